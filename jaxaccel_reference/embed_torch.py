"""PyTorch eager baseline of `jaxaccel bench embed`: the same weights, batch and tokens.

    python -m jaxaccel_reference.embed_torch '{"src": HF_DIR, "dtype": DTYPE, "batch": 32,
                                              "length": 128, "iters": 8}'

Loads the Hugging Face directory (safetensors) with transformers and prints one JSON line
with the fields of jaxaccel.bench.embed_worker, measured the same way.
"""

from __future__ import annotations

import torch
import transformers

from jaxaccel.bench.embed_worker import synthetic_batch
from jaxaccel.bench.worker import loop_seconds, serve


def main(src: str, dtype: str, batch: int, length: int, iters: int) -> dict:
    torch.manual_seed(0)
    model = transformers.AutoModel.from_pretrained(src, use_safetensors=True).eval()
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    ids, mask = (torch.from_numpy(a).long()
                 for a in synthetic_batch(model.config.vocab_size, batch, length))

    def step():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return torch.nn.functional.normalize(pooled, dim=-1)

    with torch.inference_mode():
        seconds = loop_seconds(step, iters)
    return {"sentences_per_s": batch * iters / seconds, "seconds": seconds,
            "threads": torch.get_num_threads()}


if __name__ == "__main__":
    serve(main)
