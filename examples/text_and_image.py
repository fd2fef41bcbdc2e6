"""A text prompt and an image prompt together: the text says what, the image says how it looks.

    python examples/text_and_image.py --image style.jpg --prompt "a lighthouse on a cliff" --scale 0.5
"""

import argparse

from PIL import Image

from ipadapter_mlx import ImagePrompt, StableDiffusion

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--image", required=True)
parser.add_argument("--prompt", required=True)
parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
parser.add_argument("--ip-adapter", default="sd15-plus")
parser.add_argument("--scale", type=float, default=0.5, help="about 0.5 leaves room for the text")
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--size", type=int, default=None)
parser.add_argument("--output", default="text_and_image.png")
args = parser.parse_args()

pipe = StableDiffusion.from_pretrained(args.model)
pipe.load_ip_adapter(args.ip_adapter, scale=args.scale)
reference = ImagePrompt(images=[Image.open(args.image)])
image = pipe.generate(args.prompt, negative_prompt="lowres, blurry", steps=args.steps, seed=1,
                      height=args.size, width=args.size, image_prompts=[reference])[0]
image.save(args.output)
print(args.output)
