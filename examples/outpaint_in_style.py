"""Extend a photo beyond its edges, painting the new border in the style of a reference picture.

    python examples/outpaint_in_style.py --init photo.jpg --image painting.jpg --border 128 0 128 0

--border LEFT TOP RIGHT BOTTOM in pixels (multiples of 8). The photo is kept exactly, but for a soft seam
--mask-blur pixels wide.
"""

import argparse

from PIL import Image

from ipadapter_mlx import ImagePrompt, StableDiffusion
from ipadapter_mlx.inpainting import outpaint_canvas

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--init", required=True, help="the photo to extend")
parser.add_argument("--image", required=True, help="the reference whose style the new border takes")
parser.add_argument("--border", type=int, nargs=4, default=[128, 0, 128, 0], metavar=("L", "T", "R", "B"))
parser.add_argument("--prompt", default="")
parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-inpainting")
parser.add_argument("--ip-adapter", default="sd15")
parser.add_argument("--mask-blur", type=float, default=8, help="soften the paste-back edge (pixels)")
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--output", default="outpaint_in_style.png")
args = parser.parse_args()

pipe = StableDiffusion.from_pretrained(args.model)
pipe.load_ip_adapter(args.ip_adapter, scale=0.6)
canvas, mask = outpaint_canvas(Image.open(args.init).convert("RGB"), tuple(args.border))
image = pipe.generate(args.prompt, init_image=canvas, mask_image=mask, strength=1.0, mask_blur=args.mask_blur,
                      keep_unmasked=True, steps=args.steps, seed=3,
                      image_prompts=[ImagePrompt(images=[Image.open(args.image)])])[0]
image.save(args.output)
print(args.output)
