"""Text -> token ids with the checkpoint's own `tokenizer.json`, plus length buckets.

Batches are padded to one of a few lengths (`LENGTH_BUCKETS`), so a new input reuses an
already-compiled executable instead of triggering a recompile for every new length.
"""

from __future__ import annotations

import dataclasses
import pathlib

from tokenizers import Tokenizer

LENGTH_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class InputError(ValueError):
    """Input text or ids that cannot be used; the message says which and why."""


def bucket_length(length: int, max_length: int) -> int:
    """Smallest bucket >= length, never above max_length."""
    for bucket in LENGTH_BUCKETS:
        if bucket >= length:
            return min(bucket, max_length)
    return max_length


def bucket_batch(rows: int, max_rows: int, multiple: int = 1) -> int:
    """Pad a batch to a power of two (<= max_rows) that `multiple` divides."""
    size = 1
    while size < rows:
        size *= 2
    size = min(size, max(max_rows, rows))
    return -(-size // multiple) * multiple


@dataclasses.dataclass
class Encoded:
    ids: list[list[int]]
    truncated: list[int]  # indices of inputs that were cut to max_length


class TextTokenizer:
    def __init__(self, path: str | pathlib.Path):
        self.path = pathlib.Path(path)
        try:
            self._tok = Tokenizer.from_file(str(self.path))
        except Exception as err:  # tokenizers raises a bare Exception subclass
            raise InputError(f"{self.path}: not a usable tokenizer.json ({err})") from None
        self._tok.no_padding()
        self._tok.no_truncation()

    @property
    def pad_id(self) -> int:
        padding = self._tok.padding
        return padding["pad_id"] if padding else (self._tok.token_to_id("[PAD]") or 0)

    def encode(self, texts: list[str], max_length: int, add_special_tokens: bool = True,
               truncate: bool = True) -> Encoded:
        encodings = self._tok.encode_batch(texts, add_special_tokens=add_special_tokens)
        too_long = [i for i, e in enumerate(encodings) if len(e.ids) > max_length]
        if too_long and not truncate:
            raise InputError(f"input {too_long[0] + 1} has {len(encodings[too_long[0]].ids)} "
                             f"tokens, more than the maximum {max_length} (--no-truncate given)")
        if too_long:
            self._tok.enable_truncation(max_length)
            try:
                for i in too_long:
                    encodings[i] = self._tok.encode(texts[i], add_special_tokens=add_special_tokens)
            finally:
                self._tok.no_truncation()
        return Encoded([e.ids for e in encodings], too_long)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)
