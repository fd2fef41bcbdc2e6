"""How much memory a generation needs: the weights resident at its peak plus the larger of the UNet's and the VAE
decoder's activations, fitted to peaks measured with `bench`. The CLI refuses a run whose estimate exceeds the
machine."""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_flatten

from .loading import component_bytes

# Activation memory, fitted to MLX's peak memory measured by `bench` with IP-Adapter-plus. GPU row: CUDA on an
# H200, SDXL at 1024x1024 and SD 1.5 at 512x512, float16, each quantization and low-memory setting; every
# measured peak lies at or under its estimate, by 2.4 GiB at most (Metal's convolutions may need less). CPU row:
# the decoder at several sizes and widths, SDXL at 1024x1024 8-bit low-memory (8.1 GiB measured, 9.3 estimated).
#   decoder: a fixed part plus bytes per output pixel per channel of the VAE's widest level. The CPU's
#            convolution is evaluated as it comes (EagerConv2d) as nine accumulated products: 52 bytes per pixel
#            per channel measured at SD 1.5's widths (256 and 512 px) and a tiny VAE alike, 56 allowed. With
#            Winograd's banded buffers (cpu.py) the decoder's peak above the weights measured 0.43 GiB at 256 px
#            and 1.13 GiB at 512 px (estimates 0.49 and 1.80).
#   UNet:    a fixed part plus a multiple of one first-level feature map of the CFG batch; on the CPU the
#            attention is not fused, so its score matrices (and their softmax) are materialised as well.
ACTIVATION_BYTES = {"gpu": {"decode_fixed": 1.4 * 2**30, "decode_per_px_ch": 60, "unet_fixed": 0.5 * 2**30,
                            "unet_maps": 85},
                    "cpu": {"decode_fixed": 0.05 * 2**30, "decode_per_px_ch": 56, "unet_fixed": 0.5 * 2**30,
                            "unet_maps": 20}}


def _backend() -> str:
    return "gpu" if mx.default_device() == mx.gpu else "cpu"


def decode_activation_bytes(channels: int, pixels: int) -> int:
    """The VAE decoder's activations for `pixels` output pixels (all images of the batch)."""
    a = ACTIVATION_BYTES[_backend()]
    return int(a["decode_fixed"] + a["decode_per_px_ch"] * pixels * channels)


def unet_activation_bytes(config, lat_h: int, lat_w: int, batch: int, itemsize: int) -> int:
    """One UNet step's activations at this latent size and batch (CFG doubles it)."""
    a = ACTIVATION_BYTES[_backend()]
    total = a["unet_fixed"] + a["unet_maps"] * batch * lat_h * lat_w * config.block_out_channels[0] * itemsize
    if _backend() == "cpu":  # unfused attention: scores and softmax, float32, at the largest attention level
        total += max((2 * batch * config.num_attention_heads[i] * (lat_h * lat_w // 4**i) ** 2 * 4
                      for i, kind in enumerate(config.down_block_types) if "Attn" in kind), default=0)
    return int(total)


LOW_MEMORY_TILE = 32  # latent pixels per side of a decoder tile in low-memory mode


def estimate_memory(pipe, height: int, width: int, num_images: int = 1) -> int:
    """Bytes a generation of `pipe` (a StableDiffusion) at this size needs at its peak: the weights resident
    then (the encoders are freed before the UNet runs in low-memory mode) plus the larger of the UNet's and the
    VAE decoder's activations. MLX arrays are lazy: the weights are counted from shapes, nothing is loaded."""
    resident = [("unet", pipe.folder)] + [("controlnet", net.folder) for net in pipe.controlnets]
    if not pipe.low_memory:
        resident += [(n, pipe.folder) for n in pipe.text_encoder_names]
        resident += [("image_encoder", la.encoder_folder) for la in pipe.adapters if la.encoder_folder]
    weights = sum(component_bytes(f, c, pipe.dtype, pipe.quantize) for c, f in resident)
    weights += sum(v.nbytes for m in (pipe.vae, *(la.adapter for la in pipe.adapters))
                   for _, v in tree_flatten(m.parameters()))
    weights += pipe.loras.resident_bytes()  # fused in place: only their own tensors add (lora.py)
    weights += pipe.t2i_adapters.memory_bytes(height, width, num_images)
    f = pipe.vae_scale_factor
    unet = unet_activation_bytes(pipe.unet_config, height // f, width // f, 2 * num_images, pipe.dtype.size)
    unet += pipe.controlnets.activation_bytes(height // f, width // f, 2 * num_images)
    tile = LOW_MEMORY_TILE * f if pipe.low_memory else None  # decode() tiles then
    decode = decode_activation_bytes(pipe.vae.config.block_out_channels[0],
                                     min(height, tile or height) * min(width, tile or width) * num_images)
    return int(weights + max(unet, decode))
