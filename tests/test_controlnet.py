"""ControlNet parity with diffusers: the model per module (SD 1.5 and SDXL layouts), whole generations of its
ControlNet pipelines with IP-Adapters, MultiControlNet, guess mode, image-to-image, original single files."""

import pytest

pytest.importorskip("torch", reason="parity test: needs the PyTorch reference (pip install torch==2.13.0 '.[test]')")

import json
import re
from pathlib import Path

import diffusers
import mlx.core as mx
import numpy as np
import torch
from PIL import Image

from conftest import perturb, psnr, record, to_np, write_tokenizer
from ip_fixtures import SDXL_VARIANTS, VARIANTS, make_adapter_repo
from ipadapter_mlx import ImagePrompt, StableDiffusion, UserError
from ipadapter_mlx.conditioning import StepConditioning
from ipadapter_mlx.controlnet import Control
from test_ip_adapter import reference_image
from test_pipeline import torch_noise

H, W, STEPS = 32, 48, 5
TOL = 1e-4
HINT = (8, 16)  # the tiny VAE downsamples by 2: one stride-2 conv in the control image's embedding


def make_controlnet(unet, seed: int, **kw):
    """A ControlNet copied from the UNet's layout, every weight random (its zero convs too, so it matters)."""
    torch.manual_seed(seed)
    net = perturb(diffusers.ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT,
                                                      load_weights_from_unet=False, **kw), seed)
    g = torch.Generator().manual_seed(seed + 50)
    with torch.no_grad():
        for m in [*net.controlnet_down_blocks, net.controlnet_mid_block, net.controlnet_cond_embedding.conv_out]:
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)
    return net


def nhwc(a):
    return mx.array(a.permute(0, 2, 3, 1).numpy())


def control_image(seed, size=(W, H)):
    """Edges-like: a few bright shapes on black, not at the output size (so the resize matters)."""
    rng = np.random.default_rng(seed)
    a = np.zeros((size[1] + 8, size[0] + 4, 3), np.uint8)
    for _ in range(4):
        y, x = rng.integers(0, a.shape[0] - 8), rng.integers(0, a.shape[1] - 8)
        a[y:y + 8, x:x + 8] = rng.integers(100, 256, 3)
    return Image.fromarray(a)


# -- the model, per module ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_nets(torch_pipe, tmp_path_factory):
    """Two diffusers ControlNet folders for the tiny SD 1.5 pipeline (one with BGR order)."""
    root = tmp_path_factory.mktemp("controlnets")
    for i in range(2):
        make_controlnet(torch_pipe.unet, 10 + i).save_pretrained(root / f"net{i}")
    return root


@pytest.mark.parametrize("guess,pool,order", [(False, False, "rgb"), (True, False, "bgr"), (True, True, "rgb")])
def test_model_matches_diffusers_sd15(sd_nets, tmp_path, guess, pool, order):
    ref = diffusers.ControlNetModel.from_pretrained(sd_nets / "net0")
    ref.register_to_config(global_pool_conditions=pool, controlnet_conditioning_channel_order=order)
    ref.save_pretrained(tmp_path / "net")
    from ipadapter_mlx.controlnet import resolve_controlnet
    from ipadapter_mlx.loading import load_component

    ours = load_component(resolve_controlnet(str(tmp_path / "net")), "controlnet", mx.float32)
    _compare(ref, ours, f"ControlNet SD 1.5 (guess {guess}, pool {pool}, {order})", guess, context=32)


def _compare(ref, ours, name, guess=False, context=32, added=None, image_size=2):
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 12, generator=g), torch.randn(2, 7, context, generator=g)
    image = torch.rand(2, 3, 8 * image_size, 12 * image_size, generator=g)
    t = torch.tensor([900.0, 20.0])
    with torch.no_grad():
        down, mid = ref(x, t, ctx, image, conditioning_scale=0.7, guess_mode=guess, return_dict=False,
                        added_cond_kwargs=added)
    cond = StepConditioning(mx.array(ctx.numpy()), {k: mx.array(v.numpy()) for k, v in (added or {}).items()})
    r = ours(nhwc(x), mx.array(t.numpy()), cond, nhwc(image), 0.7, guess)
    assert len(r.down) == len(down)
    pairs = zip(r.down + [r.mid], list(down) + [mid])
    err = max(np.abs(to_np(a).transpose(0, 3, 1, 2) - to_np(b)).max() for a, b in pairs)
    scale = max(np.abs(to_np(b)).max() for b in down)
    assert scale > 1e-2  # real residuals, not zeros
    assert record(name, err, "abs") < TOL


@pytest.fixture(scope="module")
def xl_parts(tmp_path_factory):
    from test_sdxl import UNET, make_sdxl_pipeline

    root = tmp_path_factory.mktemp("sdxl-cn")
    pipe = make_sdxl_pipeline(UNET, write_tokenizer(root / "tok"))
    pipe.save_pretrained(root / "pipe")
    make_controlnet(pipe.unet, 20).save_pretrained(root / "net")
    return root


def test_model_matches_diffusers_sdxl(xl_parts):
    from ipadapter_mlx.controlnet import resolve_controlnet
    from ipadapter_mlx.loading import load_component

    ref = diffusers.ControlNetModel.from_pretrained(xl_parts / "net")
    ours = load_component(resolve_controlnet(str(xl_parts / "net")), "controlnet", mx.float32)
    g = torch.Generator().manual_seed(1)
    added = {"text_embeds": torch.randn(2, 32, generator=g),
             "time_ids": torch.tensor([[64.0, 96, 0, 0, 64, 96], [32, 32, 4, 8, 64, 64]])}
    _compare(ref, ours, "ControlNet SDXL (text_time)", False, context=64, added=added)


# -- whole generations ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_repo(torch_pipe, tmp_path_factory):
    return make_adapter_repo(tmp_path_factory.mktemp("h94-cn"), torch_pipe.unet)


def sd_reference(diffusers_dir, sd_nets, nets, kind=diffusers.StableDiffusionControlNetPipeline, adapter=None,
                 repo=None):
    control = [diffusers.ControlNetModel.from_pretrained(sd_nets / n) for n in nets]
    pipe = kind.from_pretrained(diffusers_dir, controlnet=control[0] if len(control) == 1 else control,
                                safety_checker=None)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    if adapter:
        pipe.load_ip_adapter(str(repo), subfolder="models", weight_name=VARIANTS[adapter][0],
                             image_encoder_folder="models/image_encoder")
        pipe.set_ip_adapter_scale(0.7)
    return pipe


def ours_with(mlx_dir, sd_nets, nets, adapter=None, repo=None):
    ours = StableDiffusion(mlx_dir, dtype=mx.float32)
    for n in nets:
        ours.load_controlnet(str(sd_nets / n))
    if adapter:
        ours.load_ip_adapter(str(repo / "models" / VARIANTS[adapter][0]), scale=0.7)
    return ours


def start_noise(seed=0):
    return torch.randn(1, 4, H // 2, W // 2, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("adapter", ["plus", "base"])
def test_sd15_controlnet_with_ip_adapter(diffusers_dir, mlx_dir, sd_nets, adapter_repo, adapter):
    """StableDiffusionControlNetPipeline + an IP-Adapter: the ControlNet reads the text only."""
    latents, ctrl, ref_image = start_noise(), control_image(1), reference_image(1)
    ref = sd_reference(diffusers_dir, sd_nets, ["net0"], adapter=adapter, repo=adapter_repo)(
        "a cat", image=ctrl, ip_adapter_image=ref_image, controlnet_conditioning_scale=0.8, num_inference_steps=STEPS,
        guidance_scale=6.0, height=H, width=W, latents=latents, output_type="np").images
    ours = ours_with(mlx_dir, sd_nets, ["net0"], adapter, adapter_repo)
    kw = dict(steps=STEPS, cfg=6.0, height=H, width=W, scheduler="euler", latents=latents.numpy(), return_array=True,
              image_prompts=[ImagePrompt(images=[ref_image])])
    got = np.array(ours.generate("a cat", controls=[Control(ctrl, scale=0.8)], **kw))
    assert record(f"ControlNet SD 1.5 + IP-Adapter {adapter}", psnr(got, ref), "dB") >= 40
    plain = np.array(ours.generate("a cat", **kw))  # the control does change the picture
    assert psnr(got, plain) < 30


def test_multi_controlnet_scales_and_windows(diffusers_dir, mlx_dir, sd_nets):
    """MultiControlNet: residuals summed, each net with its own scale and start/end (5 steps: net0 runs steps
    0-1, net1 steps 1-4), a different scheduler."""
    latents, images = start_noise(2), [control_image(2), control_image(3, (40, 40))]
    ref_pipe = sd_reference(diffusers_dir, sd_nets, ["net0", "net1"])
    ref_pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(ref_pipe.scheduler.config,
                                                                          use_karras_sigmas=True)
    ref = ref_pipe("a cat", negative_prompt="blurry", image=images, controlnet_conditioning_scale=[0.8, 0.5],
                   control_guidance_start=[0.0, 0.2], control_guidance_end=[0.4, 1.0], num_inference_steps=STEPS,
                   guidance_scale=6.0, height=H, width=W, latents=latents, output_type="np").images
    ours = ours_with(mlx_dir, sd_nets, ["net0", "net1"])
    controls = [Control(images[0], 0, 0.8, 0.0, 0.4), Control(images[1], 1, 0.5, 0.2, 1.0)]
    got = np.array(ours.generate("a cat", negative_prompt="blurry", steps=STEPS, cfg=6.0, height=H, width=W,
                                 scheduler="dpmpp-2m-karras", latents=latents.numpy(), controls=controls,
                                 return_array=True))
    assert record("MultiControlNet (scales 0.8/0.5, windows 0-0.4/0.2-1)", psnr(got, ref), "dB") >= 40


@pytest.mark.parametrize("cfg", [6.0, 1.0])
def test_guess_mode(diffusers_dir, mlx_dir, sd_nets, cfg):
    """Guess mode: the net sees the conditional half only (zeros for the other), residuals scaled 0.1 .. 1;
    without guidance it still scales them."""
    latents, ctrl = start_noise(4), control_image(4)
    ref = sd_reference(diffusers_dir, sd_nets, ["net1"])(
        "a cat", image=ctrl, guess_mode=True, num_inference_steps=STEPS, guidance_scale=cfg, height=H, width=W,
        latents=latents, output_type="np").images
    ours = ours_with(mlx_dir, sd_nets, ["net1"])
    got = np.array(ours.generate("a cat", steps=STEPS, cfg=cfg, height=H, width=W, scheduler="euler",
                                 latents=latents.numpy(), controls=[Control(ctrl, guess_mode=True)],
                                 return_array=True))
    assert record(f"ControlNet guess mode (cfg {cfg})", psnr(got, ref), "dB") >= 40


def test_controlnet_image_to_image(diffusers_dir, mlx_dir, sd_nets, adapter_repo):
    init, ctrl = reference_image(9, (W, H)), control_image(5)
    ref = sd_reference(diffusers_dir, sd_nets, ["net0"], diffusers.StableDiffusionControlNetImg2ImgPipeline,
                       adapter="plus", repo=adapter_repo)(
        "a cat", image=init, control_image=ctrl, strength=0.7, ip_adapter_image=reference_image(1),
        controlnet_conditioning_scale=0.6,  # (this pipeline's default is 0.8; the text-to-image ones' 1.0)
        control_guidance_start=0.3, num_inference_steps=STEPS, guidance_scale=6.0, height=H, width=W,
        generator=torch.Generator().manual_seed(2), output_type="np").images
    ours = ours_with(mlx_dir, sd_nets, ["net0"], "plus", adapter_repo)
    got = np.array(ours.generate("a cat", steps=STEPS, cfg=6.0, scheduler="euler", init_image=init, strength=0.7,
                                 noise=torch_noise(torch.Generator().manual_seed(2)), return_array=True,
                                 image_prompts=[ImagePrompt(images=[reference_image(1)])],
                                 controls=[Control(ctrl, scale=0.6, start=0.3)]))
    assert record("ControlNet image-to-image + IP-Adapter plus", psnr(got, ref), "dB") >= 40


@pytest.mark.parametrize("variant", ["sdxl", "plus-sdxl-vit-h"])
def test_sdxl_controlnet_with_ip_adapter(xl_parts, tmp_path_factory, variant):
    from ipadapter_mlx.checkpoints.stable_diffusion import convert_diffusers_folder

    net = diffusers.ControlNetModel.from_pretrained(xl_parts / "net")
    ref = diffusers.StableDiffusionXLControlNetPipeline.from_pretrained(xl_parts / "pipe", controlnet=net)
    repo = make_adapter_repo(tmp_path_factory.mktemp("h94-xl"), ref.unet, variants=SDXL_VARIANTS, folder="sdxl_models")
    file, encoder, _ = SDXL_VARIANTS[variant]
    ref.load_ip_adapter(str(repo), subfolder="sdxl_models", weight_name=file,
                        image_encoder_folder=f"{encoder}/image_encoder")
    ref.set_ip_adapter_scale(0.7)
    latents, ctrl, image = start_noise(1), control_image(6), reference_image(1)
    expected = ref("a fox", image=ctrl, ip_adapter_image=image, controlnet_conditioning_scale=0.9,
                   num_inference_steps=STEPS, guidance_scale=6.0, height=H, width=W, latents=latents,
                   output_type="np").images
    ours = StableDiffusion(convert_diffusers_folder(xl_parts / "pipe", tmp_path_factory.mktemp("mlx") / "xl"),
                           mx.float32)
    ours.load_controlnet(str(xl_parts / "net"))
    ours.load_ip_adapter(str(repo / "sdxl_models" / file), scale=0.7)
    got = np.array(ours.generate("a fox", steps=STEPS, cfg=6.0, height=H, width=W, scheduler="euler",
                                 latents=latents.numpy(), image_prompts=[ImagePrompt(images=[image])],
                                 controls=[Control(ctrl, scale=0.9)], return_array=True))
    assert record(f"ControlNet SDXL + IP-Adapter {variant}", psnr(got, expected), "dB") >= 40


# -- original single files --------------------------------------------------------------------------------------


def to_original(net) -> dict:
    """A diffusers ControlNet's state dict in the original layout (`control_model.*`), by inverting our key
    table; diffusers' own single-file loader reads it back below, so the table is checked by both sides."""
    from ipadapter_mlx.checkpoints.controlnet_files import controlnet_original_to_diffusers
    from ipadapter_mlx.config import ControlNetConfig

    pairs = [(d, o) for o, d in controlnet_original_to_diffusers(ControlNetConfig.from_dict(dict(net.config)))]
    out = {}
    for key, value in net.state_dict().items():
        src, dst = max(((d, o) for d, o in pairs if key.startswith(d + ".")), key=lambda p: len(p[0]))
        out["control_model." + dst + key[len(src):]] = value.contiguous()
    return out


SD15_LIKE = dict(in_channels=4, block_out_channels=(32, 64), layers_per_block=2,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), cross_attention_dim=768,
                 attention_head_dim=8, norm_num_groups=32)  # SD 1.5's conventions: shapes alone tell the config


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_single_file_matches_diffusers_loader(tmp_path, suffix):
    from safetensors.torch import save_file

    from ipadapter_mlx.controlnet import resolve_controlnet
    from ipadapter_mlx.loading import load_component, read_safetensors

    torch.manual_seed(0)
    net = perturb(diffusers.ControlNetModel(**SD15_LIKE), 3)  # the default 16-32-96-256 hint block
    net.save_pretrained(tmp_path / "diffusers")
    original = to_original(net)
    path = tmp_path / f"control_v11p_sd15_tiny{suffix}"
    torch.save(original, path) if suffix == ".pth" else save_file(original, path)
    theirs = diffusers.ControlNetModel.from_single_file(str(path), config=str(tmp_path / "diffusers")).state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in net.state_dict().items())  # the inverse table is right
    for config in (None, json.loads((tmp_path / "diffusers" / "config.json").read_text())):  # inferred or given
        folder = resolve_controlnet(str(path), config=config)
        ours, _ = read_safetensors(folder / "controlnet" / "model.safetensors")
        assert len(ours) == len(theirs)
        for k, v in theirs.items():
            v = v.numpy()
            got = np.array(ours[k])
            got = got.transpose(0, 3, 1, 2) if got.ndim == 4 else got.reshape(v.shape)
            assert np.array_equal(got, v), k
    # and the converted net computes what diffusers' does (the config inferred from the shapes)
    _compare(net.eval(), load_component(resolve_controlnet(str(path)), "controlnet", mx.float32),
             f"ControlNet from an original {suffix} (config inferred)", context=768, image_size=8)


# -- the command line -----------------------------------------------------------------------------------------


@pytest.fixture
def cli(mlx_dir, sd_nets, tmp_path, capsys, monkeypatch, tmp_path_factory):
    """`generate` on the tiny SD 1.5 model; the canny preset resolves to a Hub cache holding net0, offline."""
    from huggingface_hub import constants

    from ipadapter_mlx.cli import main
    from test_cli import hub_cache

    hf_home = tmp_path / "hf"
    hub_cache(hf_home, "lllyasviel/control_v11p_sd15_canny", sd_nets / "net0")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hf_home / "hub"))
    control_image(7).save(tmp_path / "edges.png")
    reference_image(2).save(tmp_path / "photo.png")

    def go(*args):
        common = ["--model", str(mlx_dir), "--prompt", "a cat", "--steps", "3", "--height", str(H), "--width",
                  str(W), "--seed", "3", "--scheduler", "euler", "--output", str(tmp_path / "out.png")]
        code = main(["generate", *common, *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return go


def test_cli_two_controlnets_match_the_api(cli, mlx_dir, sd_nets, tmp_path):
    """Each option belongs to the --controlnet before it; the picture is the API's with the same controls."""
    code, out, err = cli("--controlnet", "canny", "--control-image", str(tmp_path / "edges.png"),
                         "--control-scale", "0.7", "--control-end", "0.8",
                         "--controlnet", str(sd_nets / "net1"), "--control-image", str(tmp_path / "photo.png"),
                         "--control-preprocess", "canny", "--canny-low", "50", "--canny-high", "120", "--guess-mode")
    assert code == 0, err
    from ipadapter_mlx.controlnet import preprocess
    from ipadapter_mlx.images import open_image

    ours = StableDiffusion(mlx_dir, dtype=mx.float32)
    ours.load_controlnet(str(sd_nets / "net0"))
    ours.load_controlnet(str(sd_nets / "net1"))
    edges = preprocess(open_image(tmp_path / "photo.png"), "canny", (W, H), 50, 120)
    expected = ours.generate("a cat", steps=3, height=H, width=W, seed=3, scheduler="euler", controls=[
        Control(open_image(tmp_path / "edges.png"), 0, 0.7, end=0.8), Control(edges, 1, guess_mode=True)])
    saved = Image.open(tmp_path / "out.png")
    assert np.array_equal(np.asarray(saved), np.asarray(expected[0]))
    meta = json.loads(saved.text["ipadapter_mlx"])["controlnets"]
    assert meta[0]["controlnet"] == "canny" and meta[0]["control_scale"] == 0.7
    assert meta[1]["guess_mode"] is True and meta[1]["canny_low"] == 50


def test_batch_reads_each_controlnet_once_while_jobs_use_it(cli, mlx_dir, sd_nets, tmp_path, capsys, monkeypatch):
    """Jobs in a row with the same ControlNet read it once; a job with another drops it before reading its own
    (one net's memory at a time), and a later job reads the first again. Each picture is `generate`'s."""
    from ipadapter_mlx import controlnet as controlnet_module, loading
    from ipadapter_mlx.cli import main

    reads = []  # how many models were kept when a net was read
    real_load = loading.load_component

    def load_component(folder, component, *a, **k):
        if component == "controlnet":
            reads.append(len(keeper[0].keep))
        return real_load(folder, component, *a, **k)

    keeper = []
    real_init = controlnet_module.ControlNetSet.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        keeper.append(self)

    monkeypatch.setattr(loading, "load_component", load_component)
    monkeypatch.setattr(controlnet_module.ControlNetSet, "__init__", init)
    edges = str(tmp_path / "edges.png")
    jobs = [{"controlnet": str(sd_nets / f"net{n}"), "control_image": edges, "seed": seed, "output": f"{i}.png"}
            for i, (n, seed) in enumerate([(0, 1), (0, 2), (1, 1), (0, 3)])]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
    code = main(["batch", str(tmp_path / "jobs.jsonl"), "--output-dir", str(tmp_path / "out"), "--model", str(mlx_dir),
                 "--prompt", "a cat", "--steps", "3", "--height", str(H), "--width", str(W), "--scheduler", "euler"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert reads == [0, 0, 0]  # net0 for jobs 0-1, net1, net0 again: each read with nothing else kept
    for job in (jobs[1], jobs[3]):  # a job that used the kept net draws what generate draws
        code, _, err = cli("--controlnet", job["controlnet"], "--control-image", edges, "--seed", str(job["seed"]))
        assert code == 0, err
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png")),
                              np.asarray(Image.open(tmp_path / "out" / job["output"]))), job


def test_cli_bad_inputs_one_line_each(cli, xl_parts, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a picture")
    edges = str(tmp_path / "edges.png")
    cases = [
        (["--controlnet", str(xl_parts / "net"), "--control-image", edges],
         r"ControlNet .*net is for SDXL \(cross-attention 64\), this model is SD 1.x/2.x \(cross-attention 32\)"),
        (["--controlnet", "canny", "--control-image", str(tmp_path / "missing.png")], r"image not found: .*missing"),
        (["--controlnet", "canny", "--control-image", str(tmp_path / "broken.png")], r"cannot read image .*broken"),
        (["--controlnet", "canny", "--control-image", edges, "--control-image", edges],
         r"ControlNet canny: 2 --control-image given; each --controlnet takes one"),
        (["--control-scale", "0.5"], r"--control-scale needs a --controlnet"),
        (["--controlnet", "canny"], r"ControlNet canny: 0 --control-image given"),
        (["--controlnet", "canny", "--control-image", edges, "--control-preprocess", "depth"],
         r"--control-preprocess depth: not made here; depth and pose maps come from other models"),
        (["--controlnet", "canny", "--control-image", edges, "--control-start", "0.6", "--control-end", "0.5"],
         r"ControlNet canny: --control-start 0.6 must be before --control-end 0.5"),
        (["--controlnet", "canny", "--control-image", edges, "--control-preprocess", "inpaint"],
         r"--control-mask goes with --control-preprocess inpaint"),
        (["--controlnet", str(tmp_path / "nothing"), "--control-image", edges], r"ControlNet not found: .*nothing"),
    ]
    for args, message in cases:
        code, out, err = cli(*args)
        assert code == 2 and len(err.strip().splitlines()) == 1, (args, err)
        assert re.search(f"^error: {message}", err), (args, err)


# -- control images ----------------------------------------------------------------------------------------------


def canny_cpp(src: np.ndarray, low_thresh: float, high_thresh: float) -> np.ndarray:
    """OpenCV's canny.cpp (cv::Canny, aperture 3, L1 gradient), transcribed loop for loop: the int16 Sobel with
    BORDER_REPLICATE, the padded magnitude rows, the map of 0/1/2 with its one-pixel border of 1, the
    prev_flag rule, the edge stack, and the final pass."""
    if low_thresh > high_thresh:
        low_thresh, high_thresh = high_thresh, low_thresh
    src = src[..., None] if src.ndim == 2 else src
    rows, cols, cn = src.shape
    p = np.pad(src.astype(int), ((1, 1), (1, 1), (0, 0)), mode="edge")
    dx = np.zeros((rows, cols, cn), int)
    dy = np.zeros((rows, cols, cn), int)
    for i in range(rows):
        for j in range(cols):
            for c in range(cn):
                w = p[i:i + 3, j:j + 3, c]
                dx[i, j, c] = (w[0, 2] + 2 * w[1, 2] + w[2, 2]) - (w[0, 0] + 2 * w[1, 0] + w[2, 0])
                dy[i, j, c] = (w[2, 0] + 2 * w[2, 1] + w[2, 2]) - (w[0, 0] + 2 * w[0, 1] + w[0, 2])
    low, high = int(np.floor(low_thresh)), int(np.floor(high_thresh))
    mag = np.zeros((rows + 2, cols + 2), int)  # row i + 1, column j + 1 hold pixel (i, j); borders 0
    gx = np.zeros((rows, cols), int)
    gy = np.zeros((rows, cols), int)
    for i in range(rows):
        for j in range(cols):
            norms = [abs(dx[i, j, c]) + abs(dy[i, j, c]) for c in range(cn)]
            best = 0
            for c in range(1, cn):
                if norms[c] > norms[best]:
                    best = c
            mag[i + 1, j + 1], gx[i, j], gy[i, j] = norms[best], dx[i, j, best], dy[i, j, best]
    emap = np.ones((rows + 2, cols + 2), int)
    stack = []
    TG22 = int(0.4142135623730950488016887242097 * (1 << 15) + 0.5)
    for i in range(1, rows + 1):
        prev_flag = 0
        for j in range(1, cols + 1):
            m = mag[i, j]
            push = False
            if m > low:
                xs, ys = gx[i - 1, j - 1], gy[i - 1, j - 1]
                x, y = abs(xs), abs(ys) << 15
                tg22x = x * TG22
                if y < tg22x:
                    push = m > mag[i, j - 1] and m >= mag[i, j + 1]
                else:
                    tg67x = tg22x + (x << 16)
                    if y > tg67x:
                        push = m > mag[i - 1, j] and m >= mag[i + 1, j]
                    else:
                        s = -1 if (xs ^ ys) < 0 else 1
                        push = m > mag[i - 1, j - s] and m > mag[i + 1, j + s]
            if not push:
                prev_flag = 0
                emap[i, j] = 1
                continue
            if not prev_flag and m > high and emap[i - 1, j] != 2:
                emap[i, j] = 2
                stack.append((i, j))
                prev_flag = 1
            else:
                emap[i, j] = 0
    while stack:
        i, j = stack.pop()
        for a, b in ((i, j - 1), (i, j + 1), (i - 1, j - 1), (i - 1, j), (i - 1, j + 1), (i + 1, j - 1), (i + 1, j),
                     (i + 1, j + 1)):
            if emap[a, b] == 0:
                emap[a, b] = 2
                stack.append((a, b))
    return np.where(emap[1:-1, 1:-1] == 2, 255, 0).astype(np.uint8)


@pytest.mark.parametrize("channels,low,high", [(3, 100, 200), (1, 30, 90), (3, 200.7, 50.2), (3, 0, 0)])
def test_canny_matches_opencv_algorithm(channels, low, high):
    from ipadapter_mlx.controlnet import canny

    rng = np.random.default_rng(channels + int(low))
    coarse = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((53, 41), Image.BICUBIC))
    image = np.clip(smooth.astype(int) + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)
    image = image[..., 0] if channels == 1 else image
    ours, ref = canny(image, low, high), canny_cpp(image, low, high)
    assert 0.02 < (ref > 0).mean() < 0.6  # edges, not an empty or full picture
    assert np.array_equal(ours, ref)


def test_control_image_preparation():
    """Resized with lanczos to the output size and scaled to [0, 1] as diffusers' VaeImageProcessor
    (do_normalize=False) does; canny as three equal channels; tile a blurred copy; inpaint -1 under the mask."""
    from diffusers.image_processor import VaeImageProcessor

    from ipadapter_mlx.controlnet import control_pixels, preprocess

    image = reference_image(3, (70, 45)).convert("RGBA")
    ref = VaeImageProcessor(vae_scale_factor=2, do_convert_rgb=True, do_normalize=False).preprocess(
        image, height=H, width=W).numpy().transpose(0, 2, 3, 1)
    assert np.abs(np.array(control_pixels(image, (W, H))) - ref).max() < 1e-6
    edges = np.asarray(preprocess(image, "canny", (W, H), 20, 60))
    assert edges.shape == (H, W, 3) and (edges[..., 0] == edges[..., 2]).all() and set(np.unique(edges)) == {0, 255}
    tile = np.asarray(preprocess(image, "tile", (W, H)), np.float32)
    sharp = np.asarray(image.convert("RGB").resize((W, H), Image.LANCZOS), np.float32)
    assert tile.shape == sharp.shape and 0 < np.abs(tile - sharp).mean() < 40
    mask = Image.new("L", (70, 45))
    mask.paste(255, (0, 0, 35, 45))  # the left half
    inpaint = preprocess(image, "inpaint", (W, H), mask=mask)
    assert (inpaint[:, : W // 2 - 1] == -1).all() and (inpaint[:, W // 2 + 1:] >= 0).all()
    assert np.array_equal(np.array(control_pixels(inpaint, (W, H)))[0], inpaint)


# -- conversion, quantization, low memory, the memory estimate, API errors ----------------------------------------


def test_convert_command(sd_nets, tmp_path, mlx_dir):
    """`python -m convert` writes a ControlNet folder (from a diffusers folder, or an original file with
    --config); --quantize stores its Linear layers quantized; each loads as --controlnet gives the same net."""
    from convert.__main__ import main as convert
    from mlx.utils import tree_flatten

    from ipadapter_mlx.controlnet import resolve_controlnet

    net = diffusers.ControlNetModel.from_pretrained(sd_nets / "net0")
    original = tmp_path / "control_tiny.pth"
    torch.save(to_original(net), original)
    assert convert([str(sd_nets / "net0"), str(tmp_path / "a")]) == 0
    assert convert([str(original), str(tmp_path / "b"), "--config", str(sd_nets / "net0")]) == 0
    assert convert([str(sd_nets / "net0"), str(tmp_path / "q"), "--quantize", "8"]) == 0
    from ipadapter_mlx.loading import load_component

    weights = [dict(tree_flatten(load_component(f, "controlnet").parameters())) for f in (tmp_path / "a", tmp_path / "b")]
    assert weights[0].keys() == weights[1].keys()
    assert all(mx.array_equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert resolve_controlnet(str(tmp_path / "a")) == tmp_path / "a"  # a converted folder is used as it is
    pipe = StableDiffusion(mlx_dir, mx.float32)
    pipe.load_controlnet(str(tmp_path / "q"))
    quantized = [k for k, _ in tree_flatten(pipe.controlnets[0].model.parameters()) if k.endswith(".scales")]
    assert quantized and json.loads((tmp_path / "q" / "controlnet" / "config.json").read_text())["quantization"]


def test_quantize_and_low_memory(mlx_dir, sd_nets):
    """--quantize covers the nets (their Linear layers); low-memory mode loads them after the encoders and gives
    the same picture."""
    kw = dict(steps=2, cfg=6.0, height=H, width=W, scheduler="euler", seed=4, return_array=True,
              controls=[Control(control_image(1))])
    pictures = []
    for low in (False, True):
        pipe = StableDiffusion(mlx_dir, dtype=mx.float32, low_memory=low)
        pipe.load_controlnet(str(sd_nets / "net0"))
        assert (pipe.controlnets[0].model is None) == low
        pictures.append(pipe.generate("a cat", **kw))
    assert mx.array_equal(*pictures)
    pipe = StableDiffusion(mlx_dir, dtype=mx.float32, quantize=(8, 32))
    pipe.load_controlnet(str(sd_nets / "net0"))
    from ipadapter_mlx.quantize import QuantizedLinear

    layers = [m for _, m in pipe.controlnets[0].model.named_modules() if isinstance(m, QuantizedLinear)]
    assert layers  # the attention and time-embedding Linears (zero convs of 32 wide too)
    assert psnr(np.array(pipe.generate("a cat", **kw)), np.array(pictures[0])) > 20  # close to float


def test_memory_estimate_counts_the_nets(mlx_dir, sd_nets):
    """Each net's weights and the residuals it holds while the UNet runs (measured from a real call)."""
    from mlx.utils import tree_flatten

    pipe = StableDiffusion(mlx_dir, dtype=mx.float32)
    before = pipe.estimate_memory(64, 96)
    pipe.load_controlnet(str(sd_nets / "net0"))
    net = pipe.controlnets[0].model
    weights = sum(v.nbytes for _, v in tree_flatten(net.parameters()))
    r = net(mx.zeros((2, 32, 48, 4)), mx.array([1.0, 1.0]), StepConditioning(mx.zeros((2, 7, 32))),
            mx.zeros((2, 64, 96, 3)))
    residuals = sum(a.nbytes for a in r.down + [r.mid])
    assert pipe.estimate_memory(64, 96) - before == weights + residuals


def test_api_errors(mlx_dir, sd_nets, xl_parts):
    pipe = StableDiffusion(mlx_dir, dtype=mx.float32)
    pipe.load_controlnet(str(sd_nets / "net0"))
    kw = dict(steps=2, height=H, width=W, scheduler="euler", seed=1)
    for controls, message in [
        ([Control(control_image(1)), Control(control_image(2), index=1)], r"Control index 1: 1 ControlNet loaded"),
        ([Control(control_image(1), start=0.5, end=0.5)], r"control start 0.5 must be before its end 0.5"),
        ([Control(control_image(1), scale=float("nan"))], r"control scale"),
        ([Control(np.zeros((H, W + 8, 3), np.float32))], r"a float control image must be \(height, width, 3\)"),
    ]:
        with pytest.raises(UserError, match=message):
            pipe.generate("a cat", controls=controls, **kw)
    with pytest.raises(UserError, match=r"is for SDXL \(cross-attention 64\), this model is SD 1.x/2.x"):
        pipe.load_controlnet(str(xl_parts / "net"))
    pipe.unload_controlnet()
    assert len(pipe.controlnets) == 0


@pytest.mark.parametrize("structure", ["--pose", "--edges-from"])
def test_example_pose_and_style(structure, mlx_dir, sd_nets, adapter_repo, tmp_path, monkeypatch):
    """examples/pose_and_style.py runs (tiny model, adapter and net), so it cannot rot."""
    import runpy
    import sys

    control_image(1).save(tmp_path / "structure.png")
    reference_image(2).save(tmp_path / "style.png")
    monkeypatch.setattr(sys, "argv", [
        "pose_and_style.py", structure, str(tmp_path / "structure.png"), "--image", str(tmp_path / "style.png"),
        "--prompt", "a dancer", "--model", str(mlx_dir),
        "--ip-adapter", str(adapter_repo / "models" / VARIANTS["plus"][0]),
        "--controlnet", str(sd_nets / "net0"), "--steps", "2", "--size", "32", "--output", str(tmp_path / "out.png")])
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "pose_and_style.py"), run_name="__main__")
    assert Image.open(tmp_path / "out.png").size == (32, 32)


def test_canny_long_weak_edge():
    """A weak edge 600 pixels long fed by one strong end: hysteresis outruns the numpy rings (256) and is
    finished pixel by pixel; still OpenCV's result."""
    from ipadapter_mlx.controlnet import canny

    image = np.zeros((9, 620), np.uint8)
    image[5:] = 20  # a step of 20: |dy| = 80 (weak)
    image[5:, :6] = 120  # one strong end
    ours, ref = canny(image, 50, 300), canny_cpp(image, 50, 300)
    assert (ref[4] > 0).sum() + (ref[5] > 0).sum() > 600 and np.array_equal(ours, ref)


def test_original_file_from_the_hub(mlx_dir, tmp_path, monkeypatch):
    """REPO:PATH fetches one original file from the Hub cache (offline); its inferred config (768-d context) is
    refused by the tiny model (32-d) naming both."""
    from huggingface_hub import constants

    from test_cli import hub_cache

    torch.manual_seed(0)
    (tmp_path / "repo").mkdir()
    torch.save(to_original(perturb(diffusers.ControlNetModel(**SD15_LIKE), 3)), tmp_path / "repo" / "control_tiny.pth")
    hub_cache(tmp_path / "hf", "lllyasviel/ControlNet-v1-1", tmp_path / "repo")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    with pytest.raises(UserError, match=r"ControlNet lllyasviel/ControlNet-v1-1:control_tiny.pth is for SD 1.x/2.x "
                                        r"\(cross-attention 768\), this model is SD 1.x/2.x \(cross-attention 32\)"):
        StableDiffusion(mlx_dir, mx.float32).load_controlnet("lllyasviel/ControlNet-v1-1:control_tiny.pth")


def test_repo_sub_folder_from_the_hub(mlx_dir, sd_nets, tmp_path, monkeypatch, capsys):
    """REPO:FOLDER: a diffusers ControlNet in a sub-folder of a Hub repo (offline, from the cache), loaded and
    converted like a repo of its own; a repo without one says what it lacks."""
    import shutil

    from huggingface_hub import constants
    from mlx.utils import tree_flatten

    from convert.__main__ import main as convert
    from test_cli import hub_cache

    shutil.copytree(sd_nets / "net0", tmp_path / "repo" / "canny")
    (tmp_path / "repo" / "README.md").write_text("several nets")
    hub_cache(tmp_path / "hf", "tiny/nets", tmp_path / "repo")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    pipe = StableDiffusion(mlx_dir, mx.float32)
    a, b = pipe.load_controlnet("tiny/nets:canny"), pipe.load_controlnet(str(sd_nets / "net0"))
    weights = [dict(tree_flatten(pipe.controlnets.model(pipe.controlnets.loaded[i]).parameters())) for i in (a, b)]
    assert weights[0].keys() == weights[1].keys() and all(mx.array_equal(weights[0][k], weights[1][k])
                                                          for k in weights[0])
    assert convert(["tiny/nets:canny", str(tmp_path / "out")]) == 0, capsys.readouterr().err
    assert (tmp_path / "out" / "controlnet" / "model.safetensors").is_file()
    with pytest.raises(UserError, match=r"tiny/nets has no config.json: not a diffusers ControlNet"):
        pipe.load_controlnet("tiny/nets")


def test_size_defaults_to_the_control_image(diffusers_dir, mlx_dir, sd_nets):
    """Text-to-image without height/width: the first control image's size rounded down to the VAE's factor, as
    diffusers' ControlNet pipeline defaults it (a 53x41 control image with this VAE's factor 2 -> 52x40); through
    the CLI's size rule too (Pipeline.control_size)."""
    ctrl = control_image(3, size=(49, 33))  # control_image pads by (4, 8): 53x41
    assert ctrl.size == (53, 41)
    latents = torch.randn(1, 4, 20, 26, generator=torch.Generator().manual_seed(5))
    ref = sd_reference(diffusers_dir, sd_nets, ["net0"])(
        "a cat", image=ctrl, num_inference_steps=STEPS, guidance_scale=6.0, latents=latents, output_type="np").images
    assert ref.shape[1:3] == (40, 52)
    ours = ours_with(mlx_dir, sd_nets, ["net0"])
    assert ours.control_size(None, None, [Control(ctrl)]) == (40, 52)
    assert ours.control_size(24, None, [Control(ctrl)]) == (24, 52)
    got = np.array(ours.generate("a cat", controls=[Control(ctrl)], steps=STEPS, cfg=6.0, scheduler="euler",
                                 latents=latents.numpy(), return_array=True))
    assert got.shape[1:3] == (40, 52)
    assert record("ControlNet, size from the control image", psnr(got, ref), "dB") >= 40
