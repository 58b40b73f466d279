"""Mixture-of-experts dispatch on simulated CPU devices: replicated tokens + psum against an
all-to-all of (token, slot) pairs (`jaxaccel.models.moe`), per mesh and token count.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m jaxaccel.bench.moe_dispatch

One MoE layer (router output given, bf16, d 1024, f 2048, 8 experts, top-2, random routing)
jitted on `expert=4` and `data=2,expert=4`, for decode (8 tokens) and prefill (512 tokens);
the median of `--repeats` timed calls after a warm-up, the two strategies' calls alternated. Simulated
devices share the host's cores, so collectives are memory copies: this measures the compute
and copies each strategy adds, not a real interconnect.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxaccel.bench.runner import cpu_model  # noqa: E402
from jaxaccel.models import moe  # noqa: E402
from jaxaccel.parallel import sharding as ax  # noqa: E402

MESHES = (("expert=4", "ep"), ("data=2,expert=4", "dp_ep"))
TOKENS = {"decode": 8, "prefill": 512}


def layer_inputs(tokens: int, d: int, f: int, experts: int, k: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = jnp.asarray(rng.normal(size=(tokens, 1, d)), jnp.bfloat16)
    w = tuple(jnp.asarray(rng.normal(size=s) * 0.02, jnp.bfloat16)
              for s in ((experts, d, f), (experts, d, f), (experts, f, d)))
    ids = np.stack([rng.permutation(experts)[:k] for _ in range(tokens)])
    e = jnp.asarray(ids.reshape(tokens, 1, k), jnp.int32)
    p = jnp.asarray(rng.uniform(size=(tokens, 1, k)), jnp.float32)
    return y, p, e, w


def compiled(layout, strategy: str, args):
    """The layer jitted with `strategy`, compiled and run once."""
    moe.dispatch_strategy(strategy)
    try:
        with ax.use_layout(layout):
            fn = jax.jit(lambda y, p, e, w: moe.dispatch(y, p, e, w, "silu"))
            fn(*args).block_until_ready()
        return fn
    finally:
        moe.dispatch_strategy(None)


def time_alternating(fns: dict, args, repeats: int) -> dict[str, float]:
    """Median seconds per call of each function, calls alternated (a shared machine's load
    drifts; alternating spreads it over both)."""
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn(*args).block_until_ready()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--mlp", type=int, default=2048)
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args(argv)
    print(f"CPU: {cpu_model()}; {jax.device_count()} simulated devices")
    print(f"{'mesh':<18}{'shape':<16}{'psum ms':>10}{'all_to_all ms':>15}{'a2a / psum':>12}")
    rows = []
    for mesh, rules in MESHES:
        layout = ax.Layout.create(mesh, rules)
        for shape, tokens in TOKENS.items():
            inputs = layer_inputs(tokens, args.hidden, args.mlp, 8, 2)
            fns = {s: compiled(layout, s, inputs) for s in ("psum", "all_to_all")}
            ms = {s: t * 1e3 for s, t in time_alternating(fns, inputs, args.repeats).items()}
            rows.append({"mesh": mesh, "shape": shape, "tokens": tokens, **ms})
            print(f"{mesh:<18}{f'{shape} ({tokens})':<16}{ms['psum']:>10.2f}"
                  f"{ms['all_to_all']:>15.2f}{ms['all_to_all'] / ms['psum']:>12.2f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)


if __name__ == "__main__":
    main()
