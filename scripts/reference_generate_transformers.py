"""Baseline for `jaxaccel bench generate`: transformers on the same Hugging Face weights.

    python scripts/reference_generate_transformers.py HF_DIR DTYPE PREFILL_LEN DECODE_TOKENS

Prints one JSON line with the same fields as jaxaccel.bench.generate_worker, measured the
same way (best of 3; decode = slope between a short and a long greedy generation).
"""

from __future__ import annotations

import json
import sys
import time

import torch
import transformers

REPEATS = 3


def best_seconds(fn) -> float:
    fn()
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def prompts(batch: int, length: int, vocab: int) -> torch.Tensor:
    return torch.tensor([[(17 * row + 31 * i) % (vocab - 1) + 1 for i in range(length)]
                         for row in range(batch)])


def main() -> None:
    hf_dir, dtype = sys.argv[1], sys.argv[2]
    prefill_len, new_tokens = int(sys.argv[3]), int(sys.argv[4])
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch_dtype).eval()
    vocab = model.config.vocab_size
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def generate(ids, n):
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0, attention_mask=torch.ones_like(ids))

    result = {"dtype": dtype, "param_bytes": param_bytes, "torch_threads": torch.get_num_threads()}
    with torch.inference_mode():
        long_prompt = prompts(1, prefill_len, vocab)
        # generate()'s prefill: one forward filling the cache, logits of the last position only.
        result["prefill_ms"] = 1e3 * best_seconds(
            lambda: model(long_prompt, use_cache=True, logits_to_keep=1))
        for batch in (1, 8):
            ids = prompts(batch, 16, vocab)
            short = best_seconds(lambda: generate(ids, 2))
            long = best_seconds(lambda: generate(ids, 2 + new_tokens))
            result[f"decode_b{batch}_tok_s"] = batch * new_tokens / max(long - short, 1e-9)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
