"""Pictures in 1-8 steps: presets that pair a public accelerator LoRA with the sampler, steps and guidance its
authors publish (model cards, as of 2024-2025):

- LCM-LoRA (latent-consistency/lcm-lora-*): LCMScheduler, 4 steps, guidance 1 (off).
- SDXL-Lightning (ByteDance/SDXL-Lightning, the N-step LoRAs): Euler with trailing timesteps, N steps,
  guidance 0; "always use the correct checkpoint for the corresponding inference steps".
- Hyper-SD (ByteDance/Hyper-SD): the 2/4/8-step LoRAs with DDIM, trailing timesteps, guidance 0; the unified
  1-step LoRA with TCD, eta 1.0.
- TCD-LoRA (h1t/TCD-*-LoRA): TCDScheduler, 4 steps, guidance 0, eta (gamma) 0.3.

Generic names (lcm, hyper-N, tcd) take the LoRA of the loaded model's family; the named variants (lcm-sd15,
hyper-sdxl-4, ...) are checked against it. Settings the caller gives win over the preset's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UserError

FAMILIES = {"sd15": "SD 1.x", "sdxl": "SDXL"}


@dataclass(frozen=True)
class Preset:
    loras: dict[str, str]  # model family -> the LoRA, as REPO:PATH
    scheduler: str
    steps: int
    cfg: float
    timestep_spacing: str | None = None
    eta: float | None = None
    lora_scale: float = 1.0
    settings: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "settings", {k: v for k, v in (
            ("scheduler", self.scheduler), ("steps", self.steps), ("cfg", self.cfg),
            ("timestep_spacing", self.timestep_spacing), ("eta", self.eta)) if v is not None})


def _lcm(family: str) -> str:
    return f"latent-consistency/lcm-lora-{'sdv1-5' if family == 'sd15' else 'sdxl'}:pytorch_lora_weights.safetensors"


def _hyper(family: str, n: int) -> str:
    steps = f"{n}step{'s' if n > 1 else ''}"
    return f"ByteDance/Hyper-SD:Hyper-{'SD15' if family == 'sd15' else 'SDXL'}-{steps}-lora.safetensors"


def _tcd(family: str) -> str:
    return f"h1t/TCD-{'SD15' if family == 'sd15' else 'SDXL'}-LoRA:pytorch_lora_weights.safetensors"


def _presets() -> dict[str, Preset]:
    both = list(FAMILIES)
    lcm = {f: _lcm(f) for f in both}
    p = {"lcm": Preset(lcm, "lcm", 4, 1.0), **{f"lcm-{f}": Preset({f: lcm[f]}, "lcm", 4, 1.0) for f in both}}
    for n in (2, 4, 8):
        p[f"lightning-{n}"] = Preset({"sdxl": f"ByteDance/SDXL-Lightning:sdxl_lightning_{n}step_lora.safetensors"},
                                     "euler", n, 0.0, "trailing")
    for n in (1, 2, 4, 8):
        # the unified 1-step LoRA samples with TCD (eta 1); the N-step ones with DDIM, trailing
        kind = dict(scheduler="tcd", steps=1, cfg=0.0, eta=1.0) if n == 1 else \
            dict(scheduler="ddim", steps=n, cfg=0.0, timestep_spacing="trailing")
        hyper = {f: _hyper(f, n) for f in both}
        p[f"hyper-{n}"] = Preset(hyper, **kind)
        p.update({f"hyper-{f}-{n}": Preset({f: hyper[f]}, **kind) for f in both})
    tcd = {f: _tcd(f) for f in both}
    p["tcd"] = Preset(tcd, "tcd", 4, 0.0, eta=0.3)
    p.update({f"tcd-{f}": Preset({f: tcd[f]}, "tcd", 4, 0.0, eta=0.3) for f in both})
    return p


PRESETS: dict[str, Preset] = _presets()


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"unknown --fast preset {name!r} (choose from {', '.join(PRESETS)})")
    return PRESETS[name]


def settings(name: str, **given) -> dict:
    """generate()'s keywords for a preset (scheduler, steps, cfg, timestep_spacing, eta), with the ones given
    (not None) in place of the preset's. A scheduler given instead keeps the preset's spacing and eta only
    where they apply to it (trailing suits euler-a after Lightning; TCD's eta suits nothing else)."""
    from .samplers import FIXED_TIMESTEPS

    kw = {**get_preset(name).settings, **{k: v for k, v in given.items() if v is not None}}
    applies = {"eta": kw["scheduler"] == "tcd", "timestep_spacing": kw["scheduler"] not in FIXED_TIMESTEPS}
    for key, applies in applies.items():
        if not applies and given.get(key) is None:
            kw.pop(key, None)
    return kw


def model_family(pipe) -> str | None:
    """sd15 / sdxl, or None when the UNet's text width is neither SD 1.x's (768) nor SD 2.x's (1024): a
    model this small or unusual cannot be told apart, and the caller must name the variant."""
    from .ip_adapter import model_family as family_of_width

    if pipe.is_sdxl:
        return "sdxl"
    width = family_of_width(pipe.unet_config.cross_attention_dim[0])
    return {"SD 1.x": "sd15", "SD 2.x": "sd2"}.get(width)


def preset_lora(name: str, pipe) -> str:
    """The preset's LoRA (REPO:PATH) for the loaded model; refuses a preset made for another family."""
    preset = get_preset(name)
    family = model_family(pipe)
    if family in preset.loras:
        return preset.loras[family]
    if family is None and set(preset.loras) - {"sdxl"}:  # an unrecognised non-SDXL model, a non-SDXL preset
        if len(preset.loras) == 1:  # a named variant: the caller's word
            return next(iter(preset.loras.values()))
        raise UserError(f"--fast {name}: cannot tell this model's family (its text context is "
                        f"{pipe.unet_config.cross_attention_dim[0]}-d); name the variant, e.g. {name}-sd15")
    kind = {"sdxl": "SDXL", "sd15": "SD 1.x", "sd2": "SD 2.x"}.get(family, "not SDXL")
    variants = [n for n, p in PRESETS.items() if family in p.loras and p.settings == preset.settings]
    hint = f" (for this model: {', '.join(variants)})" if variants else ""
    made_for = " or ".join(FAMILIES[f] for f in preset.loras)
    raise UserError(f"--fast {name} is for {made_for} models; this model is {kind}{hint}")


def apply_preset(pipe, name: str, **given) -> dict:
    """Load the preset's LoRA into `pipe` (the LoRA loader's load_lora) and return the generate() keywords,
    the ones given (not None) winning:

        pipe.generate(prompt, **apply_preset(pipe, "lcm"))
    """
    kw = settings(name, **given)
    ref = preset_lora(name, pipe)
    pipe.load_lora(ref, scale=get_preset(name).lora_scale)
    return kw
