"""Style transfer: the reference's look without its content, by giving its image only to the style layers
(InstantStyle; ComfyUI_IPAdapter_plus' "style transfer" weight type), and only after the layout has settled.

    python examples/style_transfer.py --image painting.jpg --prompt "a cat on a sofa"
"""

import argparse

from PIL import Image

from ipadapter_mlx import ImagePrompt, StableDiffusion
from ipadapter_mlx.steering import WEIGHT_TYPES

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--image", required=True, help="the style reference")
parser.add_argument("--prompt", required=True, help="the content")
parser.add_argument("--model", default="stabilityai/stable-diffusion-xl-base-1.0")
parser.add_argument("--ip-adapter", default="sdxl")
parser.add_argument("--weight-type", choices=WEIGHT_TYPES, default="style-transfer",
                    help="SDXL: style-transfer acts on up_blocks.0.attentions.1 only")
parser.add_argument("--scale", type=float, default=1.0)
parser.add_argument("--start-at", type=float, default=0.0, help="fraction of the steps before the style acts")
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--size", type=int, default=None)
parser.add_argument("--output", default="style_transfer.png")
args = parser.parse_args()

pipe = StableDiffusion.from_pretrained(args.model)
pipe.load_ip_adapter(args.ip_adapter)
style = ImagePrompt(images=[Image.open(args.image)], scale=args.scale, weight_type=args.weight_type,
                    start_at=args.start_at)
image = pipe.generate(args.prompt, negative_prompt="lowres, blurry", steps=args.steps, seed=1,
                      height=args.size, width=args.size, image_prompts=[style])[0]
image.save(args.output)
print(args.output)
