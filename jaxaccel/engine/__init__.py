"""The generation engine: continuous batching over a paged KV cache.

Modules, one concept each: `requests` (what is asked, what comes back), `page_pool` (pages
and their allocator), `prefix_cache` (shared prompt pages), `scheduler` (which rows run each
step), `sampling` (per-row token choice), `step` (the jitted step over pages), `engine`
(`LLMEngine`), `frontend` (`run_requests`, what `Model.generate` and `generate --input`
call).
"""
