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
    "ddim-linspace": ("ddim", "linspace", None, diffusers.DDIMScheduler, {"timestep_spacing": "linspace"}),
}
CONFIGS = {"sd15": SD15_SCHEDULER, "v-pred": {**SD15_SCHEDULER, "prediction_type": "v_prediction"}}


def reference(case: str, config: dict):
    cls, extra = CASES[case][3:]
    return cls.from_config(diffusers.PNDMScheduler.from_config(config).config, **extra)  # as a pipeline swaps it


def ours(case: str, config: dict, steps: int):
    name, spacing, eta = CASES[case][:3]
    return make_schedule(name, SchedulerConfig.from_dict({**config, **CASES[case][4]}), steps, spacing, eta)


@pytest.mark.parametrize("steps", [1, 2, 4, 6, 8])
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
    unet = lambda x, t, cond, residuals=None: eps_model(x, float(t[0]), mx)  # noqa: E731
    denoise = Denoiser(unet, Conditioning(mx.zeros((1, 1, 4)), {}, []), timesteps, sigmas, cfg=1.0,
                       prediction=c.prediction_type)
    for x in run_sampler(name, c, denoise, x, sigmas, noise, timesteps, eta, steps):
        pass
    return np.array(x / np.sqrt(float(sigmas[-1]) ** 2 + 1)).transpose(0, 3, 1, 2)  # to diffusers' latents


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("strength", [1.0, 0.5])
@pytest.mark.parametrize("steps", [1, 2, 4, 6, 8])
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

@pytest.fixture(scope="module")
def adapter_repo(torch_pipe, tmp_path_factory):
    from ip_fixtures import make_adapter_repo

    return make_adapter_repo(tmp_path_factory.mktemp("h94"), torch_pipe.unet)


def test_ip_adapter_with_lcm(diffusers_dir, mlx_dir, adapter_repo):
    from test_ip_adapter import diffusers_pipe, reference_image

    from ipadapter_mlx import StableDiffusion
    from ipadapter_mlx.ip_adapter import ImagePrompt

    repo = adapter_repo
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
    """Each refused before any work, in one line."""
    with pytest.raises(UserError, match=None) as e:
        mlx_pipe.generate_latents(PROMPT, **{"steps": 4, **kw})
    assert message in str(e.value) and "\n" not in str(e.value)


# -- IP-Adapter + LCM-LoRA, and the presets -------------------------------------------------------------------

def write_lora(torch_pipe, path, seed=0):
    """A kohya-format LoRA on the tiny model's attention and text-encoder layers (lora_fixtures), as the public
    LCM-LoRA files touch both; returns its layers for the reference fusing."""
    from lora_fixtures import TEXT_BLOCKS, TRANSFORMER, kohya_file, kohya_targets, random_layer
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    layers = [random_layer("unet", p, m, 4, 2.0, g) for p, m in kohya_targets(torch_pipe.unet, TRANSFORMER, False)]
    layers += [random_layer("text_encoder", p, m, 4, None, g)
               for p, m in kohya_targets(torch_pipe.text_encoder, TEXT_BLOCKS, False)]
    save_file(kohya_file(layers), str(path))
    return layers


def test_ip_adapter_with_lcm_lora(diffusers_dir, mlx_dir, torch_pipe, adapter_repo, tmp_path, monkeypatch):
    """diffusers' recipe (IP-Adapter + LCM-LoRA + LCMScheduler, 4 steps, no guidance), through apply_preset."""
    from lora_fixtures import fuse_into
    from test_ip_adapter import diffusers_pipe, reference_image

    from ipadapter_mlx import StableDiffusion, fast
    from ipadapter_mlx.ip_adapter import ImagePrompt

    layers = write_lora(torch_pipe, tmp_path / "lcm-lora.safetensors")
    image = reference_image(2)
    ref_pipe = diffusers_pipe(diffusers_dir, adapter_repo, ["base"], [0.7])
    fuse_into(ref_pipe, layers, 1.0)
    ref_pipe.scheduler = diffusers.LCMScheduler.from_config(ref_pipe.scheduler.config)
    ref = ref_pipe("a cat", ip_adapter_image=[image], num_inference_steps=4, guidance_scale=1.0, height=32, width=32,
                   generator=torch.Generator().manual_seed(4), output_type="np").images

    monkeypatch.setitem(fast.PRESETS, "lcm-sd15", fast.Preset({"sd15": str(tmp_path / "lcm-lora.safetensors")},
                                                              "lcm", 4, 1.0))
    pipe = StableDiffusion(mlx_dir, dtype=mx.float32)
    pipe.load_ip_adapter(str(adapter_repo / "models" / "ip-adapter_sd15.safetensors"))
    kw = fast.apply_preset(pipe, "lcm-sd15")
    assert kw == {"scheduler": "lcm", "steps": 4, "cfg": 1.0}
    got = pipe.generate("a cat", height=32, width=32, image_prompts=[ImagePrompt(images=[image], scale=0.7)],
                        noise=torch_noise(torch.Generator().manual_seed(4)), return_array=True, **kw)
    assert record("IP-Adapter + LCM-LoRA (kohya), 4 steps", psnr(np.array(got), ref), "dB") >= 40
    pipe.unload_lora()  # and the LoRA mattered: without it the picture differs
    plain = pipe.generate("a cat", height=32, width=32, image_prompts=[ImagePrompt(images=[image], scale=0.7)],
                          noise=torch_noise(torch.Generator().manual_seed(4)), return_array=True, **kw)
    assert psnr(np.array(plain), ref) < 40


def test_preset_settings_and_overrides():
    from ipadapter_mlx.fast import settings

    assert settings("lightning-4") == {"scheduler": "euler", "steps": 4, "cfg": 0.0, "timestep_spacing": "trailing"}
    assert settings("hyper-1") == {"scheduler": "tcd", "steps": 1, "cfg": 0.0, "eta": 1.0}
    # what the caller gives wins; None means "not given"
    assert settings("tcd", steps=8, eta=0.5, cfg=None) == {"scheduler": "tcd", "steps": 8, "cfg": 0.0, "eta": 0.5}
    # another scheduler keeps the preset's options that apply to it, drops those that do not
    assert settings("hyper-1", scheduler="euler") == {"scheduler": "euler", "steps": 1, "cfg": 0.0}
    assert settings("lightning-2", scheduler="euler-a")["timestep_spacing"] == "trailing"
    assert "timestep_spacing" not in settings("lightning-2", scheduler="lcm")
    given = settings("hyper-2", scheduler="lcm", timestep_spacing="trailing")  # kept: generate() refuses it
    assert given["timestep_spacing"] == "trailing"


class FakePipe:
    def __init__(self, sdxl: bool, context: int):
        from ipadapter_mlx.config import UNetConfig

        self.is_sdxl = sdxl
        self.unet_config = UNetConfig.from_dict(dict(block_out_channels=[32], down_block_types=["DownBlock2D"],
                                                     up_block_types=["UpBlock2D"], cross_attention_dim=context))
        self.loaded = []

    def load_lora(self, ref, scale=1.0):
        self.loaded.append((ref, scale))


@pytest.mark.parametrize("sdxl,context,name,expected", [
    (False, 768, "lcm", "latent-consistency/lcm-lora-sdv1-5:pytorch_lora_weights.safetensors"),
    (True, 2048, "lcm", "latent-consistency/lcm-lora-sdxl:pytorch_lora_weights.safetensors"),
    (True, 2048, "hyper-4", "ByteDance/Hyper-SD:Hyper-SDXL-4steps-lora.safetensors"),
    (False, 768, "hyper-1", "ByteDance/Hyper-SD:Hyper-SD15-1step-lora.safetensors"),
    (True, 2048, "lightning-8", "ByteDance/SDXL-Lightning:sdxl_lightning_8step_lora.safetensors"),
    (False, 768, "tcd", "h1t/TCD-SD15-LoRA:pytorch_lora_weights.safetensors"),
    (False, 32, "lcm-sd15", "latent-consistency/lcm-lora-sdv1-5:pytorch_lora_weights.safetensors"),
])
def test_family_picks_the_lora(sdxl, context, name, expected):
    from ipadapter_mlx.fast import apply_preset

    pipe = FakePipe(sdxl, context)
    apply_preset(pipe, name)
    assert pipe.loaded == [(expected, 1.0)]


@pytest.mark.parametrize("sdxl,context,name,message", [
    (False, 768, "lightning-4", "--fast lightning-4 is for SDXL models; this model is SD 1.x"),
    (True, 2048, "lcm-sd15", "--fast lcm-sd15 is for SD 1.x models; this model is SDXL (for this model: lcm, "
                             "lcm-sdxl)"),
    (False, 768, "hyper-sdxl-2", "--fast hyper-sdxl-2 is for SDXL models; this model is SD 1.x (for this model: "
                                 "hyper-2, hyper-sd15-2)"),
    (False, 1024, "lcm", "--fast lcm is for SD 1.x or SDXL models; this model is SD 2.x"),
    (False, 32, "lcm", "--fast lcm: cannot tell this model's family (its text context is 32-d); name the variant"),
    (False, 32, "lightning-2", "--fast lightning-2 is for SDXL models; this model is not SDXL"),
    (False, 768, "turbo", "unknown --fast preset 'turbo' (choose from lcm, lcm-sd15"),
])
def test_preset_refusals(sdxl, context, name, message):
    from ipadapter_mlx.fast import apply_preset

    pipe = FakePipe(sdxl, context)
    with pytest.raises(UserError) as e:
        apply_preset(pipe, name)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert pipe.loaded == []  # nothing loaded before the refusal


# -- the CLI --------------------------------------------------------------------------------------------------

@pytest.fixture
def run(mlx_dir, tmp_path, capsys):
    """The CLI in-process on the tiny model: (exit code, stdout, stderr); argparse's refusals exit too."""
    from ipadapter_mlx.cli import main

    def go(*extra):
        try:
            code = main(["generate", "--model", str(mlx_dir), "--prompt", "x", "--height", "16", "--width", "16",
                         "--output", str(tmp_path / "out.png"), *extra])
        except SystemExit as e:
            code = e.code
        out = capsys.readouterr()
        return code, out.out, out.err

    return go


@pytest.mark.parametrize("args,message", [
    (["--scheduler", "tcd", "--eta", "1.5"], "error: eta must be in [0, 1] (0: deterministic, 1: fully stochastic), "
                                             "got 1.5"),
    (["--eta", "0.3"], "error: eta (gamma) is TCD's; the dpmpp-2m-karras scheduler takes none"),
    (["--scheduler", "lcm", "--timestep-spacing", "trailing"], "error: timestep spacing does not apply to lcm"),
    (["--fast", "lightning-4"], "error: --fast lightning-4 is for SDXL models; this model is not SDXL"),
    (["--fast", "lcm"], "error: --fast lcm: cannot tell this model's family"),
    (["--fast", "turbo"], "error: argument --fast: invalid choice: 'turbo'"),
    (["--scheduler", "tcd", "--eta", "nan"], "error: argument --eta: must be a finite number"),
    (["--scheduler", "lcm", "--steps", "60"], "error: 60 steps is more than the 50 steps LCM/TCD were distilled"),
])
def test_cli_refusals(run, tmp_path, args, message):
    code, out, err = run(*args)
    assert code == 2 and err.startswith(message) and err.count("\n") == 1, err
    assert not (tmp_path / "out.png").exists()


def test_cli_preset_from_the_hub_cache(mlx_dir, torch_pipe, tmp_path):
    """--fast lcm-sd15 finds the LoRA as REPO:PATH in the Hub cache (offline), samples with LCM in 4 steps with no
    guidance, and --steps given wins; the PNG records what ran."""
    import json

    from test_cli import hub_cache, run_cli

    src = tmp_path / "src"
    src.mkdir()
    write_lora(torch_pipe, src / "pytorch_lora_weights.safetensors")
    hub_cache(tmp_path / "hf", "latent-consistency/lcm-lora-sdv1-5", src)
    env = {**__import__("os").environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "fast.png"
    done = run_cli(["generate", "--model", str(mlx_dir), "--prompt", "a fox", "--fast", "lcm-sd15", "--steps", "3",
                    "--height", "16", "--width", "16", "--seed", "1", "--output", str(out)], env)
    assert done.returncode == 0, done.stderr
    meta = json.loads(Image.open(out).text["ipadapter_mlx"])
    assert (meta["fast"], meta["sampler"], meta["steps"], meta["cfg_scale"]) == ("lcm-sd15", "lcm", 3, 1.0)


def test_example_runs(mlx_dir, torch_pipe, adapter_repo, tmp_path, monkeypatch):
    """examples/ip_adapter_lcm.py on the tiny model (its LoRA given as a file: the tiny model has no family)."""
    import runpy
    import sys
    from pathlib import Path

    from test_ip_adapter import reference_image

    write_lora(torch_pipe, tmp_path / "lora.safetensors")
    reference_image(1).save(tmp_path / "ref.png")
    monkeypatch.setattr(sys, "argv", [
        "ip_adapter_lcm.py", "--model", str(mlx_dir),
        "--ip-adapter", str(adapter_repo / "models" / "ip-adapter_sd15.bin"),
        "--image", str(tmp_path / "ref.png"), "--lora", str(tmp_path / "lora.safetensors"), "--size", "32",
        "--output", str(tmp_path / "out.png")])
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "ip_adapter_lcm.py"), run_name="__main__")
    assert Image.open(tmp_path / "out.png").size == (32, 32)


@pytest.mark.parametrize("key,value,message", [
    ("original_inference_steps", "50", "original_inference_steps must be in 1..1000, got '50'"),
    ("original_inference_steps", 0, "original_inference_steps must be in 1..1000, got 0"),
    ("timestep_scaling", None, "timestep_scaling must be a positive number, got None"),
])
def test_bad_scheduler_config(key, value, message):
    """A model folder's scheduler_config.json is untrusted: a wrong type is one line, not a traceback."""
    c = SchedulerConfig.from_dict({**SD15_SCHEDULER, key: value})
    with pytest.raises(UserError, match=None) as e:
        make_schedule("lcm", c, 4)  # with the schedule, before any work
    assert message in str(e.value)
