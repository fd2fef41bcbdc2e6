"""Text-to-image and image-to-image with classifier-free guidance; sampling is a generator over steps.

`StableDiffusion` holds the components of a converted folder and orchestrates a generation: prompts through
`PromptEncoder` (prompts.py), reference images through the `AdapterSet` (adapters.py), both into one
`Conditioning` (conditioning.py), sampled with a `Denoiser` (denoiser.py); the memory model is memory.py.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import mlx.core as mx
import numpy as np
from PIL import Image

from . import _malloc, cache, inpainting, memory
from .adapters import AdapterSet
from .conditioning import Conditioning
from .controlnet import Control, ControlNetSet
from .controlnet import default_size as controlnet_default_size
from .config import SchedulerConfig, UNetConfig
from .denoiser import CFGSplit, Denoiser, StepHook
from .errors import UserError, finite
from .images import to_pil, to_pixels
from .ip_adapter import Features, ImagePrompt
from .loading import build, load_component, load_scheduler_config, read_json, read_safetensors
from .lora import Lora, LoraSet
from .memory import LOW_MEMORY_TILE
from .prompts import PromptEncoder
from .samplers import NoiseFn, alphas_cumprod, make_schedule, run_sampler
from .steering import Timeline
from .t2i_adapter import T2IAdapterSet, T2IControl

log = logging.getLogger(__name__)
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULT_SCHEDULER = "dpmpp-2m-karras"
DEFAULT_STEPS = 25
DEFAULT_STRENGTH = 0.8  # image-to-image, as diffusers


def default_dtype() -> mx.Dtype:
    """float16 where a GPU runs MLX (Metal/CUDA); float32 on the CPU, where half matmul is slow."""
    return mx.float16 if mx.default_device() == mx.gpu else mx.float32


@dataclass
class Step:
    """One sampling step: `latents` are the current (sigma-space) latents, NHWC."""

    index: int
    total: int
    latents: mx.array


def decode_tiled(vae, z: mx.array, tile: int, overlap: int = 8) -> mx.array:
    """Decode (B, h, w, C) latents tile by tile; overlaps are blended with linear ramps so no seam shows."""
    B, h, w, _ = z.shape
    if h <= tile and w <= tile:
        return vae.decode(z)
    f = vae.scale_factor
    stride = tile - overlap
    out = mx.zeros((B, h * f, w * f, vae.config.out_channels))
    weight = mx.zeros((1, h * f, w * f, 1))
    for y in range(0, max(h - overlap, 1), stride):
        for x in range(0, max(w - overlap, 1), stride):
            y0, x0 = min(y, max(h - tile, 0)), min(x, max(w - tile, 0))
            part = vae.decode(z[:, y0 : y0 + tile, x0 : x0 + tile]).astype(mx.float32)
            th, tw = part.shape[1:3]
            ramp_y = mx.minimum(mx.minimum(mx.arange(th) + 1, th - mx.arange(th)), overlap * f) / (overlap * f)
            ramp_x = mx.minimum(mx.minimum(mx.arange(tw) + 1, tw - mx.arange(tw)), overlap * f) / (overlap * f)
            m = (ramp_y[:, None] * ramp_x[None, :])[None, :, :, None]
            out[:, y0 * f : y0 * f + th, x0 * f : x0 * f + tw] += part * m
            weight[:, y0 * f : y0 * f + th, x0 * f : x0 * f + tw] += m
            mx.eval(out, weight)
    return out / weight


class Sampling:
    """The steps of one generation: iterate for Steps (stop early by breaking), len() gives their count."""

    def __init__(self, steps: Iterator[Step], total: int, inpaint: "inpainting.Inpaint | None" = None):
        self._steps, self.total = steps, total
        self.inpaint = inpaint  # its overlay() turns the decoded pictures into the final ones

    def __iter__(self) -> Iterator[Step]:
        return self._steps

    def __len__(self) -> int:
        return self.total


def all_finite(*arrays: mx.array | None) -> bool:
    return all(a is None or bool(mx.isfinite(a).all()) for a in arrays)


def seeded_noise(seed: int | None) -> NoiseFn:
    """A noise source: each call draws from its own split of the seed's key."""
    key = mx.random.key(seed if seed is not None else np.random.randint(0, 2**31 - 1))

    def draw(shape: tuple[int, ...]) -> mx.array:
        nonlocal key
        key, sub = mx.random.split(key)
        return mx.random.normal(shape, key=sub)

    return draw


def release_memory() -> None:
    """Give memory freed by MLX back to the system: MLX's buffer cache (GPU backends) and, on the CPU backend
    under glibc, the heap's free blocks, which are otherwise kept for reuse (_malloc.py). `generate` does this at
    its end; call it after `generate_latents` + `decode` when the process stays alive with other work to do."""
    mx.clear_cache()
    _malloc.release()


def prompt_lists(prompt: str | list[str], negative_prompt: str | list[str] | None, num_images: int,
                 zeros_for_empty: bool) -> tuple[list[str], list[str], bool]:
    """Prompts and negative prompts, one per picture, and whether the negative embeddings are zeros (SDXL's
    force_zeros_for_empty_prompt when no negative prompt is given)."""
    if num_images < 1:
        raise UserError(f"num_images must be at least 1, got {num_images}")
    prompts = [prompt] * num_images if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise UserError("no prompt given (an empty list)")
    zero_negative = negative_prompt is None and zeros_for_empty
    negative_prompt = "" if negative_prompt is None else negative_prompt
    negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != len(prompts):
        raise UserError(f"{len(prompts)} prompts but {len(negatives)} negative prompts")
    return prompts, negatives, zero_negative


def given_latents(latents: np.ndarray | mx.array, shape: tuple[int, ...], f: int) -> mx.array:
    """`latents=` in diffusers' layout (B, C, H/f, W/f), checked against the NHWC `shape`, as NHWC float32."""
    given = np.asarray(latents.astype(mx.float32) if isinstance(latents, mx.array) and
                       mx.issubdtype(latents.dtype, mx.floating) else latents)
    if not np.issubdtype(given.dtype, np.floating):
        raise UserError(f"latents must be floating point, got {given.dtype}")
    if not np.isfinite(given).all():
        raise UserError("latents hold NaN or Inf values")
    start_noise = mx.array(given.astype(np.float32))
    expected = (shape[0], shape[3], shape[1], shape[2])
    if tuple(start_noise.shape) != expected:
        raise UserError(f"latents have shape {tuple(start_noise.shape)}, expected {expected} "
                        f"(batch, channels, height/{f}, width/{f})")
    return start_noise.transpose(0, 2, 3, 1)


class StableDiffusion:
    """A loaded SD 1.x/2.x or SDXL pipeline: text encoder(s), UNet, VAE, tokenizer(s), the noise schedule, and
    the IP-Adapters loaded into it. The kind is read from the folder: SDXL has a second text encoder."""

    def __init__(self, folder: str | Path, dtype: mx.Dtype | None = None, quantize: tuple[int, int] | None = None,
                 low_memory: bool = False):
        """`quantize` = (bits, group_size) quantizes the Linear layers of the text encoder, UNet and image
        encoder on load. `low_memory` frees the text and image encoders after use and decodes in tiles."""
        self.folder = Path(folder)
        self.dtype = dtype or default_dtype()
        self.quantize = quantize
        self.low_memory = low_memory
        self.prompts = PromptEncoder(self.folder, self.dtype, quantize)
        self.loras = LoraSet()
        # an encoder (re)loaded after a low-memory run gets them too
        self.prompts.on_load = lambda name, model: self.loras.apply(name, model, self._weights_file(name))
        index = self.folder / "model_index.json"
        self.force_zeros_for_empty_prompt = self.is_sdxl and (
            read_json(index).get("force_zeros_for_empty_prompt", True) if index.is_file() else True)
        self.unet_config = UNetConfig.from_dict(read_json(self.folder / "unet" / "config.json"))
        self._unet = None
        if not low_memory:  # low-memory mode loads it after the encoders have run and been freed
            self._unet = load_component(folder, "unet", self.dtype, quantize)
        # the VAE stays float32 under half precision: one decode per image, and no black/NaN pictures
        self.vae = load_component(folder, "vae", mx.float32)
        self.scheduler_config: SchedulerConfig = load_scheduler_config(folder)
        self.adapters = AdapterSet(self.dtype, quantize)
        self.t2i_adapters = T2IAdapterSet(self.dtype, self.vae_scale_factor)
        self.controlnets = ControlNetSet(self.dtype, quantize, low_memory)

    @classmethod
    def from_pretrained(cls, model: str = DEFAULT_MODEL, dtype: mx.Dtype | None = None,
                        quantize: tuple[int, int] | None = None, low_memory: bool = False,
                        **resolve_kw) -> "StableDiffusion":
        """`model`: a Hub repo id, a diffusers folder, a single .safetensors/.ckpt file, or a converted MLX folder."""
        return cls(cache.resolve_model(model, **resolve_kw), dtype, quantize, low_memory)

    @property
    def unet(self):
        if self._unet is None:
            self._unet = load_component(self.folder, "unet", self.dtype, self.quantize)
            self.loras.apply("unet", self._unet, self._weights_file("unet"))
        return self._unet

    @property
    def text_encoder_names(self) -> list[str]:
        return self.prompts.names

    @property
    def is_sdxl(self) -> bool:
        return self.prompts.is_sdxl

    @property
    def tokenizers(self) -> list:
        return self.prompts.tokenizers

    def text_model(self, name: str = "text_encoder"):
        """A text encoder, loaded on first use (and again after a low-memory run freed it)."""
        return self.prompts.model(name)

    @property
    def text_encoder(self):
        return self.text_model("text_encoder")

    @property
    def vae_scale_factor(self) -> int:
        return self.vae.scale_factor

    @property
    def default_size(self) -> int:
        return self.unet_config.sample_size * self.vae_scale_factor

    def output_size(self, height: int | None, width: int | None,
                    init_image: Image.Image | np.ndarray | None = None) -> tuple[int, int]:
        """(height, width) a generation renders: as given, else the init image's size rounded down to a
        multiple of the VAE's factor, else the model's native size. Fails for sizes that cannot be rendered."""
        f = self.vae_scale_factor
        if init_image is not None:
            h0, w0 = init_image.shape[:2] if isinstance(init_image, np.ndarray) else init_image.size[::-1]
            if w0 < f or h0 < f:  # it would give a 0-pixel size: refuse rather than ignore it
                raise UserError(f"the init image is {w0}x{h0} pixels; it must be at least {f}x{f}")
            height, width = height or h0 - h0 % f, width or w0 - w0 % f
        height, width = height or self.default_size, width or self.default_size
        for name, v in (("height", height), ("width", width)):
            if v <= 0 or v % f:
                raise UserError(f"{name} must be a positive multiple of {f}, got {v}")
        return height, width

    def estimate_memory(self, height: int, width: int, num_images: int = 1) -> int:
        """Bytes a generation at this size needs at its peak (memory.py); the CLI refuses runs that exceed the
        machine. An adapter's image encoder counts once `image_encoder_folder(index)` has found it."""
        return memory.estimate_memory(self, height, width, num_images)

    # -- IP-Adapters (adapters.py holds them) ---------------------------------------------------------

    def load_ip_adapter(self, ref: str, image_encoder: str | None = None, scale: float | dict = 1.0,
                        lora_scale: float | None = None) -> int:
        """Add an IP-Adapter (preset name, `REPO:PATH`, or file); returns its index for image_prompts.

        Fails before any work when the adapter was made for another UNet. The image encoder is found
        (beside the adapter, or the one its shapes call for; `image_encoder` overrides) on first use.
        FaceID: the LoRA in its file (or `NAME_lora.safetensors` beside it) is fused at `lora_scale` (default 1)."""
        from . import faceid

        # without a loaded UNet its structure suffices (MLX arrays are lazy: building it costs no memory)
        unet = self._unet if self._unet is not None else build("unet", read_json(self.folder / "unet" / "config.json"))
        index = self.adapters.load(ref, unet, image_encoder, scale)
        try:
            faceid.attach_lora(self, index, lora_scale)
        except BaseException:
            self.adapters.unload(index)
            raise
        return index

    def unload_ip_adapter(self, index: int | None = None) -> None:
        """Remove one adapter (by index) or all (and a FaceID adapter's LoRA); the UNet is then exactly the base
        model again."""
        from . import faceid

        gone = list(self.adapters) if index is None else [self.adapters[index]]
        self.adapters.unload(index)
        faceid.detach_lora(self, gone)

    def set_ip_adapter_scale(self, *scales: float | dict) -> None:
        """One scale per loaded adapter: a number, or a per-block dict in diffusers' form, e.g.
        `{"up": {"block_0": [0.0, 1.0, 0.0]}}` (blocks not named get 0)."""
        self.adapters.set_scales(*scales)

    def image_encoder_folder(self, index: int = 0) -> Path:
        """The converted folder of the vision tower adapter `index` reads (found and converted on first use,
        not loaded), and says which encoder it is."""
        return self.adapters.encoder_folder(index)

    def image_encoder(self, index: int = 0):
        """The CLIP vision tower adapter `index` reads (found, converted and loaded on first use)."""
        return self.adapters.encoder(index)

    def encode_reference(self, images: list[Image.Image], index: int = 0, fit: str = "crop",
                         negative: Image.Image | None = None) -> Features:
        """CLIP features of reference images, as adapter `index` reads them (embeds or hidden states)."""
        return self.adapters.encode(images, index, fit, negative)

    # -- LoRAs (lora.py holds them) -------------------------------------------------------------------

    def load_lora(self, ref: str | Lora, scale: float = 1.0) -> int:
        """Add a LoRA (a file, `REPO:PATH`, or a `Lora` built in code) at `scale`; returns its index. Its deltas
        are fused into the UNet and text encoder weights; fails before any change when it does not fit."""
        from . import discovery
        from .lora import check_lora, read_lora

        finite("LoRA scale", scale)
        # the models' structures name and size every layer (MLX arrays are lazy: building them costs nothing)
        models = {n: build(n, read_json(self.folder / n / "config.json")) for n in ("unet", *self.text_encoder_names)}
        if isinstance(ref, Lora):
            check_lora(ref, models)
            lora = ref
        else:
            lora = read_lora(discovery.resolve_lora(ref), models)
        index = self.loras.add(lora, scale, ref if isinstance(ref, str) else None)
        self._fuse_loras()
        return index

    def unload_lora(self, which: int | str | None = None) -> None:
        """Remove one LoRA (by index or the ref it was loaded with) or all: the weights they touched get their
        original arrays back, bit for bit."""
        self.loras.remove(which)
        self._fuse_loras()

    def set_lora_scale(self, *scales: float) -> None:
        """One scale per loaded LoRA, in load order (the weights are fused again from the kept originals)."""
        self.loras.set_scales(*scales)
        self._fuse_loras()

    def _fuse_loras(self) -> None:
        for name, model in {"unet": self._unet, **self.prompts.models}.items():
            if model is not None:
                self.loras.apply(name, model, self._weights_file(name))

    def _weights_file(self, component: str):
        """The component's weights, lazily: fused layers' originals are re-read from here, not kept in memory."""
        return lambda: read_safetensors(self.folder / component / "model.safetensors")[0]

    # -- T2I-Adapters (t2i_adapter.py) ----------------------------------------------------------------

    def load_t2i_adapter(self, ref: str) -> int:
        """Add a T2I-Adapter (preset, Hub repo, `REPO:FOLDER`, diffusers or converted folder, single file or
        `REPO:PATH` to one); returns its index for T2IControl. Fails when it was made for another model family:
        before its weights are downloaded (a folder or repo), before anything is written (a single file)."""
        return self.t2i_adapters.load(ref, self.unet_config, self.is_sdxl)

    def unload_t2i_adapter(self, index: int | None = None) -> None:
        self.t2i_adapters.unload(index)

    # -- ControlNets (controlnet.py holds them) ---------------------------------------------------------

    def load_controlnet(self, ref: str, config: dict | None = None) -> int:
        """Add a ControlNet (preset, diffusers folder, Hub repo or REPO:FOLDER, original .pth/.safetensors file,
        REPO:PATH); returns its index for `Control(index=...)`. Fails at once when it is for another model family.
        `config`: an original single file's diffusers config.json (dict), instead of inferring it."""
        return self.controlnets.load(ref, self.unet_config, config)

    def control_size(self, height: int | None, width: int | None, controls: list[Control] | None = None,
                     t2i_adapters: list[T2IControl] | None = None) -> tuple[int | None, int | None]:
        """Text-to-image sides not given: the first ControlNet control image's, else the first T2I-Adapter's,
        rounded down as diffusers' ControlNet and adapter pipelines round them."""
        height, width = controlnet_default_size(controls or [], height, width, self.vae_scale_factor)
        return self.t2i_adapters.default_size(t2i_adapters or [], height, width)

    def unload_controlnet(self, index: int | None = None) -> None:
        """Remove one ControlNet (by index) or all."""
        self.controlnets.unload(index)

    # -- non-finite numbers ---------------------------------------------------------------------------

    def nonfinite_cause(self) -> str:
        """Why a result holds NaN/Inf: the first loaded weight that does, else half-precision overflow or the
        inputs. Run only after a failed check: it reads every weight once."""
        from mlx.utils import tree_flatten

        modules = {"UNet": self._unet, "VAE": self.vae,
                   **{n.replace("_", " "): m for n, m in self.prompts.models.items()},
                   **{f"image encoder {f.name}": m for f, m in self.adapters.encoders.items()},
                   **{f"IP-Adapter {la.ref}": la.adapter for la in self.adapters},
                   **{f"ControlNet {net.ref}": net.model for net in self.controlnets}}
        for name, module in modules.items():
            for key, v in tree_flatten(module.parameters()) if module is not None else []:
                if mx.issubdtype(v.dtype, mx.floating) and not all_finite(v):
                    return f"the {name} weights hold NaN/Inf ({key})"
        if self.dtype != mx.float32:
            return f"{str(self.dtype).rpartition('.')[2]} overflowed; try float32 (--dtype float32)"
        return "the inputs (image prompts, embeddings) hold NaN/Inf, or the model overflowed"

    # -- conditioning ---------------------------------------------------------------------------------

    def encode_prompt(self, prompts: list[str], what: str = "prompt") -> tuple[mx.array, mx.array | None]:
        """(token embeddings (B, 77, D), pooled embedding or None), as diffusers' pipelines compute them
        (prompts.py); a prompt over 77 tokens is cut with a warning naming `what`."""
        return self.prompts(prompts, what)

    def encode_image(self, pixels: mx.array, noise: NoiseFn) -> mx.array:
        """(B, H, W, 3) in [-1, 1] -> scaled latents, sampled from the VAE's distribution."""
        mean, std = self.vae.encode(pixels.astype(self.vae.decoder.conv_in.weight.dtype))
        return self.vae.to_latents(mean + std * noise(mean.shape).astype(mean.dtype))

    def decode(self, latents: mx.array, tile: int | None = None) -> mx.array:
        """Scaled latents (NHWC) -> images (B, H, W, 3) in [0, 1]. `tile` (latent pixels; default in low-memory
        mode: LOW_MEMORY_TILE) decodes overlapping tiles and blends them, bounding the decoder's memory."""
        z = self.vae.from_latents(latents.astype(self.vae.decoder.conv_in.weight.dtype))
        tile = tile or (LOW_MEMORY_TILE if self.low_memory else None)
        x = decode_tiled(self.vae, z, tile) if tile else self.vae.decode(z)
        if not all_finite(x):  # NaN would turn into a black picture
            raise UserError(f"the VAE decoder produced NaN/Inf: {self.nonfinite_cause()}")
        return mx.clip(x.astype(mx.float32) / 2 + 0.5, 0.0, 1.0)

    # -- sampling -------------------------------------------------------------------------------------

    def text_conditioning(self, prompts: list[str], negatives: list[str] | None, zero_negative: bool,
                          original_size: tuple[int, int], crop_coords: tuple[int, int],
                          target_size: tuple[int, int]) -> tuple[mx.array, mx.array | None, dict]:
        """Text embeddings (with CFG, `negatives` given: the negatives' first, zeros for `zero_negative`), pooled
        embeddings (SDXL) and SDXL's added conditioning (micro-conditioning ids)."""
        text, pooled = self.encode_prompt(prompts)
        if negatives is not None:
            if zero_negative:
                neg_text, neg_pooled = mx.zeros_like(text), None if pooled is None else mx.zeros_like(pooled)
            else:
                neg_text, neg_pooled = self.encode_prompt(negatives, "negative prompt")
            text = mx.concatenate([neg_text, text])
            pooled = None if pooled is None else mx.concatenate([neg_pooled, pooled])
        added = {}
        if self.is_sdxl:
            ids = [*original_size, *crop_coords, *target_size]
            added = {"text_embeds": pooled, "time_ids": mx.array([ids] * text.shape[0], dtype=mx.float32)}
        return text, pooled, added

    def start_latents(self, shape: tuple[int, ...], schedule, sigmas: np.ndarray, noise: NoiseFn,
                      latents: np.ndarray | mx.array | None, init_image, strength: float, scheduler: str,
                      mask_image, mask_blur: float, padding_mask_crop: int | None):
        """The latents sampling starts from (in sigma space), and the inpainting state (None without a mask):
        pure noise, an image noised to the first sigma (image-to-image), or inpainting.py's start."""
        f = self.vae_scale_factor
        if mask_image is not None or (mask_blur or padding_mask_crop is not None):
            if mask_image is None:
                raise UserError("mask_blur and padding_mask_crop are for inpainting: give a mask_image too")
            start_noise = noise if latents is None else given_latents(latents, shape, f)
            inpaint, x = inpainting.Inpaint.prepare(self, init_image, mask_image, shape, sigmas, schedule.init_sigma,
                                                    scheduler, strength, start_noise, noise, mask_blur,
                                                    padding_mask_crop)
            return x, inpaint
        if init_image is not None:
            height, width = shape[1] * f, shape[2] * f
            pixels = to_pixels(init_image, (width, height))
            x0 = self.encode_image(mx.concatenate([pixels] * shape[0]), noise)
            return x0.astype(mx.float32) + noise(shape) * float(sigmas[0]), None
        start_noise = noise(shape) if latents is None else given_latents(latents, shape, f)
        return start_noise * schedule.init_sigma, None

    def generate_latents(
        self,
        prompt: str | list[str],
        negative_prompt: str | list[str] | None = None,
        steps: int = DEFAULT_STEPS,
        cfg: float = 7.5,
        seed: int | None = None,
        height: int | None = None,
        width: int | None = None,
        scheduler: str = DEFAULT_SCHEDULER,
        num_images: int = 1,
        init_image: Image.Image | np.ndarray | None = None,
        strength: float = DEFAULT_STRENGTH,
        latents: np.ndarray | mx.array | None = None,
        noise: NoiseFn | None = None,
        image_prompts: list[ImagePrompt | None] | None = None,
        original_size: tuple[int, int] | None = None,
        crop_coords: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        hooks: list[StepHook] = (),
        controls: list[Control] | None = None,
        t2i_adapters: list[T2IControl] | None = None,
        timestep_spacing: str | None = None,
        eta: float | None = None,
        mask_image: Image.Image | np.ndarray | None = None,
        mask_blur: float = 0.0,
        padding_mask_crop: int | None = None,
        parallel_cfg: "mx.distributed.Group | None" = None,
    ) -> "Sampling":
        """Iterate for a Step after every sampling step; the last Step's latents are the final (scaled) latents.

        Inputs are checked and encoded here, before the first step; `len()` of the result is the step count.

        `latents` is the starting noise in diffusers' layout (B, C, H/8, W/8), as its `latents=` takes it.
        `noise` replaces the seeded noise source (it is called in diffusers' order: VAE sample, start noise,
        then one draw per ancestral step), so a diffusers run can be reproduced exactly.
        `image_prompts`: one ImagePrompt (or None to leave it out) per loaded IP-Adapter, in load order.
        SDXL micro-conditioning: `original_size` and `target_size` as (height, width), default the output
        size, and `crop_coords` (top, left), as diffusers' defaults. `negative_prompt=None` on SDXL gives zero
        negative embeddings (its force_zeros_for_empty_prompt), as diffusers does.
        `hooks`: functions called at every step with the UNet's input (denoiser.py), which they may replace.
        `controls`: one Control (control image, scale, start/end, guess mode) per ControlNet used (controlnet.py).
        `t2i_adapters`: one T2IControl per T2I-Adapter to use (several add up); without a height/width or an
        init image, the size is the first control image's, as in diffusers' adapter pipelines.
        `timestep_spacing` (leading/trailing/linspace) overrides the scheduler config's; `eta` is TCD's gamma
        (samplers.py; fast.py has the few-step presets).
        Inpainting (inpainting.py): `mask_image` (white = repaint) with `init_image`, blurred by `mask_blur`
        pixels; `padding_mask_crop` repaints only a crop around the mask (the result's `inpaint.overlay` pastes
        it back); `latents` is then diffusers' `latents=` of its inpainting pipelines.
        `parallel_cfg`: a group of 2 ranks (`mx.distributed.init()` under `mlx.launch -n 2`) that share the work of
        classifier-free guidance: each runs the UNet on one half of the CFG batch (denoiser.CFGSplit); every rank
        calls this with the same arguments and gets the same result (without a seed, rank 0's random one; a
        `noise` function must draw the same on every rank).
        """
        prompts, negatives, zero_negative = prompt_lists(prompt, negative_prompt, num_images,
                                                         self.force_zeros_for_empty_prompt)
        batch = len(prompts)
        if seed is not None and not (type(seed) is int and 0 <= seed < 2**64):
            raise UserError(f"seed must be a whole number in 0..2**64-1, got {seed!r}")
        split = CFGSplit(parallel_cfg) if parallel_cfg is not None else None
        if split is not None and seed is None and noise is None:  # one random seed for both ranks: rank 0's
            seed = split.seed()
        noise = noise or seeded_noise(seed)
        f = self.vae_scale_factor

        finite("cfg", cfg)
        if init_image is not None and not 0 < strength <= 1:
            raise UserError(f"strength must be in (0, 1], got {strength}")
        if init_image is None and strength != DEFAULT_STRENGTH:
            raise UserError("strength is for image-to-image: give an init_image too")
        train_steps = self.scheduler_config.num_train_timesteps
        if not 1 <= steps <= train_steps:
            raise UserError(f"steps must be in 1..{train_steps} (the model's training timesteps), got {steps}")
        if init_image is None:
            height, width = self.control_size(height, width, controls, t2i_adapters)
        height, width = self.output_size(height, width, init_image)
        shape = (batch, height // f, width // f, self.vae.config.latent_channels)
        inpainting.check_unet(self.unet_config.in_channels, shape[3], mask_image is not None)

        schedule = make_schedule(scheduler, self.scheduler_config, steps, timestep_spacing, eta)
        timesteps, sigmas = schedule.timesteps, schedule.sigmas
        if init_image is not None:
            # diffusers' img2img: skip the first (1 - strength) of the schedule, noise the image to that level
            start = steps - min(int(steps * strength), steps)
            if start >= steps:
                raise UserError(f"strength {strength} with {steps} steps leaves no step to run")
            timesteps, sigmas = timesteps[start:], sigmas[start:]
        x, inpaint = self.start_latents(shape, schedule, sigmas, noise, latents, init_image, strength, scheduler,
                                        mask_image, mask_blur, padding_mask_crop)
        if split is not None:
            x = split.rank0s(x)

        guided = cfg > 1.0
        control_hook = None  # control images checked and prepared before the prompts are encoded; N = steps run
        if controls:
            control_hook = self.controlnets.hook(controls, (width, height), len(timesteps), guided)
        text, pooled, added = self.text_conditioning(prompts, negatives if guided else None, zero_negative,
                                                     original_size or (height, width), crop_coords,
                                                     target_size or (height, width))
        ac = alphas_cumprod(self.scheduler_config)  # the training schedule: ComfyUI's percentages map onto it
        timeline = Timeline(len(timesteps), np.sqrt((1 - ac) / ac))
        content = lambda text: self.encode_prompt([text], "negative content prompt")[1]  # noqa: E731
        images = (self.adapters.conditions(image_prompts, batch, guided, timeline, (height, width), content)
                  if image_prompts else [])
        cond = Conditioning(text, added, images)
        if t2i_adapters:
            hooks = [*hooks, *self.t2i_adapters.hooks(t2i_adapters, batch, guided, (height, width), len(timesteps))]
        tokens = [c.tokens for c in images]
        mx.eval(text, x, added, tokens)
        for what, values in (("the text embeddings", [text, pooled]), ("the starting latents", [x]),
                             ("the image-prompt tokens", tokens)):
            if not all_finite(*values):
                raise UserError(f"{what} hold NaN/Inf: {self.nonfinite_cause()}")
        if self.low_memory:  # the encoders' work is done: give their memory to the UNet and the VAE
            self.prompts.free()
            self.adapters.encoders.clear()
            release_memory()
        denoise = Denoiser(self.unet, cond, timesteps, sigmas, cfg, self.scheduler_config.prediction_type,
                           self.dtype, list(hooks) + ([inpaint.hook] if inpaint else []) +
                           # after the inpaint hook: the nets read the latents the UNet reads, as diffusers' ControlNet
                           # inpaint pipeline (with a 4-channel UNet the known region blended back; controlnet.py
                           # takes the latent channels of a 9-channel input)
                           ([control_hook] if control_hook else []), split)
        total = len(timesteps)

        def steps() -> Iterator[Step]:
            for i, x_i in enumerate(run_sampler(scheduler, self.scheduler_config, denoise, x, sigmas, noise,
                                                timesteps, eta, len(schedule.timesteps))):
                mx.eval(x_i)
                if not all_finite(x_i):  # one small reduction per step
                    raise UserError(f"sampling produced NaN/Inf at step {i + 1} of {total}: {self.nonfinite_cause()}")
                if i == total - 1:
                    x_i = x_i / math.sqrt(float(sigmas[-1]) ** 2 + 1)  # from sigma space to diffusers' latents
                if inpaint is not None:  # 4 channels: the known region back (inpainting.py says why it is exact)
                    x_i = inpaint.blend(x_i, i, last=i == total - 1)
                yield Step(i, total, x_i)

        return Sampling(steps(), total, inpaint)

    def generate(self, prompt: str | list[str], return_array: bool = False, keep_unmasked: bool = False,
                 **kw) -> list[Image.Image] | mx.array:
        """Run all steps and decode: PIL images, or the (B, H, W, 3) array in [0, 1] with return_array=True.
        Inpainting with `keep_unmasked` (or padding_mask_crop) pastes the original back outside the mask."""
        if keep_unmasked and kw.get("mask_image") is None:
            raise UserError("keep_unmasked is for inpainting: give a mask_image too")
        step = None
        sampling = self.generate_latents(prompt, **kw)
        for step in sampling:
            pass
        images = self.decode(step.latents)
        mx.eval(images)
        release_memory()  # the generation's activations: kept for reuse while it ran, given back now
        if sampling.inpaint is not None and (keep_unmasked or sampling.inpaint.crop is not None):
            pictures = sampling.inpaint.overlay(images, keep_unmasked)
            return mx.array(np.stack([np.asarray(p) for p in pictures]) / 255.0) if return_array else pictures
        return images if return_array else to_pil(images)
