"""Hostile ControlNet inputs: a bad config.json or a malformed original file gets one UserError naming the key
and the file, and nothing is written (no torch needed)."""

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from ipadapter_mlx import UserError
from ipadapter_mlx.controlnet import convert_controlnet

# a tiny diffusers ControlNetModel config.json, written out in full as diffusers saves one
GOOD = {
    "_class_name": "ControlNetModel", "act_fn": "silu", "attention_head_dim": 4, "block_out_channels": [32, 64],
    "conditioning_channels": 3, "conditioning_embedding_out_channels": [8, 16], "cross_attention_dim": 32,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "in_channels": 4, "layers_per_block": 1,
    "norm_num_groups": 8, "transformer_layers_per_block": 1, "use_linear_projection": False,
}


@pytest.mark.parametrize("patch, message", [
    ({"conditioning_channels": 0}, "has conditioning_channels=0: expected a number > 0"),
    ({"attention_head_dim": 0}, r"has num_attention_heads=\[0, 0\]: expected a non-empty list of numbers > 0"),
    ({"norm_num_groups": 0}, "has norm_num_groups=0: expected a number > 0"),
    ({"norm_num_groups": 7}, r"has norm_num_groups=7: expected a divisor of every block_out_channels entry \[32, 64\]"),
    ({"block_out_channels": []}, r"has block_out_channels=\[\]: expected a non-empty list"),
    ({"conditioning_embedding_out_channels": []}, "has conditioning_embedding_out_channels=.*non-empty list"),
    ({"cross_attention_dim": 0}, "has cross_attention_dim=.*> 0"),
    ({"down_block_types": ["DownBlock2D"]}, "has down_block_types=.*expected 2 entries, one per block_out_channels"),
    (None, "config.json is not a JSON object"),
])
def test_bad_config_one_line_nothing_written(tmp_path, patch, message):
    net = tmp_path / "net"
    net.mkdir()
    (net / "config.json").write_text("[1, 2]" if patch is None else json.dumps({**GOOD, **patch}))
    with pytest.raises(UserError, match=f"{net / 'config.json'}.*{message}" if patch else message) as e:
        convert_controlnet(str(net), tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def original(**changes) -> dict[str, np.ndarray]:
    """An original-format (lllyasviel) ControlNet's tensors that matter for the inference: one level, SD 1.x text."""
    z = lambda *s: np.zeros(s, np.float32)  # noqa: E731
    w = {"input_blocks.0.0.weight": z(32, 4, 3, 3), "input_blocks.1.0.out_layers.3.weight": z(32, 32, 3, 3),
         "input_blocks.1.1.proj_in.weight": z(32, 32, 1, 1),
         "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": z(32, 768),
         "input_hint_block.0.weight": z(8, 3, 3, 3), "input_hint_block.2.weight": z(16, 8, 3, 3)}
    for k, v in changes.items():
        k = k.replace("__", ".")
        w.pop(k) if v is None else w.__setitem__(k, v)
    return {f"control_model.{k}": v for k, v in w.items()}


@pytest.mark.parametrize("changes, message", [
    ({"input_blocks.1.0.out_layers.3.weight": None}, "key input_blocks.1.0.out_layers.3.weight is missing"),
    ({"input_blocks.1.1.proj_in.weight": None}, r"no \*.proj_in.weight beside the cross-attention layers"),
    ({"input_blocks.1.0.out_layers.3.weight": np.zeros((), np.float32)},
     r"key input_blocks.1.0.out_layers.3.weight has shape \(\), expected 4 dimensions"),
    ({"input_hint_block.0.weight": np.zeros(8, np.float32)},
     r"key input_hint_block.0.weight has shape \(8,\), expected 4 dimensions"),
    ({"label_emb.0.0.weight": np.zeros((32, 10), np.float32)}, "key label_emb.0.0.weight has 10 inputs"),
])
def test_malformed_original_file_one_line(tmp_path, changes, message):
    path = tmp_path / "control_tiny.safetensors"
    save_file(original(**changes), str(path))
    with pytest.raises(UserError, match=f"cannot infer the ControlNet's config from {path}: {message}") as e:
        convert_controlnet(str(path), tmp_path / "out")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_inferred_config_checked_too(tmp_path):
    """SD 2.x's 64-wide heads on blocks 32 wide infer 0 heads: the inferred config is checked as a given one."""
    path = tmp_path / "control_tiny.safetensors"
    save_file(original(**{"input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": np.zeros((32, 32), np.float32)}),
              str(path))
    with pytest.raises(UserError, match=rf"the config inferred from {path} has num_attention_heads=\[0\]: expected a "
                                        "non-empty list of numbers > 0"):
        convert_controlnet(str(path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_given_config_checked_too(tmp_path):
    path = tmp_path / "control_tiny.safetensors"
    save_file(original(), str(path))
    with pytest.raises(UserError, match="--config is not a JSON object"):
        convert_controlnet(str(path), tmp_path / "out", config=[1, 2])
    with pytest.raises(UserError, match="--config has norm_num_groups=7"):
        convert_controlnet(str(path), tmp_path / "out", config={**GOOD, "norm_num_groups": 7})
