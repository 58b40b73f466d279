"""Text -> token ids with the checkpoint's own `tokenizer.json` (padding to buckets is the
runtime's: `jaxaccel.runtime.programs.Buckets`)."""

from __future__ import annotations

import dataclasses
import pathlib

from tokenizers import Tokenizer

from jaxaccel.errors import InputError  # noqa: F401  (re-exported)


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

    def encode_one(self, text: str) -> list[int]:
        """Token ids of one text, special tokens added, untruncated (a decoder's prompt)."""
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """The vocabulary's piece of an id, e.g. "▁there" or a byte-fallback "<0xE2>"."""
        return self._tok.id_to_token(token_id)
