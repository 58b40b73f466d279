"""One fresh-process measurement of image classification (used by `bench classify`).

    python -m jaxaccel.bench.classify_worker '{"ckpt": CKPT, "dtype": "float32", "batch": 32,
        "iters": 4, "mode": "compute"}'
    ... "mode": "decode" | "pipeline" | "serial" | "serial_parallel", "images": [FILE, ...]

compute: the jitted forward alone on a fixed random batch [batch, s, s, 3] (s: the
checkpoint's crop). decode: the input pipeline's host side alone (worker-thread decode and
preprocessing into host batches; `workers` threads). pipeline: files -> logits through
`Classifier.classify` (decode, transfer one step ahead, compute, all overlapping). serial:
the same with `prefetch=False`, what a user gets without the overlap: each batch decoded
inline on one thread, then transferred and computed, and the next batch decoded only once
that result is back. serial_parallel: no overlap either, but each batch decoded by
`workers` threads (to separate what parallel decoding gains from what overlapping it with
the compute gains). Prints one JSON line: {"images_per_s": ..., "seconds": ...,
"cpu_s_per_image": ...} (the process's CPU seconds, all threads, per image: on a shared
machine less disturbed by other load than the wall clock).
"""

from __future__ import annotations

import time

import numpy as np

from jaxaccel.bench.worker import loop_seconds, serve


def random_pixels(batch: int, side: int, seed: int = 0) -> np.ndarray:
    """Normalised-looking float32 [batch, side, side, 3]: every contender gets the same."""
    return np.random.default_rng(seed).standard_normal((batch, side, side, 3), np.float32)


def load_classifier(ckpt: str, dtype: str, batch: int):
    # deferred: jax and the runtime load in the worker process only, not in `jaxaccel bench`
    from jaxaccel.runtime.classify import Classifier
    from jaxaccel.startup.loader import load_model

    return Classifier(load_model(ckpt, dtype=dtype), batch_size=batch)


def load_preprocessor(ckpt: str):
    # deferred: see load_classifier
    from jaxaccel.inputs.images import Preprocessor
    from jaxaccel.startup.loader import plan_model

    return Preprocessor.from_config(plan_model(ckpt).config)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process's threads) of `fn()`."""
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


def serial_parallel(classifier, files: list[str], workers: int | None) -> None:
    """Each batch decoded by a thread pool, then put, computed and fetched; the next batch
    starts decoding only after that (no overlap between decode and compute)."""
    from jaxaccel.inputs.batches import HostBatches  # deferred: see load_classifier

    step = classifier.batch_size
    for start in range(0, len(files), step):
        batch, = HostBatches(files[start:start + step], classifier.preprocess, step,
                             workers=workers)
        classifier.fetch(classifier.run(classifier.put(batch.rows)))


def main(ckpt: str, dtype: str, batch: int, iters: int, mode: str,
         images: list[str] | None = None, workers: int | None = None) -> dict:
    from jaxaccel.inputs.batches import HostBatches  # deferred: see load_classifier

    files = (images or []) * (batch * iters // max(1, len(images or [])) + 1)
    files = files[:batch * iters]
    if mode == "decode":  # the host side alone: no weights, no compile
        preprocess = load_preprocessor(ckpt)
        list(HostBatches(files[:batch], preprocess, batch, workers=workers))  # warm up
        seconds, cpu = timed(lambda: list(HostBatches(files, preprocess, batch,
                                                      workers=workers)))
        return {"images_per_s": len(files) / seconds, "seconds": seconds,
                "cpu_s_per_image": cpu / len(files)}
    classifier = load_classifier(ckpt, dtype, batch)
    if mode == "compute":
        placed = classifier.put(random_pixels(batch, classifier.config.image_size))
        classifier.run(placed).block_until_ready()  # compile outside the CPU-time window
        cpu = time.process_time()
        seconds = loop_seconds(lambda: classifier.run(placed), iters,
                               wait=lambda out: out.block_until_ready())
        cpu = time.process_time() - cpu  # loop_seconds' 2 warm-up steps: 2 more batches
        return {"images_per_s": batch * iters / seconds, "seconds": seconds,
                "cpu_s_per_image": cpu / (batch * (iters + 2))}
    classifier.classify(files[:batch])  # compile and warm up
    if mode in ("pipeline", "serial"):
        seconds, cpu = timed(lambda: classifier.classify(files, prefetch=mode == "pipeline",
                                                         workers=workers))
    elif mode == "serial_parallel":
        seconds, cpu = timed(lambda: serial_parallel(classifier, files, workers))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    return {"images_per_s": len(files) / seconds, "seconds": seconds,
            "cpu_s_per_image": cpu / len(files)}


if __name__ == "__main__":
    serve(main)
