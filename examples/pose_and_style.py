"""Structure from one picture, style from another: a ControlNet holds the pose (an OpenPose map) or the edges
(Canny, made here from a photo), an IP-Adapter gives the look of a reference image.

    python examples/pose_and_style.py --pose pose_map.png --image painting.jpg --prompt "a dancer"
    python examples/pose_and_style.py --edges-from photo.jpg --image painting.jpg --prompt "a house"

Pose maps come from an OpenPose detector (e.g. controlnet_aux's OpenposeDetector); this script does not make them.
"""

import argparse

from PIL import Image

from ipadapter_mlx import ImagePrompt, StableDiffusion
from ipadapter_mlx.controlnet import Control, preprocess

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
structure = parser.add_mutually_exclusive_group(required=True)
structure.add_argument("--pose", help="an OpenPose map (used with the openpose ControlNet)")
structure.add_argument("--edges-from", help="a photo whose Canny edges hold the layout (the canny ControlNet)")
parser.add_argument("--image", required=True, help="the style reference (IP-Adapter)")
parser.add_argument("--prompt", required=True)
parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
parser.add_argument("--ip-adapter", default="sd15-plus")
parser.add_argument("--controlnet", default=None, help="default: openpose with --pose, canny with --edges-from")
parser.add_argument("--control-scale", type=float, default=1.0)
parser.add_argument("--style-scale", type=float, default=0.6, help="how strongly the reference's look acts")
parser.add_argument("--steps", type=int, default=25)
parser.add_argument("--size", type=int, default=512)
parser.add_argument("--output", default="pose_and_style.png")
args = parser.parse_args()

pipe = StableDiffusion.from_pretrained(args.model)
pipe.load_ip_adapter(args.ip_adapter, scale=args.style_scale)
pipe.load_controlnet(args.controlnet or ("openpose" if args.pose else "canny"))
size = (args.size, args.size)
control = (Image.open(args.pose) if args.pose else
           preprocess(Image.open(args.edges_from), "canny", size, low=100, high=200))
image = pipe.generate(args.prompt, negative_prompt="lowres, blurry", steps=args.steps, seed=1,
                      height=args.size, width=args.size,
                      image_prompts=[ImagePrompt(images=[Image.open(args.image)])],
                      controls=[Control(control, scale=args.control_scale)])[0]
image.save(args.output)
print(args.output)
