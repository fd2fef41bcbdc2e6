"""Structure from one image, style from another: a T2I-Adapter follows a control image (edges, depth, pose,
sketch), an IP-Adapter carries the look of a reference picture.

    python examples/structure_and_style.py --control edges.png --image painting.jpg --prompt "a house by a lake"

The control image is a map already made (white edges on black for canny/lineart/sketch, a depth map, a pose
skeleton); the picture takes its size unless --size is given. SD 1.5: --model stable-diffusion-v1-5/stable-
diffusion-v1-5 --t2i-adapter t2i-canny-sd15 --ip-adapter sd15.
"""

import argparse

from PIL import Image

from ipadapter_mlx import ImagePrompt, StableDiffusion, T2IControl

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--control", required=True, help="the structure: an edge, depth, pose or sketch map")
parser.add_argument("--image", required=True, help="the style reference")
parser.add_argument("--prompt", default="")
parser.add_argument("--model", default="stabilityai/stable-diffusion-xl-base-1.0")
parser.add_argument("--t2i-adapter", default="t2i-canny-sdxl")
parser.add_argument("--ip-adapter", default="sdxl")
parser.add_argument("--scale", type=float, default=0.6, help="the IP-Adapter's strength")
parser.add_argument("--conditioning-scale", type=float, default=0.8, help="the T2I-Adapter's strength")
parser.add_argument("--conditioning-factor", type=float, default=0.9,
                    help="the fraction of the first steps the structure is enforced in")
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--size", type=int, default=None, help="default: the control image's size")
parser.add_argument("--output", default="structure_and_style.png")
args = parser.parse_args()

pipe = StableDiffusion.from_pretrained(args.model)
pipe.load_ip_adapter(args.ip_adapter, scale=args.scale)
structure = T2IControl(pipe.load_t2i_adapter(args.t2i_adapter), Image.open(args.control),
                       scale=args.conditioning_scale, factor=args.conditioning_factor)
image = pipe.generate(args.prompt, negative_prompt="lowres, blurry", steps=args.steps, seed=1, height=args.size,
                      width=args.size, image_prompts=[ImagePrompt(images=[Image.open(args.image)])],
                      t2i_adapters=[structure])[0]
image.save(args.output)
print(args.output)
