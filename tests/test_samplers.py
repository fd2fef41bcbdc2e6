"""Timesteps and sigmas of every sampler against diffusers' schedulers built from the same config."""

import pytest

pytest.importorskip("torch", reason="parity test: needs the PyTorch reference (pip install torch==2.13.0 '.[test]')")

import diffusers
import numpy as np
import pytest

from conftest import SD15_SCHEDULER
from ipadapter_mlx.config import SchedulerConfig
from ipadapter_mlx.samplers import make_schedule

REFERENCE = {
    "ddim": (diffusers.DDIMScheduler, {}),
    "euler": (diffusers.EulerDiscreteScheduler, {}),
    "euler-a": (diffusers.EulerAncestralDiscreteScheduler, {}),
    "dpmpp-2m": (diffusers.DPMSolverMultistepScheduler, {}),
    "dpmpp-2m-karras": (diffusers.DPMSolverMultistepScheduler, {"use_karras_sigmas": True}),
}
CONFIGS = {
    "sd15": SD15_SCHEDULER,
    "trailing-v": {**SD15_SCHEDULER, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
    "linspace-linear": {**SD15_SCHEDULER, "timestep_spacing": "linspace", "beta_schedule": "linear",
                        "beta_start": 0.0001, "beta_end": 0.02, "steps_offset": 0},
}


def reference_sigmas(sched) -> np.ndarray:
    """diffusers' noise levels in sigma space (DDIM/DPM keep theirs as alphas)."""
    if isinstance(sched, diffusers.DDIMScheduler):
        ac = sched.alphas_cumprod.double().numpy()
        t = sched.timesteps.numpy()
        prev = t - sched.config.num_train_timesteps // sched.num_inference_steps
        a = np.append(ac[t], ac[prev[-1]] if prev[-1] >= 0 else sched.final_alpha_cumprod.item())
        return np.sqrt((1 - a) / a)
    return sched.sigmas.double().numpy()


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("name", list(REFERENCE))
@pytest.mark.parametrize("steps", [1, 10, 25])
def test_schedule_matches_diffusers(name, config, steps):
    cls, extra = REFERENCE[name]
    base = diffusers.PNDMScheduler.from_config(CONFIGS[config])  # a pipeline's scheduler as loaded from disk
    ref = cls.from_config(base.config, **extra)
    ref.set_timesteps(steps)
    ours = make_schedule(name, SchedulerConfig.from_dict(CONFIGS[config]), steps)
    np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), atol=1e-3)
    # diffusers computes the schedule in float32: at the small sigmas (1 - alpha ~ 1e-3) that is ~1e-4 relative
    np.testing.assert_allclose(ours.sigmas, reference_sigmas(ref), rtol=2e-4, atol=1e-6)
    init = float(ref.init_noise_sigma)
    if name in ("ddim", "dpmpp-2m", "dpmpp-2m-karras"):  # DDPM-space schedulers start at sigma 1 there
        init = np.sqrt(ours.sigmas[0] ** 2 + 1)
    assert ours.init_sigma == pytest.approx(init, rel=2e-4)
