"""MLX modules. Parameter names follow diffusers/transformers, so a diffusers checkpoint maps 1:1."""

from .clip import CLIPTextModel, CLIPVisionModel
from .controlnet import ControlNetModel
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL

__all__ = ["CLIPTextModel", "CLIPVisionModel", "UNet2DConditionModel", "AutoencoderKL", "ControlNetModel"]
