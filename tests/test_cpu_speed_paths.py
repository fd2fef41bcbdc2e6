"""The CPU backend's own kernels (models/cpu.py): attention with numpy's softmax, SiLU, GELU, GroupNorm, the 3x3 convolution
as nine accumulated products, and bench's profile. Each against torch in float64, and each checked to be the
path that runs on the CPU (by which function ran, never by timing)."""

import pytest

pytest.importorskip("torch", reason="parity test: needs the PyTorch reference (pip install torch==2.13.0 '.[test]')")

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import torch
import torch.nn.functional as F

from ipadapter_mlx.models import attention as attention_module
from ipadapter_mlx.models import cpu, ops

pytestmark = pytest.mark.skipif(mx.default_device() != mx.cpu, reason="the CPU backend's paths")


def t64(x: mx.array) -> torch.Tensor:
    return torch.from_numpy(np.array(x.astype(mx.float32))).double()


def torch_attention(q, k, v, heads):
    B, Lq, D = q.shape
    split = lambda t: t64(t).reshape(B, t.shape[1], heads, D // heads).transpose(1, 2)
    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(B, Lq, D).numpy()


def qkv(B, Lq, Lk, heads, d, seed=0, dtype=mx.float32):
    keys = mx.random.split(mx.random.key(seed), 3)
    q = mx.random.normal((B, Lq, heads * d), key=keys[0]) * 2  # wide score range: the max shift matters
    k, v = (mx.random.normal((B, Lk, heads * d), key=key) for key in keys[1:])
    return q.astype(dtype), k.astype(dtype), v.astype(dtype)


# SD 1.5's head widths (40 / 80 / 160 in the UNet, 64 in the image encoder's resampler), odd lengths, text (77)
# and image (16, 4) contexts, the VAE's single 512-wide head
@pytest.mark.parametrize("B,Lq,Lk,heads,d", [
    (2, 64, 64, 8, 40), (2, 37, 77, 8, 40), (2, 25, 16, 8, 80), (1, 9, 4, 8, 160), (2, 50, 50, 12, 64),
    (1, 49, 49, 1, 512), (3, 1, 7, 2, 40), (2, 300, 301, 8, 40),
])
def test_cpu_attention_matches_torch(B, Lq, Lk, heads, d):
    q, k, v = qkv(B, Lq, Lk, heads, d)
    out = attention_module.attention(q, k, v, heads)
    assert out.shape == q.shape and out.dtype == mx.float32
    np.testing.assert_allclose(np.array(out), torch_attention(q, k, v, heads), rtol=0, atol=1e-5)


@pytest.mark.parametrize("write_through", [True, False])
def test_cpu_attention_blocks_of_queries(monkeypatch, write_through):
    """Queries in blocks with a remainder (7 blocks of 23 + 1 of 13 queries), each block's softmax split
    across threads: the same attention, whether P is read from the scores' own buffer or copied back."""
    monkeypatch.setattr(cpu, "BLOCK_SCORES", 16 * 23 * 150)
    monkeypatch.setattr(cpu, "MIN_SPLIT", 64)
    monkeypatch.setattr(cpu, "_write_through", write_through and cpu.views_write_through())
    q, k, v = qkv(2, 174, 150, 8, 40, seed=1)
    out = attention_module.attention(q, k, v, 8)
    np.testing.assert_allclose(np.array(out), torch_attention(q, k, v, 8), rtol=0, atol=1e-5)


def test_cpu_attention_half_precision_returns_its_dtype():
    q, k, v = qkv(2, 40, 77, 8, 40, dtype=mx.float16)
    out = attention_module.attention(q, k, v, 8)
    assert out.dtype == mx.float16
    np.testing.assert_allclose(np.array(out.astype(mx.float32)), torch_attention(q, k, v, 8), rtol=0, atol=2e-3)


@pytest.mark.parametrize("blocks", [False, True])
def test_cpu_attention_with_an_additive_mask(monkeypatch, blocks):
    """CLIP's text encoder: a causal mask added to the scores; in query blocks each block gets its own rows."""
    if blocks:
        monkeypatch.setattr(cpu, "BLOCK_SCORES", 24 * 10 * 77)  # 8 blocks of 10 queries (the last of 7)
    q, k, v = qkv(2, 77, 77, 12, 64, seed=2)
    mask = nn.MultiHeadAttention.create_additive_causal_mask(77)
    out = attention_module.attention(q, k, v, 12, mask=mask)
    keep = attention_module.attention(q, k, v, 12, mask=mx.tril(mx.ones((77, 77), mx.bool_)))  # True: attend
    split = lambda t: t64(t).reshape(2, 77, 12, 64).transpose(1, 2)
    causal = torch.ones(77, 77, dtype=torch.bool).tril()
    ref = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=causal)
    for o in (out, keep):
        np.testing.assert_allclose(np.array(o), ref.transpose(1, 2).reshape(2, 77, 768).numpy(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="mask"):
        attention_module.attention(q, k, v, 12, mask=mask[None, None])


def test_clip_runs_the_cpu_attention_and_activations(monkeypatch):
    """On the CPU both CLIP towers use `cpu.attention` and numpy's GELUs, never MLX's scalar exp/erf paths
    (their numbers against transformers: test_modules)."""
    from ipadapter_mlx.bench_shapes import TINY
    from ipadapter_mlx.loading import build

    calls = []
    for name in ("attention", "gelu", "quick_gelu"):
        real = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, _n=name, _r=real, **kw: calls.append(_n) or _r(*a, **kw))
    monkeypatch.setattr(cpu, "MIN_SPLIT", 1)

    def mlx_kernel(*a, **kw):
        raise AssertionError("MLX's attention or GELU ran on the CPU")

    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", mlx_kernel)
    monkeypatch.setattr(nn, "gelu", mlx_kernel)
    vision = build("image_encoder", TINY["image_encoder"])
    size = TINY["image_encoder"]["image_size"]
    mx.eval(vision.penultimate(mx.random.normal((1, size, size, 3))))
    layers = TINY["image_encoder"]["num_hidden_layers"] - 1  # the penultimate layer's output
    assert calls.count("attention") == layers and calls.count("gelu") == layers
    calls.clear()
    text = build("text_encoder", TINY["text_encoder"])
    mx.eval(text(mx.array([[1, 2, 3, 4]])).last_hidden_state)
    layers = TINY["text_encoder"]["num_hidden_layers"]
    assert calls.count("attention") == layers and calls.count("quick_gelu") == layers


def test_softmax_numerator_split_equals_one_thread(monkeypatch):
    scores = np.random.default_rng(0).normal(size=(3, 41, 333)).astype(np.float32) * 8
    ref = np.exp(scores.astype(np.float64) - scores.max(-1, keepdims=True))
    monkeypatch.setattr(cpu, "MIN_SPLIT", 1)
    split = scores.copy()
    sums = cpu.softmax_numerator(split)
    assert sums.shape == (3, 41, 1)
    np.testing.assert_allclose(split, ref, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(sums, ref.sum(-1, keepdims=True), rtol=1e-5)


def test_cpu_runs_the_cpu_attention(monkeypatch):
    """On the CPU the UNet's attention is `cpu.attention`, never MLX's softmax (scalar exp) or its fused kernel;
    an explicit pad_to still asks for the fused kernel."""
    calls = []
    real = cpu.attention
    monkeypatch.setattr(cpu, "attention", lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))

    def no_fused(*a, **kw):
        raise AssertionError("MLX's attention ran on the CPU")

    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", no_fused)
    monkeypatch.setattr(mx, "softmax", no_fused)
    layer = attention_module.Attention(320, heads=8, dim_head=40, context_dim=768)
    x, ctx = mx.random.normal((2, 64, 320)), mx.random.normal((2, 77, 768))
    mx.eval(layer(x, ctx))
    assert calls == [(16, 64, 40)]
    with pytest.raises(AssertionError, match="MLX's attention ran"):
        attention_module.attention(*qkv(1, 4, 4, 2, 40), 2, pad_to=64)


# transformers' QuickGELUActivation and MLX's formula for it, the references of cpu.quick_gelu
TORCH_ACTS = {"silu": F.silu, "gelu": F.gelu, "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t)}
MLX_ACTS = {"silu": nn.silu, "gelu": nn.gelu, "quick_gelu": lambda x: x * mx.sigmoid(1.702 * x)}


@pytest.mark.parametrize("name", ["silu", "gelu", "quick_gelu"])
@pytest.mark.parametrize("shape", [(1, 7, 5, 3), (2, 300, 1280), (3, 129, 131)])
def test_cpu_silu_gelu_match_torch(name, shape):
    x = mx.random.normal(shape, key=mx.random.key(3)) * 6
    if x.size > 8:  # the tails: exp(-x) overflows below -88, erf saturates
        x = mx.concatenate([mx.array([0.0, -0.0, -100.0, 100.0, -30.0, 30.0, 1e-8, -1e-8]), x.reshape(-1)[8:]])
        x = x.reshape(shape)
    ref = TORCH_ACTS[name](t64(x)).numpy()
    out = getattr(cpu, name)(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    np.testing.assert_allclose(np.array(out), ref, rtol=1e-6, atol=1e-6)
    half = getattr(cpu, name)(x.astype(mx.bfloat16))
    assert half.dtype == mx.bfloat16
    np.testing.assert_allclose(np.array(half.astype(mx.float32)), TORCH_ACTS[name](t64(x.astype(mx.bfloat16))),
                               rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("name", ["silu", "gelu", "quick_gelu"])
def test_ops_silu_gelu_take_the_cpu_path_above_the_split_size(monkeypatch, name):
    calls = []
    real = getattr(cpu, name)
    monkeypatch.setattr(cpu, name, lambda x: calls.append(x.shape) or real(x))
    big, small = mx.random.normal((2, cpu.MIN_SPLIT)), mx.random.normal((3, 5))
    for x in (big, small):
        np.testing.assert_allclose(np.array(getattr(ops, name)(x)), np.array(MLX_ACTS[name](x)), atol=2e-6)
    assert calls == [big.shape]  # small arrays stay in MLX: a sync point costs more than they do


@pytest.mark.parametrize("shape", [(1, 7, 10), (2, 300, 2560), (3, 129, 262)])
def test_cpu_geglu_matches_torch(shape):
    """h * gelu(gate) of [h, gate], as diffusers' GEGLU: float32 and bfloat16, through ops above the split size."""
    x = mx.random.normal(shape, key=mx.random.key(4)) * 6
    h, gate = t64(x).chunk(2, dim=-1)
    ref = (h * F.gelu(gate)).numpy()
    out = cpu.geglu(x)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == x.dtype
    np.testing.assert_allclose(np.array(out), ref, rtol=1e-6, atol=1e-5)
    half = cpu.geglu(x.astype(mx.bfloat16))
    h, gate = t64(x.astype(mx.bfloat16)).chunk(2, dim=-1)
    assert half.dtype == mx.bfloat16
    np.testing.assert_allclose(np.array(half.astype(mx.float32)), (h * F.gelu(gate)).numpy(), rtol=2e-2, atol=2e-2)
    np.testing.assert_allclose(np.array(ops.geglu(x)), ref, rtol=1e-6, atol=1e-5)


def test_ops_geglu_takes_the_cpu_path_above_the_split_size(monkeypatch):
    calls = []
    real = cpu.geglu
    monkeypatch.setattr(cpu, "geglu", lambda x: calls.append(x.shape) or real(x))
    big, small = mx.random.normal((2, cpu.MIN_SPLIT)), mx.random.normal((3, 6))
    for x in (big, small):
        h, gate = mx.split(x, 2, axis=-1)
        np.testing.assert_allclose(np.array(ops.geglu(x)), np.array(h * nn.gelu(gate)), atol=2e-6)
    assert calls == [big.shape]


def torch_conv(x, conv, padding):
    w = t64(conv.weight).permute(0, 3, 1, 2)
    b = t64(conv.bias) if "bias" in conv else None
    out = F.conv2d(t64(x).permute(0, 3, 1, 2), w, b, stride=conv.stride, padding=padding)
    return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("B,H,W,C,O,bias", [(1, 7, 5, 3, 4, True), (2, 13, 9, 16, 8, False), (1, 1, 1, 5, 3, True),
                                            (1, 32, 24, 128, 64, True)])
def test_eager_conv_3x3_taps_match_torch(monkeypatch, B, H, W, C, O, bias):
    calls = []
    real = ops.conv3x3_taps
    monkeypatch.setattr(ops, "conv3x3_taps", lambda *a: calls.append(a[0].shape) or real(*a))
    conv = ops.EagerConv2d(C, O, 3, padding=1, bias=bias)
    x = mx.random.normal((B, H, W, C), key=mx.random.key(5))
    out = conv(x)
    assert calls == [x.shape] and out.shape == (B, H, W, O)
    np.testing.assert_allclose(np.array(out), torch_conv(x, conv, 1), rtol=0, atol=1e-5)


@pytest.mark.parametrize("kernel,stride,padding", [(3, 2, 0), (1, 1, 0), (3, 1, 0)])
def test_eager_conv_other_shapes_keep_mlx_conv(monkeypatch, kernel, stride, padding):
    monkeypatch.setattr(ops, "conv3x3_taps", lambda *a: pytest.fail("taps ran for a convolution they do not fit"))
    conv = ops.EagerConv2d(6, 4, kernel, stride=stride, padding=padding)
    x = mx.random.normal((1, 9, 8, 6), key=mx.random.key(6))
    np.testing.assert_allclose(np.array(conv(x)), torch_conv(x, conv, padding), rtol=0, atol=1e-5)


@pytest.mark.parametrize("B,H,W,C,O,bias", [(1, 32, 32, 256, 64, True), (2, 34, 40, 320, 24, False)])
def test_conv_winograd_matches_torch(monkeypatch, B, H, W, C, O, bias):
    """Wide inputs of even size at 32x32 and up: Winograd F(2x2, 3x3), equal to torch's float64 convolution to
    float32 rounding, in the UNet's Conv2d and the VAE's EagerConv2d alike."""
    if not cpu.views_write_through():
        pytest.skip("numpy's view of an MLX array is a copy with this MLX: no Winograd path")
    calls = []
    real = cpu.conv3x3_winograd
    monkeypatch.setattr(cpu, "conv3x3_winograd", lambda *a: calls.append(a[0].shape) or real(*a))
    monkeypatch.setattr(ops, "conv3x3_taps", lambda *a: pytest.fail("taps ran where Winograd fits"))
    x = mx.random.normal((B, H, W, C), key=mx.random.key(7))
    for kind in (ops.Conv2d, ops.EagerConv2d):
        conv = kind(C, O, 3, padding=1, bias=bias)
        conv.weight = conv.weight * 3  # products well away from rounding noise
        out = conv(x)
        assert out.shape == (B, H, W, O) and out.dtype == mx.float32
        np.testing.assert_allclose(np.array(out), torch_conv(x, conv, 1), rtol=0, atol=2e-5)
    assert calls == [x.shape, x.shape]


@pytest.mark.parametrize("shape,dtype,why", [
    ((1, 33, 32, 256), mx.float32, "odd height"), ((1, 32, 31, 256), mx.float32, "odd width"),
    ((1, 16, 16, 256), mx.float32, "under 32x32 pixels"), ((1, 32, 32, 128), mx.float32, "narrow input"),
    ((1, 32, 32, 256), mx.float16, "half precision"),
])
def test_conv_outside_winograd_keeps_the_other_paths(monkeypatch, shape, dtype, why):
    """Where Winograd does not fit, the UNet's Conv2d is MLX's convolution and the VAE's the nine taps."""
    monkeypatch.setattr(cpu, "conv3x3_winograd", lambda *a: pytest.fail(f"Winograd ran: {why}"))
    taps = []
    real = ops.conv3x3_taps
    monkeypatch.setattr(ops, "conv3x3_taps", lambda *a: taps.append(a[0].shape) or real(*a))
    x = mx.random.normal(shape, key=mx.random.key(8)).astype(dtype)
    for kind in (ops.Conv2d, ops.EagerConv2d):
        conv = kind(shape[-1], 8, 3, padding=1)
        conv.set_dtype(dtype)
        ref = torch_conv(x, conv, 1)
        tol = 1e-4 if dtype == mx.float32 else 5e-2
        np.testing.assert_allclose(np.array(conv(x).astype(mx.float32)), ref, rtol=0, atol=tol)
    assert taps == [shape]  # the eager one only


def test_vae_uses_the_cpu_group_norm_and_silu(monkeypatch):
    from ipadapter_mlx.bench_shapes import TINY
    from ipadapter_mlx.config import VAEConfig
    from ipadapter_mlx.models import AutoencoderKL

    calls = []
    real = cpu.group_norm
    monkeypatch.setattr(cpu, "group_norm", lambda x, *a: calls.append((x.shape, a[-1])) or real(x, *a))
    vae = AutoencoderKL(VAEConfig.from_dict(TINY["vae"]))
    mx.eval(vae.decode(mx.random.normal((1, 32, 32, 4))))
    assert ((1, 256, 256, 16), True) in calls  # the decoder's last norm + SiLU, 16 channels at full resolution


# VAE/UNet shapes (32 groups), a batch of 2 with odd sizes, one group per channel, a 512x512 image's worth of pixels
# (where float32 sums over the whole image drift), half precision in and out
@pytest.mark.parametrize("shape,groups,dtype", [((2, 33, 17, 64), 32, mx.float32), ((1, 96, 96, 12), 12, mx.float32),
                                                ((1, 512, 512, 8), 4, mx.float32), ((2, 40, 40, 32), 8, mx.bfloat16)])
@pytest.mark.parametrize("then_silu", [False, True])
def test_cpu_group_norm_matches_torch(shape, groups, dtype, then_silu):
    keys = mx.random.split(mx.random.key(4), 3)
    C = shape[-1]
    x = (mx.random.normal(shape, key=keys[0]) * 3 + 1.5).astype(dtype)  # an offset mean: the variance must not cancel
    norm = ops.GroupNorm(groups, C, 1e-6)
    norm.weight, norm.bias = mx.random.normal((C,), key=keys[1]), mx.random.normal((C,), key=keys[2])
    ref = F.group_norm(t64(x).permute(0, 3, 1, 2), groups, t64(norm.weight), t64(norm.bias), 1e-6)
    ref = (F.silu(ref) if then_silu else ref).permute(0, 2, 3, 1).numpy()
    assert x.size >= cpu.MIN_SPLIT  # ops.GroupNorm takes the numpy path for these
    out = norm(x, then_silu=then_silu)
    assert out.dtype == dtype and out.shape == x.shape
    tol = dict(rtol=0, atol=2e-5) if dtype == mx.float32 else dict(rtol=2**-7, atol=2**-7)  # bfloat16: its rounding
    np.testing.assert_allclose(np.array(out.astype(mx.float32)), ref, **tol)
    mlx_path = norm._mlx(x)  # the MLX path (small inputs, GPUs) agrees with it, less closely: float32 sums
    if then_silu:
        mlx_path = nn.silu(mlx_path)
    np.testing.assert_allclose(np.array(mlx_path.astype(mx.float32)), ref,
                               **(dict(rtol=0, atol=1e-3) if dtype == mx.float32 else tol))


def test_profile_counts_every_op_once():
    """The profile's kinds add up to its total, and each module kind is counted once per call: as many 3x3
    convolutions and attention calls as the UNet has (self, text and image attention per transformer block), and
    one attention, GELU and six linear layers per image-encoder layer."""
    from ipadapter_mlx.bench import format_profile, profile_worker
    from ipadapter_mlx.bench_shapes import TINY
    from ipadapter_mlx.config import UNetConfig
    from ipadapter_mlx.models import UNet2DConditionModel

    p = profile_worker(TINY, 64, "float32", 1)
    unet = UNet2DConditionModel(UNetConfig.from_dict(TINY["unet"]))
    modules = [m for _, m in unet.named_modules()]
    convs3 = sum(isinstance(m, nn.Conv2d) and m.weight.shape[1] == 3 for m in modules)
    blocks = sum(type(m).__name__ == "BasicTransformerBlock" for m in modules)
    step = p["unet_step"]["ops"]
    assert step["conv 3x3"]["calls"] == convs3
    assert step["attention (q k^T, softmax, p v)"]["calls"] == 3 * blocks
    assert step["layer_norm"]["calls"] == 3 * blocks and step["gelu"]["calls"] == blocks
    layers = TINY["image_encoder"]["num_hidden_layers"] - 1  # up to the penultimate layer, as the adapters read
    enc = p["image_encoder"]["ops"]
    assert enc["attention (q k^T, softmax, p v)"]["calls"] == layers and enc["gelu"]["calls"] == layers
    assert enc["layer_norm"]["calls"] == 2 * layers + 1 and enc["linear"]["calls"] == 6 * layers  # + pre-norm
    for phase in ("unet_step", "vae_decode", "image_encoder"):
        assert sum(o["s"] for o in p[phase]["ops"].values()) == pytest.approx(p[phase]["profiled_s"])
    assert "evaluated op by op" in format_profile(p)
