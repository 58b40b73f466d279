"""Prefix caching: full pages of tokens found again by a hash chained over the prefix.

A page's key is hash((key of the page before it, its tokens)), so equal keys mean equal
whole prefixes, not just equal pages. Pages are registered once their tokens are computed;
a new sequence takes the longest run of registered pages that starts its tokens (sharing
them through the pool's reference counts) and computes only the rest. A cached page whose
sequences all ended stays in the pool's free queue: a hit revives it, allocation reusing it
evicts it here (least recently used first).
"""

from __future__ import annotations

from collections.abc import Sequence

from jaxaccel.engine.page_pool import PagePool


def extend_keys(keys: list[int], tokens: Sequence[int], page_size: int, pages: int) -> list[int]:
    """`keys` (the chained keys of the first len(keys) full pages of `tokens`) extended in
    place to the first `pages` pages; returned for convenience."""
    parent = keys[-1] if keys else None
    for i in range(len(keys), pages):
        parent = hash((parent, tuple(tokens[i * page_size:(i + 1) * page_size])))
        keys.append(parent)
    return keys


class PrefixCache:
    """Key -> page for full computed pages of a `PagePool`; `enabled=False` caches nothing."""

    def __init__(self, pool: PagePool, page_size: int, enabled: bool = True):
        self.pool, self.page_size, self.enabled = pool, page_size, enabled
        self._page_of: dict[int, int] = {}
        self._key_of: dict[int, int] = {}
        self.hit_pages = 0  # pages served from the cache, over the engine's life
        pool.on_reuse = self._evict

    def _evict(self, page: int) -> None:
        key = self._key_of.pop(page, None)
        if key is not None:
            del self._page_of[key]

    def lookup(self, keys: list[int], tokens: Sequence[int], max_pages: int) -> list[int]:
        """Pages holding the longest cached prefix of `tokens` (at most `max_pages`), each
        now shared (one more reference) by the caller. `keys`: the sequence's chained keys
        so far (extended here)."""
        if not self.enabled:
            return []
        pages = []
        for key in extend_keys(keys, tokens, self.page_size, max_pages):
            page = self._page_of.get(key)
            if page is None:
                break
            self.pool.share(page)
            pages.append(page)
        self.hit_pages += len(pages)
        return pages

    def cached_run(self, keys: Sequence[int]) -> int:
        """How many of `keys` (a chain, in order) are cached, from the first; takes nothing."""
        if not self.enabled:
            return 0
        for i, key in enumerate(keys):
            if key not in self._page_of:
                return i
        return len(keys)

    def register(self, keys: list[int], tokens: Sequence[int], pages: Sequence[int],
                 first: int, full: int) -> None:
        """Record pages[first:full] (full pages of `tokens`, computed) under their keys
        (`keys`, the sequence's chained keys, extended here). A key already cached on
        another page keeps that page (its twin stays private)."""
        if not self.enabled or full <= first:
            return
        extend_keys(keys, tokens, self.page_size, full)
        for i in range(first, full):
            if keys[i] not in self._page_of and pages[i] not in self._key_of:
                self._page_of[keys[i]] = pages[i]
                self._key_of[pages[i]] = keys[i]
