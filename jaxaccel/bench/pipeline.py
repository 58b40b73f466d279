"""`jaxaccel bench pipeline`: the pipeline bubble, measured.

For each stage count S, a BERT-shaped encoder with random weights runs on S devices three
ways: as an S-stage pipeline (`stage=S`) with M = 1, 2S and 4S microbatches; with S=1 at the
same device count (`data=S`, no pipeline); and on one device. GPipe needs M + S − 1 steps for
M microbatches, so its ideal speedup over one device is S·M/(S+M−1) and, against `data=S`
(which has no bubble), M/(S+M−1). Each measurement runs in a fresh process.

On simulated CPU devices (`--xla_force_host_platform_device_count`) all "devices" share the
machine's cores, so the speedup over one device is capped by the core count; the bubble still
shows, because every stage computes during every step (bubble steps on padding).
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
import time
from typing import Optional

import typer

from jaxaccel.bench import runner


def _worker_argv(spec: dict) -> list[str]:
    return ["-m", "jaxaccel.bench.pipeline", json.dumps(spec)]


def _env(devices: int) -> dict:
    from jaxaccel.launcher import process_env

    env = process_env(0, 1, 0, host_devices=devices)
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(name, None)  # one process: no cluster
    return env


def contenders(stages: int, spec: dict) -> list[tuple[str, dict]]:
    """(label, worker spec) pairs for one stage count."""
    runs = [("1 device", {**spec, "mesh": "data=1", "microbatches": None}),
            (f"data={stages}", {**spec, "mesh": f"data={stages}", "microbatches": None})]
    for m in (1, 2 * stages, 4 * stages):
        runs.append((f"stage={stages} M={m}", {**spec, "mesh": f"stage={stages}",
                                               "microbatches": m}))
    return runs


def measure(spec: dict) -> dict:
    """Sequences/s of one configuration, in this process (its devices already set)."""
    import jax
    import numpy as np
    from flax import nnx

    from jaxaccel import pipeline
    from jaxaccel.embed import make_embed_fn, state_shardings
    from jaxaccel.models import bert
    from jaxaccel.models.state import fill_state, flat_arrays, param_specs
    from jaxaccel.sharding import Layout

    cfg = bert.Config(vocab_size=1024, hidden_size=spec["hidden"], num_layers=spec["layers"],
                      num_heads=spec["hidden"] // 64, intermediate_size=4 * spec["hidden"])
    layout = Layout.create(spec["mesh"], "dp_tp_pp")
    graphdef, state = nnx.split(bert.Model(cfg, rngs=nnx.Rngs(0)))
    specs = param_specs(state)
    state = fill_state(state, {n: jax.device_put(a, layout.sharding(specs[n].axes, a.shape))
                               for n, a in flat_arrays(state).items()})
    runner_ = pipeline.for_layout(layout, cfg.num_layers, spec["microbatches"])
    fn = make_embed_fn(graphdef, state_shardings(state), layout.batch_sharding(2), runner_)
    rng = np.random.default_rng(0)
    ids = rng.integers(1, cfg.vocab_size, (spec["batch"], spec["length"])).astype(np.int32)
    mask = np.ones_like(ids)
    fn(state, ids, mask).block_until_ready()  # compile
    start = time.perf_counter()
    for _ in range(spec["iters"]):
        out = fn(state, ids, mask)
    out.block_until_ready()
    seconds = time.perf_counter() - start
    return {"sequences_per_s": spec["batch"] * spec["iters"] / seconds,
            "devices": jax.device_count()}


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("pipeline")
    def bench_pipeline(
        stages: str = typer.Option("2,4", "--stages", help="Stage counts S to try, e.g. 2,4,8."),
        layers: int = typer.Option(8, "--layers", min=1, help="Encoder layers."),
        hidden: int = typer.Option(256, "--hidden", min=64, help="Model width (multiple of 64)."),
        batch: int = typer.Option(32, "--batch", help="Sequences per call (divisible by 4S)."),
        length: int = typer.Option(64, "--length", help="Tokens per sequence."),
        iters: int = typer.Option(5, "--iters", min=1, help="Timed calls per process."),
        repeats: int = typer.Option(1, "--repeats", min=1, help="Fresh processes per contender."),
        json_out: Optional[pathlib.Path] = typer.Option(None, "--json", help="Write results here."),
    ) -> None:
        """Throughput of stage=S (M = 1, 2S, 4S microbatches) vs S=1 at the same device count,
        with the ideal S·M/(S+M−1); every run in a fresh process."""
        spec = {"layers": layers, "hidden": hidden, "batch": batch, "length": length,
                "iters": iters}
        rows, payload = [], []
        for s in (int(x) for x in stages.split(",")):
            if batch % (4 * s):
                raise typer.BadParameter(f"--batch {batch} must be divisible by 4*S = {4 * s}")
            results = {}
            for label, worker in contenders(s, spec):
                runs = [runner.run_worker(_worker_argv(worker), env=_env(s))
                        for _ in range(repeats)]
                results[label] = runner.summarize([r["sequences_per_s"] for r in runs])
            rows += table_rows(s, results)
            payload.append({"stages": s, "results": results})
        runner.print_table(
            f"pipeline bubble: {layers} layers x {hidden} wide, batch {batch} x {length} tokens "
            f"(median sequences/s of {repeats} fresh process(es); {os.cpu_count()} CPU cores)",
            ("S", "M", "stage=S", "data=S", "1 dev", "stage/data", "ideal M/(S+M-1)",
             "stage/1 dev", "ideal SM/(S+M-1)"), rows)
        runner.write_json(json_out, {"benchmark": "pipeline", **spec, "runs": payload})


def table_rows(s: int, results: dict) -> list[tuple]:
    data, single = results[f"data={s}"]["median"], results["1 device"]["median"]
    rows = []
    for m in (1, 2 * s, 4 * s):
        pp = results[f"stage={s} M={m}"]["median"]
        rows.append((s, m, f"{pp:.0f}", f"{data:.0f}", f"{single:.0f}", f"{pp / data:.2f}",
                     f"{m / (s + m - 1):.2f}", f"{pp / single:.2f}", f"{s * m / (s + m - 1):.2f}"))
    return rows


if __name__ == "__main__":
    print(json.dumps(measure(json.loads(sys.argv[1]))))
