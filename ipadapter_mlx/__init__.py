"""ipadapter-mlx: Stable Diffusion (and, next, IP-Adapter image prompts) in MLX.

    from ipadapter_mlx import StableDiffusion
    pipe = StableDiffusion.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    images = pipe.generate("a lighthouse at dusk", steps=25, seed=1)
"""

from .errors import UserError
from .ip_adapter import Features, ImagePrompt, load_features, save_features
from .pipeline import DEFAULT_MODEL, Sampling, StableDiffusion, Step, default_dtype
from .samplers import SAMPLERS

__all__ = ["ImagePrompt", "Features", "load_features", "save_features", "StableDiffusion", "Sampling", "Step", "UserError", "DEFAULT_MODEL", "SAMPLERS", "default_dtype"]
__version__ = "0.1.0"
