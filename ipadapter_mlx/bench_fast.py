"""`python -m ipadapter_mlx.bench_fast`: seconds per picture with the usual sampler (25 steps of dpmpp-2m-karras,
guidance 7.5: two UNet passes a step) against LCM (4 steps, guidance 1: one pass), on the real pipeline with
random weights at SD 1.5 + IP-Adapter-plus shapes (`--tiny`: miniature ones). A fused LoRA such as LCM-LoRA adds
nothing per step, so none is loaded. The reference image comes as saved embeddings (`embed`), so the vision tower,
whose one run is the same for both, is not in memory. A benchmark, not a test: the README quotes its figures.

A picture = prompt encoding + steps x seconds per step + VAE decode; each step time is the median of `--measure`
steps after one warm-up step."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

CASES = {  # name -> generate() settings
    "dpmpp-2m-karras, 25 steps, cfg 7.5": dict(scheduler="dpmpp-2m-karras", steps=25, cfg=7.5),
    "lcm, 4 steps, cfg 1": dict(scheduler="lcm", steps=4, cfg=1.0),
}


def main(argv: list[str] | None = None) -> int:
    from .argparsing import Parser

    p = Parser(prog="python -m ipadapter_mlx.bench_fast", description=__doc__)
    p.add_argument("--size", type=int, default=512, help="picture size")
    p.add_argument("--measure", type=int, default=3, help="timed steps per case (after one warm-up step)")
    p.add_argument("--tiny", action="store_true", help="miniature shapes: checks the script in seconds")
    args = p.parse_args(argv)

    import mlx.core as mx
    import numpy as np

    from . import ImagePrompt, StableDiffusion
    from .bench_shapes import SHAPES
    from .ip_adapter import Features
    from .synthetic import random_ip_adapter, random_pipeline

    shapes = SHAPES[("sd15", args.tiny)]
    hidden = shapes["image_encoder"]["hidden_size"]
    features = Features(mx.array(np.random.default_rng(1).standard_normal((1, 257, hidden)).astype(np.float32)),
                        mx.zeros((1, 257, hidden)), True)
    with tempfile.TemporaryDirectory(prefix="ipadapter-mlx-bench-") as tmp:
        pipe = StableDiffusion(random_pipeline(Path(tmp) / "model", shapes), mx.float32)
        pipe.load_ip_adapter(str(random_ip_adapter(Path(tmp) / "ip-adapter.safetensors", shapes)))
        print(f"{args.size}x{args.size}, SD 1.5 shapes{' (tiny)' if args.tiny else ''} + IP-Adapter, "
              f"{mx.default_device()}; seconds")
        print(f"  {'':38s} {'encode':>7s} {'s/step':>7s} {'steps':>5s} {'decode':>7s} {'picture':>8s}")
        for name, kw in CASES.items():
            t = time.perf_counter()
            sampling = iter(pipe.generate_latents("a photo", height=args.size, width=args.size, seed=0,
                                                  image_prompts=[ImagePrompt(features=features)], **kw))
            encode = time.perf_counter() - t  # the prompt is encoded before the first step
            times = []
            for _ in range(min(args.measure + 1, kw["steps"])):
                t = time.perf_counter()
                step = next(sampling)
                mx.eval(step.latents)
                times.append(time.perf_counter() - t)
            per_step = statistics.median(times[1:] or times)
            t = time.perf_counter()
            mx.eval(pipe.decode(step.latents))
            decode = time.perf_counter() - t
            picture = encode + kw["steps"] * per_step + decode
            print(f"  {name:38s} {encode:7.2f} {per_step:7.2f} {kw['steps']:5d} {decode:7.2f} {picture:8.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
