"""Convert a Stable Diffusion model, an IP-Adapter, a ControlNet or a T2I-Adapter into a converted MLX folder,
once, ahead of time.

SOURCE is one of
  a model:       a Hub repo id (org/name), a diffusers folder, or an original single
                 file (.safetensors, .ckpt)
  an IP-Adapter: a preset (below), REPO:PATH on the Hub
                 (h94/IP-Adapter:models/ip-adapter-plus_sd15.safetensors), or a tencent-format
                 ip-adapter*.bin / .safetensors file
  a ControlNet:  a preset (below), a diffusers ControlNet folder, Hub repo
                 (lllyasviel/control_v11p_sd15_canny) or REPO:FOLDER, or an original control_*.pth /
                 .safetensors file (control_model.* keys), local or REPO:PATH
  a T2I-Adapter: a preset (below), a Hub repo id (TencentARC/t2i-adapter-canny-sdxl-1.0),
                 REPO:FOLDER, a diffusers folder (config.json + diffusion_pytorch_model.*), or a
                 single file: TencentARC's t2iadapter_*.pth or diffusers' weights as one file,
                 local or REPO:PATH (TencentARC/T2I-Adapter:models/t2iadapter_depth_sd15v2.pth)
presets: {presets}
ControlNet presets: {controlnet_presets}
T2I-Adapter presets: {t2i_presets}"""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

from ipadapter_mlx.argparsing import Parser, show_log
from ipadapter_mlx.errors import UserError

EPILOG = """what OUTPUT holds:
  a model:       text_encoder/ (text_encoder_2/ for SDXL), unet/, vae/, each with config.json
                 and model.safetensors; tokenizer/, scheduler/, and mlx_model.json (written
                 last: it marks the folder complete). Use it as --model.
  an IP-Adapter: ip_adapter/config.json, ip_adapter/model.safetensors and mlx_model.json; no
                 image encoder. Use it as --ip-adapter; its encoder is found as for any adapter
                 (an image_encoder/ folder beside it, else h94/IP-Adapter's), or give --image-encoder.
  a ControlNet:  controlnet/config.json, controlnet/model.safetensors and mlx_model.json. Use it
                 as --controlnet. An original single file's config is inferred from its shapes
                 (SD 1.5 / SDXL conventions) unless --config names a diffusers ControlNet.
  a T2I-Adapter: t2i_adapter/config.json, t2i_adapter/model.safetensors and mlx_model.json.
                 Use it as --t2i-adapter. A single file's config is inferred from its shapes.

OUTPUT is written to a temp folder beside it, then renamed into place; with --force an existing
OUTPUT is replaced the same way, so an interrupted run leaves the old folder or the new one whole."""


def is_ip_adapter_file(path: Path) -> bool:
    """Tell an IP-Adapter from a model checkpoint by its tensor names, without reading a big file whole: any
    `ip_adapter.*` tensor in a .safetensors file; the tencent format's two top-level keys in a pickle."""
    from ipadapter_mlx.loading import holds_tensors

    if path.suffix == ".safetensors":
        return holds_tensors(path, "ip_adapter.")
    return holds_tensors(path, "image_proj", "ip_adapter", every=True)


def check_output(out: Path, src: Path, force: bool) -> None:
    """OUTPUT must be a new path, or with --force a converted folder (what --force replaces, and nothing else:
    never a folder of the user's files, the source, or a folder holding the source)."""
    from ipadapter_mlx.loading import is_mlx_folder

    if str(out) in ("", ".", "..") or out.resolve() in (Path.cwd().resolve(), Path("/").resolve()):
        raise UserError(f"OUTPUT {str(out)!r} is not a folder to write; name a new one")
    if src.exists() and (out.resolve() == src.resolve() or out.resolve() in src.resolve().parents):
        raise UserError(f"OUTPUT {out} is or holds the source {src}; name a new folder")
    if out.exists() or out.is_symlink():
        if not force:
            raise UserError(f"{out} already exists (use --force to replace it)")
        if not (out.is_dir() and is_mlx_folder(out)):
            raise UserError(f"{out} exists and is not a converted MLX folder: --force replaces only those "
                            "(move it away yourself if you mean to)")


def main(argv: list[str] | None = None) -> int:
    from ipadapter_mlx.controlnet import PRESETS as CONTROLNET_PRESETS
    from ipadapter_mlx.discovery import PRESETS
    from ipadapter_mlx.t2i_adapter import PRESETS as T2I_PRESETS

    p = Parser(prog="python -m convert", description=__doc__.format(
        presets=textwrap.fill(", ".join(PRESETS), 90, subsequent_indent="  "),
        controlnet_presets=textwrap.fill(", ".join(CONTROLNET_PRESETS), 90, subsequent_indent="  "),
        t2i_presets=textwrap.fill(", ".join(T2I_PRESETS), 90, subsequent_indent="  ", break_on_hyphens=False)),
        epilog=EPILOG)
    p.add_argument("source", help="a model, an IP-Adapter, a ControlNet or a T2I-Adapter (see above)")
    p.add_argument("output", help="the MLX folder to write")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="store weights in this dtype (default: as in the source)")
    p.add_argument("--tokenizer", default=None, help="single files: tokenizer folder or Hub repo")
    p.add_argument("--config", default=None,
                   help="single files: a diffusers folder or Hub repo whose configs to use instead of inferring them")
    p.add_argument("--quantize", type=int, choices=(4, 8), default=None,
                   help="store the Linear layers of the text encoder, UNet and image encoder quantized")
    p.add_argument("--group-size", type=int, choices=(32, 64, 128), default=64, help="weights per quantization scale")
    p.add_argument("--force", action="store_true", help="replace an existing output folder")
    args = p.parse_args(argv)
    show_log()
    try:
        import mlx.core as mx

        from ipadapter_mlx.checkpoints.adapter_files import save_ip_adapter
        from ipadapter_mlx.checkpoints.stable_diffusion import convert_diffusers_folder, convert_single_file
        from ipadapter_mlx.discovery import resolve_ip_adapter
        from ipadapter_mlx.folders import clean_stale
        from ipadapter_mlx.hub import download_diffusers_repo, is_repo_id, resolve_config, split_hub_path
        from ipadapter_mlx.loading import is_mlx_folder

        out = Path(args.output)
        src = Path(args.source).expanduser()
        if src.is_dir() and is_mlx_folder(src):
            # exit 2, not 0: OUTPUT is not written, so a script that goes on to use it must stop here
            raise UserError(f"{src} is already a converted MLX folder; nothing to do (use it as it is)")
        clean_stale(out.parent)  # first: it may put back an OUTPUT that an interrupted --force had set aside
        check_output(out, src, args.force)
        dtype = getattr(mx, args.dtype) if args.dtype else None
        q = (args.quantize, args.group_size) if args.quantize else None
        from ipadapter_mlx import t2i_adapter
        from ipadapter_mlx.controlnet import controlnet_config, convert_controlnet, is_controlnet

        if is_controlnet(args.source):
            config = controlnet_config(args.config) if args.config else None
            convert_controlnet(args.source, out, dtype, q, config)
        elif t2i_adapter.is_t2i_adapter(args.source):
            t2i_adapter.convert_t2i_adapter(t2i_adapter.t2i_source(args.source)[0], out, dtype)
        elif args.source in PRESETS or split_hub_path(args.source) or (src.is_file() and is_ip_adapter_file(src)):
            save_ip_adapter(resolve_ip_adapter(args.source)[0], out, dtype)
        elif src.is_dir():
            if not (src / "model_index.json").is_file():  # what the other kinds' tests looked for, said at once
                raise UserError(f"{src} is not a folder to convert: no model_index.json (a diffusers pipeline) and "
                                "no config.json naming a ControlNet or a T2I-Adapter")
            convert_diffusers_folder(src, out, dtype, q)
        elif src.is_file():
            config_dir = resolve_config(args.config) if args.config else None
            convert_single_file(src, out, args.tokenizer, dtype, config_dir, q)
        elif is_repo_id(args.source):
            convert_diffusers_folder(download_diffusers_repo(args.source), out, dtype, q)
        else:
            raise UserError(f"not found: {args.source} is neither an existing path nor a Hub repo id (org/name)")
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
