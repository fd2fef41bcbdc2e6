"""ipadapter-mlx: Stable Diffusion with IP-Adapter image prompts, in MLX.

    from ipadapter_mlx import ImagePrompt, StableDiffusion
    pipe = StableDiffusion.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    pipe.load_ip_adapter("sd15-plus", scale=0.6)
    images = pipe.generate("a lighthouse at dusk", seed=1, image_prompts=[ImagePrompt(images=[reference])])
"""

from ._blas import route_mlx_blas
from ._malloc import keep_large_buffers

route_mlx_blas()  # Linux: MLX's matrix products on OpenBLAS (see _blas.py); nothing else in the process changes
keep_large_buffers()  # Linux, CPU backend: large buffers reused from the heap, not mapped afresh (_malloc.py)

from .errors import UserError  # noqa: E402
from .ip_adapter import Features, ImagePrompt, load_features, save_features  # noqa: E402
from .pipeline import DEFAULT_MODEL, Sampling, StableDiffusion, Step, default_dtype, release_memory  # noqa: E402
from .samplers import SAMPLERS  # noqa: E402
from .t2i_adapter import T2IControl  # noqa: E402

__all__ = ["StableDiffusion", "ImagePrompt", "Features", "load_features", "save_features", "Sampling", "Step",
           "UserError", "DEFAULT_MODEL", "SAMPLERS", "default_dtype", "T2IControl", "release_memory"]
__version__ = "0.1.0"
