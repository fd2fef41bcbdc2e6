"""Few-step sampling (LCM, TCD, trailing timesteps) and the --fast presets, against diffusers' schedulers.

Three levels: the schedules (timesteps and noise levels), whole sampling loops on an analytic noise model (every
update and every noise draw, text-to-image and image-to-image), and the tiny pipeline end to end, with an
IP-Adapter too. The noise comes from one torch generator, drawn in diffusers' order.
"""

import pytest

pytest.importorskip("torch", reason="parity test: needs the PyTorch reference (pip install torch==2.13.0 '.[test]')")

import diffusers
import mlx.core as mx
import numpy as np
import torch
from PIL import Image

from conftest import SD15_SCHEDULER, psnr, record
from ipadapter_mlx.conditioning import Conditioning
from ipadapter_mlx.config import SchedulerConfig
from ipadapter_mlx.denoiser import Denoiser
from ipadapter_mlx.errors import UserError
from ipadapter_mlx.samplers import make_schedule, run_sampler
from test_pipeline import torch_noise

# name -> (our scheduler, timestep spacing, eta, diffusers' class, its extra config)
CASES = {
    "lcm": ("lcm", None, None, diffusers.LCMScheduler, {}),
    # at the usual timestep_scaling (10) the boundary condition is ~identity (c_skip < 1e-7 at t >= 19): a small
    # one makes c_skip and c_out count, so that their formula is checked too
    "lcm-scaled": ("lcm", None, None, diffusers.LCMScheduler, {"timestep_scaling": 0.003}),
    "tcd-0.3": ("tcd", None, 0.3, diffusers.TCDScheduler, {}),
    "tcd-0": ("tcd", None, 0.0, diffusers.TCDScheduler, {}),
    "tcd-1": ("tcd", None, 1.0, diffusers.TCDScheduler, {}),
    "euler-trailing": ("euler", "trailing", None, diffusers.EulerDiscreteScheduler, {"timestep_spacing": "trailing"}),
    "ddim-trailing": ("ddim", "trailing", None, diffusers.DDIMScheduler, {"timestep_spacing": "trailing"}),
}
CONFIGS = {"sd15": SD15_SCHEDULER, "v-pred": {**SD15_SCHEDULER, "prediction_type": "v_prediction"}}


def reference(case: str, config: dict):
    cls, extra = CASES[case][3:]
    return cls.from_config(diffusers.PNDMScheduler.from_config(config).config, **extra)  # as a pipeline swaps it


def ours(case: str, config: dict, steps: int):
    name, spacing, eta = CASES[case][:3]
    return make_schedule(name, SchedulerConfig.from_dict({**config, **CASES[case][4]}), steps, spacing, eta)


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("case", list(CASES))
def test_schedule_matches_diffusers(case, steps):
    ref, got = reference(case, SD15_SCHEDULER), ours(case, SD15_SCHEDULER, steps)
    ref.set_timesteps(steps)
    np.testing.assert_array_equal(got.timesteps, ref.timesteps.numpy())
    ac = ref.alphas_cumprod.double().numpy()
    if case.startswith("euler"):
        np.testing.assert_allclose(got.sigmas, ref.sigmas.double().numpy(), rtol=2e-4)
    else:  # DDPM-space schedulers: the noise level of each timestep, in sigma space
        t = ref.timesteps.numpy()
        np.testing.assert_allclose(got.sigmas[:-1], np.sqrt((1 - ac[t]) / ac[t]), rtol=2e-4)
    # where the last step lands: x0 for LCM and DDIM (SD 1.5: final alpha = alphas_cumprod[0]), t = 0 for TCD
    last = {"lcm": 0.0, "lcm-scaled": 0.0, "euler-trailing": 0.0}.get(case, np.sqrt((1 - ac[0]) / ac[0]))
    assert got.sigmas[-1] == pytest.approx(last, rel=2e-4, abs=1e-12)


def eps_model(x, t: float, lib):
    """An analytic, non-linear stand-in for the UNet (elementwise, so layouts do not matter)."""
    return 0.9 * lib.tanh(0.7 * x + np.sin(t / 97.0)) + 0.1 * x


def run_diffusers(case, config, steps, strength, eta, gen, shape):
    """A diffusers pipeline's loop (StableDiffusion(Img2Img)Pipeline): timesteps, begin index, noise order."""
    sched = reference(case, config)
    sched.set_timesteps(steps)
    timesteps = sched.timesteps
    if strength < 1:  # Img2ImgPipeline.get_timesteps and prepare_latents
        t_start = steps - min(int(steps * strength), steps)
        timesteps = timesteps[t_start:]
        if hasattr(sched, "set_begin_index"):  # DDIM has none (it reads no step index)
            sched.set_begin_index(t_start)
        image = torch.randn(shape, generator=gen)  # stands in for the VAE's sample (drawn first, as there)
        x = sched.add_noise(image, torch.randn(shape, generator=gen), timesteps[:1])
    else:
        x = torch.randn(shape, generator=gen) * sched.init_noise_sigma
    for t in timesteps:
        out = eps_model(sched.scale_model_input(x, t), float(t), torch)
        kw = {"eta": eta} if eta is not None else {}
        x = sched.step(out, t, x, generator=gen, **kw).prev_sample
    return x.numpy()


def run_ours(case, config, steps, strength, noise, shape):
    name, spacing, eta = CASES[case][:3]
    c = SchedulerConfig.from_dict({**config, **CASES[case][4]})
    schedule = make_schedule(name, c, steps, spacing, eta)
    timesteps, sigmas = schedule.timesteps, schedule.sigmas
    b, ch, h, w = shape
    if strength < 1:  # as generate_latents does it
        start = steps - min(int(steps * strength), steps)
        timesteps, sigmas = timesteps[start:], sigmas[start:]
        image = noise((b, h, w, ch))
        x = image + noise((b, h, w, ch)) * float(sigmas[0])
    else:
        x = noise((b, h, w, ch)) * schedule.init_sigma
    unet = lambda x, t, cond: eps_model(x, float(t[0]), mx)  # noqa: E731
    denoise = Denoiser(unet, Conditioning(mx.zeros((1, 1, 4)), {}, []), timesteps, sigmas, cfg=1.0,
                       prediction=c.prediction_type)
    for x in run_sampler(name, c, denoise, x, sigmas, noise, timesteps, eta):
        pass
    return np.array(x / np.sqrt(float(sigmas[-1]) ** 2 + 1)).transpose(0, 3, 1, 2)  # to diffusers' latents


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("steps", [1, 2, 4, 8])
@pytest.mark.parametrize("case", list(CASES))
def test_sampling_matches_diffusers(case, steps, strength, config):
    """Every update and noise draw of the loop, float32: the final latents agree to ~1e-5 (the first x0
    estimate, from sigma 14.6, cancels numbers ~15 times larger than the result in both)."""
    if int(steps * strength) == 0:
        pytest.skip("no step left to run")
    if case.startswith("euler") and config == "v-pred":
        pytest.skip("the same Euler code as the sd15 case")
    shape = (2, 4, 8, 8)
    ref = run_diffusers(case, CONFIGS[config], steps, strength, CASES[case][2], torch.Generator().manual_seed(7),
                        shape)
    got = run_ours(case, CONFIGS[config], steps, strength, torch_noise(torch.Generator().manual_seed(7)), shape)
    err = float(np.abs(got - ref).max())
    record(f"sampler {case} {steps} steps strength {strength} {config}", err, "max abs")
    assert err < 3e-5, err
    assert np.abs(ref).mean() > 0.1  # latents, not zeros


# -- the tiny pipeline end to end ---------------------------------------------------------------------------

PROMPT, H, W = "a watercolor fox", 32, 48


def diffusers_with(pipe, case, img2img=False):
    parts = dict(pipe.components)
    parts["scheduler"] = reference(case, dict(pipe.scheduler.config))
    kind = diffusers.StableDiffusionImg2ImgPipeline if img2img else diffusers.StableDiffusionPipeline
    return kind(**parts)


@pytest.mark.parametrize("case,cfg,steps", [("lcm", 1.0, 4), ("lcm", 3.0, 2), ("tcd-0.3", 0.0, 4), ("tcd-1", 2.0, 8),
                                            ("euler-trailing", 0.0, 4), ("ddim-trailing", 0.0, 8)])
def test_text_to_image(torch_pipe, mlx_pipe, case, cfg, steps):
    name, spacing, eta = CASES[case][:3]
    extra = {"eta": eta} if eta is not None else {}
    ref = diffusers_with(torch_pipe, case)(
        PROMPT, num_inference_steps=steps, guidance_scale=cfg, height=H, width=W, num_images_per_prompt=2,
        generator=torch.Generator().manual_seed(3), output_type="np", **extra).images
    got = mlx_pipe.generate(PROMPT, steps=steps, cfg=cfg, height=H, width=W, num_images=2, scheduler=name,
                            timestep_spacing=spacing, eta=eta, noise=torch_noise(torch.Generator().manual_seed(3)),
                            return_array=True)
    assert ref.std() > 0.05
    assert record(f"SD text-to-image {case}, cfg {cfg}, {steps} steps", psnr(np.array(got), ref), "dB") >= 40


@pytest.mark.parametrize("case,strength", [("lcm", 0.6), ("tcd-0.3", 0.75), ("euler-trailing", 0.5)])
def test_image_to_image(torch_pipe, mlx_pipe, case, strength):
    name, spacing, eta = CASES[case][:3]
    init = Image.fromarray(np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8))
    extra = {"eta": eta} if eta is not None else {}
    ref = diffusers_with(torch_pipe, case, img2img=True)(
        PROMPT, image=init, strength=strength, num_inference_steps=8, guidance_scale=1.0,
        generator=torch.Generator().manual_seed(5), output_type="np", **extra).images
    got = mlx_pipe.generate(PROMPT, steps=8, cfg=1.0, scheduler=name, timestep_spacing=spacing, eta=eta,
                            init_image=init, strength=strength, noise=torch_noise(torch.Generator().manual_seed(5)),
                            return_array=True)
    assert record(f"SD image-to-image {case}, strength {strength}", psnr(np.array(got), ref), "dB") >= 40


def test_no_guidance_runs_one_batch(mlx_pipe):
    """cfg <= 1 skips the unconditional pass: the UNet sees a batch of 1 per picture (2 with guidance)."""
    for cfg, expected in ((1.0, 1), (0.0, 1), (1.5, 2)):
        seen = []

        def spy(step, i, sigma):
            seen.append(step.x.shape[0])
            return step

        for _ in mlx_pipe.generate_latents(PROMPT, steps=2, cfg=cfg, height=16, width=16, scheduler="lcm", seed=0,
                                           hooks=[spy]):
            pass
        assert seen == [expected, expected]


# -- IP-Adapter + LCM -----------------------------------------------------------------------------------------

def test_ip_adapter_with_lcm(diffusers_dir, mlx_dir, torch_pipe, tmp_path_factory):
    from ip_fixtures import make_adapter_repo
    from test_ip_adapter import diffusers_pipe, reference_image

    from ipadapter_mlx import StableDiffusion
    from ipadapter_mlx.ip_adapter import ImagePrompt

    repo = make_adapter_repo(tmp_path_factory.mktemp("h94"), torch_pipe.unet)
    image = reference_image(1)
    ref_pipe = diffusers_pipe(diffusers_dir, repo, ["plus"], [0.8])
    ref_pipe.scheduler = diffusers.LCMScheduler.from_config(ref_pipe.scheduler.config)
    ref = ref_pipe("a cat", ip_adapter_image=[image], num_inference_steps=4, guidance_scale=1.0, height=32, width=32,
                   generator=torch.Generator().manual_seed(9), output_type="np").images
    pipe = StableDiffusion(mlx_dir, dtype=mx.float32)
    pipe.load_ip_adapter(str(repo / "models" / "ip-adapter-plus_sd15.bin"))
    got = pipe.generate("a cat", steps=4, cfg=1.0, height=32, width=32, scheduler="lcm",
                        image_prompts=[ImagePrompt(images=[image], scale=0.8)],
                        noise=torch_noise(torch.Generator().manual_seed(9)), return_array=True)
    assert record("IP-Adapter plus + LCM, 4 steps", psnr(np.array(got), ref), "dB") >= 40


# -- bad input ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,message", [
    ({"scheduler": "tcd", "eta": 1.5}, "eta must be in [0, 1]"),
    ({"scheduler": "tcd", "eta": -0.1}, "eta must be in [0, 1]"),
    ({"scheduler": "euler", "eta": 0.3}, "eta (gamma) is TCD's"),
    ({"scheduler": "lcm", "timestep_spacing": "trailing"}, "timestep spacing does not apply to lcm"),
    ({"scheduler": "euler", "timestep_spacing": "sideways"}, "unknown timestep spacing 'sideways'"),
    ({"scheduler": "lcm", "steps": 51}, "more than the 50 steps"),
])
def test_bad_sampler_options(mlx_pipe, kw, message):
    with pytest.raises(UserError, match=None) as e:
        mlx_pipe.generate_latents(PROMPT, **{"steps": 4, **kw})
    assert message in str(e.value) and "\n" not in str(e.value)
