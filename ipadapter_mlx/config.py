"""Small config dataclasses, each built from a checkpoint's own config.json (diffusers / transformers keys).

Nothing here hard-codes one model's sizes: every field comes from the file, and the defaults are the
ones diffusers/transformers use when a key is absent.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import UserError

# What a config.json may declare. A file is untrusted: `layers_per_block: 1e9` would build modules forever,
# so counts and widths are bounded far above every published model (SDXL: 10 layers, 2816-d, 49408 tokens).
MAX_COUNT = 256  # layers, heads, blocks per level
MAX_SIZE = 2**18  # widths, vocabulary, positions, pixels
COUNTS = {"num_hidden_layers", "num_attention_heads", "layers_per_block", "transformer_layers_per_block"}


class ConfigFile:
    """`from_dict` for every config below: the subclass's `_parse`, every failure one UserError, every number
    checked for type and range before anything is built from it."""

    # fields that must be > 0 (a width or count of 0 divides by zero when the model is built), in subclasses
    POSITIVE: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json"):
        """`source`: the file's path for the messages."""
        if not isinstance(d, dict):
            raise UserError(f"{cls.__name__}: {source} is not a JSON object")
        try:
            config = cls._parse(d)
        except UserError:
            raise
        except (KeyError, TypeError, ValueError, OverflowError, AttributeError) as e:
            raise UserError(f"{cls.__name__}: {source} is incomplete or invalid ({type(e).__name__}: "
                            f"{str(e)[:120]})") from None
        for f in fields(config):  # the annotation says which JSON types a field takes
            value = getattr(config, f.name)
            kinds = [t for t, word in ((str, "str"), (bool, "bool"), (int, "int"), (float, "float"), (dict, "dict"),
                                       (type(None), "None")) if word in str(f.type)]
            limit = MAX_COUNT if f.name in COUNTS else MAX_SIZE
            for v in value if isinstance(value, (list, tuple)) else [value]:
                ok = (type(v) in kinds or (type(v) is int and float in kinds)) and not (
                    type(v) is int and not 0 <= v <= limit or type(v) is float and not math.isfinite(v))
                if not ok or (isinstance(value, (list, tuple)) and len(value) > MAX_COUNT):
                    expected = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
                    raise UserError(f"{cls.__name__}: {source} has {f.name}={str(value)[:60]}: expected {expected}"
                                    f"{f' (whole numbers 0..{limit})' if int in kinds else ''}")
        for name in cls.POSITIVE:
            value = getattr(config, name)
            if isinstance(value, (list, tuple)) and not value or any(v <= 0 for v in _as_list(value)):
                raise UserError(f"{cls.__name__}: {source} has {name}={str(value)[:60]}: expected "
                                f"{'a non-empty list of numbers' if isinstance(value, (list, tuple)) else 'a number'} > 0")
        config._check(source)
        return config

    def _check(self, source: str) -> None:
        """Relations between fields (after every field's own type and range check); subclasses add theirs."""

    def _fail(self, source: str, key: str, value: Any, expected: str) -> None:
        raise UserError(f"{type(self).__name__}: {source} has {key}={str(value)[:60]}: expected {expected}")


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _per_block(value: Any, n: int, name: str) -> list[int]:
    """diffusers allows an int (same for every block) or a list with one entry per block."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise UserError(f"config: {name} has {len(value)} entries for {n} blocks")
        return [int(v) for v in value]
    return [int(value)] * n


@dataclass
class CLIPTextConfig(ConfigFile):
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None  # set for CLIPTextModelWithProjection (SDXL's second encoder)
    eos_token_id: int | None = None  # None: pool at the highest token id (transformers' legacy rule for id 2)

    @classmethod
    def _parse(cls, d: dict) -> "CLIPTextConfig":
        d = d.get("text_config", d)
        has_proj = any("WithProjection" in a for a in d.get("architectures", []) or [])
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            max_position_embeddings=d["max_position_embeddings"],
            hidden_act=d.get("hidden_act", "quick_gelu"),
            layer_norm_eps=d.get("layer_norm_eps", 1e-5),
            projection_dim=d.get("projection_dim") if has_proj else None,
            eos_token_id=None if d.get("eos_token_id", 2) == 2 else d["eos_token_id"],
        )


@dataclass
class CLIPVisionConfig(ConfigFile):
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    projection_dim: int = 512
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def _parse(cls, d: dict) -> "CLIPVisionConfig":
        top = d
        d = d.get("vision_config", d)
        return cls(
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=d["num_attention_heads"],
            image_size=d.get("image_size", 224),
            patch_size=d.get("patch_size", 32),
            num_channels=d.get("num_channels", 3),
            projection_dim=d.get("projection_dim", top.get("projection_dim", 512)),
            hidden_act=d.get("hidden_act", "quick_gelu"),
            layer_norm_eps=d.get("layer_norm_eps", 1e-5),
        )


@dataclass
class UNetConfig(ConfigFile):
    in_channels: int
    out_channels: int
    block_out_channels: list[int]
    layers_per_block: list[int]
    down_block_types: list[str]
    up_block_types: list[str]
    cross_attention_dim: list[int]
    num_attention_heads: list[int]  # heads per down block (diffusers' legacy "attention_head_dim" means heads)
    transformer_layers_per_block: list[int]
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    sample_size: int = 64
    # SDXL: time ids and the pooled text embedding, added to the time embedding
    addition_embed_type: str | None = None
    addition_time_embed_dim: int = 256
    projection_class_embeddings_input_dim: int = 0

    POSITIVE = ("in_channels", "out_channels", "block_out_channels", "cross_attention_dim", "num_attention_heads",
                "norm_num_groups")

    def _check(self, source: str) -> None:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n:
            self._fail(source, "down_block_types", self.down_block_types, f"{n} entries, one per block_out_channels")
        if self.up_block_types and len(self.up_block_types) != n:
            self._fail(source, "up_block_types", self.up_block_types, f"{n} entries, one per block_out_channels")
        if any(c % self.norm_num_groups for c in self.block_out_channels):  # GroupNorm splits every width
            self._fail(source, "norm_num_groups", self.norm_num_groups,
                       f"a divisor of every block_out_channels entry {self.block_out_channels}")

    @classmethod
    def _parse(cls, d: dict) -> "UNetConfig":
        for key, ok in [
            ("addition_embed_type", (None, "text_time")),
            ("class_embed_type", (None,)),
            ("time_embedding_type", ("positional",)),
            ("mid_block_type", ("UNetMidBlock2DCrossAttn",)),
            ("resnet_time_scale_shift", ("default",)),
            ("act_fn", ("silu",)),
        ]:
            if d.get(key, ok[0]) not in ok:
                raise UserError(f"unsupported UNet config: {key}={d[key]!r} (supported: {ok[0]!r})")
        n = len(d["block_out_channels"])
        heads = d.get("num_attention_heads") or d.get("attention_head_dim", 8)
        return cls(
            in_channels=d.get("in_channels", 4),
            out_channels=d.get("out_channels", 4),
            block_out_channels=list(d["block_out_channels"]),
            layers_per_block=_per_block(d.get("layers_per_block", 2), n, "layers_per_block"),
            down_block_types=list(d["down_block_types"]),
            up_block_types=list(d["up_block_types"]),
            cross_attention_dim=_per_block(d.get("cross_attention_dim", 1280), n, "cross_attention_dim"),
            num_attention_heads=_per_block(heads, n, "attention heads"),
            transformer_layers_per_block=_per_block(
                d.get("transformer_layers_per_block", 1), n, "transformer_layers_per_block"
            ),
            use_linear_projection=bool(d.get("use_linear_projection", False)),
            norm_num_groups=d.get("norm_num_groups", 32),
            norm_eps=d.get("norm_eps", 1e-5),
            flip_sin_to_cos=d.get("flip_sin_to_cos", True),
            freq_shift=d.get("freq_shift", 0),
            sample_size=d.get("sample_size", 64),
            addition_embed_type=d.get("addition_embed_type"),
            addition_time_embed_dim=d.get("addition_time_embed_dim") or 256,
            projection_class_embeddings_input_dim=d.get("projection_class_embeddings_input_dim") or 0,
        )


@dataclass
class VAEConfig(ConfigFile):
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: list[int] = field(default_factory=lambda: [64])
    layers_per_block: int = 1
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    mid_block_add_attention: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True

    @classmethod
    def _parse(cls, d: dict) -> "VAEConfig":
        names = cls.__dataclass_fields__
        kw = {k: d[k] for k in names if k in d and d[k] is not None}
        return cls(**kw)


@dataclass
class SchedulerConfig(ConfigFile):
    """The training noise schedule plus the raw keys a sampler may read (spacing, offsets, ...)."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    raw: dict = field(default_factory=dict)

    @classmethod
    def _parse(cls, d: dict) -> "SchedulerConfig":
        if d.get("trained_betas"):
            raise UserError("scheduler config: trained_betas are not supported")
        if d.get("beta_schedule", "linear") not in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            raise UserError(f"scheduler config: unsupported beta_schedule {d['beta_schedule']!r}")
        return cls(
            num_train_timesteps=d.get("num_train_timesteps", 1000),
            beta_start=d.get("beta_start", 0.0001),
            beta_end=d.get("beta_end", 0.02),
            beta_schedule=d.get("beta_schedule", "linear"),
            prediction_type=d.get("prediction_type", "epsilon"),
            raw=dict(d),
        )

    def get(self, key: str, sampler_default: Any) -> Any:
        """A key from the file, else the default of the sampler that asks (diffusers' from_config rule)."""
        return self.raw.get(key, sampler_default)

    def to_dict(self) -> dict:
        return self.raw or {k: v for k, v in asdict(self).items() if k != "raw"}


@dataclass
class ControlNetConfig(UNetConfig):
    """A ControlNetModel's config.json: the UNet's down path (no up blocks) plus the control image's embedding."""

    conditioning_channels: int = 3
    conditioning_embedding_out_channels: list[int] = field(default_factory=lambda: [16, 32, 96, 256])
    global_pool_conditions: bool = False  # shuffle-style nets: residuals averaged over the picture
    controlnet_conditioning_channel_order: str = "rgb"

    POSITIVE = UNetConfig.POSITIVE + ("conditioning_channels", "conditioning_embedding_out_channels")

    @classmethod
    def _parse(cls, d: dict) -> "ControlNetConfig":
        for key in ("encoder_hid_dim", "encoder_hid_dim_type", "num_class_embeds"):
            if d.get(key) is not None:
                raise UserError(f"unsupported ControlNet config: {key}={d[key]!r}")
        if d.get("controlnet_conditioning_channel_order", "rgb") not in ("rgb", "bgr"):
            raise UserError(f"unsupported ControlNet config: controlnet_conditioning_channel_order="
                            f"{d['controlnet_conditioning_channel_order']!r} (rgb or bgr)")
        unet = UNetConfig._parse({**d, "up_block_types": []})
        widths = d.get("conditioning_embedding_out_channels")
        widths = [16, 32, 96, 256] if widths is None else widths
        return cls(
            **{f.name: getattr(unet, f.name) for f in fields(UNetConfig)},
            conditioning_channels=d.get("conditioning_channels", 3),
            conditioning_embedding_out_channels=list(widths),
            global_pool_conditions=bool(d.get("global_pool_conditions", False)),
            controlnet_conditioning_channel_order=d.get("controlnet_conditioning_channel_order", "rgb"),
        )
