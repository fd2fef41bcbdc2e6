"""A wide (or tall) reference seen whole: ComfyUI's IPAdapter Tiled (`fit="tiles"`: square tiles, each acting on
its part of the picture) beside CLIP's centre crop, which keeps only the middle square.

    python examples/wide_reference.py --image panorama.jpg --prompt "a mountain village at dusk" --output wide.png
"""

import argparse

from PIL import Image

from ipadapter_mlx import ImagePrompt, StableDiffusion
from ipadapter_mlx.images import tile_reference

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--image", required=True, help="the wide or tall reference")
parser.add_argument("--prompt", default="")
parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5")
parser.add_argument("--ip-adapter", default="sd15-plus")
parser.add_argument("--scale", type=float, default=0.7)
parser.add_argument("--steps", type=int, default=30)
parser.add_argument("--size", type=int, default=None)
parser.add_argument("--output", default="wide.png")
args = parser.parse_args()

reference = Image.open(args.image)
tiles, _ = tile_reference(reference)
print(f"{reference.width}x{reference.height} reference: {len(tiles)} tiles")
pipe = StableDiffusion.from_pretrained(args.model)
pipe.load_ip_adapter(args.ip_adapter, scale=args.scale)
pictures = [pipe.generate(args.prompt, steps=args.steps, seed=0, height=args.size, width=args.size,
                          image_prompts=[ImagePrompt(images=[reference], fit=fit)])[0] for fit in ("crop", "tiles")]
grid = Image.new("RGB", (pictures[0].width * 2, pictures[0].height))
for i, picture in enumerate(pictures):  # left: the centre crop; right: the tiles
    grid.paste(picture, (i * picture.width, 0))
grid.save(args.output)
print(args.output)
