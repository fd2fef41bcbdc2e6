"""Image-to-image guided by an image prompt: keep the layout of one picture, take the look of another.

    python examples/image_to_image.py --init photo.jpg --image painting.jpg --strength 0.6
"""

import argparse

from PIL import Image

from ipadapter_mlx import ImagePrompt, StableDiffusion

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--init", required=True, help="the picture to start from")
parser.add_argument("--image", required=True, help="the reference whose look to take")
parser.add_argument("--strength", type=float, default=0.6)
parser.add_argument("--prompt", default="")
parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
parser.add_argument("--ip-adapter", default="sd15")
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--output", default="image_to_image.png")
args = parser.parse_args()

pipe = StableDiffusion.from_pretrained(args.model)
pipe.load_ip_adapter(args.ip_adapter, scale=0.7)
image = pipe.generate(args.prompt, init_image=Image.open(args.init).convert("RGB"), strength=args.strength,
                      steps=args.steps, seed=3, image_prompts=[ImagePrompt(images=[Image.open(args.image)])])[0]
image.save(args.output)
print(args.output)
