"""IP-Adapter-FaceID: projections, LoRA, whole generations against diffusers (load_ip_adapter of FaceID files +
ip_adapter_image_embeds, float32) and the authors' code transcribed where diffusers has no equivalent; face
embeddings files and the CLI's one-line errors."""

import pytest

pytest.importorskip("torch", reason="parity test: needs the PyTorch reference (pip install torch==2.13.0 '.[test]')")

import diffusers
import mlx.core as mx
import numpy as np
import torch

from conftest import psnr, record, to_np
from faceid_fixtures import FACEID_VARIANTS, ID_DIM, make_faceid_repo
from ip_fixtures import make_adapter_repo
from ipadapter_mlx import StableDiffusion
from ipadapter_mlx.checkpoints.adapter_files import read_ip_adapter
from ipadapter_mlx.errors import UserError
from ipadapter_mlx.ip_adapter import ImagePrompt
from test_ip_adapter import reference_image

H, W, STEPS = 32, 32, 4


@pytest.fixture(scope="module")
def faceid_repo(torch_pipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("h94-faceid")
    make_adapter_repo(root / "clip", torch_pipe.unet)  # the CLIP towers the Plus adapters read (models/...)
    return make_faceid_repo(root, torch_pipe.unet)


def faces(n: int, seed: int = 0) -> np.ndarray:
    a = np.random.default_rng(seed).standard_normal((n, ID_DIM)).astype(np.float32)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)  # as insightface's normed_embedding


def diffusers_projection(path):
    state = torch.load(path, weights_only=True)
    return diffusers.UNet2DConditionModel._convert_ip_adapter_image_proj_to_diffusers(
        diffusers.UNet2DConditionModel, state["image_proj"], low_cpu_mem_usage=False).eval()


# -- per module ------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["faceid", "portrait", "portrait-unnorm"])
def test_projection_matches_diffusers(variant, faceid_repo):
    path = faceid_repo / FACEID_VARIANTS[variant][0]
    adapter = read_ip_adapter(path)
    c = adapter.config.image_proj
    assert c.face and c.tokens == FACEID_VARIANTS[variant][2] and not c.reads_hidden_states
    x = torch.tensor(faces(3, 1))
    with torch.no_grad():  # portrait-unnorm is diffusers' plus Resampler over one-token sequences
        ref = diffusers_projection(path)(x[:, None] if variant == "portrait-unnorm" else x)
    got = adapter.image_proj(mx.array(x.numpy())[:, None] if variant == "portrait-unnorm" else mx.array(x.numpy()))
    assert record(f"FaceID projection {variant}", np.abs(to_np(got) - to_np(ref)).max(), "abs") < 1e-4


@pytest.mark.parametrize("variant,scale,shortcut", [("plus", None, False), ("plusv2", None, True), ("plusv2", 0.6, True),
                                                    ("plus", 0.6, True)])  # a weight turns v2's shortcut on
def test_plus_projection_matches_diffusers(variant, scale, shortcut, faceid_repo):
    path = faceid_repo / FACEID_VARIANTS[variant][0]
    adapter = read_ip_adapter(path)
    c = adapter.config.image_proj
    assert c.kind == "faceid-plus" and c.shortcut == (variant == "plusv2") and c.clip_width == c.clip_dim
    ref = diffusers_projection(path)
    g = torch.Generator().manual_seed(2)
    x, clip = torch.tensor(faces(3, 2)), torch.randn(3, 257, c.clip_dim, generator=g)
    # diffusers' by-hand settings: clip_embeds (batch, images, tokens, width), shortcut and its scale (default 1)
    ref.clip_embeds, ref.shortcut, ref.shortcut_scale = clip[None], shortcut, 1.0 if scale is None else scale
    with torch.no_grad():
        expected = ref(x)
    got = adapter.image_proj(mx.array(x.numpy()), mx.array(clip.numpy()), scale)
    assert record(f"FaceID projection {variant} (v2 weight {scale})", np.abs(to_np(got) - to_np(expected)).max(),
                  "abs") < 1e-4


# -- whole generations -----------------------------------------------------------------------------


def start_noise(h=H, w=W, seed=0):
    return torch.randn(1, 4, h // 2, w // 2, generator=torch.Generator().manual_seed(seed))


def crops(n: int):
    return [reference_image(10 + k, (224, 224)) for k in range(n)]  # stand-ins for norm_crop's 224 px faces


class AuthorsLoRA(torch.nn.Module):
    """attention_processor_faceid.py: `attn.to_q(h) + lora_scale * self.to_q_lora(h)`, LoRALinearLayer being
    up(down(h)) with no alpha; likewise to_k, to_v and to_out[0]."""

    def __init__(self, base, down, up, scale):
        super().__init__()
        self.base, self.down, self.up, self.scale = base, down, up, scale

    def forward(self, h, *args, **kw):
        return self.base(h) + self.scale * torch.nn.functional.linear(torch.nn.functional.linear(h, self.down), self.up)


def add_authors_lora(unet, state: dict, scale: float) -> int:
    """The file's LoRA on processor i of unet.attn_processors, as the authors' LoRA(IP)AttnProcessor applies it
    (diffusers would route it through PEFT; this transcription needs no PEFT)."""
    modules, n = dict(unet.named_modules()), 0
    for i, name in enumerate(unet.attn_processors):
        attn = modules[name[: -len(".processor")]]
        for proj in ("to_q", "to_k", "to_v", "to_out"):
            if f"{i}.{proj}_lora.down.weight" not in state:
                continue
            down, up = state[f"{i}.{proj}_lora.down.weight"], state[f"{i}.{proj}_lora.up.weight"]
            if proj == "to_out":
                attn.to_out[0] = AuthorsLoRA(attn.to_out[0], down, up, scale)
            else:
                setattr(attn, proj, AuthorsLoRA(getattr(attn, proj), down, up, scale))
            n += 1
    return n


def diffusers_faceid(pipe, repo, variant, scale, ids, images=None, shortcut_scale=1.0, lora_scale=1.0,
                     plus_encoder="clip/models/image_encoder"):
    """diffusers' documented FaceID recipe: load_ip_adapter of the file, the id embeddings as
    ip_adapter_image_embeds [zeros; faces] (batch, faces, dim); for Plus, clip_embeds and shortcut by hand; the
    LoRA as the authors apply it."""
    file, kind, _, lora = FACEID_VARIANTS[variant]
    pipe.load_ip_adapter(str(repo), subfolder="", weight_name=file,
                         image_encoder_folder=plus_encoder if kind == "plus" else None)
    if lora:
        assert add_authors_lora(pipe.unet, torch.load(repo / file, weights_only=True)["ip_adapter"], lora_scale) > 0
    pipe.set_ip_adapter_scale(scale)
    x = torch.tensor(ids)[None]
    embeds = [torch.cat([torch.zeros_like(x), x])]
    if kind == "plus":
        clip = pipe.prepare_ip_adapter_image_embeds([images], None, "cpu", 1, True)[0]
        proj = pipe.unet.encoder_hid_proj.image_projection_layers[0]
        proj.clip_embeds, proj.shortcut, proj.shortcut_scale = clip, "plusv2" in variant, shortcut_scale
    return embeds


def run_sd15(diffusers_dir, mlx_dir, repo, variant, n_faces=1, scale=0.8, shortcut_scale=1.0):
    ids, images = faces(n_faces, 3), crops(n_faces)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(diffusers_dir, safety_checker=None)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    embeds = diffusers_faceid(pipe, repo, variant, scale, ids, images, shortcut_scale)
    ref = pipe("a portrait", ip_adapter_image_embeds=embeds, num_inference_steps=STEPS, guidance_scale=6.0,
               height=H, width=W, latents=start_noise(), output_type="np").images
    ours = StableDiffusion(mlx_dir, dtype=mx.float32)
    plus = FACEID_VARIANTS[variant][1] == "plus"
    ours.load_ip_adapter(str(repo / FACEID_VARIANTS[variant][0]), scale=scale,
                         image_encoder=str(repo / "clip/models/image_encoder") if plus else None)
    prompt = ImagePrompt(face_embeds=ids, images=images if plus else [],
                         faceid_v2_weight=None if shortcut_scale == 1.0 else shortcut_scale)
    kw = dict(steps=STEPS, cfg=6.0, height=H, width=W, scheduler="euler", latents=start_noise().numpy(),
              return_array=True)
    got = np.array(ours.generate("a portrait", image_prompts=[prompt], **kw))
    return got, ref, ours, kw


@pytest.mark.parametrize("variant,n_faces", [("faceid", 1), ("plus", 1), ("plusv2", 1), ("portrait", 3)])
def test_generation_matches_diffusers(variant, n_faces, diffusers_dir, mlx_dir, faceid_repo):
    got, ref, ours, kw = run_sd15(diffusers_dir, mlx_dir, faceid_repo, variant, n_faces)
    assert record(f"FaceID SD 1.5 {variant} ({n_faces} faces)", psnr(got, ref), "dB") >= 40
    ours.unload_ip_adapter()  # and the adapter really acts (the check above is not the base model twice)
    assert psnr(got, np.array(ours.generate("a portrait", **kw))) < 40


SDXL_FACEID = {"faceid": ("ip-adapter-faceid_sdxl.bin", "faceid", 4, True),
               "plusv2": ("ip-adapter-faceid-plusv2_sdxl.bin", "plus", 4, True),
               "portrait": ("ip-adapter-faceid-portrait_sdxl.bin", "faceid", 16, False)}


@pytest.fixture(scope="module")
def xl_faceid(tmp_path_factory):
    from conftest import write_tokenizer
    from ipadapter_mlx.checkpoints.stable_diffusion import convert_diffusers_folder
    from test_sdxl import UNET, make_sdxl_pipeline

    root = tmp_path_factory.mktemp("xl-faceid")
    pipe = make_sdxl_pipeline(UNET, write_tokenizer(root / "tok"))
    pipe.save_pretrained(root / "xl")
    make_adapter_repo(root / "repo" / "clip", pipe.unet)
    make_faceid_repo(root / "repo", pipe.unet, seed=5, variants=SDXL_FACEID)
    return root / "xl", convert_diffusers_folder(root / "xl", root / "mlx"), root / "repo"


@pytest.mark.parametrize("variant,n_faces", [("faceid", 1), ("plusv2", 2), ("portrait", 2)])
def test_sdxl_generation_matches_diffusers(variant, n_faces, xl_faceid, monkeypatch):
    from test_sdxl import H as XH, W as XW

    xl_dir, mlx_dir, repo = xl_faceid
    monkeypatch.setitem(FACEID_VARIANTS, variant, SDXL_FACEID[variant])  # diffusers_faceid reads the table
    ids, images = faces(n_faces, 4), crops(n_faces)
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(xl_dir)
    embeds = diffusers_faceid(pipe, repo, variant, 0.7, ids, images, shortcut_scale=0.8)
    latents = start_noise(XH, XW, seed=1)
    ref = pipe("a portrait", ip_adapter_image_embeds=embeds, num_inference_steps=STEPS, guidance_scale=6.0,
               height=XH, width=XW, latents=latents, output_type="np").images
    ours = StableDiffusion(mlx_dir, mx.float32)
    plus = SDXL_FACEID[variant][1] == "plus"
    ours.load_ip_adapter(str(repo / SDXL_FACEID[variant][0]), scale=0.7,
                         image_encoder=str(repo / "clip/models/image_encoder") if plus else None)
    prompt = ImagePrompt(face_embeds=ids, images=images if plus else [], faceid_v2_weight=0.8)
    got = ours.generate("a portrait", steps=STEPS, cfg=6.0, height=XH, width=XW, scheduler="euler",
                        latents=latents.numpy(), image_prompts=[prompt], return_array=True)
    assert record(f"FaceID SDXL {variant} ({n_faces} faces)", psnr(np.array(got), ref), "dB") >= 40


# -- LoRA lifetime, converted folders ----------------------------------------------------------------


def test_unloading_removes_the_lora_and_scale_zero_is_the_base_model(mlx_dir, faceid_repo):
    pipe = StableDiffusion(mlx_dir, dtype=mx.float32)
    kw = dict(steps=2, cfg=6.0, height=H, width=W, scheduler="euler", latents=start_noise().numpy(), return_array=True)
    base = pipe.generate("a portrait", **kw)
    pipe.load_ip_adapter(str(faceid_repo / FACEID_VARIANTS["faceid"][0]), lora_scale=0.0)
    assert len(pipe.loras) == 1
    zero = pipe.generate("a portrait", image_prompts=[ImagePrompt(face_embeds=faces(1), scale=0.0)], **kw)
    assert mx.array_equal(base, zero)  # LoRA scale 0 and adapter scale 0: exactly the base model
    pipe.unload_ip_adapter()
    pipe.load_ip_adapter(str(faceid_repo / FACEID_VARIANTS["faceid"][0]))
    assert not mx.array_equal(base, pipe.generate("a portrait", image_prompts=[ImagePrompt(face_embeds=faces(1), scale=0.0)], **kw))
    pipe.unload_ip_adapter(0)
    assert len(pipe.loras) == 0 and mx.array_equal(base, pipe.generate("a portrait", **kw))


def test_converted_folder_keeps_the_lora_and_the_shortcut(faceid_repo, tmp_path):
    from mlx.utils import tree_flatten

    from ipadapter_mlx.checkpoints.adapter_files import save_ip_adapter

    src = faceid_repo / FACEID_VARIANTS["plusv2"][0]
    folder = save_ip_adapter(src, tmp_path / "plusv2")
    a, b = read_ip_adapter(src), read_ip_adapter(folder)
    assert b.config.image_proj.shortcut and b.config == a.config
    assert set(a._lora) == set(b._lora) and all(mx.array_equal(a._lora[k], b._lora[k]) for k in a._lora)
    pa, pb = dict(tree_flatten(a.parameters())), dict(tree_flatten(b.parameters()))
    assert set(pa) == set(pb) and all(mx.array_equal(pa[k], pb[k]) for k in pa)


# -- face embeddings files and the command line ------------------------------------------------------


def test_face_embeds_file_round_trip(tmp_path):
    from ipadapter_mlx.faceid import read_face_embeds, save_face_embeds

    ids, images = faces(2, 7), crops(2)
    save_face_embeds(str(tmp_path / "f.safetensors"), ids, images, {"who": "test"})
    got, got_crops = read_face_embeds(str(tmp_path / "f.safetensors"))
    assert np.array_equal(got, ids) and [np.asarray(c).tolist() for c in got_crops] == [np.asarray(c).tolist() for c in images]
    np.save(tmp_path / "f.npy", ids[:1])
    assert np.array_equal(read_face_embeds(str(tmp_path / "f.npy"))[0], ids[:1])


@pytest.fixture
def cli(mlx_dir, faceid_repo, tmp_path, capsys):
    from ipadapter_mlx.cli import main

    reference_image(1).save(tmp_path / "ref.png")
    crops(1)[0].save(tmp_path / "crop.png")
    np.save(tmp_path / "face.npy", faces(1, 3))

    def go(*args, command="generate"):
        common = ["--model", str(mlx_dir), "--prompt", "a portrait", "--steps", "2", "--height", str(H), "--width",
                  str(W), "--seed", "3", "--scheduler", "euler", "--output", str(tmp_path / "out.png")]
        code = main([command, *(common if command == "generate" else []), *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return go


def test_cli_plusv2_matches_the_api(cli, mlx_dir, faceid_repo, tmp_path):
    from PIL import Image

    from ipadapter_mlx.images import open_image

    adapter, encoder = str(faceid_repo / FACEID_VARIANTS["plusv2"][0]), str(faceid_repo / "clip/models/image_encoder")
    code, _, err = cli("--ip-adapter", adapter, "--face-embeds", str(tmp_path / "face.npy"), "--image",
                       str(tmp_path / "crop.png"), "--image-encoder", encoder, "--faceid-v2-weight", "0.5",
                       "--faceid-lora-scale", "0.6", "--scale", "0.9")
    assert code == 0, err
    pipe = StableDiffusion(mlx_dir, dtype=mx.float32)
    pipe.load_ip_adapter(adapter, image_encoder=encoder, scale=0.9, lora_scale=0.6)
    prompt = ImagePrompt(face_embeds=faces(1, 3), images=[open_image(tmp_path / "crop.png")], faceid_v2_weight=0.5)
    api = pipe.generate("a portrait", steps=2, cfg=7.5, height=H, width=W, scheduler="euler", seed=3,
                        image_prompts=[prompt])[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out.png").convert("RGB")), np.asarray(api))


def bad(cli, *args) -> str:
    code, _, err = cli(*args)
    lines = err.strip().splitlines()
    assert code == 2 and lines and lines[-1].startswith("error: "), err
    return lines[-1]


def test_cli_bad_face_inputs_get_one_line(cli, faceid_repo, tmp_path):
    faceid = str(faceid_repo / FACEID_VARIANTS["faceid"][0])
    plus = str(faceid_repo / FACEID_VARIANTS["plus"][0])
    clip = str(faceid_repo / "clip/models/ip-adapter_sd15.bin")
    np.save(tmp_path / "wide.npy", np.ones((1, ID_DIM + 4), np.float32))
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    face = str(tmp_path / "face.npy")
    assert "reads a face identity embedding, not a reference picture" in bad(
        cli, "--ip-adapter", faceid, "--image", str(tmp_path / "ref.png"))
    assert "is a CLIP image adapter" in bad(cli, "--ip-adapter", clip, "--face-embeds", face)
    line = bad(cli, "--ip-adapter", faceid, "--face-embeds", str(tmp_path / "wide.npy"))
    assert f"({ID_DIM + 4}-d)" in line and f"reads {ID_DIM}-d" in line
    assert "cannot read face embeddings" in bad(cli, "--ip-adapter", faceid, "--face-embeds", str(tmp_path / "obj.npy"))
    assert "0 face crops (--image) for 1 face embeddings" in bad(
        cli, "--ip-adapter", plus, "--face-embeds", face, "--image-encoder", str(faceid_repo / "clip/models/image_encoder"))
    assert "--faceid-v2-weight is for FaceID Plus v2" in bad(
        cli, "--ip-adapter", faceid, "--face-embeds", face, "--faceid-v2-weight", "0.5")
    assert "carries no LoRA" in bad(cli, "--ip-adapter", str(faceid_repo / FACEID_VARIANTS["portrait"][0]),
                                    "--face-embeds", face, "--faceid-lora-scale", "0.5")
    assert "reads no picture" in bad(cli, "--ip-adapter", faceid, "--face-embeds", face, "--image", str(tmp_path / "ref.png"))


def test_cli_face_image_without_insightface_says_what_to_install(cli, faceid_repo, tmp_path):
    try:
        import insightface  # noqa: F401
        pytest.skip("insightface is installed: the message for a missing one cannot be shown")
    except ImportError:
        pass
    line = bad(cli, "--ip-adapter", str(faceid_repo / FACEID_VARIANTS["faceid"][0]), "--face-image",
               str(tmp_path / "ref.png"))
    assert 'pip install ".[faceid]"' in line and "buffalo_l" in line and ".insightface/models" in line


def test_embed_face_image_round_trip(cli, faceid_repo, tmp_path):
    """`embed --face-image` writes what `generate --face-embeds` reads (needs insightface and its buffalo_l models)."""
    pytest.importorskip("insightface", reason="insightface is not installed (the optional extra faceid)")
    code, out, err = cli("--ip-adapter", str(faceid_repo / FACEID_VARIANTS["plus"][0]), "--face-image",
                         str(tmp_path / "ref.png"), "--output", str(tmp_path / "f.safetensors"), command="embed")
    if code == 2 and "buffalo_l" in err:
        pytest.skip(f"insightface's models are not available here: {err.strip()}")
    assert code == 2 and "no face found" in err or code == 0, err  # the stand-in picture holds no real face


def test_separate_kohya_lora_beside_the_adapter(mlx_dir, faceid_repo, torch_pipe, tmp_path):
    """h94 also ships each FaceID LoRA as NAME_lora.safetensors (kohya names, for ComfyUI/A1111): beside an adapter
    whose file has none, it is found and gives the same picture as the LoRA inside the .bin."""
    from safetensors.torch import save_file

    state = torch.load(faceid_repo / FACEID_VARIANTS["faceid"][0], weights_only=True)
    names = list(torch_pipe.unet.attn_processors)
    kohya, plain = {}, {}
    for key, value in state["ip_adapter"].items():
        i, proj, *rest = key.split(".")
        if not proj.endswith("_lora"):
            plain[key] = value
            continue
        module = names[int(i)][: -len(".processor")] + "." + proj[: -len("_lora")] + (".0" if proj == "to_out_lora" else "")
        stem = "lora_unet_" + module.replace(".", "_")
        kohya[f"{stem}.lora_{rest[0]}.weight"] = value.contiguous()
        kohya[f"{stem}.alpha"] = torch.tensor(float(value.shape[0] if rest[0] == "down" else value.shape[1]))
    torch.save({"image_proj": state["image_proj"], "ip_adapter": plain}, tmp_path / "ip-adapter-faceid_sd15.bin")
    save_file(kohya, tmp_path / "ip-adapter-faceid_sd15_lora.safetensors")
    kw = dict(steps=2, cfg=6.0, height=H, width=W, scheduler="euler", latents=start_noise().numpy(), return_array=True,
              image_prompts=[ImagePrompt(face_embeds=faces(1))])
    pictures = []
    for path in (faceid_repo / FACEID_VARIANTS["faceid"][0], tmp_path / "ip-adapter-faceid_sd15.bin"):
        pipe = StableDiffusion(mlx_dir, dtype=mx.float32)
        pipe.load_ip_adapter(str(path), lora_scale=0.7)
        pictures.append(np.array(pipe.generate("a portrait", **kw)))
    assert record("FaceID LoRA: kohya file beside vs in the .bin", psnr(*pictures), "dB") >= 100


def test_hostile_faceid_files_get_one_line(faceid_repo, mlx_dir, tmp_path):
    state = torch.load(faceid_repo / FACEID_VARIANTS["plusv2"][0], weights_only=True)
    lora = dict(state["ip_adapter"])
    lora["999.to_q_lora.down.weight"], lora["999.to_q_lora.up.weight"] = torch.zeros(4, 8), torch.zeros(8, 4)
    torch.save({"image_proj": state["image_proj"], "ip_adapter": lora}, tmp_path / "a-faceid-plusv2_sd15.bin")
    pipe = StableDiffusion(mlx_dir, dtype=mx.float32)
    with pytest.raises(UserError, match="names no attention processor"):
        pipe.load_ip_adapter(str(tmp_path / "a-faceid-plusv2_sd15.bin"))
    assert len(pipe.adapters) == 0 and len(pipe.loras) == 0  # nothing half-loaded
    lora = dict(state["ip_adapter"])
    lora["1.to_q_lora.down.weight"] = torch.zeros(4, 7)
    torch.save({"image_proj": state["image_proj"], "ip_adapter": lora}, tmp_path / "b-faceid-plusv2_sd15.bin")
    with pytest.raises(UserError, match="attn2.to_q has down"):
        pipe.load_ip_adapter(str(tmp_path / "b-faceid-plusv2_sd15.bin"))
    proj = dict(state["image_proj"])
    proj["perceiver_resampler.proj_out.weight"] = torch.zeros(5, proj["perceiver_resampler.proj_out.weight"].shape[1])
    torch.save({"image_proj": proj, "ip_adapter": state["ip_adapter"]}, tmp_path / "c-faceid-plusv2_sd15.bin")
    with pytest.raises(UserError, match="FaceID Plus projection is inconsistent"):
        read_ip_adapter(tmp_path / "c-faceid-plusv2_sd15.bin")
    with pytest.raises(UserError, match=f"reads {ID_DIM}-d identity embeddings"):
        pipe.load_ip_adapter(str(faceid_repo / FACEID_VARIANTS["faceid"][0]))
        pipe.generate("x", steps=1, height=H, width=W, image_prompts=[ImagePrompt(face_embeds=np.zeros((2, 3, ID_DIM)))])


@pytest.mark.parametrize("variant", ["plusv2", "faceid"])
def test_example_runs(variant, mlx_dir, faceid_repo, tmp_path, monkeypatch):
    import runpy
    import sys
    from pathlib import Path

    from PIL import Image

    np.save(tmp_path / "face.npy", faces(1, 3))
    crops(1)[0].save(tmp_path / "crop.png")
    # the Plus encoder beside the adapter, where discovery looks first
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / FACEID_VARIANTS[variant][0]).symlink_to(faceid_repo / FACEID_VARIANTS[variant][0])
    (tmp_path / "a" / "image_encoder").symlink_to(faceid_repo / "clip/models/image_encoder")
    monkeypatch.setattr(sys, "argv", [
        "faceid.py", "--model", str(mlx_dir), "--ip-adapter", str(tmp_path / "a" / FACEID_VARIANTS[variant][0]),
        "--face-embeds", str(tmp_path / "face.npy"), "--crop", str(tmp_path / "crop.png"), "--steps", "2",
        "--size", "32", "--lora-scale", "0.6", "--output", str(tmp_path / "out.png")])
    runpy.run_path(str(Path(__file__).resolve().parents[1] / "examples" / "faceid.py"), run_name="__main__")
    assert Image.open(tmp_path / "out.png").size == (32, 32)


# -- the insightface path, with a stand-in for insightface (its real models cannot be had here) ------------


@pytest.fixture
def fake_insightface(monkeypatch):
    """A stand-in with insightface's interface: FaceAnalysis finds two faces (only at detection sizes up to 512,
    so the retry at smaller sizes is exercised), the second larger; norm_crop returns the image's top-left corner.
    Embeddings are made from the pixel under each face's box (BGR), so a colour-order mistake shows."""
    import sys
    import types
    from types import SimpleNamespace

    calls = {"sizes": []}

    class FaceAnalysis:
        def __init__(self, name, root, providers):
            calls["init"] = (name, root)

        def prepare(self, ctx_id, det_size):
            self.det_model = SimpleNamespace(input_size=det_size)

        def get(self, bgr):
            calls["sizes"].append(self.det_model.input_size[0])
            if self.det_model.input_size[0] > 512 or bgr.mean() > 250:  # a white picture holds no face
                return []
            out = []
            for box in ([0, 0, 10, 10], [4, 4, 30, 28]):
                e = np.resize(bgr[box[1], box[0]].astype(np.float32) + 1, ID_DIM)
                out.append(SimpleNamespace(bbox=np.array(box, np.float32), kps=np.zeros((5, 2)), embedding=e * 3,
                                           normed_embedding=e / np.linalg.norm(e)))
            return out

    def norm_crop(img, landmark, image_size):
        return np.ascontiguousarray(img[:image_size, :image_size])

    app, utils = types.ModuleType("insightface.app"), types.ModuleType("insightface.utils")
    app.FaceAnalysis, utils.face_align = FaceAnalysis, SimpleNamespace(norm_crop=norm_crop)
    for name, module in {"insightface": types.ModuleType("insightface"), "insightface.app": app,
                         "insightface.utils": utils}.items():
        monkeypatch.setitem(sys.modules, name, module)
    return calls


def test_face_analysis_takes_the_largest_face_and_retries_smaller(fake_insightface, caplog, monkeypatch):
    import logging

    from PIL import Image

    monkeypatch.setattr(logging.getLogger("ipadapter_mlx"), "propagate", True)  # the CLI's setup turns it off

    from ipadapter_mlx.faceid import analyse_faces

    rgb = np.zeros((300, 300, 3), np.uint8)
    rgb[..., 0], rgb[4, 4] = 200, (10, 20, 30)  # the larger face's box starts at (4, 4)
    embeds, crops_ = analyse_faces([Image.fromarray(rgb)], ["me.png"])
    e = np.resize(np.array([30, 20, 10], np.float32) + 1, ID_DIM)  # its pixel in BGR order
    assert np.allclose(embeds[0], e / np.linalg.norm(e)) and fake_insightface["init"][0] == "buffalo_l"
    assert fake_insightface["sizes"] == [640, 576, 512] and "2 faces in me.png: using the largest" in caplog.text
    assert np.array_equal(np.asarray(crops_[0]), rgb[:224, :224])  # back to RGB
    assert "only 26 px wide" in caplog.text
    with pytest.raises(UserError, match="no face found in white.png"):
        analyse_faces([Image.new("RGB", (64, 64), "white")], ["white.png"])


def test_embed_face_image_then_face_embeds_is_face_image(fake_insightface, cli, faceid_repo, tmp_path):
    """`embed --face-image` writes the embedding and the crop; `generate --face-embeds` with that file gives the
    picture `generate --face-image` gives (Plus v2: the crop travels in the file)."""
    from PIL import Image

    photo = np.zeros((256, 256, 3), np.uint8)
    photo[..., 1], photo[4, 4] = 90, (200, 10, 60)
    Image.fromarray(photo).save(tmp_path / "me.png")
    adapter = str(faceid_repo / FACEID_VARIANTS["plusv2"][0])
    encoder = ["--image-encoder", str(faceid_repo / "clip/models/image_encoder")]
    code, _, err = cli("--ip-adapter", adapter, "--face-image", str(tmp_path / "me.png"), "--output",
                       str(tmp_path / "me.safetensors"), command="embed")
    assert code == 0, err
    pictures = []
    for face in (["--face-image", str(tmp_path / "me.png")], ["--face-embeds", str(tmp_path / "me.safetensors")]):
        code, _, err = cli("--ip-adapter", adapter, *face, *encoder)
        assert code == 0, err
        pictures.append(np.asarray(Image.open(tmp_path / "out.png")))
    assert np.array_equal(*pictures)


def test_lora_attention_layer_matches_the_authors(diffusers_dir, mlx_dir, faceid_repo):
    """One cross-attention layer with the FaceID LoRA fused and the image branch: ours vs diffusers' IP-Adapter
    processor over the authors' `W x + lora_scale * up(down(x))` projections."""
    from ipadapter_mlx.conditioning import ImageAttention
    from ipadapter_mlx.lora import submodule

    file, scale, lora_scale = FACEID_VARIANTS["faceid"][0], 0.7, 0.6
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(diffusers_dir, safety_checker=None)
    pipe.load_ip_adapter(str(faceid_repo), subfolder="", weight_name=file, image_encoder_folder=None)
    add_authors_lora(pipe.unet, torch.load(faceid_repo / file, weights_only=True)["ip_adapter"], lora_scale)
    pipe.set_ip_adapter_scale(scale)
    ours = StableDiffusion(mlx_dir, dtype=mx.float32)
    ours.load_ip_adapter(str(faceid_repo / file), lora_scale=lora_scale)
    name = "up_blocks.1.attentions.2.transformer_blocks.0.attn2"
    ref_attn = dict(pipe.unet.named_modules())[name]
    g = torch.Generator().manual_seed(5)
    x, text, ip = torch.randn(2, 64, ref_attn.query_dim, generator=g), torch.randn(2, 7, 32, generator=g), \
        torch.randn(2, 4, 32, generator=g)
    with torch.no_grad():
        expected = ref_attn(x, encoder_hidden_states=(text, [ip]))
    layer = next(l for s, l in ours.adapters[0].layers.items() if s.name == name)
    got = submodule(ours.unet, name)(mx.array(x.numpy()), mx.array(text.numpy()),
                                     [ImageAttention(layer, mx.array(ip.numpy()), scale)])
    assert record("FaceID LoRA'd attention layer (up_blocks.1 attn2)", np.abs(to_np(got) - to_np(expected)).max(),
                  "abs") < 1e-4


def test_two_identities_in_two_regions_match_diffusers(diffusers_dir, mlx_dir, faceid_repo):
    """Two faces on one FaceID adapter, each in its own region (diffusers' ip_adapter_masks), LoRA included."""
    from diffusers.image_processor import IPAdapterMaskProcessor
    from PIL import Image

    def half(left: bool) -> Image.Image:
        x = np.arange(W)[None, :].repeat(H, 0)
        return Image.fromarray((((x < 0.6 * W) if left else (x >= 0.4 * W)) * 255).astype(np.uint8)).convert("RGB")

    ids, masks = faces(2, 9), [half(True), half(False)]
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(diffusers_dir, safety_checker=None)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    embeds = diffusers_faceid(pipe, faceid_repo, "faceid", 0.9, ids)
    m = IPAdapterMaskProcessor().preprocess(masks, height=H, width=W)
    ref = pipe("two people", ip_adapter_image_embeds=embeds, num_inference_steps=STEPS, guidance_scale=6.0,
               height=H, width=W, latents=start_noise(), output_type="np",
               cross_attention_kwargs={"ip_adapter_masks": [m.reshape(1, *m.shape[:1], *m.shape[2:])]}).images
    ours = StableDiffusion(mlx_dir, dtype=mx.float32)
    ours.load_ip_adapter(str(faceid_repo / FACEID_VARIANTS["faceid"][0]), scale=0.9)
    kw = dict(steps=STEPS, cfg=6.0, height=H, width=W, scheduler="euler", latents=start_noise().numpy(), return_array=True)
    got = np.array(ours.generate("two people", image_prompts=[ImagePrompt(face_embeds=ids, masks=masks)], **kw))
    assert record("FaceID two faces in two regions (masks)", psnr(got, ref), "dB") >= 40
    assert psnr(got, np.array(ours.generate("two people", image_prompts=[ImagePrompt(face_embeds=ids)], **kw))) < 40


def test_presets_from_the_hub_find_the_vit_h_encoder(cli, faceid_repo, tmp_path, monkeypatch):
    """faceid-plusv2-sd15 from h94/IP-Adapter-FaceID (no encoder there) takes h94/IP-Adapter's ViT-H, by shapes;
    faceid-sd15 needs none. Offline, from a Hub cache laid out as huggingface_hub does."""
    import shutil

    from huggingface_hub import constants

    from test_cli import hub_cache

    flat = tmp_path / "faceid-repo"
    flat.mkdir()
    for variant in ("faceid", "plusv2"):
        shutil.copy(faceid_repo / FACEID_VARIANTS[variant][0], flat)
    hub_cache(tmp_path / "hf", "h94/IP-Adapter-FaceID", flat)
    hub_cache(tmp_path / "hf", "h94/IP-Adapter", faceid_repo / "clip")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    code, out, err = cli("--ip-adapter", "faceid-plusv2-sd15", "--face-embeds", str(tmp_path / "face.npy"),
                         "--image", str(tmp_path / "crop.png"))
    assert code == 0, err
    assert "image encoder for faceid-plusv2-sd15: h94/IP-Adapter:models/image_encoder" in out + err
    code, out, err = cli("--ip-adapter", "faceid-sd15", "--face-embeds", str(tmp_path / "face.npy"))
    assert code == 0 and "image encoder" not in out + err, err


def test_low_memory_and_quantized_pipelines_get_the_lora(mlx_dir, faceid_repo):
    """Low-memory mode loads the UNet after the adapter: its LoRA is fused then, the same picture; a quantized
    UNet gets it too (the check runs on the unquantized structure)."""
    kw = dict(steps=2, height=H, width=W, seed=1, return_array=True, image_prompts=[ImagePrompt(face_embeds=faces(1))])
    pictures = []
    for low, quantize in ((False, None), (True, None), (False, (8, 32))):
        pipe = StableDiffusion(mlx_dir, dtype=mx.float32, low_memory=low, quantize=quantize)
        pipe.load_ip_adapter(str(faceid_repo / FACEID_VARIANTS["faceid"][0]), lora_scale=0.5)
        pictures.append(np.array(pipe.generate("a portrait", **kw)))
    assert np.array_equal(pictures[0], pictures[1])
    assert record("FaceID + LoRA, 8-bit UNet vs float32", psnr(pictures[0], pictures[2]), "dB") >= 25
