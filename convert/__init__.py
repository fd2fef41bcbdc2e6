"""Every remapping of PyTorch / diffusers / original-checkpoint weights into MLX arrays."""
