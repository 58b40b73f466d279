"""Continuous batching: which sequences run in the next step, and how many tokens each.

Policy (vLLM v1's, in plain Python on the host, no jax): a step has a token budget
(`max_num_batched_tokens`) and a sequence limit (`max_num_seqs`). Running sequences go first,
oldest first: one token each when decoding, or the next chunk of a prompt still being
prefilled (chunked prefill: a long prompt spreads over steps, within the budget). Then
waiting requests join in arrival order while budget, sequence slots and pages last; each
first takes the longest cached prefix of its tokens; one whose next prompt page a running
sequence is computing right now waits a step for it (a shared system prompt is computed
once, not once per request arriving together). A sequence that needs a page when none
is free preempts the newest running sequence (its pages are freed, it goes back to the front
of the queue and is recomputed later from its prompt and the tokens it already has: the
same tokens come out, since greedy and seeded sampling depend only on the sequence), and
preempts itself when it is the newest. Finished sequences free their pages at once. With a
`window` (every layer of the model windowed), a sequence frees its leading pages as they fall
out of the window of its next query (`page_pool.dead_pages`), so it holds a bounded number.
"""

from __future__ import annotations

import collections
import dataclasses

from jaxaccel.engine.page_pool import NULL_PAGE, PagePool, dead_pages, pages_needed
from jaxaccel.engine.prefix_cache import PrefixCache, extend_keys
from jaxaccel.engine.requests import Request


@dataclasses.dataclass(eq=False)
class Sequence:
    """A request in flight: its tokens (prompt, then generated), how many of them are in
    the cache (`computed`), its block table (`pages`: page i holds tokens i*c .. i*c + c-1;
    the first `dropped` are freed, out of every future query's window, and read NULL_PAGE)
    and its prefix keys."""

    request: Request
    number: int  # arrival order
    tokens: list[int]
    computed: int = 0
    pages: list[int] = dataclasses.field(default_factory=list)
    keys: list[int] = dataclasses.field(default_factory=list)  # chained page keys so far
    registered: int = 0  # pages already offered to the prefix cache
    dropped: int = 0  # leading pages freed (sliding windows)
    preemptions: int = 0

    @property
    def live_pages(self) -> list[int]:
        """The pages it still holds, in order: its block table from page `dropped` on."""
        return self.pages[self.dropped:]

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_token_ids)

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def remaining(self) -> int:
        """Tokens not yet in the cache (the prompt's rest, or the last sampled token)."""
        return len(self.tokens) - self.computed


@dataclasses.dataclass(frozen=True)
class Scheduled:
    """One row of a step: `count` tokens of `seq` from position `start`; `samples` when the
    row reaches the sequence's last token (its logits choose the next one)."""

    seq: Sequence
    start: int
    count: int

    @property
    def samples(self) -> bool:
        return self.start + self.count == len(self.seq.tokens)


class Scheduler:
    """`window`: the model's `page_pool.cache_window` (None: sequences keep every page)."""

    def __init__(self, pool: PagePool, prefix: PrefixCache, page_size: int,
                 max_num_seqs: int, max_num_batched_tokens: int, window: int | None = None):
        self.pool, self.prefix, self.page_size, self.window = pool, prefix, page_size, window
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.preemptions = 0
        self.prefill_tokens = 0  # prompt tokens computed (recomputation included)
        self._arrivals = 0

    def add(self, request: Request) -> Sequence:
        seq = Sequence(request, self._arrivals, list(request.prompt_token_ids))
        self._arrivals += 1
        self.waiting.append(seq)
        return seq

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[Scheduled]:
        """The rows of the next step (empty when nothing waits or runs)."""
        budget, rows = self.max_num_batched_tokens, []
        preempted = False
        for seq in list(self.running):
            # (preempted by an older one, or waiting for its sampled token)
            if budget == 0 or seq not in self.running or seq.remaining == 0:
                continue
            count = min(seq.remaining, budget)
            while not self._grow(seq, seq.computed + count):
                preempted = True
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            if seq in self.running:
                rows.append(Scheduled(seq, seq.computed, count))
                budget -= count
        pending = self._pending_keys()
        while self.waiting and not preempted and budget and len(self.running) < self.max_num_seqs:
            if self._computing_its_prefix(self.waiting[0], pending):
                break  # next step it finds those pages cached instead of computing them again
            row = self._admit(self.waiting[0], budget)
            if row is None:
                break
            pending.update(self._uncached_prompt_keys(self.waiting[0]))
            self.running.append(self.waiting.popleft())
            rows.append(row)
            budget -= row.count
        return rows

    def _uncached_prompt_keys(self, seq: Sequence) -> list[int]:
        """Keys of `seq`'s full prompt pages not yet offered to the prefix cache."""
        full = (seq.prompt_len - 1) // self.page_size  # the pages a lookup may take
        extend_keys(seq.keys, seq.tokens, self.page_size, full)
        return seq.keys[seq.registered:full]

    def _pending_keys(self) -> set[int]:
        """Keys of the prompt pages running sequences are still computing."""
        if not self.prefix.enabled:
            return set()
        return {key for seq in self.running if seq.computed < seq.prompt_len
                for key in self._uncached_prompt_keys(seq)}

    def _computing_its_prefix(self, seq: Sequence, pending: set[int]) -> bool:
        """Whether the first prompt page of `seq` that is not cached yet is one a running
        sequence is computing now: admitting `seq` would compute it twice (pages register
        once computed, after the step), waiting a step gets it from the cache."""
        if not pending or not self.prefix.enabled:
            return False
        keys = self._uncached_prompt_keys(seq)  # seq waits: nothing registered yet
        cached = self.prefix.cached_run(keys)
        return cached < len(keys) and keys[cached] in pending

    def _admit(self, seq: Sequence, budget: int) -> Scheduled | None:
        """Start a waiting sequence from its longest cached prefix, if pages allow."""
        hits = self.prefix.lookup(seq.keys, seq.tokens, (len(seq.tokens) - 1) // self.page_size)
        seq.pages, seq.registered = hits, len(hits)
        seq.computed = len(hits) * self.page_size
        self._drop_dead(seq)  # a long cached prefix: only its last window's pages stay
        count = min(seq.remaining, budget)
        if not self._grow(seq, seq.computed + count):
            self._release(seq)
            return None
        return Scheduled(seq, seq.computed, count)

    def _grow(self, seq: Sequence, tokens: int) -> bool:
        """Give `seq` pages for `tokens` tokens; False (nothing taken) if too few are free."""
        missing = pages_needed(tokens, self.page_size) - len(seq.pages)
        if missing <= 0:
            return True
        pages = self.pool.allocate(missing)
        if pages is None:
            return False
        seq.pages += pages
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        # Tail pages first into the free queue, so eviction takes a prefix's end first.
        self.pool.release(reversed(seq.live_pages))
        seq.pages, seq.computed, seq.registered, seq.dropped = [], 0, 0, 0

    def _drop_dead(self, seq: Sequence) -> None:
        """Free the pages of `seq` that no query of it reads again (only with a window). A
        page the prefix cache or another sequence holds loses one reference, nothing more."""
        if self.window is None:
            return
        dead = min(dead_pages(seq.computed, self.window, self.page_size), len(seq.pages))
        if dead <= seq.dropped:
            return
        self.pool.release(reversed(seq.pages[seq.dropped:dead]))
        seq.pages[seq.dropped:dead] = [NULL_PAGE] * (dead - seq.dropped)
        seq.dropped = dead

    def advance(self, rows: list[Scheduled]) -> None:
        """After a step ran `rows`: their tokens are in the cache; offer full pages to the
        prefix cache."""
        for row in rows:
            seq = row.seq
            self.prefill_tokens += max(0, min(row.start + row.count, seq.prompt_len) - row.start)
            seq.computed = row.start + row.count
            full = seq.computed // self.page_size
            self.prefix.register(seq.keys, seq.tokens, seq.pages, seq.registered, full)
            seq.registered = max(seq.registered, full)
            self._drop_dead(seq)

    def abort(self, request_id) -> bool:
        """Drop the request `request_id` wherever it is (waiting or running) and free its
        pages at once; False if no such request is in flight."""
        for seq in self.running:
            if seq.request.request_id == request_id:
                self.finish(seq)
                return True
        for seq in self.waiting:
            if seq.request.request_id == request_id:
                self.waiting.remove(seq)
                self._release(seq)  # a preempted sequence holds none, but be exact
                return True
        return False

    def finish(self, seq: Sequence) -> None:
        """A finished sequence leaves and frees its pages at once."""
        self.running.remove(seq)
        self._release(seq)
