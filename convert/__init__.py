"""Every remapping of PyTorch / diffusers / original-checkpoint weights into MLX arrays."""

import ipadapter_mlx  # noqa: F401  (first: it routes MLX to OpenBLAS on Linux before mlx loads)
