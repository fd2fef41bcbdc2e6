"""`python -m ipadapter_mlx.bench_steering`: what each way of steering an image prompt costs per sampling step,
against the plain adapter and no adapter, on the real pipeline with random weights at SD 1.5 + IP-Adapter-plus
shapes (`--tiny`: miniature ones). A benchmark, not a test: the README quotes its figures."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from .argparsing import Parser

    p = Parser(prog="python -m ipadapter_mlx.bench_steering", description=__doc__)
    p.add_argument("--size", type=int, default=256, help="picture size")
    p.add_argument("--steps", type=int, default=6, help="sampling steps per case (the first is not counted)")
    p.add_argument("--tiny", action="store_true", help="miniature shapes: checks the script in seconds")
    args = p.parse_args(argv)

    import mlx.core as mx
    import numpy as np
    from PIL import Image

    from . import ImagePrompt, StableDiffusion
    from .bench_shapes import SHAPES
    from .ip_adapter import Features
    from .synthetic import random_ip_adapter, random_pipeline

    shapes = SHAPES[("sd15", args.tiny)]
    with tempfile.TemporaryDirectory(prefix="ipadapter-mlx-bench-") as tmp:
        pipe = StableDiffusion(random_pipeline(Path(tmp) / "model", shapes), mx.float32)
        pipe.load_ip_adapter(str(random_ip_adapter(Path(tmp) / "ip-adapter.safetensors", shapes)))
        hidden, rng = shapes["image_encoder"]["hidden_size"], np.random.default_rng(0)

        def features(n: int) -> Features:  # saved-embeddings style: the vision tower is not part of a step
            return Features(mx.array(rng.standard_normal((n, 257, hidden)).astype(np.float32)),
                            mx.zeros((n, 257, hidden)), True)

        column = np.arange(args.size)[None, :].repeat(args.size, 0)
        left, right = (Image.fromarray((m * 255).astype(np.uint8))
                       for m in (column < 0.6 * args.size, column >= 0.4 * args.size))
        one, two = features(1), features(2)
        cases = {
            "no adapter": None,
            "plain, 1 image": ImagePrompt(features=one),
            "plain, 2 images": ImagePrompt(features=two),
            "masks, 2 images": ImagePrompt(features=two, masks=[left, right]),
            "ease-in (every layer its own weight)": ImagePrompt(features=one, weight_type="ease-in"),
            "layer weights 3:1,6:0.5": ImagePrompt(features=one, layer_weights="3:1.0,6:0.5"),
            "style-transfer": ImagePrompt(features=one, weight_type="style-transfer"),
            "start-at 0.5": ImagePrompt(features=one, start_at=0.5),
        }
        print(f"seconds per step, {args.size}x{args.size}, CFG, median of steps 2..{args.steps}")
        for name, prompt in cases.items():
            times, t = [], time.perf_counter()
            for step in pipe.generate_latents("a cat", steps=args.steps, cfg=6.0, height=args.size,
                                              width=args.size, seed=0, scheduler="euler",
                                              image_prompts=None if prompt is None else [prompt]):
                mx.eval(step.latents)
                now = time.perf_counter()
                times.append(now - t)
                t = now
            print(f"  {name:40s} {statistics.median(times[1:]):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
