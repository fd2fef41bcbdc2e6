"""T2IAdapter (diffusers' models/adapter.py, NHWC here), sized from its config.json.

A control image (in [0, 1]) goes through a pixel unshuffle and a few residual blocks; the feature map after each
block is what the UNet adds inside its down blocks (diffusers' down_intrablock_additional_residuals). Three
layouts: `full_adapter` (SD 1.x/2.x, one level per UNet down block), `full_adapter_xl` (SDXL: unshuffle 16, one
downsampling) and `light_adapter` (the small "color" adapters). Parameter names are diffusers', so a
diffusers checkpoint maps 1:1 (1x1 convolutions are Linear layers here, as in the UNet).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from ..config import ConfigFile
from ..errors import UserError

ADAPTER_TYPES = ("full_adapter", "full_adapter_xl", "light_adapter")
MAX_DOWNSCALE = 64  # pixel unshuffle factor; the published adapters use 8 (SD 1.x) and 16 (SDXL)
MAX_RES_BLOCKS = 64  # per level; the published ones have 2 (full) and 4 (light)


@dataclass
class T2IAdapterConfig(ConfigFile):
    in_channels: int = 3
    channels: list[int] = field(default_factory=lambda: [320, 640, 1280, 1280])
    num_res_blocks: int = 2
    downscale_factor: int = 8
    adapter_type: str = "full_adapter"

    @classmethod
    def _parse(cls, d: dict) -> "T2IAdapterConfig":
        if d.get("_class_name", "T2IAdapter") != "T2IAdapter":
            raise UserError(f"config.json describes a {d['_class_name']!s:.60}, not a T2IAdapter")
        kind = d.get("adapter_type", "full_adapter")
        if kind not in ADAPTER_TYPES:
            raise UserError(f"unsupported T2I-Adapter adapter_type {kind!r:.60} "
                            f"(supported: {', '.join(ADAPTER_TYPES)})")
        c = cls(in_channels=d.get("in_channels", 3), channels=list(d.get("channels", [320, 640, 1280, 1280])),
                num_res_blocks=d.get("num_res_blocks", 2), downscale_factor=d.get("downscale_factor", 8),
                adapter_type=kind)
        if not c.channels or not all(type(v) is int and v > 0 for v in c.channels):
            raise UserError(f"T2I-Adapter config: channels must be positive whole numbers, got {c.channels!s:.80}")
        if type(c.downscale_factor) is not int or not 1 <= c.downscale_factor <= MAX_DOWNSCALE:
            raise UserError(f"T2I-Adapter config: downscale_factor must be in 1..{MAX_DOWNSCALE}, "
                            f"got {c.downscale_factor!r:.40}")
        if type(c.num_res_blocks) is not int or not 1 <= c.num_res_blocks <= MAX_RES_BLOCKS:
            raise UserError(f"T2I-Adapter config: num_res_blocks must be in 1..{MAX_RES_BLOCKS}, "
                            f"got {c.num_res_blocks!r:.40}")
        if c.in_channels not in (1, 3):  # the control image is a grey (1) or an RGB (3) picture
            raise UserError(f"T2I-Adapter config: in_channels={c.in_channels!r:.40}; control images have 1 (grey) "
                            "or 3 (RGB) channels")
        if kind == "full_adapter_xl" and any(a != b for a, b in zip(c.channels[2:], c.channels[3:])):
            # diffusers' FullAdapterXL feeds level i-1's output into a block built for channels[i] from level 3 on
            raise UserError(f"T2I-Adapter config: full_adapter_xl needs equal channels from the third level on, "
                            f"got {c.channels}")
        if kind == "light_adapter" and any(v < 4 for v in c.channels):
            raise UserError(f"T2I-Adapter config: light_adapter channels must be at least 4, got {c.channels}")
        return c

    def features(self) -> list[tuple[int, int]]:
        """(channels, stride in pixels) of each feature map, in the order the UNet consumes them."""
        d, ch = self.downscale_factor, self.channels
        if self.adapter_type == "full_adapter":
            return [(c, d * 2**i) for i, c in enumerate(ch)]
        if self.adapter_type == "full_adapter_xl":  # only the third block downsamples
            return [(c, d if i < 2 else 2 * d) for i, c in enumerate(ch)]
        return [(c, d * 2**i) for i, c in enumerate(ch)] + [(ch[-1], d * 2 ** len(ch))]  # light_adapter

    @property
    def total_downscale_factor(self) -> int:
        return self.features()[-1][1]


def pixel_unshuffle(x: mx.array, r: int) -> mx.array:
    """torch's PixelUnshuffle on NHWC: (B, H, W, C) -> (B, H/r, W/r, C*r*r), channel c*r*r + i*r + j taking the
    pixel at row offset i, column offset j."""
    B, H, W, C = x.shape
    x = x.reshape(B, H // r, r, W // r, r, C).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(B, H // r, W // r, C * r * r)


def avg_pool_ceil(x: mx.array) -> mx.array:
    """torch's AvgPool2d(2, 2, ceil_mode=True): an odd side gets a last window over the one row (column) that is
    there, averaged over the pixels it covers."""
    B, H, W, C = x.shape
    ph, pw = H % 2, W % 2
    x = mx.pad(x, [(0, 0), (0, ph), (0, pw), (0, 0)])
    total = x.reshape(B, (H + ph) // 2, 2, (W + pw) // 2, 2, C).sum(axis=(2, 4))
    if not (ph or pw):
        return total / 4
    rows = mx.array([2.0] * (H // 2) + [1.0] * ph)
    cols = mx.array([2.0] * (W // 2) + [1.0] * pw)
    return total / (rows[:, None] * cols[None, :])[None, :, :, None].astype(x.dtype)


class AdapterResnetBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.block2 = nn.Linear(ch, ch)  # a 1x1 convolution

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.block2(nn.relu(self.block1(x)))


class LightAdapterResnetBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.block1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.block2 = nn.Conv2d(ch, ch, 3, padding=1)

    def __call__(self, x: mx.array) -> mx.array:
        return x + self.block2(nn.relu(self.block1(x)))


class AdapterBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, num_res_blocks: int, down: bool = False):
        super().__init__()
        self.down = down
        if in_ch != out_ch:
            self.in_conv = nn.Linear(in_ch, out_ch)
        self.resnets = [AdapterResnetBlock(out_ch) for _ in range(num_res_blocks)]

    def __call__(self, x: mx.array) -> mx.array:
        if self.down:
            x = avg_pool_ceil(x)
        if "in_conv" in self:
            x = self.in_conv(x)
        for resnet in self.resnets:
            x = resnet(x)
        return x


class LightAdapterBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, num_res_blocks: int, down: bool = False):
        super().__init__()
        self.down = down
        mid = out_ch // 4
        self.in_conv = nn.Linear(in_ch, mid)
        self.resnets = [LightAdapterResnetBlock(mid) for _ in range(num_res_blocks)]
        self.out_conv = nn.Linear(mid, out_ch)

    def __call__(self, x: mx.array) -> mx.array:
        if self.down:
            x = avg_pool_ceil(x)
        x = self.in_conv(x)
        for resnet in self.resnets:
            x = resnet(x)
        return self.out_conv(x)


class _Adapter(nn.Module):
    """diffusers' FullAdapter / FullAdapterXL / LightAdapter (the `adapter.` level of the checkpoint)."""

    def __init__(self, c: T2IAdapterConfig):
        super().__init__()
        self.r = c.downscale_factor
        ch, n, unshuffled = c.channels, c.num_res_blocks, c.in_channels * c.downscale_factor**2
        if c.adapter_type == "light_adapter":
            self.body = [LightAdapterBlock(unshuffled, ch[0], n)]
            self.body += [LightAdapterBlock(ch[i], ch[i + 1], n, down=True) for i in range(len(ch) - 1)]
            self.body += [LightAdapterBlock(ch[-1], ch[-1], n, down=True)]
            return
        self.conv_in = nn.Conv2d(unshuffled, ch[0], 3, padding=1)
        if c.adapter_type == "full_adapter":
            self.body = [AdapterBlock(ch[max(i - 1, 0)], ch[i], n, down=i > 0) for i in range(len(ch))]
        else:  # full_adapter_xl
            self.body = [AdapterBlock(ch[i - 1] if i in (1, 2) else ch[i], ch[i], n, down=i == 2)
                         for i in range(len(ch))]

    def __call__(self, x: mx.array) -> list[mx.array]:
        x = pixel_unshuffle(x, self.r)
        if "conv_in" in self:
            x = self.conv_in(x)
        features = []
        for block in self.body:
            x = block(x)
            features.append(x)
        return features


class T2IAdapter(nn.Module):
    def __init__(self, config: T2IAdapterConfig):
        super().__init__()
        self.config = config
        self.adapter = _Adapter(config)

    def __call__(self, image: mx.array) -> list[mx.array]:
        """(B, H, W, in_channels) in [0, 1], H and W multiples of downscale_factor -> the feature maps (NHWC)."""
        r = self.config.downscale_factor
        if image.shape[1] % r or image.shape[2] % r:
            raise UserError(f"T2I-Adapter input is {image.shape[2]}x{image.shape[1]} pixels; both sides must be "
                            f"multiples of {r} (its pixel unshuffle)")
        return self.adapter(image)
