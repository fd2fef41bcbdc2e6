"""Image variations: an empty prompt, the reference image alone steers the picture.

    python examples/image_variation.py --image cat.jpg --output variations.png
"""

import argparse

from PIL import Image

from ipadapter_mlx import ImagePrompt, StableDiffusion

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--image", required=True)
parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
parser.add_argument("--ip-adapter", default="sd15")
parser.add_argument("--num-images", type=int, default=4)
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--size", type=int, default=None)
parser.add_argument("--output", default="variations.png")
args = parser.parse_args()

pipe = StableDiffusion.from_pretrained(args.model)
pipe.load_ip_adapter(args.ip_adapter, scale=1.0)  # image only: full strength
images = pipe.generate("", num_images=args.num_images, steps=args.steps, seed=0, height=args.size, width=args.size,
                       image_prompts=[ImagePrompt(images=[Image.open(args.image)])])
grid = Image.new("RGB", (images[0].width * len(images), images[0].height))
for i, im in enumerate(images):
    grid.paste(im, (i * im.width, 0))
grid.save(args.output)
print(args.output)
