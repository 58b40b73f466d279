"""PyTorch eager baseline of `jaxaccel bench classify`: the same weights and pixels.

    python -m jaxaccel_reference.classify_torch '{"src": HF_DIR, "dtype": DTYPE, "batch": 32,
                                                 "iters": 4}'

Loads the Hugging Face directory (safetensors) as transformers' ResNetForImageClassification
in eval mode, channels_last (PyTorch's fast CPU convolution layout), and prints one JSON line
with the fields of jaxaccel.bench.classify_worker's compute mode, measured the same way.
"""

from __future__ import annotations

import json
import pathlib

import torch
import transformers

from jaxaccel.bench.classify_worker import random_pixels
from jaxaccel.bench.worker import loop_seconds, serve


def main(src: str, dtype: str, batch: int, iters: int) -> dict:
    model = transformers.ResNetForImageClassification.from_pretrained(
        src, use_safetensors=True).eval().to(memory_format=torch.channels_last)
    pre = pathlib.Path(src) / "preprocessor_config.json"
    side = json.loads(pre.read_text())["size"]["shortest_edge"] if pre.is_file() else 224
    pixels = torch.from_numpy(random_pixels(batch, side)).permute(0, 3, 1, 2)
    pixels = pixels.contiguous(memory_format=torch.channels_last)
    if dtype == "bfloat16":
        model, pixels = model.to(torch.bfloat16), pixels.to(torch.bfloat16)
    with torch.inference_mode():
        seconds = loop_seconds(lambda: model(pixels).logits.float(), iters)
    return {"images_per_s": batch * iters / seconds, "seconds": seconds,
            "threads": torch.get_num_threads()}


if __name__ == "__main__":
    serve(main)
