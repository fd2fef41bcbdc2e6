"""IP-Adapter-FaceID: a person's identity from a face-recognition embedding (tencent-ailab/IP-Adapter's
`ip_adapter_faceid.py` / `ip_adapter_faceid_separate.py`, h94/IP-Adapter-FaceID).

FaceID adapters read a 512-d ArcFace embedding (insightface's `buffalo_l`: `normed_embedding`; portrait-unnorm
the raw `embedding`) instead of CLIP features; the unconditional branch gets the zero embedding. The Plus
adapters also read CLIP's hidden states of the aligned face crop (`face_align.norm_crop`, 224 px). Portrait
takes several faces, their tokens joined. The projections are in models/image_proj.py; the LoRA that the
FaceID, Plus and SDXL files carry (rank 128 on q/k/v/out of every attention) is fused into the UNet through
lora.py. insightface is optional (`pip install ".[faceid]"`): precomputed embeddings need neither it nor its
models.
"""

from __future__ import annotations

import logging
from pathlib import Path

import mlx.core as mx
import numpy as np
from PIL import Image

from .errors import UserError
from .ip_adapter import Features, ImagePrompt

log = logging.getLogger(__name__)

EMBEDS_KEY, CROPS_KEY = "face_embeds", "face_crops"  # what `embed --face-image` writes
MIN_CROP = 8  # smallest face crop side read from a file (the CLIP encoder resizes it; 0x0 would not be a picture)
MAX_FACES = 64
CROP_SIZE = 224  # the authors' norm_crop size for every FaceID Plus adapter (CLIP's input size)
INSIGHTFACE_ROOT = "~/.insightface"  # FaceAnalysis' default: the pack goes to ~/.insightface/models/buffalo_l
INSTALL_HINT = ('pip install ".[faceid]" (insightface and onnxruntime); on first use insightface downloads its '
                f"buffalo_l model pack into {INSIGHTFACE_ROOT}/models/buffalo_l (or unzip buffalo_l.zip there); "
                "or give --face-embeds instead")


def is_faceid(adapter) -> bool:
    return adapter.config.image_proj.face


def check_prompt(la, p: ImagePrompt) -> bool:
    """Whether adapter `la` reads faces; a face given to a CLIP adapter, or a picture alone to a FaceID adapter,
    is refused in one line."""
    proj = la.adapter.config.image_proj
    if not proj.face:
        if p.face_embeds is not None:
            raise UserError(f"IP-Adapter {la.ref} is a CLIP image adapter: face embeddings (--face-image, "
                            "--face-embeds) are for FaceID adapters; give it --image")
        return False
    if p.face_embeds is None:
        what = ("give --face-image (a photo: the embedding and the aligned crop are computed) or --face-embeds "
                "with --image (the aligned face crop)") if proj.kind == "faceid-plus" else \
            "give --face-image (a photo of the face) or --face-embeds; --image is not what it reads"
        raise UserError(f"FaceID adapter {la.ref} reads a face identity embedding, not a reference picture: {what}")
    if p.negative_content is not None or p.composition_images:
        raise UserError(f"FaceID adapter {la.ref}: a negative content prompt and composition images work on CLIP "
                        "image features; a face embedding has neither")
    if p.images and proj.kind != "faceid-plus":
        raise UserError(f"FaceID adapter {la.ref} reads no picture (only FaceID Plus reads the face crop); "
                        "leave out --image")
    return True


def as_embeds(x, width: int, ref: str) -> mx.array:
    """Face embeddings as (faces, width) float32: (width,), (faces, width) or the authors' (1, faces, width)."""
    a = np.asarray(x)
    if a.dtype.kind not in "fiu":  # numbers only (numpy counts timedelta64 as an integer)
        raise UserError(f"face embeddings for {ref} hold {a.dtype} values; expected floats")
    if a.ndim == 3 and a.shape[0] == 1:
        a = a[0]
    if a.ndim == 1:
        a = a[None]
    if a.ndim != 2 or a.shape[-1] != width or not 1 <= a.shape[0] <= MAX_FACES:
        got = f"{a.shape[-1]}-d" if a.ndim else "a scalar"
        raise UserError(f"face embeddings of shape {tuple(a.shape)} ({got}): FaceID adapter {ref} reads {width}-d "
                        f"identity embeddings, 1 to {MAX_FACES} faces as (faces, {width})")
    a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise UserError(f"face embeddings for {ref} hold NaN or Inf values")
    return mx.array(a)


def face_features(adapters, i: int, p: ImagePrompt) -> Features:
    """The zero embedding is the unconditional branch (the authors' `torch.zeros_like(faceid_embeds)`); Plus
    adds CLIP's hidden states of each face crop, the all-zero normalised image for the null branch."""
    la = adapters[i]
    proj = la.adapter.config.image_proj
    embeds = as_embeds(p.face_embeds, proj.input_dim, la.ref)
    feats = Features(embeds, mx.zeros_like(embeds), hidden_states=False, face=True)
    if proj.kind != "faceid-plus":
        return feats
    if len(p.images) != embeds.shape[0]:
        raise UserError(f"FaceID Plus adapter {la.ref}: {len(p.images)} face crops (--image) for "
                        f"{embeds.shape[0]} face embeddings; give one aligned crop per face (--face-image does both)")
    clip = adapters.encode(p.images, i, p.fit, p.negative)
    feats.clip, feats.clip_uncond = clip.cond, clip.uncond
    return feats


def check_features(la, feats: Features) -> Features:
    """Saved or given features against a FaceID adapter (or face features against a CLIP one)."""
    want = la.adapter.config.image_proj
    if not want.face:
        raise UserError(f"IP-Adapter {la.ref} reads {want.input_dim}-d CLIP features, the embeddings given are "
                        f"{feats.cond.shape[-1]}-d face identity embeddings (for FaceID adapters)")
    if not feats.face:
        raise UserError(f"FaceID adapter {la.ref} reads {want.input_dim}-d face identity embeddings, the embeddings "
                        f"given are {feats.cond.shape[-1]}-d CLIP features")
    if feats.cond.ndim != 2 or feats.cond.shape[-1] != want.input_dim:
        raise UserError(f"face embeddings are {feats.cond.shape[-1]}-d, FaceID adapter {la.ref} reads "
                        f"{want.input_dim}-d")
    if want.kind == "faceid-plus" and (feats.clip is None or feats.clip.shape[-1] != want.clip_dim):
        got = "none" if feats.clip is None else f"{feats.clip.shape[-1]}-d"
        raise UserError(f"FaceID Plus adapter {la.ref} reads {want.clip_dim}-d CLIP hidden states of the face "
                        f"crop, got {got}")
    return feats


# ---------------------------------------------------------------------------------------------------
# Embeddings files: .npy (the (faces, 512) array) or .safetensors (`embed --face-image` writes face_embeds and,
# for the Plus adapters, the aligned crops)


def read_face_embeds(path: str) -> tuple[np.ndarray, list[Image.Image]]:
    """(embeddings, aligned face crops or []) from a .npy or .safetensors file, checked before use."""
    from .loading import read_safetensors

    crops: list[Image.Image] = []
    if path.endswith(".npy"):
        try:
            a = np.load(path, mmap_mode="r", allow_pickle=False)
            if not isinstance(a, np.ndarray) or a.size > MAX_FACES * 4096:
                raise ValueError(f"{getattr(a, 'shape', type(a).__name__)} is far more than face embeddings")
            a = np.array(a)
        except (OSError, ValueError, EOFError) as e:
            raise UserError(f"cannot read face embeddings {path}: {e}") from None
        if not np.issubdtype(a.dtype, np.floating):
            raise UserError(f"{path}: face embeddings hold {a.dtype} values; expected floats")
        return a, crops
    if not path.endswith(".safetensors"):
        raise UserError(f"face embeddings must be a .npy or .safetensors file, got {path}")
    arrays, _ = read_safetensors(path, what="face embeddings file")
    if EMBEDS_KEY in arrays:
        embeds = arrays[EMBEDS_KEY]
    elif len(arrays) == 1:
        embeds = next(iter(arrays.values()))
    else:
        raise UserError(f"{path}: no '{EMBEDS_KEY}' tensor among {', '.join(sorted(arrays)[:5])}")
    if not mx.issubdtype(embeds.dtype, mx.floating):
        raise UserError(f"{path}: face embeddings hold {embeds.dtype} values; expected floats")
    if CROPS_KEY in arrays:
        c = arrays[CROPS_KEY]
        faces = embeds.shape[0] if embeds.ndim == 2 else None  # (faces, width): one crop per face
        if (c.dtype != mx.uint8 or c.ndim != 4 or c.shape[-1] != 3 or c.shape[0] != faces
                or min(c.shape[1:3]) < MIN_CROP):
            raise UserError(f"{path}: {CROPS_KEY} is {tuple(c.shape)} {c.dtype} beside {EMBEDS_KEY} "
                            f"{tuple(embeds.shape)}; expected (faces, H, W, 3) uint8 crops of at least "
                            f"{MIN_CROP}x{MIN_CROP}, one per row of (faces, width) embeddings")
        crops = [Image.fromarray(np.array(x)) for x in c]
    return np.array(embeds.astype(mx.float32)), crops


def save_face_embeds(path: str, embeds: np.ndarray, crops: list[Image.Image] = (), info: dict | None = None) -> None:
    """face_embeds (faces, 512) float32 and the aligned crops (faces, H, W, 3) uint8; written whole or not at all."""
    import json

    from .files import atomic_file

    arrays = {EMBEDS_KEY: mx.array(np.asarray(embeds, np.float32))}
    if crops:
        arrays[CROPS_KEY] = mx.array(np.stack([np.asarray(c.convert("RGB"), np.uint8) for c in crops]))
    with atomic_file(path) as tmp:
        mx.save_safetensors(str(tmp), arrays, metadata={"format": "ipadapter-mlx-face-embeds",
                                                        "info": json.dumps(info or {})})


# ---------------------------------------------------------------------------------------------------
# insightface (optional): detection + ArcFace + alignment


def _insightface():
    try:
        from insightface.app import FaceAnalysis
        from insightface.utils import face_align
    except ImportError as e:
        raise UserError(f"--face-image needs insightface, which is not installed ({e.name or e}): {INSTALL_HINT}") from None
    return FaceAnalysis, face_align


def analyse_faces(images: list[Image.Image], names: list[str], unnormed: bool = False,
                  crop_size: int = CROP_SIZE) -> tuple[np.ndarray, list[Image.Image]]:
    """One (embedding, aligned crop) per picture, as the authors and ComfyUI compute them: buffalo_l, detection
    at 640 px then smaller (down to 320 by 64) when no face is found; the largest face when there are several."""
    FaceAnalysis, face_align = _insightface()
    try:
        app = FaceAnalysis(name="buffalo_l", root=str(Path(INSIGHTFACE_ROOT).expanduser()),
                           providers=["CPUExecutionProvider"])
        app.prepare(ctx_id=-1, det_size=(640, 640))
    except Exception as e:  # a missing or partial model pack, no network for the download
        raise UserError(f"insightface could not load its buffalo_l models ({type(e).__name__}: {e}); "
                        f"{INSTALL_HINT}") from None
    embeds, crops = [], []
    for image, name in zip(images, names):
        bgr = np.asarray(image.convert("RGB"))[:, :, ::-1].copy()  # insightface works on OpenCV's BGR
        faces = []
        for size in range(640, 256, -64):
            app.det_model.input_size = (size, size)
            faces = app.get(bgr)
            if faces:
                break
        if not faces:
            raise UserError(f"no face found in {name}")
        area = lambda f: float((f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))  # noqa: E731
        face = max(faces, key=area)
        if len(faces) > 1:
            log.warning("%d faces in %s: using the largest", len(faces), name)
        width = float(face.bbox[2] - face.bbox[0])
        if width < 64:
            log.warning("the face in %s is only %d px wide: its identity will be weak", name, int(width))
        embeds.append(face.embedding if unnormed else face.normed_embedding)
        crop = face_align.norm_crop(bgr, landmark=face.kps, image_size=crop_size)
        crops.append(Image.fromarray(np.ascontiguousarray(crop[:, :, ::-1])))
    return np.stack(embeds).astype(np.float32), crops


def prompt_from_faces(adapter, images: list[Image.Image], names: list[str]) -> tuple[np.ndarray, list[Image.Image]]:
    """--face-image: embeddings (raw for portrait-unnorm) and, for the Plus adapters, the crops as their images."""
    proj = adapter.config.image_proj
    embeds, crops = analyse_faces(images, names, unnormed=proj.kind == "resampler")
    return embeds, crops if proj.kind == "faceid-plus" else []


# ---------------------------------------------------------------------------------------------------
# The LoRA of the FaceID, Plus and SDXL files: `ip_adapter.N.to_{q,k,v,out}_lora.{down,up}.weight` on processor N
# of every attention (diffusers' attn_processors order: attn1 and attn2 of each transformer block in turn),
# `W + lora_scale * up @ down` (no alpha), fused into the UNet through lora.py


def lora_of(adapter, unet, name: str):
    """The adapter file's LoRA as a lora.Lora on this UNet's module paths (None when the file has none)."""
    from .ip_adapter import cross_attention_slots
    from .checkpoints.torch_pickle import printable
    from .lora import Lora, LoraLayer, check_arrays, check_lora

    if not adapter._lora:
        return None
    processors = {}
    for i, (site, _) in cross_attention_slots(unet).items():
        processors[i] = site.name
        processors[str(int(i) - 1)] = site.name[: -len("attn2")] + "attn1"  # its block's self-attention
    groups: dict[str, dict[str, mx.array]] = {}
    for key, value in adapter._lora.items():
        parts = key.split(".")  # ip_adapter, N, to_q_lora, down|up, weight
        proj = parts[2][: -len("_lora")] if len(parts) == 5 and parts[2].endswith("_lora") else ""
        if (proj not in ("to_q", "to_k", "to_v", "to_out") or parts[1] not in processors
                or parts[3] not in ("down", "up") or parts[4] != "weight"):
            raise UserError(f"{name}: LoRA tensor {printable(key)} names no attention processor of this UNet "
                            f"({len(processors)} processors)")
        path = f"{processors[parts[1]]}.{proj}" + (".0" if proj == "to_out" else "")
        check_arrays(name, {key: value}, (2,))  # Linear layers only: no conv kernels in these files
        groups.setdefault(path, {})[parts[3]] = value
    half = [p for p, g in groups.items() if set(g) != {"down", "up"}]
    if half:
        raise UserError(f"{name}: LoRA layers without both down and up weights: {', '.join(sorted(half)[:3])}")
    lora = Lora(name, {"unet": {p: LoraLayer(g["down"], g["up"]) for p, g in groups.items()}})
    check_lora(lora, {"unet": unet})
    return lora


def sibling_lora(adapter_file: Path) -> Path | None:
    """The separately shipped kohya LoRA beside the adapter (`NAME_lora.safetensors`), for files without one."""
    path = adapter_file.with_name(f"{adapter_file.stem}_lora.safetensors")
    return path if path.is_file() else None


def attach_lora(pipe, index: int, lora_scale: float | None) -> None:
    """Fuse adapter `index`'s LoRA (in its file, else beside it) into the UNet at `lora_scale` (default 1.0, the
    authors' LoRAAttnProcessor); remembered on the loaded adapter so unloading it removes the LoRA too."""
    from .loading import build, read_json

    la = pipe.adapters[index]
    if not is_faceid(la.adapter):
        if lora_scale is not None:
            raise UserError(f"IP-Adapter {la.ref} is not a FaceID adapter: it has no LoRA for a lora scale")
        return
    # the UNet's structure names and sizes the layers (lazy arrays: no memory), unquantized as load_lora checks it
    unet = build("unet", read_json(pipe.folder / "unet" / "config.json"))
    lora = lora_of(la.adapter, unet, f"FaceID LoRA of {la.ref}")
    source = lora if lora is not None else sibling_lora(la.file)
    if source is None:
        if lora_scale is not None:
            raise UserError(f"FaceID adapter {la.ref} carries no LoRA (portrait adapters have none, and no "
                            f"{la.file.stem}_lora.safetensors lies beside it); leave out the LoRA scale")
        return
    before = len(pipe.loras)
    pipe.load_lora(source if lora is not None else str(source), 1.0 if lora_scale is None else lora_scale)
    la.lora = pipe.loras[before].lora


def detach_lora(pipe, loaded: list) -> None:
    """Remove the LoRAs that these (unloaded) adapters brought."""
    for la in loaded:
        for k, entry in enumerate(pipe.loras):
            if getattr(la, "lora", None) is not None and entry.lora is la.lora:
                pipe.unload_lora(k)
                break


# ---------------------------------------------------------------------------------------------------
# The command line: --face-image / --face-embeds / --faceid-v2-weight for one --ip-adapter


def cli_faces(la, g: dict, images: list[Image.Image]) -> tuple[np.ndarray, list[Image.Image]]:
    """(face embeddings, the images its prompt gets) for adapter `la` from its CLI group: --face-image computes
    both (the crops only matter to the Plus adapters; --image, when given, replaces them), --face-embeds reads
    files (with their crops, when `embed` saved them)."""
    proj = la.adapter.config.image_proj
    if not proj.face:
        raise UserError(f"IP-Adapter {la.ref} is a CLIP image adapter: --face-image and --face-embeds are for "
                        "FaceID adapters; give it --image")
    if g["face_image"] and g["face_embeds"]:
        raise UserError(f"FaceID adapter {la.ref}: give --face-image or --face-embeds (one of them)")
    if g.get("faceid_v2_weight") is not None and proj.kind != "faceid-plus":
        raise UserError(f"--faceid-v2-weight is for FaceID Plus v2 adapters (their shortcut); {la.ref} is not one")
    if g.get("faceid_v2_weight") is not None and not proj.shortcut:  # v2 is told by the name only
        log.warning("%s: its file name does not say plusv2; using the v2 shortcut as --faceid-v2-weight asks", la.ref)
    if not g["face_image"] and not g["face_embeds"]:
        raise UserError(f"FaceID adapter {la.ref} needs a face: --face-image or --face-embeds")
    if g["face_image"]:
        from .images import open_image

        embeds, crops = prompt_from_faces(la.adapter, [open_image(p) for p in g["face_image"]], g["face_image"])
    else:
        parts = [read_face_embeds(p) for p in g["face_embeds"]]
        embeds = np.concatenate([as_embeds_np(e, proj.input_dim, la.ref, p) for (e, _), p in zip(parts, g["face_embeds"])])
        crops = [c for _, cs in parts for c in cs] if all(cs for _, cs in parts) else []
    return embeds, images or (crops if proj.kind == "faceid-plus" else [])


def as_embeds_np(x: np.ndarray, width: int, ref: str, path: str) -> np.ndarray:
    """A file's embeddings checked (naming the file) as `as_embeds` checks them."""
    try:
        return np.array(as_embeds(x, width, ref))
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def embed_faces(adapter, face_images: list[str], output: str, info: dict) -> None:
    """`python -m ipadapter_mlx embed --face-image`: the embeddings (and for Plus the aligned crops) to a file."""
    from .images import open_image

    if not is_faceid(adapter):
        raise UserError("--face-image needs a FaceID --ip-adapter (it says which embedding to compute)")
    embeds, crops = prompt_from_faces(adapter, [open_image(p) for p in face_images], face_images)
    save_face_embeds(output, embeds, crops, info)
