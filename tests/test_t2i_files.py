"""Single-file T2I-Adapters (ComfyUI's models/t2i_adapter): TencentARC's original .pth files, written here by the
original architecture (T2I-Adapter's ldm/modules/encoders/adapter.py, re-typed below in PyTorch) and checked
feature by feature against it; diffusers' weights saved as one file, against diffusers' T2IAdapter. float32: max
abs error < 1e-5 of each feature map's largest value (the maps reach ~75 here; measured: <= 8e-7; a wrong name
or layout gives errors of order 1)."""

import pytest

pytest.importorskip("torch", reason="parity test: needs the PyTorch reference (pip install torch==2.13.0 '.[test]')")

import json

import diffusers
import mlx.core as mx
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

from conftest import perturb, record, to_np
from ipadapter_mlx import StableDiffusion, T2IControl
from ipadapter_mlx.errors import UserError
from ipadapter_mlx.loading import load_component
from ipadapter_mlx.t2i_adapter import resolve_t2i_adapter
from test_t2i_adapter import control_image, same_weights, xl  # noqa: F401 (xl: a fixture)


# -- TencentARC's modules (sk=True, ksize=1, use_conv=False: the published files) ------------------------------


class ResnetBlock(torch.nn.Module):
    def __init__(self, in_c: int, out_c: int, down: bool):
        super().__init__()
        self.down = down
        self.in_conv = torch.nn.Conv2d(in_c, out_c, 1) if in_c != out_c else None
        self.block1 = torch.nn.Conv2d(out_c, out_c, 3, 1, 1)
        self.act = torch.nn.ReLU()
        self.block2 = torch.nn.Conv2d(out_c, out_c, 1)

    def forward(self, x):
        if self.down:
            x = F.avg_pool2d(x, 2, 2)
        if self.in_conv is not None:
            x = self.in_conv(x)
        return x + self.block2(self.act(self.block1(x)))


class Adapter(torch.nn.Module):
    def __init__(self, channels: list[int], nums_rb: int, cin: int, r: int):
        super().__init__()
        self.unshuffle = torch.nn.PixelUnshuffle(r)
        self.channels, self.nums_rb = channels, nums_rb
        self.body = torch.nn.ModuleList([ResnetBlock(channels[i - 1] if i and not j else channels[i], channels[i],
                                                     down=bool(i and not j))
                                         for i in range(len(channels)) for j in range(nums_rb)])
        self.conv_in = torch.nn.Conv2d(cin, channels[0], 3, 1, 1)

    def forward(self, x):
        x, features = self.conv_in(self.unshuffle(x)), []
        for i in range(len(self.channels)):
            for j in range(self.nums_rb):
                x = self.body[i * self.nums_rb + j](x)
            features.append(x)
        return features


class ResnetBlockLight(torch.nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.block1 = torch.nn.Conv2d(c, c, 3, 1, 1)
        self.act = torch.nn.ReLU()
        self.block2 = torch.nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return x + self.block2(self.act(self.block1(x)))


class Extractor(torch.nn.Module):
    def __init__(self, in_c: int, inter_c: int, out_c: int, nums_rb: int, down: bool):
        super().__init__()
        self.in_conv = torch.nn.Conv2d(in_c, inter_c, 1)
        self.body = torch.nn.Sequential(*[ResnetBlockLight(inter_c) for _ in range(nums_rb)])
        self.out_conv = torch.nn.Conv2d(inter_c, out_c, 1)
        self.down = down

    def forward(self, x):
        if self.down:
            x = F.avg_pool2d(x, 2, 2)
        return self.out_conv(self.body(self.in_conv(x)))


class AdapterLight(torch.nn.Module):
    def __init__(self, channels: list[int], nums_rb: int, cin: int, r: int):
        super().__init__()
        self.unshuffle = torch.nn.PixelUnshuffle(r)
        self.body = torch.nn.ModuleList([Extractor(channels[i - 1] if i else cin, channels[i] // 4, channels[i], nums_rb,
                                                   down=i > 0) for i in range(len(channels))])

    def forward(self, x):
        x, features = self.unshuffle(x), []
        for block in self.body:
            x = block(x)
            features.append(x)
        return features


def original(kind: str, channels: list[int], blocks: int, image: int, r: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cls = AdapterLight if kind == "light" else Adapter
    model = perturb(cls(channels, blocks, image * r * r, r), seed)
    with torch.no_grad():  # features as strong as a trained adapter's (the default init gives faint ones)
        for name, p in model.named_parameters():
            if name.endswith("weight"):
                p.mul_(2.0)
    return model


def save(state: dict, path):
    """As TencentARC published them: torch.save of the state dict (.pth), or the same tensors as .safetensors."""
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    return path


def features(model, image: torch.Tensor, path) -> tuple[float, object]:
    """(the largest error of our feature maps, from the file through the converted cache, relative to the
    reference's largest value in each map; our inferred config)."""
    ours = load_component(resolve_t2i_adapter(str(path)), "t2i_adapter", mx.float32)
    with torch.no_grad():
        expected = [e.numpy() for e in model(image)]
    got = [to_np(g).transpose(0, 3, 1, 2) for g in ours(mx.array(image.permute(0, 2, 3, 1).numpy()))]
    assert [e.shape for e in expected] == [g.shape for g in got]
    return max(float(np.abs(g - e).max() / np.abs(e).max()) for g, e in zip(got, expected)), ours.config


# -- the module ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,channels,blocks,image,suffix", [
    ("full", [16, 24, 40, 40], 2, 3, ".pth"),  # t2iadapter_depth_sd15v2.pth's layout in small
    ("full", [16, 24, 40, 40], 1, 1, ".safetensors"),  # grey (canny, sketch); one block a level
    ("full", [16, 16, 40], 2, 3, ".pth"),  # no width change at level 1: 2 blocks a level still
    ("full", [16, 24, 40, 40], 4, 3, ".pth"),  # 4 blocks a level: read as 4 levels, not 8 of 2
    ("light", [16, 24, 40, 40], 4, 3, ".pth"),  # t2iadapter_color_sd14v1.pth's
], ids=["full", "full-grey-1-block", "full-same-width", "full-4-blocks", "light"])
def test_original_file_matches_tencentarc(kind, channels, blocks, image, suffix, tmp_path):
    model = original(kind, channels, blocks, image, 8)
    path = save(model.state_dict(), tmp_path / f"t2iadapter_{kind}{suffix}")
    x = torch.rand(2, image, 64, 128, generator=torch.Generator().manual_seed(1))  # even sizes down to 1/64
    err, config = features(model, x, path)
    assert (config.adapter_type, config.in_channels, config.downscale_factor, config.num_res_blocks) == \
        ({"full": "full_adapter", "light": "light_adapter"}[kind], image, 8, blocks)
    assert config.channels == (channels if kind == "full" else channels[:-1])  # diffusers' light: last repeated
    assert record(f"T2I-Adapter original {kind} file ({channels}, {blocks} blocks, {suffix})", err, "rel") < 1e-5


@pytest.mark.parametrize("config,suffix", [
    (dict(in_channels=1, channels=[16, 24, 40, 40], num_res_blocks=2, downscale_factor=16,
          adapter_type="full_adapter_xl"), ".safetensors"),  # t2i-adapter-*-sdxl-1.0 saved as one file
    (dict(in_channels=3, channels=[16, 24, 40], num_res_blocks=4, downscale_factor=8, adapter_type="light_adapter"),
     ".pth"),
], ids=["full_adapter_xl", "light_adapter"])
def test_diffusers_weights_as_one_file(config, suffix, tmp_path):
    torch.manual_seed(0)
    model = perturb(diffusers.T2IAdapter(**config), 4)
    path = save(model.state_dict(), tmp_path / f"adapter{suffix}")
    x = torch.rand(1, config["in_channels"], 64, 96, generator=torch.Generator().manual_seed(2))
    err, inferred = features(model, x, path)
    assert (inferred.adapter_type, inferred.in_channels, inferred.channels, inferred.num_res_blocks,
            inferred.downscale_factor) == (config["adapter_type"], config["in_channels"], config["channels"],
                                           config["num_res_blocks"], config["downscale_factor"])
    assert record(f"T2I-Adapter {config['adapter_type']} as one file ({suffix})", err, "rel") < 1e-5


# -- bad files -----------------------------------------------------------------------------------------------


def _full_state() -> dict:
    # fits the tiny SD 1.x model, so each file's own error shows; one block a level (with 2, four levels of one
    # would fit the names as well, and four levels are preferred: what the real UNets take)
    return original("full", [32, 64], 1, 3, 2).state_dict()


@pytest.mark.parametrize("edit,message", [
    (lambda s: {"style_embedding": torch.zeros(1, 8, 4), "ln_pre.weight": torch.zeros(4)},
     r"TencentARC's style adapter .* use an IP-Adapter"),
    (lambda s: {**s, "body.0.skep.weight": torch.zeros(32, 32, 1, 1)}, r"sk=False or use_conv=True"),
    (lambda s: {**s, "body.3.block1.weight": torch.zeros(64, 64, 3, 3)}, r"residual blocks numbered \[0, 1, 3\]"),
    (lambda s: {**s, "conv_in.weight": torch.zeros(32, 5, 3, 3)}, r"takes 5 channels; .* 3 x r\^2 \(RGB\) or r\^2"),
    (lambda s: {**s, "body.0.in_conv.weight": torch.zeros(32, 32, 1, 1), "body.0.in_conv.bias": torch.zeros(32)},
     r"an in_conv on the first residual block \(sk=False\)"),
    (lambda s: {**s, "body.0.block2.weight": torch.zeros(32, 32, 3, 3)},
     r"body.0.resnets.0.block2.weight is \(32, 32, 3, 3\) in the file, .* expects \(32, 32\)"),
    (lambda s: {"unet.conv_in.weight": torch.zeros(4, 4, 3, 3)}, r"not a T2I-Adapter \(no conv_in, body"),
], ids=["style", "skep", "gap", "channels", "first-in-conv", "3x3-block2", "not-an-adapter"])
def test_bad_single_files_are_one_clear_error(mlx_dir, tmp_path, edit, message):
    path = save(edit(_full_state()), tmp_path / "t2iadapter_bad.pth")
    with pytest.raises(UserError, match=message):
        StableDiffusion(mlx_dir, mx.float32).load_t2i_adapter(str(path))


def test_an_ip_adapter_given_as_t2i_adapter_is_named(tmp_path):
    torch.save({"image_proj": {"proj.weight": torch.zeros(4, 4)}, "ip_adapter": {"1.to_k_ip.weight": torch.zeros(4, 4)}},
               tmp_path / "ip-adapter_sd15.bin")
    with pytest.raises(UserError, match=r"ip-adapter_sd15.bin is an IP-Adapter .* give it as --ip-adapter"):
        resolve_t2i_adapter(str(tmp_path / "ip-adapter_sd15.bin"))


def test_empty_folder_and_short_file_say_what_they_lack(tmp_path, capsys):
    from convert.__main__ import main as convert

    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty is not a T2I-Adapter folder: no config.json \(a diffusers T2I-Adapter"):
        resolve_t2i_adapter(str(tmp_path / "empty"))
    assert convert([str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "no model_index.json (a diffusers pipeline) and no config.json naming a ControlNet or a T2I-Adapter" in \
        capsys.readouterr().err
    (tmp_path / "short.safetensors").write_bytes(b"{}")
    with pytest.raises(UserError, match=r"short.safetensors: not a readable .* \(2 bytes, fewer than the 8 that give"):
        resolve_t2i_adapter(str(tmp_path / "short.safetensors"))


def test_light_file_whose_last_level_widens_is_refused(tmp_path):
    """diffusers' LightAdapter repeats its last width in an extra level; a file that widens there cannot load."""
    state = original("light", [16, 24, 40, 48], 1, 3, 2).state_dict()
    with pytest.raises(UserError, match=r"light adapter levels \[16, 24, 40, 48\]; .* repeats the last width"):
        resolve_t2i_adapter(str(save(state, tmp_path / "light.pth")))


def test_prefixed_and_wrapped_original_files(tmp_path):
    """TencentARC's loaders strip an `adapter.` before the original names, and ComfyUI unwraps {"adapter": ...}:
    both forms of one file give its features."""
    model = original("full", [16, 24, 40, 40], 2, 3, 8)
    state = model.state_dict()
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    for name, saved in [("prefixed", {f"adapter.{k}": v for k, v in state.items()}), ("wrapped", {"adapter": state})]:
        err, config = features(model, x, save(saved, tmp_path / f"{name}.pth"))
        assert config.channels == [16, 24, 40, 40] and err < 1e-5, name


@pytest.mark.parametrize("kind,count,message", [
    ("light", 400, r"400 levels; a T2I-Adapter has at most 16"),
    ("light-blocks", 400, r"400 residual blocks; a T2I-Adapter has at most 64"),
    ("full", 20000, r"20000 residual blocks; a T2I-Adapter has at most 1024"),
    ("full-levels", 40, r"20 levels of 2 residual blocks; a T2I-Adapter has at most 16"),
])
def test_many_blocks_are_refused_before_any_work(tmp_path, kind, count, message):
    """A small file naming thousands of blocks (tiny tensors) is refused from its names: renaming or building what
    they describe would take minutes (the names cost a few bytes each)."""
    def t():
        return torch.zeros(1, 1, 1, 1)  # one each: safetensors refuses shared tensors

    if kind == "light":
        state = {f"body.{i}.out_conv.weight": t() for i in range(count)} | {"body.0.body.0.block1.weight": t()}
    elif kind == "light-blocks":
        state = {"body.0.out_conv.weight": t()} | {f"body.0.body.{j}.block1.weight": t() for j in range(count)}
    elif kind == "full":
        state = {"conv_in.weight": t()} | {f"body.{i}.block1.weight": t() for i in range(count)}
    else:  # widening every other block: levels of 2
        state = {"conv_in.weight": t()} | {f"body.{i}.block1.weight": t() for i in range(count)} | \
                {f"body.{i}.in_conv.weight": t() for i in range(2, count, 2)}
    with pytest.raises(UserError, match=message):
        resolve_t2i_adapter(str(save(state, tmp_path / f"{kind}.safetensors")))


def test_mutated_files_fail_cleanly(tmp_path):
    """Fuzz the layout reader: dropped tensors, other indices in a name, unknown names, tensors of other shapes or
    ranks: a UserError naming the file (or a load, when the change still describes an adapter), never another
    exception."""
    rng = np.random.default_rng(0)
    for kind in ("full", "light"):
        state = original(kind, [16, 24], 2, 3, 2).state_dict()
        names = sorted(state)
        for trial in range(40):
            mutated = dict(state)
            name = names[rng.integers(len(names))]
            if trial % 4 == 0:
                del mutated[name]
            elif trial % 4 == 1:  # another index in its name (a gap, a duplicate level, a far block)
                parts = name.split(".")
                at = [i for i, p in enumerate(parts) if p.isdigit()]
                parts[at[rng.integers(len(at))]] = str(int(rng.choice([0, 1, 2, 3, 7, 10**6])))
                mutated[".".join(parts)] = mutated.pop(name)
            elif trial % 4 == 2:  # an unknown name beside the real ones
                mutated[name.replace("block", "blok") + ("" if rng.integers(2) else ".x")] = torch.zeros(2)
            else:
                shape = [int(rng.integers(1, 5)) for _ in range(int(rng.integers(1, 5)))]
                mutated[name] = torch.zeros(shape)
            path = save(mutated, tmp_path / f"{kind}{trial}.safetensors")
            try:
                resolve_t2i_adapter(str(path))
            except UserError as e:
                assert "\n" not in str(e) and str(path) in str(e), str(e)


def test_wrong_family_is_refused_before_anything_is_written(xl, tmp_path):  # noqa: F811
    from ipadapter_mlx.cache import cache_root

    before = set((cache_root() / "converted").glob("t2i-adapter-*"))
    path = save(original("full", [32, 64], 1, 3, 2).state_dict(), tmp_path / "t2iadapter_sd15.pth")
    with pytest.raises(UserError, match=r"made for SD 1.x/2.x .* this model is SDXL"):
        StableDiffusion(xl[1], mx.float32).load_t2i_adapter(str(path))
    assert set((cache_root() / "converted").glob("t2i-adapter-*")) == before


# -- in the pipeline -----------------------------------------------------------------------------------------


def test_original_file_from_cli_convert_and_hub(mlx_dir, tmp_path, monkeypatch, capsys):
    """generate --t2i-adapter FILE.pth equals the API with the folder `python -m convert FILE.pth` writes, and
    REPO:PATH (TencentARC/T2I-Adapter:models/....pth's form) reads the file from the Hub cache offline."""
    from huggingface_hub import constants

    from convert.__main__ import main as convert
    from ipadapter_mlx.cli import main
    from test_cli import hub_cache

    (tmp_path / "repo" / "models").mkdir(parents=True)
    path = save(original("full", [32, 64], 1, 3, 2, seed=5).state_dict(),
                tmp_path / "repo" / "models" / "t2iadapter_canny_sd15v2.pth")
    control_image(9, (48, 32)).save(tmp_path / "edges.png")
    code = main(["generate", "--model", str(mlx_dir), "--prompt", "a cat", "--steps", "2", "--seed", "3",
                 "--scheduler", "euler", "--t2i-adapter", str(path), "--t2i-image", str(tmp_path / "edges.png"),
                 "--output", str(tmp_path / "cat.png")])
    assert code == 0, capsys.readouterr().err
    assert convert([str(path), str(tmp_path / "converted")]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "converted" / "t2i_adapter" / "config.json").read_text())["channels"] == [32, 64]
    pipe = StableDiffusion(mlx_dir, mx.float32)
    index = pipe.load_t2i_adapter(str(tmp_path / "converted"))
    api = pipe.generate("a cat", steps=2, seed=3, scheduler="euler",
                        t2i_adapters=[T2IControl(index, Image.open(tmp_path / "edges.png"))])[0]
    assert np.array_equal(np.asarray(api), np.asarray(Image.open(tmp_path / "cat.png").convert("RGB")))

    hub_cache(tmp_path / "hf", "tiny/T2I-Adapter", tmp_path / "repo")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    ref = "tiny/T2I-Adapter:models/t2iadapter_canny_sd15v2.pth"
    hub = pipe.load_t2i_adapter(ref)
    assert same_weights(pipe.t2i_adapters[hub].model, pipe.t2i_adapters[index].model)
    assert convert([ref, str(tmp_path / "from-hub")]) == 0, capsys.readouterr().err
    assert (tmp_path / "from-hub" / "t2i_adapter" / "model.safetensors").is_file()
