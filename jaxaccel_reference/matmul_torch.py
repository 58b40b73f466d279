"""PyTorch baseline of `jaxaccel bench roofline`: matmul GFLOP/s at the same shapes.

    python -m jaxaccel_reference.matmul_torch '{"shapes": [...], "dtypes": [...],
                                               "min_seconds": 0.2}'

Same arguments, timing and JSON as `jaxaccel.bench.roofline_worker`, with `torch.matmul` in
the dtype (PyTorch's bf16 matmul accumulates in float32 and returns bf16, as jaxaccel's).
"""

from __future__ import annotations

import torch

from jaxaccel.bench.roofline_worker import flops, time_matmul
from jaxaccel.bench.worker import serve


def main(shapes: list[dict], dtypes: list[str], min_seconds: float = 0.2) -> dict:
    gen = torch.Generator().manual_seed(0)
    gflops = {}
    with torch.inference_mode():
        for dtype in dtypes:
            gflops[dtype] = {}
            for shape in shapes:
                b, m, k, n = shape["batch"], shape["m"], shape["k"], shape["n"]
                x = torch.randn(b, m, k, generator=gen).to(getattr(torch, dtype))
                w = torch.randn(b, k, n, generator=gen).to(getattr(torch, dtype))
                seconds = time_matmul(lambda x=x, w=w: torch.matmul(x, w), lambda out: out,
                                      min_seconds)
                gflops[dtype][shape["name"]] = flops(shape) / seconds / 1e9
    return {"gflops": gflops, "threads": torch.get_num_threads()}


if __name__ == "__main__":
    serve(main)
