"""`python -m convert SOURCE OUTPUT`: any Stable Diffusion checkpoint or IP-Adapter -> a converted MLX folder.

SOURCE: a Hub repo id, a diffusers folder, an original single file, or an IP-Adapter (preset name,
REPO:PATH, or a tencent-format .bin/.safetensors file)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ipadapter_mlx.errors import UserError


def is_ip_adapter_file(path: Path) -> bool:
    """Tell an IP-Adapter from a model checkpoint by its tensor names, without reading a big file whole."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                return any(k.startswith("ip_adapter.") for k in f.keys())
        except Exception:
            return False  # not readable: the model converter reports it
    return path.suffix == ".bin" and path.stat().st_size < 2**31 and path.name.startswith("ip-adapter")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__)
    p.add_argument("source", help="Hub repo id, diffusers folder, or single .safetensors/.ckpt file")
    p.add_argument("output", help="the MLX folder to write (written to a temp folder, then renamed)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="store weights in this dtype (default: as in the source)")
    p.add_argument("--tokenizer", default=None, help="single files: tokenizer folder or Hub repo")
    p.add_argument("--config", default=None,
                   help="single files: a diffusers folder or Hub repo whose configs to use instead of inferring them")
    p.add_argument("--quantize", type=int, choices=(4, 8), default=None,
                   help="store the Linear layers of the text encoder, UNet and image encoder quantized")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=64)
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    args = p.parse_args(argv)
    try:
        import mlx.core as mx

        from ipadapter_mlx.hub import (
            PRESETS, REPO_ID, download_diffusers_repo, resolve_config, resolve_ip_adapter, split_hub_path,
        )

        from .ip_adapter import save_ip_adapter
        from .stable_diffusion import convert_diffusers_folder, convert_single_file

        out = Path(args.output)
        if out.exists() and not args.force:
            raise UserError(f"{out} already exists (use --force to replace it)")
        dtype = getattr(mx, args.dtype) if args.dtype else None
        q = (args.quantize, args.group_size) if args.quantize else None
        src = Path(args.source).expanduser()
        if args.source in PRESETS or split_hub_path(args.source) or (src.is_file() and is_ip_adapter_file(src)):
            save_ip_adapter(resolve_ip_adapter(args.source)[0], out, dtype)
        elif src.is_dir():
            convert_diffusers_folder(src, out, dtype, q)
        elif src.is_file():
            config_dir = resolve_config(args.config) if args.config else None
            convert_single_file(src, out, args.tokenizer, dtype, config_dir, q)
        elif REPO_ID.match(args.source):
            convert_diffusers_folder(download_diffusers_repo(args.source), out, dtype, q)
        else:
            raise UserError(f"model not found: {args.source} is neither an existing path nor a Hub repo id")
        print(out)
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if os.environ.get("IPADAPTER_MLX_DEBUG"):
            raise
        print(f"error: {type(e).__name__}: {e} (set IPADAPTER_MLX_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
