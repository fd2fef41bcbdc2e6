"""Replace what a mask covers with something from a reference picture ("this jacket, on the person, only
there"): inpainting guided by an IP-Adapter image prompt; everything outside the (blurred) mask is kept exactly.

    python examples/inpaint_with_reference.py --init photo.jpg --mask mask.png --image jacket.jpg \
        --prompt "a person wearing a jacket"

The mask is white where to repaint. An inpainting model (9-channel UNet) blends the new part best; any
ordinary model works too (the kept part is blended back at every step).
"""

import argparse

from PIL import Image

from ipadapter_mlx import ImagePrompt, StableDiffusion

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--init", required=True, help="the photo to edit")
parser.add_argument("--mask", required=True, help="white = repaint, black = keep")
parser.add_argument("--image", required=True, help="the reference: what to put there")
parser.add_argument("--prompt", default="")
parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-inpainting")
parser.add_argument("--ip-adapter", default="sd15")
parser.add_argument("--scale", type=float, default=0.7, help="how strongly the reference steers")
parser.add_argument("--padding-mask-crop", type=int, default=None,
                    help="for a small mask in a large photo: repaint a crop this many pixels around it")
parser.add_argument("--mask-blur", type=float, default=4, help="soften the paste-back edge (pixels)")
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--output", default="inpaint_with_reference.png")
args = parser.parse_args()

pipe = StableDiffusion.from_pretrained(args.model)
pipe.load_ip_adapter(args.ip_adapter, scale=args.scale)
image = pipe.generate(args.prompt, init_image=Image.open(args.init).convert("RGB"), mask_image=Image.open(args.mask),
                      strength=1.0, mask_blur=args.mask_blur, padding_mask_crop=args.padding_mask_crop,
                      keep_unmasked=True, steps=args.steps, seed=3,
                      image_prompts=[ImagePrompt(images=[Image.open(args.image)])])[0]
image.save(args.output)
print(args.output)
