"""Which library should run XLA:CPU's dots on this CPU? MiniLM embed with each of them.

    python scripts/bench_cpu_library.py CKPT                  # e.g. checkpoints/minilm
    python scripts/bench_cpu_library.py CKPT --dtype bfloat16 --rounds 6 --json out.json

Compiles jaxaccel's embed program (batch 32 x 128 tokens) once per library of
`jaxaccel.backends.cpu.tuning.LIBRARIES` (XLA's default YNNPACK, oneDNN, XNNPACK, Eigen) in
one process, then times them alternately, round by round, so that the load of a shared
machine hits all alike; prints sentences/s (best and median of the rounds) and the compiled
program's library fusions, which show whether the library took the dots at all (a jaxlib
built without oneDNN, or a CPU it does not support, silently leaves them to Eigen). This is
the measurement behind `tuning.dot_library`'s per-CPU default.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import time

from jaxaccel.backends.cpu import isa, tuning
from jaxaccel.bench.embed_worker import synthetic_batch
from jaxaccel.runtime.embed import Embedder
from jaxaccel.startup.loader import load_model

BATCH, LENGTH = 32, 128


def embedders(ckpt: str, dtype: str) -> tuple[dict, object, object]:
    """Per library: (Embedder, library fusions in its program); and the inputs."""
    loaded = load_model(ckpt, dtype=dtype)
    ids, mask = synthetic_batch(loaded.config.vocab_size, BATCH, LENGTH)
    found = {}
    for name, options in tuning.LIBRARIES.items():
        if name == "ynn":  # the same options as "default"
            continue
        embedder = Embedder(loaded, batch_size=BATCH, compiler_options=options)
        text = embedder.forward.lower(loaded.state, ids, mask).compile().as_text()
        fusions = sorted(set(re.findall(r"%([a-z]+)_fusion[.\d]* = \S+ fusion\(", text))
                         & {"ynn", "xnn", "onednn"})
        embedder.forward(loaded.state, ids, mask).block_until_ready()  # compile, warm up
        found[name] = (embedder, fusions or ["none (Eigen dots)"])
    return found, loaded.state, (ids, mask)


def measure(found: dict, state, inputs, rounds: int, calls: int) -> dict[str, list[float]]:
    """Sentences/s per library and round, libraries alternating within each round."""
    rates = {name: [] for name in found}
    for _ in range(rounds):
        for name, (embedder, _) in found.items():
            start = time.perf_counter()
            for _ in range(calls):
                out = embedder.forward(state, *inputs)
            out.block_until_ready()
            rates[name].append(calls * BATCH / (time.perf_counter() - start))
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ckpt")
    parser.add_argument("--dtype", action="append", choices=("float32", "bfloat16"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--calls", type=int, default=2, help="Batches per timed round.")
    parser.add_argument("--json", dest="json_out")
    args = parser.parse_args()
    cpu = isa.detect()
    print(f"CPU: {cpu.model}; ISA: "
          + " ".join(f for f, present in cpu.features().items() if present))
    results = {}
    for dtype in args.dtype or ["float32", "bfloat16"]:
        found, state, inputs = embedders(args.ckpt, dtype)
        rates = measure(found, state, inputs, args.rounds, args.calls)
        print(f"\n| {dtype} | best sent/s | median | x default | library fusions |\n|---|---|---|---|---|")
        base = statistics.median(rates["default"])
        for name, values in rates.items():
            print(f"| {name} | {max(values):.1f} | {statistics.median(values):.1f} | "
                  f"{statistics.median(values) / base:.2f} | {', '.join(found[name][1])} |")
        results[dtype] = {name: {"runs": v, "fusions": found[name][1]} for name, v in rates.items()}
    if args.json_out:
        with open(args.json_out, "w") as handle:
            json.dump({"cpu": cpu.as_json(), "results": results}, handle, indent=1)


if __name__ == "__main__":
    main()
