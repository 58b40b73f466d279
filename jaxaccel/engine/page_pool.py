"""The paged KV cache: device pages for keys and values, and the host's page allocator.

Layout: per layer, keys and values are each a pool of fixed-size pages
[pages, kv_heads, page_size, head_dim], stacked over layers as [l, p, k, c, h] (p pages,
c slots per page) so the layer scan iterates them like the dense cache. Kv heads are sharded
over `model` (the `kv_heads` logical axis); pages and slots are never sharded. A sequence's
block table lists its pages in order: token i lives at slot i % c of page table[i // c].

Page 0 is the null page: never handed out, it absorbs the writes of padding tokens and pads
block tables; its contents are finite garbage that masks hide.

A model whose every attention layer is windowed (`cache_window`) never reads a key again
once it lies a window behind the sequence's next query, so the scheduler frees such pages
as the sequence moves on (`dead_pages`): a sequence then holds at most `window_pages` pages,
however long it runs. One block table serves every layer, so a model with any global layer
(Gemma 2 and 3) keeps its whole history.

The allocator keeps a reference count per page (a page shared through the prefix cache has
one reference per sequence using it) and a free queue in least-recently-freed order: a freed
page that still holds a cached prefix stays reusable by a later hit until allocation reaches
it, which is least-recently-used eviction. No jax here: the scheduler's bookkeeping runs in
microseconds.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable
from typing import NamedTuple

from jaxaccel.errors import UsageError

NULL_PAGE = 0
DEFAULT_PAGE_SIZE = 16  # tokens per page unless the engine is told otherwise


class KVPages(NamedTuple):
    """Device pages of every layer: keys and values [l, p, k, c, h] (storage dtype)."""

    k_lpkch: object
    v_lpkch: object


def page_bytes(num_layers: int, kv_heads: int, page_size: int, head_dim: int,
               itemsize: int) -> int:
    """Bytes one page takes over all layers, keys and values together."""
    return 2 * num_layers * kv_heads * page_size * head_dim * itemsize


def pages_for_budget(budget_bytes: int, one_page_bytes: int) -> int:
    """How many pages (the null page included) fit in `budget_bytes`; UsageError if < 2."""
    pages = budget_bytes // one_page_bytes
    if pages < 2:
        raise UsageError(f"KV cache budget {budget_bytes} bytes holds {pages} page(s) of "
                         f"{one_page_bytes} bytes; at least 2 are needed")
    return int(pages)


def pages_needed(tokens: int, page_size: int) -> int:
    return -(-tokens // page_size)


def cache_window(config) -> int | None:
    """The sliding window (tokens) bounding a decoder's KV cache: its `sliding_window` when
    every layer is windowed (its `windowed_layers`), else None (a global layer reads the
    whole history through the block table all layers share)."""
    window = getattr(config, "sliding_window", None)
    windowed = getattr(config, "windowed_layers", ())
    return int(window) if window and windowed and all(windowed) else None


def dead_pages(computed: int, window: int, page_size: int) -> int:
    """How many leading pages of a sequence with `computed` tokens cached no query reads
    again: a query at position q >= computed sees keys at positions > q - window, so page i
    (positions i*c .. i*c + c-1) is dead once i*c + c-1 <= computed - window."""
    return max(0, (computed - window + 1) // page_size)


def window_pages(window: int, page_size: int, new_tokens: int = 1) -> int:
    """Most pages a sequence holds in a step that computes `new_tokens` tokens when its dead
    pages are freed: its last window - 1 cached positions and the new ones (decode: 1, so
    ceil(window / page_size) + 1)."""
    return pages_needed(window - 1 + new_tokens, page_size) + 1


def table_width(max_length: int, page_size: int, window: int | None,
                max_num_batched_tokens: int) -> int:
    """Most pages one sequence's block table lists: its maximum length's, or with a
    `cache_window` the pages a step of up to `max_num_batched_tokens` new tokens holds."""
    full = pages_needed(max_length, page_size)
    if window is None:
        return full
    return min(full, window_pages(window, page_size, max_num_batched_tokens))


class PagePool:
    """Host bookkeeping of `num_pages` pages (page 0 reserved): counts and a free queue."""

    def __init__(self, num_pages: int):
        if num_pages < 2:
            raise UsageError(f"a page pool needs at least 2 pages, got {num_pages}")
        self.num_pages = num_pages
        self.refs = [0] * num_pages
        # page -> None, oldest first; OrderedDict gives O(1) removal of a page a hit revives.
        self._free: collections.OrderedDict[int, None] = collections.OrderedDict(
            (p, None) for p in range(1, num_pages))
        self.on_reuse: Callable[[int], None] = lambda page: None  # the prefix cache's hook

    @property
    def free_count(self) -> int:
        return len(self._free)

    @property
    def used_count(self) -> int:
        """Pages referenced by at least one sequence."""
        return self.num_pages - 1 - len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """n fresh pages (reference 1 each), or None when fewer than n are free."""
        if n > len(self._free):
            return None
        pages = []
        for _ in range(n):
            page, _ = self._free.popitem(last=False)
            self.on_reuse(page)  # its old contents (a cached prefix, maybe) are gone
            self.refs[page] = 1
            pages.append(page)
        return pages

    def share(self, page: int) -> None:
        """One more reference to a page (a prefix-cache hit); revives a freed page."""
        if self.refs[page] == 0:
            del self._free[page]
        self.refs[page] += 1

    def release(self, pages: Iterable[int]) -> None:
        """Drop one reference to each page; a page no one uses joins the free queue's end."""
        for page in pages:
            if self.refs[page] <= 0:
                raise RuntimeError(f"page {page} released more often than taken")
            self.refs[page] -= 1
            if self.refs[page] == 0:
                self._free[page] = None
