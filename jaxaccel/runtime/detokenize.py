"""New tokens' text, decoded in the context of their prompt: the one detokeniser of every
output path (`Completion.text`, `Model.stream`, the CLI's stream and `--json`).

A token's text depends on its neighbours: a SentencePiece "▁there" after "time" is
" there", but decoded alone it is "there" (the decoder strips a leading space); a byte-level
or byte-fallback tokenizer may split one character over several tokens. So, as
transformers' streamers do, the text of new ids is the difference between the decoded
prompt + new ids and the decoded prompt, and a streamed piece that ends in an incomplete
character (U+FFFD) is held back until the next token completes it or the stream ends.

Byte-fallback tokenizers (Llama's, SentencePiece's `<0xE2>` pieces) decode a run of byte
pieces as one group, and replace the whole group when it is not valid UTF-8: a complete "€"
followed by the first byte of another character decodes as five U+FFFD. So text that ends in
a byte piece is held back too, until a token that is not one (or the end) settles the group.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Iterable

_INCOMPLETE = "\ufffd"  # what a decoder gives for the first bytes of an unfinished character
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's byte-fallback pieces


class IncrementalDetokenizer:
    """Text of new tokens after `prompt_ids`, piece by piece: `push` ids as they arrive and
    print what it returns, then print `flush()`; the pieces joined are `text`, which is
    `decode(prompt + new)[len(decode(prompt)):]`. `tokenizer` has `decode(ids) -> str`.

    Each step decodes prompt + new ids again: exact for any tokenizer, at the cost of a
    decode of the prompt per token (microseconds per hundred tokens with `tokenizers`)."""

    def __init__(self, tokenizer, prompt_ids: Iterable[int] = ()):
        self.tokenizer = tokenizer
        self.prompt_ids = [int(i) for i in prompt_ids]
        self.prompt_text = tokenizer.decode(self.prompt_ids)
        self.new_ids: list[int] = []
        self.emitted = ""
        self._piece = getattr(tokenizer, "id_to_token", lambda i: None)  # id -> its piece

    @property
    def text(self) -> str:
        """The whole continuation so far, held-back characters included."""
        full = self.tokenizer.decode(self.prompt_ids + self.new_ids)
        # Cut by length, as transformers' streamers do: where merging across the join changes
        # the prompt's own text (rare), this still gives every character once.
        return full[len(self.prompt_text):]

    def push(self, ids: int | Iterable[int]) -> str:
        """Add new ids; return the text that is now final (maybe ""), holding back an
        incomplete trailing character."""
        self.new_ids.extend([int(ids)] if isinstance(ids, numbers.Integral) else (int(i) for i in ids))
        text = self.text
        if text.endswith(_INCOMPLETE) or not text.startswith(self.emitted) or \
                self._ends_in_byte_piece():
            return ""
        return self._emit(text)

    def _ends_in_byte_piece(self) -> bool:
        piece = self._piece(self.new_ids[-1]) if self.new_ids else None
        return bool(piece and _BYTE_PIECE.fullmatch(piece))

    def flush(self) -> str:
        """The rest of the text at the end of the stream, held-back characters included."""
        text = self.text
        if not text.startswith(self.emitted):  # a later token rewrote printed text
            return ""
        return self._emit(text)

    def _emit(self, text: str) -> str:
        piece, self.emitted = text[len(self.emitted):], text
        return piece


def continuation_text(tokenizer, prompt_ids: Iterable[int], new_ids: Iterable[int]) -> str:
    """The text of `new_ids` after `prompt_ids` (what a stream of them prints, joined)."""
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids)
    detokenizer.new_ids = [int(i) for i in new_ids]
    return detokenizer.text
