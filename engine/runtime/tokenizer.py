"""T5/Llama-style tokenizer through the `tokenizers` library (no transformers needed at run time).

``tokenizer_config.json`` flags are applied the way transformers' LlamaTokenizerFast applies them:
``add_bos_token`` / ``add_eos_token`` rebuild the post-processor; the pad token and padding side
come from the config (LlamaTokenizer's class default is left padding).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer
from tokenizers.processors import TemplateProcessing

from ..errors import UserError
from ..model.spec import TEXT_LENGTH


class PromptTruncated(UserWarning):
    """A prompt longer than the text window (the CLI prints it as one ``warning:`` line)."""


def _token_str(v) -> str | None:
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, dict):
        return v.get("content")
    return None


class TextTokenizer:
    def __init__(self, folder: str | Path, max_length: int = TEXT_LENGTH):
        folder = Path(folder)
        tj = folder / "tokenizer.json"
        if not tj.is_file():
            raise UserError(f"{folder}: missing tokenizer.json (a fast tokenizer file is required)")
        try:
            self.tok = Tokenizer.from_file(str(tj))
        except Exception as e:  # tokenizers raises plain Exceptions on bad JSON
            raise UserError(f"{tj}: cannot be read as a tokenizer ({e})") from None
        cfg_path = folder / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.max_length = max_length
        bos = _token_str(cfg.get("bos_token")) or "<s>"
        eos = _token_str(cfg.get("eos_token")) or "</s>"
        pad = _token_str(cfg.get("pad_token")) or eos
        self.pad_id = self._id(pad)
        add_bos, add_eos = cfg.get("add_bos_token"), cfg.get("add_eos_token")
        if add_bos is not None or add_eos is not None:
            specials, single, pair = [], "$A:0", "$A:0 $B:1"
            if add_bos:
                specials.append((bos, self._id(bos)))
                single, pair = f"{bos}:0 {single}", f"{bos}:0 $A:0 {bos}:1 $B:1"
            if add_eos:
                specials.append((eos, self._id(eos)))
                single = f"{single} {eos}:0"
                pair = (pair.replace("$A:0", f"$A:0 {eos}:0", 1)) + f" {eos}:1"
            self.tok.post_processor = TemplateProcessing(single=single, pair=pair, special_tokens=specials)
        self.tok.enable_truncation(max_length)
        # transformers' LlamaTokenizer class pads on the left unless the config says otherwise.
        cls = str(cfg.get("tokenizer_class", ""))
        side = cfg.get("padding_side") or ("left" if cls.startswith("Llama") else "right")
        self.padding_side = side
        self.tok.enable_padding(length=max_length, pad_id=self.pad_id, pad_token=pad, direction=side)

    def _id(self, token: str) -> int:
        i = self.tok.token_to_id(token)
        if i is None:
            raise UserError(f"tokenizer has no token {token!r} named in tokenizer_config.json")
        return i

    def __call__(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """-> input_ids (1, max_length) int64, attention_mask (1, max_length) int64."""
        enc = self.tok.encode(text)
        if enc.overflowing:  # as diffusers: keep the first max_length tokens, say what was dropped
            dropped = self.tok.decode(enc.overflowing[0].ids, skip_special_tokens=True)
            warnings.warn(
                f"prompt truncated to the text encoder's {self.max_length} tokens; dropped: "
                f"{dropped[:80]!r}{'...' if len(dropped) > 80 else ''}",
                PromptTruncated,
                stacklevel=2,
            )
        ids = np.asarray([enc.ids], dtype=np.int64)
        mask = np.asarray([enc.attention_mask], dtype=np.int64)
        return ids, mask
