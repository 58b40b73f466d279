"""One fresh-process measurement of `jaxaccel bench pipeline`: sequences/s of a BERT-shaped
encoder with random weights on one mesh.

    python -m jaxaccel.bench.pipeline_worker '{"mesh": "stage=2", "microbatches": 4,
        "layers": 8, "hidden": 256, "batch": 32, "length": 64, "iters": 5}'

The process needs as many (simulated) devices as the mesh has. Prints one JSON line.
"""

from __future__ import annotations

from jaxaccel.bench.worker import loop_seconds, serve


def build_forward(mesh: str, microbatches: int | None, layers: int, hidden: int):
    """The runtime's jitted forward of a random encoder on `mesh`, its sharded state and its
    vocabulary size (kept apart: the runtime's API may change)."""
    # deferred: jax and the runtime load in the worker process only, not in `jaxaccel bench`
    import jax
    from flax import nnx

    from jaxaccel.models import bert
    from jaxaccel.parallel.pipeline import pad_stacked
    from jaxaccel.runtime.programs import Runtime, placed_shardings, state_shardings
    from jaxaccel.parallel.sharding import Layout

    cfg = bert.Config(vocab_size=1024, hidden_size=hidden, num_layers=layers,
                      num_heads=hidden // 64, intermediate_size=4 * hidden)
    layout = Layout.create(mesh, "dp_tp_pp")
    graphdef, state = nnx.split(bert.Model(cfg, rngs=nnx.Rngs(0)))
    runtime = Runtime(graphdef, cfg, layout, microbatches=microbatches)
    state = pad_stacked(state, runtime.stages)  # as the loader holds uneven stages
    state = jax.device_put(state, state_shardings(state, layout))
    batch = runtime.batch_sharding()
    fn = runtime.program(("embed",), lambda s, ids, mask: runtime.model(s).embed(ids, mask),
                         in_shardings=(placed_shardings(state), batch, batch),
                         out_shardings=batch)
    return fn, state, cfg.vocab_size


def main(mesh: str, microbatches: int | None, layers: int, hidden: int, batch: int,
         length: int, iters: int) -> dict:
    """Sequences/s of one configuration, in this process (its devices already set)."""
    # deferred: jax and the runtime load in the worker process only, not in `jaxaccel bench`
    import jax
    import numpy as np

    fn, state, vocab = build_forward(mesh, microbatches, layers, hidden)
    ids = np.random.default_rng(0).integers(1, vocab, (batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    seconds = loop_seconds(lambda: fn(state, ids, mask), iters, warmup=1,  # warm-up: compile
                           wait=lambda out: out.block_until_ready())
    return {"sequences_per_s": batch * iters / seconds, "devices": jax.device_count()}

if __name__ == "__main__":
    serve(main)
