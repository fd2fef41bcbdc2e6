"""Random-weight LoRA files in the real layouts, and the reference fusing them into torch models.

kohya's sd-scripts (networks/lora.py) wraps every Linear and 1x1 Conv2d inside the modules of the classes it
targets (Transformer2DModel; CLIPAttention, CLIPMLP), and with --conv_dim (LoCon) every Conv2d, Linear included,
inside ResnetBlock2D, Downsample2D and Upsample2D too. A layer's name is `prefix.module.child` with '.' -> '_';
prefixes lora_unet, lora_te (lora_te1, lora_te2 on SDXL); keys `<name>.lora_down.weight` (Linear (r, in) or
Conv2d (r, in, kh, kw)), `<name>.lora_up.weight` (Linear (out, r) or Conv2d (out, r, 1, 1)) and `<name>.alpha`.
SD 1.x LoRAs are trained on a diffusers-named UNet; SDXL ones on the original (sgm) UNet: input_blocks /
middle_block / output_blocks, transcribed here. Text encoders are named as transformers 4's CLIPTextModel
(`text_model.encoder...`). The PEFT layout is written by diffusers' own save_lora_weights.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TRANSFORMER = ("Transformer2DModel",)
CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_BLOCKS = ("CLIPAttention", "CLIPMLP", "CLIPSdpaAttention")


@dataclass
class Layer:
    component: str  # unet, text_encoder, text_encoder_2
    path: str  # the torch module's own name (diffusers / transformers 5)
    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None


def kohya_targets(model: torch.nn.Module, classes: tuple[str, ...], conv: bool) -> list[tuple[str, torch.nn.Module]]:
    """kohya's create_modules: Linear and 1x1 Conv2d children of the target classes; with conv, every Conv2d."""
    out = []
    for name, module in model.named_modules():
        if type(module).__name__ in classes:
            for child_name, child in module.named_modules():
                is_conv = isinstance(child, torch.nn.Conv2d)
                if isinstance(child, torch.nn.Linear) or (is_conv and (child.kernel_size == (1, 1) or conv)):
                    out.append((f"{name}.{child_name}", child))
    return out


def random_layer(component: str, path: str, module: torch.nn.Module, rank: int, alpha: float | None,
                 g: torch.Generator, size: float = 0.15) -> Layer:
    if isinstance(module, torch.nn.Conv2d):
        down = torch.randn(rank, module.in_channels, *module.kernel_size, generator=g) * size
        up = torch.randn(module.out_channels, rank, 1, 1, generator=g) * size
    else:
        down = torch.randn(rank, module.in_features, generator=g) * size
        up = torch.randn(module.out_features, rank, generator=g) * size
    return Layer(component, path, down, up, alpha)


def sgm_name(path: str, config) -> str:
    """A diffusers UNet module path -> its name in the original SDXL UNet (input_blocks / middle_block /
    output_blocks), for uniform layers_per_block."""
    per = config.layers_per_block if isinstance(config.layers_per_block, int) else config.layers_per_block[0]
    resnet = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1",
              "conv_shortcut": "skip_connection"}
    p = path.split(".")
    if p[0] == "mid_block":
        block = {("resnets", "0"): "middle_block.0", ("attentions", "0"): "middle_block.1",
                 ("resnets", "1"): "middle_block.2"}[(p[1], p[2])]
        rest = p[3:]
        kind = p[1]
    else:
        i, kind, j, rest = int(p[1]), p[2], int(p[3]), p[4:]
        if p[0] == "down_blocks":
            k = 1 + i * (per + 1)
            block = {"resnets": f"input_blocks.{k + j}.0", "attentions": f"input_blocks.{k + j}.1",
                     "downsamplers": f"input_blocks.{k + per}.0"}[kind]
        else:
            k = i * (per + 1)
            attn = "CrossAttn" in config.up_block_types[i]
            block = {"resnets": f"output_blocks.{k + j}.0", "attentions": f"output_blocks.{k + j}.1",
                     "upsamplers": f"output_blocks.{k + per}.{2 if attn else 1}"}[kind]
    if kind == "resnets":
        rest = [resnet[rest[0]]] + rest[1:]
    if kind == "downsamplers":
        rest = ["op"]
    return ".".join([block, *rest])


def kohya_file(layers: list[Layer], sdxl: bool = False, unet_config=None) -> dict[str, torch.Tensor]:
    prefix = {"unet": "lora_unet", "text_encoder": "lora_te1" if sdxl else "lora_te", "text_encoder_2": "lora_te2"}
    out = {}
    for layer in layers:
        name = layer.path
        if layer.component == "unet" and sdxl:
            name = sgm_name(name, unet_config)
        elif layer.component != "unet" and not name.startswith("text_model."):
            name = "text_model." + name  # transformers 4's CLIPTextModel, as kohya's files name it
        key = f"{prefix[layer.component]}.{name}".replace(".", "_")
        out[f"{key}.lora_down.weight"] = layer.down.contiguous()
        out[f"{key}.lora_up.weight"] = layer.up.contiguous()
        if layer.alpha is not None:
            out[f"{key}.alpha"] = torch.tensor(float(layer.alpha))
    return out


def delta(layer: Layer, weight: torch.Tensor) -> torch.Tensor:
    """kohya's LoRAInfModule.merge_to, without the multiplier."""
    scale = (layer.alpha or layer.down.shape[0]) / layer.down.shape[0]
    up, down = layer.up.float(), layer.down.float()
    if weight.ndim == 2:
        return up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1) * scale
    if down.shape[2:4] == (1, 1):
        return (up.squeeze(3).squeeze(2) @ down.squeeze(3).squeeze(2)).unsqueeze(2).unsqueeze(3) * scale
    return torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * scale


@torch.no_grad()
def fuse_into(pipe, layers: list[Layer], multiplier: float) -> None:
    """The reference: W += multiplier * delta on the torch pipeline's own modules, by their own names."""
    for layer in layers:
        module = getattr(pipe, layer.component).get_submodule(layer.path)
        module.weight += multiplier * delta(layer, module.weight)


def peft_layers(layers: list[Layer]) -> dict[str, dict[str, torch.Tensor]]:
    """{component: {module.lora_A.weight / lora_B.weight}} as diffusers' save_lora_weights takes them (the
    text encoders in transformers 4's naming, as published files have them)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for layer in layers:
        name = layer.path
        if layer.component != "unet" and not name.startswith("text_model."):
            name = "text_model." + name
        out.setdefault(layer.component, {})[f"{name}.lora_A.weight"] = layer.down.contiguous()
        out[layer.component][f"{name}.lora_B.weight"] = layer.up.contiguous()
    return out
