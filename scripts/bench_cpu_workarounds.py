"""Do jaxaccel's XLA:CPU workarounds still pay on this jax? Each timed with and without it.

    python scripts/bench_cpu_workarounds.py            # prints a markdown table
    python scripts/bench_cpu_workarounds.py --reps 50 --json out.json

Each workaround is rebuilt here in a few lines (the library's own code is being moved), at
GPT-2 124M shapes, next to the plain code XLA would get without it:
  (a) bf16 token lookup: `jnp.take` on the table vs on its uint16 bits
      (jaxaccel/models/layers.py `lookup`);
  (b) `lax.scan` over stacked bf16 weights, slicing bf16 vs uint16 bits
      (layers.py `_to_carrier` / `scan_blocks`);
  (c) KV-cache write of one slot, bf16 cache vs uint16 storage (kv_cache.py `storage_dtype`);
  (d) projection matmul then head transpose, without vs with an `optimization_barrier`
      between them (kv_cache.py `attend`), over 12 scanned layers with a 256-slot cache read:
      once as a 3-D einsum (the form XLA folds the transpose into) and once through a 2-D
      [k, n] view of the weight (as `layers.matmul` does today); and (unless --no-decode) a
      real GPT-2 124M decode step (random weights, jaxaccel's Generator, XLA's own dots),
      with the barriers of `kv_cache.attend` patched out at trace time for "without";
  (e) bf16 one-row matmul vs the row padded to two (generate.py `default_buckets` min_batch=2);
  and, with the decode rows, (a)-(c) together in that bf16 decode step: uint16 carriers for
  weights, lookup and cache vs plain bf16 (`layers._to_carrier`, `kv_cache.storage_dtype`).

Every variant is jitted, warmed up, then timed `--reps` times (block_until_ready), the two
variants of a row alternating rep by rep so drift hits both alike; the table shows medians.
A decode step is timed as the slope between generating 2 and 2 + DECODE_TOKENS tokens.
Verdict: "helps xN" when the workaround is >= 1.15x faster, "hurts xN" when >= 1.15x slower,
else "no gain".
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import time
from importlib.metadata import version

import jax
import jax.numpy as jnp
import numpy as np

BF16, U16, F32 = jnp.bfloat16, jnp.uint16, jnp.float32
VOCAB, D, F, LAYERS, HEADS, HEAD_DIM, SLOTS = 50257, 768, 3072, 12, 12, 64, 256
WARMUP = 3
DECODE_TOKENS = 8
THRESHOLD = 1.15


def bits(x):
    return jax.lax.bitcast_convert_type(x, U16)


def unbits(x):
    return jax.lax.bitcast_convert_type(x, BF16)


def rand(shape, dtype, seed=0):
    return jnp.asarray(0.02 * np.random.default_rng(seed).standard_normal(shape), dtype)


# Each case: (label, shape note, plain variant, workaround variant). A variant is a
# zero-argument callable that runs one rep and returns its seconds.

def clocked(run):
    def measure():
        start = time.perf_counter()
        jax.block_until_ready(run())
        return time.perf_counter() - start
    return measure


def jitted(fn, *args):
    f = jax.jit(fn)
    return clocked(lambda: f(*args))


def donating(fn, state, *args):
    """A step that donates and threads `state` (the cache), as generation does."""
    f = jax.jit(fn, donate_argnums=0)
    box = [state]

    def run():
        box[0] = f(box[0], *args)
        return box[0]
    return clocked(run)


def case_lookup(rows: int):
    table, ids = rand((VOCAB, D), BF16), jnp.arange(rows, dtype=jnp.int32)[None] * 97
    plain = jitted(lambda t, i: jnp.take(t, i, axis=0), table, ids)
    carrier = jitted(lambda t, i: unbits(jnp.take(bits(t), i, axis=0)), table, ids)
    return f"(a) bf16 lookup, {rows} row(s)", f"[{VOCAB},{D}]", plain, carrier


def scan_matmul(x, w_ldf, carrier: bool):
    def body(acc, w_df):
        w_df = unbits(w_df) if carrier else w_df
        return acc + jnp.dot(x, w_df, preferred_element_type=F32), None

    acc = jnp.zeros((x.shape[0], w_ldf.shape[-1]), F32)
    return jax.lax.scan(body, acc, bits(w_ldf) if carrier else w_ldf)[0]


def case_scan(batch: int):
    x, w = rand((batch, D), BF16, 1), rand((LAYERS, D, F), BF16)
    plain = jitted(lambda x, w: scan_matmul(x, w, False), x, w)
    carrier = jitted(lambda x, w: scan_matmul(x, w, True), x, w)
    return f"(b) scan over bf16 weights, x[{batch},{D}]", f"[{LAYERS},{D},{F}]", plain, carrier


def case_cache_write():
    shape = (LAYERS, 8, HEADS, SLOTS, HEAD_DIM)
    new = rand((LAYERS, 8, HEADS, 1, HEAD_DIM), BF16, 2)
    slot = jnp.int32(SLOTS // 2)
    write = lambda c, x, s: jax.lax.dynamic_update_slice(c, x, (0, 0, 0, s, 0))  # noqa: E731
    plain = donating(write, jnp.zeros(shape, BF16), new, slot)
    stored = donating(lambda c, x, s: write(c, bits(x), s), jnp.zeros(shape, U16), new, slot)
    return "(c) KV-cache write of one slot", "[12,8,12,256,64]", plain, stored


def attention_layers(x_btd, wq_ldnh, cache_lbnsh, barrier: bool, view_2d: bool):
    """Per layer: q = x . wq, heads transposed before a read of the cache and back after."""
    fence = jax.lax.optimization_barrier if barrier else (lambda v: v)
    b, t, d = x_btd.shape

    def body(x_btd, layer):
        wq_dnh, cache_bnsh = layer
        if view_2d:  # layers.matmul: one [k, n] matmul, reshaped to heads after
            q_btnh = jnp.dot(x_btd.reshape(b * t, d), wq_dnh.reshape(d, HEADS * HEAD_DIM),
                             preferred_element_type=F32).reshape(b, t, HEADS, HEAD_DIM)
        else:
            q_btnh = jnp.einsum("btd,dnh->btnh", x_btd, wq_dnh, preferred_element_type=F32)
        q_bnth = fence(q_btnh.astype(x_btd.dtype)).transpose(0, 2, 1, 3)
        scores = jnp.einsum("bnth,bnsh->bnts", q_bnth, cache_bnsh, preferred_element_type=F32)
        probs = jax.nn.softmax(scores * HEAD_DIM ** -0.5, axis=-1).astype(x_btd.dtype)
        out_bnth = jnp.einsum("bnts,bnsh->bnth", probs, cache_bnsh, preferred_element_type=F32)
        out_btd = fence(out_bnth.transpose(0, 2, 1, 3).reshape(b, t, d).astype(x_btd.dtype))
        return x_btd + out_btd, None

    return jax.lax.scan(body, x_btd, (wq_ldnh, cache_lbnsh))[0]


def case_barrier(batch: int, dtype, view_2d: bool):
    x = rand((batch, 1, D), dtype, 3)
    wq = rand((LAYERS, D, HEADS, HEAD_DIM), dtype, 4)
    cache = rand((LAYERS, batch, HEADS, SLOTS, HEAD_DIM), dtype, 5)
    plain = jitted(lambda *a: attention_layers(*a, False, view_2d), x, wq, cache)
    fenced = jitted(lambda *a: attention_layers(*a, True, view_2d), x, wq, cache)
    form = "2-D view" if view_2d else "3-D einsum"
    name = "f32" if dtype == F32 else "bf16"
    return (f"(d) barrier, {form}, {name}, b={batch}",
            f"x[{batch},1,{D}].w[{D},{HEADS},{HEAD_DIM}] x{LAYERS}", plain, fenced)


@contextlib.contextmanager
def patched(replacements: list[tuple[object, str, object]]):
    """While tracing: each (module, name) set to its replacement, restored after. The
    library looks these names up at trace time, so a patched trace compiles without them."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in replacements]
    for owner, name, value in replacements:
        setattr(owner, name, value)
    try:
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def without(workaround: str) -> list[tuple[object, str, object]]:
    """What to patch to run jaxaccel's decode without `workaround`."""
    from jaxaccel import kv_cache
    from jaxaccel.models import layers

    if workaround == "barrier":  # kv_cache.attend is the library's only user
        return [(jax.lax, "optimization_barrier", lambda operand: operand)]
    # "carriers": bf16 weights, token lookup and KV cache held as bf16, not uint16 bits
    return [(layers, "_to_carrier", lambda x: x), (kv_cache, "storage_dtype", jnp.dtype)]


def case_decode(batch: int, dtype, workaround: str):
    """A GPT-2 124M decode step through jaxaccel's Generator, without vs with `workaround`."""
    from jaxaccel.runtime.generate import Buckets, Generator, default_buckets
    from jaxaccel.models import gpt2
    from jaxaccel.models.state import abstract_model
    from jaxaccel.parallel.params import fill_state, param_specs

    config = gpt2.Config(vocab_size=50257, hidden_size=D, num_layers=LAYERS, num_heads=HEADS,
                         intermediate_size=F)
    graphdef, state = abstract_model("gpt2", config, dtype)
    rng = np.random.default_rng(0)
    state = fill_state(state, {name: jnp.asarray(0.02 * rng.standard_normal(spec.shape,
                                                                           np.float32), dtype)
                               for name, spec in param_specs(state).items()})
    rows = [[(17 * r + 31 * i) % 50000 + 1 for i in range(16)] for r in range(batch)]

    def variant(remove: bool):
        # XLA's own dots (no packed kernel); one cache bucket for the short and long runs.
        gen = Generator(graphdef, state, config, dtype=dtype, packed_weights=False)
        gen.buckets = Buckets(slot_multiple=128, min_batch=default_buckets(dtype).min_batch)
        replacements = without(workaround) if remove else []

        def measure():
            # Patched on every call, not only the first: a retrace must see the same code.
            with patched(replacements):
                start = time.perf_counter()
                gen.generate(rows, 2, loop="device")
                middle = time.perf_counter()
                gen.generate(rows, 2 + DECODE_TOKENS, loop="device")
                end = time.perf_counter()
            return max((end - middle) - (middle - start), 0.0) / DECODE_TOKENS
        return measure

    name = "f32" if dtype == F32 else "bf16 (XLA dots)"
    label = "(d) barrier" if workaround == "barrier" else "(a-c) all uint16 carriers"
    return (f"{label}, GPT-2 decode step, {name}, b={batch}", "124M, 12 layers",
            variant(True), variant(False))


def case_pad_row():
    x, w = rand((1, D), BF16, 6), rand((D, F), BF16, 7)
    one = jitted(lambda x, w: jnp.dot(x, w, preferred_element_type=F32), x, w)
    two = jitted(lambda x, w: jnp.dot(jnp.pad(x, ((0, 1), (0, 0))), w,
                                      preferred_element_type=F32)[:1], x, w)
    return "(e) bf16 matmul, 1 row padded to 2", f"[1,{D}].[{D},{F}]", one, two


def cases(decode: bool):
    yield case_lookup(1)
    yield case_lookup(8)
    yield case_scan(1)
    yield case_scan(8)
    yield case_cache_write()
    for view_2d in (False, True):
        for batch, dtype in ((1, F32), (8, F32), (1, BF16)):
            yield case_barrier(batch, dtype, view_2d)
    if decode:
        for batch, dtype in ((1, F32), (8, F32), (1, BF16)):
            yield case_decode(batch, dtype, "barrier")
        for batch in (1, 8):
            yield case_decode(batch, BF16, "carriers")
    yield case_pad_row()


def medians(plain, workaround, reps: int) -> tuple[float, float]:
    for _ in range(WARMUP):  # the first call compiles
        plain()
        workaround()
    times = ([], [])
    for _ in range(reps):
        times[0].append(plain())
        times[1].append(workaround())
    return statistics.median(times[0]), statistics.median(times[1])


def verdict(plain: float, workaround: float) -> str:
    gain = plain / workaround
    if gain >= THRESHOLD:
        return f"helps x{gain:.2f}"
    if gain <= 1 / THRESHOLD:
        return f"hurts x{1 / gain:.2f}"
    return f"no gain (x{gain:.2f})"


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=30, help="timed reps per variant (>= 20)")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--decode-reps", type=int, default=20,
                        help="timed reps of the (slow) GPT-2 decode-step rows")
    parser.add_argument("--no-decode", dest="decode", action="store_false",
                        help="skip the GPT-2 decode-step rows (the slowest, ~3 min)")
    args = parser.parse_args()
    # Flags from the environment change what XLA compiles: show them, never assume none.
    env = {k: v for k, v in os.environ.items() if k.startswith(("XLA_", "JAX_"))}
    print(f"CPU: {cpu_model()} ({os.cpu_count()} logical CPUs)")
    print(f"jax {jax.__version__}, jaxlib {version('jaxlib')}, backend "
          f"{jax.default_backend()} ({len(jax.devices())} device(s)), python "
          f"{platform.python_version()}")
    print(f"XLA_/JAX_ environment: {env or 'none set'}; median of {args.reps} reps "
          f"({args.decode_reps} for decode steps); load "
          f"average at start {os.getloadavg()[0]:.2f} (other processes share these CPUs)\n")
    print("| workaround | shape | without ms | with ms | verdict |")
    print("|---|---|---|---|---|")
    rows = []
    for label, shape, plain, workaround in cases(args.decode):
        reps = args.decode_reps if "decode step" in label else args.reps
        t_plain, t_work = medians(plain, workaround, reps)
        rows.append({"case": label, "shape": shape, "without_s": t_plain, "with_s": t_work,
                     "verdict": verdict(t_plain, t_work)})
        print(f"| {label} | {shape} | {1e3 * t_plain:.3f} | {1e3 * t_work:.3f} "
              f"| {rows[-1]['verdict']} |", flush=True)
    print(f"\nload average at end {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"cpu": cpu_model(), "jax": jax.__version__, "env": env, "reps": args.reps,
                       "rows": rows}, out, indent=1)


if __name__ == "__main__":
    main()
