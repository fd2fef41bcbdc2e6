"""Hostile jobs files, prompts, images and inpainting options: each gets one clear UserError line, in bounded
time and memory (the line fails alone where it is one job's)."""

from __future__ import annotations

import logging
import os
import warnings

import numpy as np
import pytest
from PIL import Image

from ipadapter_mlx import cli
from ipadapter_mlx.errors import UserError


def _defaults():
    return cli.build_parser().parse_args(["generate"])


def _fifo(path):
    os.mkfifo(path)


def _sparse(path):
    with open(path, "wb") as f:
        f.truncate((64 << 20) + 1)  # no data written: a reader that reads it whole would still take 64 MiB


@pytest.mark.parametrize("make, message", [
    (_fifo, "JOBS must be a regular file"),
    (_sparse, "is a jobs file of 64 MiB; at most 64"),
    (None, "JOBS must be a regular file"),  # /dev/zero
], ids=["fifo", "sparse", "dev-zero"])
def test_jobs_file_is_bounded(tmp_path, make, message):
    from ipadapter_mlx.batch import read_jobs

    path = "/dev/zero" if make is None else tmp_path / "jobs.jsonl"
    if make is not None:
        make(path)
    with pytest.raises(UserError, match=message):
        read_jobs(str(path), _defaults())


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "' + "a" * (1 << 20) + '"}', f"a line of {(1 << 20) + 14} characters; at most {1 << 20}"),
    ("[" * 100_000 + "]" * 100_000, "malformed JSON: maximum recursion depth"),
    ('{"output": "a\\u0000b.png"}', "\"output\" must be a name of printable characters"),
    ('{"output": "a\\nerror: x.png"}', "\"output\" must be a name of printable characters"),
    ('{"output": "' + "a" * 300 + '.png"}', "at most 200 long"),
    ('{"prompt": "\\ud800"}', "not valid Unicode text: a lone surrogate '\\ud800'"),
], ids=["long-line", "deep-json", "nul-output", "newline-output", "long-output", "lone-surrogate"])
def test_bad_job_lines_fail_alone(tmp_path, line, message):
    from ipadapter_mlx.batch import read_jobs

    path = tmp_path / "jobs.jsonl"
    path.write_text(f'{{"prompt": "ok"}}\n{line}\n', encoding="utf-8")
    first, bad = read_jobs(str(path), _defaults())
    assert first.error is None
    assert bad.error.startswith("line 2: ") and "\n" not in bad.error
    assert message in bad.error, bad.error


def test_long_prompt_is_cut_before_tokenizing(tmp_path):
    """A prompt of millions of characters (whitespace runs among them): the tokens read are those the full text
    gives (transformers' tokenizer on the whole text is the reference), and the warning quotes a short excerpt."""
    from transformers import CLIPTokenizer

    from ipadapter_mlx.prompts import MAX_READ_CHARS, PromptEncoder, readable
    from ipadapter_mlx.synthetic import write_tokenizer

    write_tokenizer(tmp_path / "model" / "tokenizer")
    (tmp_path / "model" / "text_encoder").mkdir()
    text = "a red" + " " * 50_000 + "\n\t fox " + "jumps over " * 2000
    full = CLIPTokenizer.from_pretrained(str(tmp_path / "model" / "tokenizer"))
    ids = lambda t: full(t, padding="max_length", max_length=77, truncation=True)["input_ids"]  # noqa: E731
    assert len(readable(text)) <= MAX_READ_CHARS and ids(readable(text)) == ids(text)
    records = []  # a handler on the logger itself: the CLI's log setup (show_log) stops propagation to caplog
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("ipadapter_mlx.prompts")
    logger.addHandler(handler)
    try:
        PromptEncoder(tmp_path / "model", None).warn_if_cut(["x " * 3_000_000], "prompt")
    finally:
        logger.removeHandler(handler)
    (record,) = records
    record.message = record.getMessage()
    assert "is at least" in record.message and len(record.message) < 300, record.message
    with pytest.raises(UserError, match="the prompt is not valid Unicode text: '\\\\ud800' at character 2"):
        readable("ab\ud800")


def _big_png(path, size):
    Image.new("1", size).save(path)  # a few KB on disk


@pytest.mark.parametrize("case, message", [
    ("image", "is 8193x8192 pixels; at most 67 Mpx \\(8192x8192\\)"),
    ("mask", "mask image .* is 8193x8192 pixels; at most 67 Mpx"),
    ("bomb", "cannot read image .* exceeds limit .* \\(at most 67 Mpx\\)"),  # past PIL's own error limit
    ("outpaint", "the outpainted canvas is 40008x40008 pixels; at most 67 Mpx"),
    ("blur", "mask blur is 1e\\+300 pixels; at most 1024"),
])
def test_images_are_bounded(tmp_path, case, message):
    from ipadapter_mlx.images import open_image
    from ipadapter_mlx.inpainting import open_mask, outpaint_canvas, read_mask

    path = tmp_path / "big.png"
    with warnings.catch_warnings(), pytest.raises(UserError, match=message):
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning would be a second line
        if case in ("image", "mask"):
            _big_png(path, (8193, 8192))
            (open_image if case == "image" else open_mask)(path)
        elif case == "bomb":
            _big_png(path, (20000, 9000))  # 180 Mpx: over twice PIL's MAX_IMAGE_PIXELS
            open_image(path)
        elif case == "outpaint":
            outpaint_canvas(Image.new("RGB", (8, 8)), (40000, 40000, 0, 0))
        else:
            read_mask(Image.new("L", (8, 8)), 1e300)


def test_strip_and_nan_mask_still_read(tmp_path):
    """A 1x4000 strip is under the pixel limit; a float mask's NaN and Inf read as 0, with no numpy warning."""
    from ipadapter_mlx.images import open_image
    from ipadapter_mlx.inpainting import read_mask

    Image.new("RGB", (1, 4000), (10, 20, 30)).save(tmp_path / "strip.png")
    assert open_image(tmp_path / "strip.png").size == (1, 4000)
    arr = np.array([[0.0, np.nan], [1.0, np.inf]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = np.asarray(read_mask(Image.fromarray(arr, "F")))
    np.testing.assert_array_equal(out[..., 0], [[0, 0], [255, 0]])
