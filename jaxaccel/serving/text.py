"""One choice's output as it streams: text deltas that never split a UTF-8 character and never
show a stop string, token-id deltas, and the finished text.

The text is the project's one rule (`runtime.detokenize`): the new tokens decoded in the
context of the prompt, an incomplete trailing character held back. With stop strings, the
last `len(longest stop) - 1` characters are held back too until the request ends, so a stop
string that is still being completed is never sent; the finished text is cut before the
first stop string, as vLLM and `Model.generate` cut it. A non-streamed response is the same
deltas joined, so both agree by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxaccel.runtime.detokenize import IncrementalDetokenizer


class ChoiceStream:
    """Deltas of one choice. `tokenizer` (decode(ids) -> str) may be None: token ids only,
    empty text."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int], stops: Sequence[str] = ()):
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids) if tokenizer else None
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.token_ids: list[int] = []
        self.sent = ""  # text sent so far
        self.final = ""  # text the detokenizer has settled

    def update(self, token_ids: Sequence[int], finished: bool) -> tuple[str, list[int]]:
        """(new text, new ids) given all the choice's token ids so far."""
        new_ids = list(token_ids[len(self.token_ids):])
        self.token_ids.extend(new_ids)
        if self.detokenizer is None:
            return "", new_ids
        self.final += self.detokenizer.push(new_ids) if new_ids else ""
        if finished:
            self.final += self.detokenizer.flush()
        text = self._visible(finished)
        delta, self.sent = text[len(self.sent):], max(text, self.sent, key=len)
        return delta, new_ids

    def _visible(self, finished: bool) -> str:
        text = self.final
        found = [text.find(s) for s in self.stops if s in text]
        if found:
            return text[:min(found)]
        if finished or not self.hold:
            return text
        return text[:max(len(self.sent), len(text) - self.hold)]
