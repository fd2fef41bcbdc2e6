"""Samplers that reproduce diffusers' schedulers, written k-diffusion style.

Everything runs in the sigma parameterisation x = x0 + sigma * eps (diffusers' Euler space). The DDIM and
DPM-Solver updates of diffusers, which live in the DDPM space sqrt(a) x0 + sqrt(1-a) eps, are the same
updates after dividing by sqrt(a) = 1 / sqrt(1 + sigma^2); the final latents are x / sqrt(1 + sigma_last^2).

A schedule gives the UNet timesteps and the sigmas (one more than steps). A sampler is a generator over
steps: `denoise(x, i)` returns the model's x0 prediction at step i, `noise(shape)` draws fresh noise.

The few-step samplers (LCM, TCD) also read the integer timesteps: LCM's boundary condition and TCD's
intermediate noise level are functions of t, not of sigma.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np

from .config import SchedulerConfig
from .errors import UserError

Denoiser = Callable[[mx.array, int], mx.array]
Sigmas = list[float]  # plain floats, so that MLX arrays keep their dtype when scaled by them
NoiseFn = Callable[[tuple[int, ...]], mx.array]


@dataclass
class Schedule:
    timesteps: np.ndarray  # (n,) what the UNet is given at each step
    sigmas: np.ndarray  # (n + 1,) noise level before each step, then the final one
    init_sigma: float  # the starting noise is scaled by this (diffusers' init_noise_sigma, in sigma space)


def alphas_cumprod(c: SchedulerConfig) -> np.ndarray:
    T = c.num_train_timesteps
    if c.beta_schedule == "linear":
        betas = np.linspace(c.beta_start, c.beta_end, T, dtype=np.float64)
    elif c.beta_schedule == "scaled_linear":
        betas = np.linspace(c.beta_start**0.5, c.beta_end**0.5, T, dtype=np.float64) ** 2
    else:  # squaredcos_cap_v2
        f = lambda t: np.cos((t + 0.008) / 1.008 * np.pi / 2) ** 2  # noqa: E731
        t = np.arange(T) / T
        betas = np.minimum(1 - f(t + 1 / T) / f(t), 0.999)
    return np.cumprod(1.0 - betas)


def _sigmas(ac: np.ndarray) -> np.ndarray:
    return np.sqrt((1 - ac) / ac)


def _spacing(c: SchedulerConfig, default: str) -> str:
    s = c.get("timestep_spacing", default)
    if s not in ("leading", "trailing", "linspace"):
        raise UserError(f"scheduler config: unsupported timestep_spacing {s!r}")
    return s


def karras_sigmas(sigma_max: float, sigma_min: float, n: int, rho: float = 7.0) -> np.ndarray:
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, by interpolating in log-sigma (diffusers' _sigma_to_t)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, None]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return (1 - w) * low + w * (low + 1)


def ddim_schedule(c: SchedulerConfig, n: int) -> Schedule:
    T, ac = c.num_train_timesteps, alphas_cumprod(c)
    spacing = _spacing(c, "leading")
    if spacing == "leading":
        ts = (np.arange(n) * (T // n)).round()[::-1] + c.get("steps_offset", 0)
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / n)) - 1
    else:
        ts = np.linspace(0, T - 1, n).round()[::-1]
    ts = ts.astype(np.int64)
    final_alpha = 1.0 if c.get("set_alpha_to_one", True) else ac[0]
    sigmas = np.append(_sigmas(ac[ts]), _sigmas(np.array(final_alpha)))
    return Schedule(ts, sigmas, float(np.sqrt(sigmas[0] ** 2 + 1)))


def euler_schedule(c: SchedulerConfig, n: int, karras: bool = False) -> Schedule:
    T, ac = c.num_train_timesteps, alphas_cumprod(c)
    spacing = _spacing(c, "linspace")
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n)[::-1].copy()
    elif spacing == "leading":
        ts = (np.arange(n) * (T // n)).round()[::-1] + c.get("steps_offset", 0)
    else:
        ts = np.arange(T, 0, -T / n).round() - 1
    all_sigmas = _sigmas(ac)
    sigmas = np.interp(ts, np.arange(T), all_sigmas)
    if karras:
        sigmas = karras_sigmas(sigmas[0], sigmas[-1], n)
        ts = sigma_to_t(sigmas, np.log(all_sigmas))
    last = all_sigmas[0] if c.get("final_sigmas_type", "zero") == "sigma_min" else 0.0
    sigmas = np.append(sigmas, last)
    init = sigmas.max() if spacing in ("linspace", "trailing") else np.sqrt(sigmas.max() ** 2 + 1)
    return Schedule(ts.astype(np.float64), sigmas, float(init))


def dpm_schedule(c: SchedulerConfig, n: int, karras: bool = False) -> Schedule:
    T, ac = c.num_train_timesteps, alphas_cumprod(c)
    spacing = _spacing(c, "linspace")
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, n + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ts = (np.arange(n + 1) * (T // (n + 1))).round()[::-1][:-1] + c.get("steps_offset", 0)
    else:
        ts = np.arange(T, 0, -T / n).round() - 1
    all_sigmas = _sigmas(ac)
    if karras:
        sigmas = karras_sigmas(all_sigmas[-1], all_sigmas[0], n)
        ts = sigma_to_t(sigmas, np.log(all_sigmas)).round()
    else:
        sigmas = np.interp(ts, np.arange(T), all_sigmas)
    last = all_sigmas[0] if c.get("final_sigmas_type", "zero") == "sigma_min" else 0.0
    sigmas = np.append(sigmas, last)
    return Schedule(ts.astype(np.int64), sigmas, float(np.sqrt(sigmas[0] ** 2 + 1)))


def ddim_landing(c: SchedulerConfig, timesteps: np.ndarray, steps: int) -> list[float]:
    """Where each DDIM step lands: diffusers' DDIMScheduler steps from t to t - T // steps (the final alpha below
    0), which with trailing or linspace spacing and a step count that does not divide T is not the next
    timestep (trailing, 6 steps: 999 -> 833, then 832 is sampled)."""
    ac = alphas_cumprod(c)
    final = 1.0 if c.get("set_alpha_to_one", True) else ac[0]
    prev = np.asarray(timesteps, np.int64) - c.num_train_timesteps // steps
    return [float(v) for v in _sigmas(np.where(prev >= 0, ac[np.maximum(prev, 0)], final))]


def lcm_timesteps(c: SchedulerConfig, n: int) -> np.ndarray:
    """LCM's and TCD's timesteps: every k-th training step (k = T // original_inference_steps), the
    distillation schedule, of which `n` are taken evenly by index (diffusers' LCMScheduler.set_timesteps)."""
    T, original = c.num_train_timesteps, c.get("original_inference_steps", 50)
    if type(original) is not int or not 1 <= original <= T:
        raise UserError(f"scheduler config: original_inference_steps must be in 1..{T}, got {original!r}")
    if n > original:
        raise UserError(f"{n} steps is more than the {original} steps LCM/TCD were distilled with "
                        f"(original_inference_steps); use at most {original}")
    origin = (np.arange(1, original + 1) * (T // original) - 1)[::-1]
    return origin[np.floor(np.linspace(0, original, n, endpoint=False)).astype(np.int64)]


def _timestep_scaling(c: SchedulerConfig) -> float:
    scaling = c.get("timestep_scaling", 10.0)
    if type(scaling) not in (int, float) or not 0 < scaling < 1e6:
        raise UserError(f"scheduler config: timestep_scaling must be a positive number, got {scaling!r}")
    return float(scaling)


def lcm_schedule(c: SchedulerConfig, n: int) -> Schedule:
    ts = lcm_timesteps(c, n)
    _timestep_scaling(c)  # checked with the schedule, before any work
    sigmas = np.append(_sigmas(alphas_cumprod(c)[ts]), 0.0)  # the last step returns the denoised estimate
    return Schedule(ts, sigmas, float(np.sqrt(sigmas[0] ** 2 + 1)))


def tcd_schedule(c: SchedulerConfig, n: int) -> Schedule:
    ts = lcm_timesteps(c, n)
    ac = alphas_cumprod(c)
    sigmas = np.append(_sigmas(ac[ts]), _sigmas(ac[0]))  # TCD's last step lands on timestep 0, not on x0
    return Schedule(ts, sigmas, float(np.sqrt(sigmas[0] ** 2 + 1)))


def lcm_boundary(c: SchedulerConfig, timesteps: np.ndarray, sigmas: Sigmas) -> tuple[list[float], list[float]]:
    """LCM's consistency boundary condition, denoised = c_skip * x_t + c_out * x0, with c_skip and c_out of the
    scaled timestep (timestep_scaling, sigma_data 0.5). x_t is the DDPM-space sample, so in sigma space
    c_skip is divided by sqrt(1 + sigma^2). Returns the two coefficients per step: (on x, on x0)."""
    t = np.asarray(timesteps, np.float64) * _timestep_scaling(c)
    c_skip, c_out = 0.25 / (t**2 + 0.25), t / np.sqrt(t**2 + 0.25)
    return [float(k / math.sqrt(1 + s**2)) for k, s in zip(c_skip, sigmas)], [float(o) for o in c_out]


def tcd_gamma_sigmas(c: SchedulerConfig, timesteps: np.ndarray, eta: float) -> list[float]:
    """TCD's intermediate noise level per step: the x0 estimate is first renoised to s = floor((1 - eta) * t'),
    t' the next timestep (0 after the last), then forward-noised to t' with fresh noise."""
    nxt = np.append(np.asarray(timesteps, np.int64)[1:], 0)
    s = np.floor((1 - eta) * nxt).astype(np.int64)
    return [float(v) for v in _sigmas(alphas_cumprod(c)[s])]


# ---------------------------------------------------------------------------------------------------
# Samplers: each a short generator over the sigmas, yielding the latents after every step.


def sample_euler(denoise: Denoiser, x: mx.array, sigmas: Sigmas, noise: NoiseFn) -> Iterator[mx.array]:
    for i in range(len(sigmas) - 1):
        d = (x - denoise(x, i)) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
        yield x


def sample_ddim(
    denoise: Denoiser, x: mx.array, sigmas: Sigmas, noise: NoiseFn, clip: float | None = None,
    landing: list[float] | None = None,
) -> Iterator[mx.array]:
    """DDIM with eta = 0: Euler, except that x0 may be clipped (diffusers' clip_sample) while eps is not.
    `landing` (ddim_landing): where each step lands when that is not the next step's noise level; the next
    step then reads the sample as if it were at its own level, as diffusers does."""
    for i in range(len(sigmas) - 1):
        x0 = denoise(x, i)
        eps = (x - x0) / sigmas[i]
        if clip is not None:
            x0 = mx.clip(x0, -clip, clip)
        to = sigmas[i + 1] if landing is None else landing[i]
        x = x0 + eps * to
        if to != sigmas[i + 1]:  # the same DDPM-space sample, in the sigma space of the next level
            x = x * math.sqrt((1 + sigmas[i + 1] ** 2) / (1 + to**2))
        yield x


def sample_euler_ancestral(denoise: Denoiser, x: mx.array, sigmas: Sigmas, noise: NoiseFn) -> Iterator[mx.array]:
    for i in range(len(sigmas) - 1):
        s, s_next = sigmas[i], sigmas[i + 1]
        sigma_up = math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2)
        sigma_down = math.sqrt(s_next**2 - sigma_up**2)
        d = (x - denoise(x, i)) / s
        x = x + d * (sigma_down - s)
        x = x + noise(x.shape) * sigma_up  # drawn on every step, as diffusers does, to share its RNG stream
        yield x


def sample_dpmpp_2m(denoise: Denoiser, x: mx.array, sigmas: Sigmas, noise: NoiseFn) -> Iterator[mx.array]:
    """DPM-Solver++(2M), midpoint form; first order on the first step and on the last (diffusers' defaults)."""
    n = len(sigmas) - 1
    old = None
    for i in range(n):
        s, s_next = sigmas[i], sigmas[i + 1]
        x0 = denoise(x, i)
        if s_next == 0:  # the last step lands on x0
            x = x0
        else:
            h = math.log(s) - math.log(s_next)
            first_order = old is None or (i == n - 1 and n < 15)
            if first_order:
                d = x0
            else:
                r = (math.log(sigmas[i - 1]) - math.log(s)) / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old
            x = (s_next / s) * x - math.expm1(-h) * d
        old = x0
        yield x


def sample_lcm(
    denoise: Denoiser, x: mx.array, sigmas: Sigmas, noise: NoiseFn, skip: list[float], out: list[float],
    clip: float | None = None,
) -> Iterator[mx.array]:
    """LCM: the consistency function's estimate (boundary condition `skip`, `out`: lcm_boundary), renoised
    with fresh noise to the next level on every step but the last (diffusers' LCMScheduler)."""
    for i in range(len(sigmas) - 1):
        x0 = denoise(x, i)
        if clip is not None:
            x0 = mx.clip(x0, -clip, clip)
        x = out[i] * x0 + skip[i] * x
        if sigmas[i + 1] > 0:
            x = x + noise(x.shape) * sigmas[i + 1]
        yield x


def sample_tcd(
    denoise: Denoiser, x: mx.array, sigmas: Sigmas, noise: NoiseFn, gamma_sigmas: list[float], eta: float
) -> Iterator[mx.array]:
    """TCD (strategic stochastic sampling): a DDIM step to the intermediate level gamma_sigmas[i], then, when
    eta > 0 and a step follows, fresh noise up to sigmas[i + 1] (diffusers' TCDScheduler)."""
    n = len(sigmas) - 1
    for i in range(n):
        x0 = denoise(x, i)
        x = x0 + (x - x0) * (gamma_sigmas[i] / sigmas[i])
        if eta > 0 and i < n - 1:
            x = x + noise(x.shape) * math.sqrt(max(sigmas[i + 1] ** 2 - gamma_sigmas[i] ** 2, 0.0))
        yield x


@dataclass(frozen=True)
class Sampler:
    schedule: Callable[[SchedulerConfig, int], Schedule]
    sample: Callable[..., Iterator[mx.array]]


SAMPLERS: dict[str, Sampler] = {
    "ddim": Sampler(ddim_schedule, sample_ddim),
    "euler": Sampler(euler_schedule, sample_euler),
    "euler-a": Sampler(euler_schedule, sample_euler_ancestral),
    "dpmpp-2m": Sampler(dpm_schedule, sample_dpmpp_2m),
    "dpmpp-2m-karras": Sampler(lambda c, n: dpm_schedule(c, n, karras=True), sample_dpmpp_2m),
    "lcm": Sampler(lcm_schedule, sample_lcm),
    "tcd": Sampler(tcd_schedule, sample_tcd),
}
SPACINGS = ("leading", "trailing", "linspace")
FIXED_TIMESTEPS = ("lcm", "tcd")  # their timesteps come from original_inference_steps: no spacing applies
TCD_DEFAULT_ETA = 0.3  # TCDScheduler.step's default and the TCD authors' advice (diffusers' pipelines pass 0.0)


def check_options(name: str, spacing: str | None = None, eta: float | None = None) -> None:
    """--timestep-spacing and --eta against the sampler, before any work."""
    if name not in SAMPLERS:
        raise UserError(f"unknown scheduler {name!r} (choose from {', '.join(SAMPLERS)})")
    if spacing is not None:
        if spacing not in SPACINGS:
            raise UserError(f"unknown timestep spacing {spacing!r} (choose from {', '.join(SPACINGS)})")
        if name in FIXED_TIMESTEPS:
            raise UserError(f"timestep spacing does not apply to {name} (its timesteps are the distillation "
                            "schedule's); leave it out")
    if eta is not None:
        if name != "tcd":
            raise UserError(f"eta (gamma) is TCD's; the {name} scheduler takes none (use --scheduler tcd)")
        if not (isinstance(eta, (int, float)) and 0 <= eta <= 1):
            raise UserError(f"eta must be in [0, 1] (0: deterministic, 1: fully stochastic), got {eta}")


def with_spacing(config: SchedulerConfig, spacing: str | None) -> SchedulerConfig:
    """The model's scheduler config with its timestep_spacing replaced (diffusers' from_config(...,
    timestep_spacing=...)), as SDXL-Lightning and Hyper-SD ask for 'trailing'."""
    return config if spacing is None else replace(config, raw={**config.to_dict(), "timestep_spacing": spacing})


def make_schedule(name: str, config: SchedulerConfig, steps: int, spacing: str | None = None,
                  eta: float | None = None) -> Schedule:
    """`spacing` overrides the config's timestep_spacing; `eta` (TCD only) is checked here, with it, so that a
    bad value fails before any work."""
    check_options(name, spacing, eta)
    if steps < 1:
        raise UserError(f"steps must be at least 1, got {steps}")
    return SAMPLERS[name].schedule(with_spacing(config, spacing), steps)


def run_sampler(
    name: str, config: SchedulerConfig, denoise: Denoiser, x: mx.array, sigmas: np.ndarray, noise: NoiseFn,
    timesteps: np.ndarray | None = None, eta: float | None = None, steps: int | None = None,
) -> Iterator[mx.array]:
    """`timesteps`: the schedule's (as sliced for image-to-image), needed by lcm and tcd; `eta`: TCD's gamma
    (default TCD_DEFAULT_ETA); `steps`: the whole schedule's step count (DDIM's step to t - T // steps)."""
    sigmas = [float(s) for s in sigmas]  # numpy scalars would turn MLX arrays into numpy ones
    if name == "ddim":
        clip = config.get("clip_sample_range", 1.0) if config.get("clip_sample", True) else None
        landing = ddim_landing(config, timesteps, steps) if timesteps is not None and steps else None
        return sample_ddim(denoise, x, sigmas, noise, clip=clip, landing=landing)
    if name == "lcm":
        clip = config.get("clip_sample_range", 1.0) if config.get("clip_sample", False) else None
        return sample_lcm(denoise, x, sigmas, noise, *lcm_boundary(config, timesteps, sigmas), clip=clip)
    if name == "tcd":
        eta = TCD_DEFAULT_ETA if eta is None else eta
        return sample_tcd(denoise, x, sigmas, noise, tcd_gamma_sigmas(config, timesteps, eta), eta)
    return SAMPLERS[name].sample(denoise, x, sigmas, noise)
