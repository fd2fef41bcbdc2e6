"""Two references in two regions of one picture: the first acts on the left, the second on the right
(diffusers' ip_adapter_masks: each image is attended on its own, its output kept where its mask is white).

    python examples/two_regions.py --image left.jpg --image right.jpg --prompt "two people in a park"
    python examples/two_regions.py --image a.jpg --mask a_mask.png --image b.jpg --mask b_mask.png
"""

import argparse

import numpy as np
from PIL import Image

from ipadapter_mlx import ImagePrompt, StableDiffusion

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--image", action="append", required=True, help="two: left, then right")
parser.add_argument("--mask", action="append", help="one per --image (default: left and right halves)")
parser.add_argument("--prompt", default="two people, best quality")
parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
parser.add_argument("--ip-adapter", default="sd15-plus-face")
parser.add_argument("--scale", type=float, default=0.7)
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--size", type=int, default=512)
parser.add_argument("--output", default="two_regions.png")
args = parser.parse_args()


def half(side: int, size: int) -> Image.Image:
    """White on the left (side 0) or right (side 1) half."""
    white = np.zeros((size, size), np.uint8)
    white[:, side * size // 2:(side + 1) * size // 2] = 255
    return Image.fromarray(white)


masks = [Image.open(p) for p in args.mask] if args.mask else [half(i, args.size) for i in range(len(args.image))]
pipe = StableDiffusion.from_pretrained(args.model)
pipe.load_ip_adapter(args.ip_adapter, scale=args.scale)
regions = ImagePrompt(images=[Image.open(p) for p in args.image], masks=masks)
image = pipe.generate(args.prompt, steps=args.steps, seed=2, height=args.size, width=args.size,
                      image_prompts=[regions])[0]
image.save(args.output)
print(args.output)
