"""transformers baseline of `jaxaccel bench generate`: the same Hugging Face weights.

    python -m jaxaccel_reference.generate_transformers '{"src": HF_DIR, "dtype": DTYPE,
        "prefill_len": 512, "new_tokens": 32}'

Prints one JSON line with the fields of jaxaccel.bench.generate_worker, measured the same way
(best of 3; decode = slope between a short and a long greedy generation).
"""

from __future__ import annotations

import torch
import transformers

from jaxaccel.bench.generate_worker import decode_tokens_per_s, prompts
from jaxaccel.bench.worker import best_seconds, serve


def main(src: str, dtype: str, prefill_len: int, new_tokens: int) -> dict:
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch_dtype).eval()
    vocab = model.config.vocab_size
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def generate(rows, n):
        ids = torch.tensor(rows)
        model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=0, attention_mask=torch.ones_like(ids))

    result = {"dtype": dtype, "param_bytes": param_bytes, "torch_threads": torch.get_num_threads()}
    with torch.inference_mode():
        long_prompt = torch.tensor(prompts(1, prefill_len, vocab))
        # generate()'s prefill: one forward filling the cache, logits of the last position only.
        result["prefill_ms"] = 1e3 * best_seconds(
            lambda: model(long_prompt, use_cache=True, logits_to_keep=1))
        for batch in (1, 8):
            result[f"decode_b{batch}_tok_s"] = decode_tokens_per_s(generate, batch, new_tokens,
                                                                   vocab)
    return result


if __name__ == "__main__":
    serve(main)
