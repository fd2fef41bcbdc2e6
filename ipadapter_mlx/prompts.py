"""Text prompts -> the UNet's text context: the tokenizer(s) and CLIP text encoder(s) of a converted folder."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import mlx.core as mx

from .errors import UserError
from .loading import load_component

log = logging.getLogger(__name__)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")  # the second: SDXL
MAX_READ_CHARS = 10_000  # 77 CLIP tokens span well under 3,000 characters once whitespace runs are one space


def readable(text: str, what: str = "prompt") -> str:
    """The part of a prompt the tokenizer can read: a long text is cut (its whitespace runs made one space
    first, as CLIP's tokenizer does, so the first 77 tokens are unchanged) before it is tokenized, so a 50 MB
    prompt costs no more than a long one. Lone surrogates (not Unicode text) are refused."""
    if len(text) > MAX_READ_CHARS:
        words, n = [], 0
        for m in re.finditer(r"\S+", text):
            words.append(text[m.start() : min(m.end(), m.start() + MAX_READ_CHARS)])
            if (n := n + len(words[-1]) + 1) >= MAX_READ_CHARS:
                break
        text = " ".join(words)[:MAX_READ_CHARS]
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"the {what} is not valid Unicode text: {text[e.start:e.end]!r} at character {e.start} "
                        "(a lone surrogate)") from None
    return text


class PromptEncoder:
    """SD 1.x/2.x: one encoder, its last layer. SDXL: two, their penultimate layers joined, and the second
    encoder's projected pooled output. Encoders load on first use (and again after `free`)."""

    def __init__(self, folder: str | Path, dtype: mx.Dtype, quantize: tuple[int, int] | None = None):
        from transformers import CLIPTokenizer  # tokenizer files only; heavy import, so here

        self.folder, self.dtype, self.quantize = Path(folder), dtype, quantize
        self.names = [n for n in TEXT_ENCODERS if (self.folder / n).is_dir()]
        self.tokenizers = []
        for name in ("tokenizer", "tokenizer_2")[: len(self.names)]:
            try:
                self.tokenizers.append(CLIPTokenizer.from_pretrained(str(self.folder / name)))
            except Exception as e:
                raise UserError(f"cannot load the tokenizer in {self.folder / name}: {e}") from None
        self.models: dict[str, object] = {}
        self.on_load = lambda name, model: None  # the pipeline fuses its LoRAs into each encoder it loads

    @property
    def is_sdxl(self) -> bool:
        return len(self.names) == 2

    def model(self, name: str = "text_encoder"):
        if name not in self.models:
            self.models[name] = load_component(self.folder, name, self.dtype, self.quantize)
            self.on_load(name, self.models[name])
        return self.models[name]

    def free(self) -> None:
        self.models.clear()

    def warn_if_cut(self, prompts: list[str], what: str) -> None:
        """A prompt longer than the tokenizer's 77 tokens is cut, as diffusers does; say what is dropped, once
        per distinct prompt."""
        tokenizer = self.tokenizers[0]  # both SDXL tokenizers split text alike
        for text in dict.fromkeys(prompts):
            read = readable(text, what)
            ids = tokenizer(read, truncation=False, verbose=False)["input_ids"]
            if (dropped := len(ids) - tokenizer.model_max_length) > 0:
                cut = tokenizer.decode(ids[tokenizer.model_max_length - 1 : -1]).replace("\n", " ")
                more = "at least " if read != text else ""  # only the readable part was tokenized
                log.warning(f"the {what} is {more}{len(ids)} tokens long; only {tokenizer.model_max_length} are "
                            f"read, the last {more}{dropped} are dropped: \"{cut[:80]}{'...' * (len(cut) > 80)}\"")

    def __call__(self, prompts: list[str], what: str = "prompt") -> tuple[mx.array, mx.array | None]:
        """(token embeddings (B, 77, D), pooled embedding or None), as diffusers' pipelines compute them."""
        self.warn_if_cut(prompts, what)
        prompts = [readable(p, what) for p in prompts]
        states, pooled = [], None
        for tokenizer, name in zip(self.tokenizers, self.names):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="np")["input_ids"]
            out = self.model(name)(mx.array(ids))
            states.append(out.hidden_states[-2] if self.is_sdxl else out.last_hidden_state)
            pooled = out.pooler_output
        return mx.concatenate(states, axis=-1), (pooled if self.is_sdxl else None)
