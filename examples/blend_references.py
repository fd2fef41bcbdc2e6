"""Several reference images blended into one picture (several styles at once), weighted.

    python examples/blend_references.py --image a.jpg --image b.jpg --weight 1 --weight 0.5 --combine average
"""

import argparse

from PIL import Image

from ipadapter_mlx import ImagePrompt, StableDiffusion

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--image", action="append", required=True)
parser.add_argument("--weight", action="append", type=float, help="one per --image (default 1)")
parser.add_argument("--combine", default="average", choices=["concat", "average", "norm-average", "subtract", "add", "max", "min"])
parser.add_argument("--prompt", default="best quality, high quality")
parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
parser.add_argument("--ip-adapter", default="sd15-plus")
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--size", type=int, default=None)
parser.add_argument("--output", default="blend.png")
args = parser.parse_args()

pipe = StableDiffusion.from_pretrained(args.model)
pipe.load_ip_adapter(args.ip_adapter, scale=0.8)
blend = ImagePrompt(images=[Image.open(p) for p in args.image], weights=args.weight, combine=args.combine)
image = pipe.generate(args.prompt, steps=args.steps, seed=2, height=args.size, width=args.size,
                      image_prompts=[blend])[0]
image.save(args.output)
print(args.output)
