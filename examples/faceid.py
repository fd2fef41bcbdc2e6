"""A person's likeness from a photo of their face (IP-Adapter-FaceID). With --face-image, insightface
(pip install ".[faceid]"; its models are for non-commercial research only) computes the identity embedding and
the aligned crop; --face-embeds takes saved embeddings (`python -m ipadapter_mlx embed --face-image ...` or a
(faces, 512) .npy) and, for the Plus adapters, --crop the aligned face crop.

    python examples/faceid.py --face-image me.jpg --prompt "a knight in armour, oil painting"
    python examples/faceid.py --face-embeds me.safetensors --ip-adapter faceid-sd15 --lora-scale 0.6
"""

import argparse

from PIL import Image

from ipadapter_mlx import ImagePrompt, StableDiffusion
from ipadapter_mlx.faceid import prompt_from_faces, read_face_embeds

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
faces = parser.add_mutually_exclusive_group(required=True)
faces.add_argument("--face-image", action="append", help="a photo of the face (repeatable: portrait)")
faces.add_argument("--face-embeds", help=".npy or .safetensors face embeddings")
parser.add_argument("--crop", action="append", help="with --face-embeds, Plus adapters: the aligned face crop")
parser.add_argument("--prompt", default="a portrait photo, best quality")
parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
parser.add_argument("--ip-adapter", default="faceid-plusv2-sd15")
parser.add_argument("--scale", type=float, default=0.8)
parser.add_argument("--lora-scale", type=float, default=None, help="the FaceID LoRA's strength (default 1.0)")
parser.add_argument("--v2-weight", type=float, default=None, help="Plus v2: the CLIP branch's weight (default 1)")
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--size", type=int, default=512)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--output", default="faceid.png")
args = parser.parse_args()

pipe = StableDiffusion.from_pretrained(args.model)
index = pipe.load_ip_adapter(args.ip_adapter, scale=args.scale, lora_scale=args.lora_scale)
if args.face_image:  # the embedding (and for Plus the aligned crop) of the largest face in each photo
    embeds, crops = prompt_from_faces(pipe.adapters[index].adapter, [Image.open(p) for p in args.face_image],
                                      args.face_image)
else:
    embeds, crops = read_face_embeds(args.face_embeds)
    crops = [Image.open(p) for p in args.crop or []] or crops
plus = pipe.adapters[index].adapter.config.image_proj.kind == "faceid-plus"
prompt = ImagePrompt(face_embeds=embeds, images=crops if plus else [], faceid_v2_weight=args.v2_weight)
pipe.generate(args.prompt, steps=args.steps, height=args.size, width=args.size, seed=args.seed,
              image_prompts=[prompt])[0].save(args.output)
print(args.output)
