"""PyTorch eager reference for `jaxaccel bench embed`: the same weights, batch and tokens.

Usage: python scripts/reference_embed_torch.py SRC_DIR DTYPE BATCH LENGTH ITERS
Loads the Hugging Face directory (safetensors) with transformers and prints one JSON line.
Reference/benchmark code only: the jaxaccel package never imports torch.
"""

import json
import sys
import time

import numpy as np
import torch
import transformers


def main(src, dtype, batch, length, iters):
    torch.manual_seed(0)
    model = transformers.AutoModel.from_pretrained(src, use_safetensors=True).eval()
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    vocab = model.config.vocab_size
    ids = np.random.default_rng(0).integers(1000, vocab, (batch, length)).astype(np.int64)
    ids, mask = torch.from_numpy(ids), torch.ones(batch, length, dtype=torch.int64)

    def step():
        hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state.float()
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        return torch.nn.functional.normalize(pooled, dim=-1)

    with torch.inference_mode():
        for _ in range(2):
            step()
        start = time.perf_counter()
        for _ in range(iters):
            step()
        seconds = time.perf_counter() - start
    return {"sentences_per_s": batch * iters / seconds, "seconds": seconds,
            "threads": torch.get_num_threads()}


if __name__ == "__main__":
    src, dtype, batch, length, iters = sys.argv[1:6]
    print(json.dumps(main(src, dtype, int(batch), int(length), int(iters))))
