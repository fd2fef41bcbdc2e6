"""Per-module parity with the PyTorch reference (float32, max abs error ~1e-4)."""

import pytest

pytest.importorskip("torch", reason="parity test: needs the PyTorch reference (pip install torch==2.13.0 '.[test]')")

import mlx.core as mx

from ipadapter_mlx.conditioning import StepConditioning
import numpy as np
import pytest
import torch

from conftest import UNET_CONFIGS, make_torch_pipeline, record, to_np
from ipadapter_mlx.checkpoints.stable_diffusion import component_weights, diffusers_rename
from ipadapter_mlx.checkpoints.weights import fit_weights
from ipadapter_mlx.errors import UserError
from ipadapter_mlx.loading import build, read_json
from ipadapter_mlx.models.unet import Residuals

TOL = 1e-4


def mlx_module(name, folder):
    """Our module, built from the saved config.json and filled from the saved weights."""
    model = build(name, read_json(folder / name / "config.json"))
    model.load_weights(list(fit_weights(model, component_weights(folder / name), diffusers_rename(name)).items()))
    return model


def test_text_encoder(torch_pipe, diffusers_dir):
    ours = mlx_module("text_encoder", diffusers_dir)
    ids = torch_pipe.tokenizer(["a red fox in snow", ""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        ref = torch_pipe.text_encoder(ids, output_hidden_states=True)
    out = ours(mx.array(ids.numpy()))
    assert record("text encoder: last hidden state", np.abs(to_np(out.last_hidden_state) - to_np(ref.last_hidden_state)).max(), "abs") < TOL
    assert np.abs(to_np(out.pooler_output) - to_np(ref.pooler_output)).max() < TOL
    for a, b in zip(out.hidden_states, ref.hidden_states):
        assert np.abs(to_np(a) - to_np(b)).max() < TOL


@pytest.fixture(params=["direct", "winograd"])
def conv_path(request, monkeypatch):
    """The CPU's 3x3 convolutions as at their real sizes, or all through Winograd F(2x2, 3x3) (the tiny models'
    narrow layers are below its thresholds): the model must match either way. Returns the Winograd calls (None:
    direct)."""
    from ipadapter_mlx.models import cpu, ops

    if request.param == "direct":
        return None
    if mx.default_device() != mx.cpu or not cpu.views_write_through():
        pytest.skip("the CPU's Winograd path")
    calls = []
    monkeypatch.setattr(ops, "WINOGRAD_MIN_PIXELS", 4)
    monkeypatch.setattr(ops, "WINOGRAD_MIN_CHANNELS", 1)
    real = cpu.conv3x3_winograd
    monkeypatch.setattr(cpu, "conv3x3_winograd", lambda *a: calls.append(a[0].shape) or real(*a))
    return calls


def unet_pair(layout, tmp_path, seed, input_seed):
    """diffusers' UNet of a tiny pipeline, ours on its saved weights, random inputs (x, context) for both and the
    generator that drew them (for more inputs)."""
    pipe = make_torch_pipeline(layout, seed=seed)
    pipe.unet.save_pretrained(tmp_path / "unet")
    g = torch.Generator().manual_seed(input_seed)
    x = torch.randn(2, 4, 16, 16, generator=g)
    ctx = torch.randn(2, 9, pipe.unet.config.cross_attention_dim, generator=g)
    return pipe, mlx_module("unet", tmp_path), x, ctx, g


@pytest.mark.parametrize("layout", list(UNET_CONFIGS))
def test_unet(layout, tmp_path, conv_path):
    pipe, ours, x, ctx, _ = unet_pair(layout, tmp_path, seed=7, input_seed=0)
    t = torch.tensor([981.0, 3.0])
    with torch.no_grad():
        ref = pipe.unet(x, t, ctx).sample
    out = ours(mx.array(x.permute(0, 2, 3, 1).numpy()), mx.array(t.numpy()), StepConditioning(mx.array(ctx.numpy())))
    assert conv_path is None or len(conv_path) >= 10  # every 3x3 convolution of stride 1 but the 1x1-pixel level
    name = f"UNet ({layout} layout{'' if conv_path is None else ', Winograd convolutions'})"
    err = record(name, np.abs(to_np(out).transpose(0, 3, 1, 2) - to_np(ref)).max(), "abs")
    assert err < TOL, err


def test_vae_encode_decode(torch_pipe, diffusers_dir, conv_path):
    ours = mlx_module("vae", diffusers_dir)
    g = torch.Generator().manual_seed(1)
    img = torch.rand(1, 3, 32, 48, generator=g) * 2 - 1
    with torch.no_grad():
        dist = torch_pipe.vae.encode(img).latent_dist
        z = torch.randn(1, 4, 4, 6, generator=g)
        dec = torch_pipe.vae.decode(z).sample
    mean, std = ours.encode(mx.array(img.permute(0, 2, 3, 1).numpy()))
    enc = f"VAE encode (mean{'' if conv_path is None else ', Winograd convolutions'})"
    assert record(enc, np.abs(to_np(mean).transpose(0, 3, 1, 2) - to_np(dist.mean)).max(), "abs") < TOL
    assert np.abs(to_np(std).transpose(0, 3, 1, 2) - to_np(dist.std)).max() < TOL
    out = ours.decode(mx.array(z.permute(0, 2, 3, 1).numpy()))
    assert conv_path is None or len(conv_path) >= 8
    name = f"VAE encode + decode{'' if conv_path is None else ' (Winograd convolutions)'}"
    assert record(name, np.abs(to_np(out).transpose(0, 3, 1, 2) - to_np(dec)).max(), "abs") < TOL


@pytest.mark.parametrize("layout", list(UNET_CONFIGS))
def test_unet_control_residuals(layout, tmp_path):
    """ControlNet residuals (one per skip + mid) and T2I-Adapter intrablock residuals enter the UNet where
    diffusers adds them: random residuals of the right shapes, our UNet against diffusers' on the same weights."""
    pipe, ours, x, ctx, g = unet_pair(layout, tmp_path, seed=11, input_seed=3)
    t = torch.tensor([500.0, 20.0])
    with torch.no_grad():  # the skips' and the mid block's shapes, read off diffusers' own forward
        skips, mid = [], []
        hooks = [pipe.unet.conv_in.register_forward_hook(lambda m, i, o: skips.append(o.shape))]
        hooks += [b.register_forward_hook(lambda m, i, o: skips.extend(s.shape for s in o[1]))
                  for b in pipe.unet.down_blocks]
        hooks += [pipe.unet.mid_block.register_forward_hook(lambda m, i, o: mid.append(o.shape))]
        pipe.unet(x, t, ctx)
        for h in hooks:
            h.remove()
        down = [torch.randn(s, generator=g) for s in skips]
        mid_r = torch.randn(mid[0], generator=g)
        # T2I: one feature per down block, the size of its last attention output (before downsampling) or,
        # without attention, of the block's output
        intra_shapes = []
        hooks = [(b.attentions[-1] if getattr(b, "has_cross_attention", False) else b).register_forward_hook(
            lambda m, i, o: intra_shapes.append((o[0] if isinstance(o, tuple) else o.sample).shape))
            for b in pipe.unet.down_blocks]
        pipe.unet(x, t, ctx)
        for h in hooks:
            h.remove()
        intra = [torch.randn(s, generator=g) for s in intra_shapes]
        ref_control = pipe.unet(x, t, ctx, down_block_additional_residuals=down,
                                mid_block_additional_residual=mid_r).sample
        ref_t2i = pipe.unet(x, t, ctx, down_intrablock_additional_residuals=[r.clone() for r in intra]).sample
        plain = pipe.unet(x, t, ctx).sample

    nhwc = lambda a: mx.array(a.permute(0, 2, 3, 1).numpy())  # noqa: E731
    cond = StepConditioning(mx.array(ctx.numpy()))
    out_control = ours(nhwc(x), mx.array(t.numpy()), cond, Residuals([nhwc(d) for d in down], nhwc(mid_r)))
    out_t2i = ours(nhwc(x), mx.array(t.numpy()), cond, Residuals(intrablock=[nhwc(r) for r in intra]))
    for name, out, ref in (("ControlNet residuals", out_control, ref_control), ("T2I residuals", out_t2i, ref_t2i)):
        assert np.abs(to_np(ref) - to_np(plain)).max() > 1e-2  # the residuals do change the output
        err = record(f"UNet + {name} ({layout})", np.abs(to_np(out).transpose(0, 3, 1, 2) - to_np(ref)).max(), "abs")
        assert err < TOL, (name, err)
    # several controls sum (diffusers' MultiControlNet), and a wrong residual count names both sides
    half = Residuals([nhwc(d) / 2 for d in down], nhwc(mid_r) / 2)
    summed = ours(nhwc(x), mx.array(t.numpy()), cond, half + half)
    assert np.abs(to_np(summed) - to_np(out_control)).max() < TOL
    with pytest.raises(UserError, match=rf"{len(down) - 1} down residuals for a UNet with {len(down)} skip"):
        ours(nhwc(x), mx.array(t.numpy()), cond, Residuals([nhwc(d) for d in down[1:]], nhwc(mid_r)))
