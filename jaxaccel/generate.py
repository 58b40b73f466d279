"""Text generation for the decoder families: jitted prefill + decode step over a KV cache.

Shape legend as in `jaxaccel.models.layers`: b batch, t prompt (bucket) length, s cache slots,
n generated tokens, v vocab.

Layout of a batch: prompts are left-padded to a bucketed length t, so every row writes its
next key/value into the same cache slot and one `dynamic_update_slice` updates the whole
(donated) cache in place. A row's positions start at 0 after its padding and its padding is
masked out, so a batched row generates exactly what it would alone.

Compilation: prefill compiles once per (batch, prompt, cache) bucket and the decode step once
per (batch, cache) bucket; the model state is a jit argument, so new weights reuse them.

Decode loop: without streaming it runs inside `lax.while_loop` (`loop="device"`); with a
streaming callback, on the host (one jitted step per token). Measured on CPU (GPT-2 124M):
the device loop is as fast in float32 and ~3x faster in bfloat16, because XLA hoists per-call
work on the weights out of the loop; `jaxaccel bench generate` reports both.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxaccel import distributed, kv_cache, pipeline
from jaxaccel import sharding as ax
from jaxaccel.kernels import decode_weights
from jaxaccel.kernels.packed import PackedWeight
from jaxaccel.models import layers
from jaxaccel.sampling import GREEDY, Sampling, choose

# How often (in steps) the host loop asks the device whether every row has stopped: each
# question waits for the step to finish, so asking every step would serialise dispatch.
_EOS_POLL_STEPS = 8


class DecodeState(NamedTuple):
    token_b: jax.Array  # last chosen token
    slot: jax.Array  # cache slot (= scalar) the next token's key/value goes to
    step: jax.Array  # tokens generated so far
    pad_b: jax.Array  # left padding of each row
    done_b: jax.Array  # row has emitted EOS (or is a batch-padding row)
    out_bn: jax.Array  # generated tokens
    eos: jax.Array  # EOS id, or -1 for none
    key: jax.Array


def next_power_of_two(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class Buckets:
    """Padded shapes: fewer distinct shapes mean fewer compilations."""

    min_prompt: int = 16  # prompt lengths round up to a power of two, at least this
    slot_multiple: int = 64  # cache slots (prompt bucket + new tokens) round up to this
    min_batch: int = 1

    def batch(self, rows: int, divisor: int) -> int:
        return round_up(max(next_power_of_two(rows, 1), self.min_batch), divisor)

    def prompt(self, longest: int) -> int:
        return next_power_of_two(longest, self.min_prompt)

    def slots(self, prompt_bucket: int, max_new_tokens: int) -> int:
        return round_up(prompt_bucket + max_new_tokens, self.slot_multiple)


def default_buckets(dtype, packed_weights: bool = False) -> Buckets:
    # XLA:CPU's fast bfloat16 dot (YNNPACK) takes no matrix-vector products: a one-row
    # bf16 product falls back to converting every weight to float32, so without the packed
    # kernel a lone bf16 prompt decodes as a batch of two.
    on_cpu = jax.default_backend() == "cpu"
    bf16 = jnp.dtype(dtype) == jnp.bfloat16
    return Buckets(min_batch=2 if on_cpu and bf16 and not packed_weights else 1)


class Generator:
    """Generates from a decoder model held as (graphdef, state), placed by a `Layout`."""

    def __init__(self, graphdef, state, config, layout: ax.Layout | None = None, dtype=None,
                 buckets: Buckets | None = None, microbatches: int | None = None,
                 compiler_options: dict | None = None, packed_weights: bool | None = None):
        """`compiler_options` go to every `jax.jit` (tests lower XLA's optimisation level,
        which compiles ~2x faster on CPU). `packed_weights`: read the matmul weights through
        jaxaccel's bf16 CPU kernel (`jaxaccel.kernels`); None uses it wherever it applies."""
        self.graphdef, self.config = graphdef, config
        self.layout = layout or ax.Layout.create("data=1,model=1", "replicated")
        # On a `stage` mesh the layers run as a GPipe pipeline of `microbatches` (default: the
        # stage count) in prefill and in every decode step; each stage keeps its layers' cache.
        self.pipeline = pipeline.for_layout(self.layout, config.num_layers, microbatches)
        stages = pipeline.stage_count(self.layout) if self.pipeline else 1
        state = pipeline.pad_stacked(state, stages)  # uneven stages: identity layers
        self.cache_layers = pipeline.padded_layers(config.num_layers, stages)
        self.batch_divisor = self.layout.batch_divisor * (
            self.pipeline.microbatches if self.pipeline else 1)
        self.dtype = jnp.dtype(dtype or _param_dtype(state))
        self.packed_weights = decode_weights.wanted(self.dtype, self.layout,
                                                    self.pipeline is not None, packed_weights)
        self.buckets = buckets or default_buckets(self.dtype, self.packed_weights)
        self.state_shardings = _state_shardings(state, self.layout)
        self.state = jax.device_put(_cast(state, self.dtype), self.state_shardings)
        if self.packed_weights:  # one device: the packed arrays stay where the state is
            self.state = decode_weights.pack_state(self.state, config)
            self.state_shardings = _state_shardings(self.state, self.layout)
        self.traces = {"prefill": 0, "decode": 0}  # incremented while tracing; tests read it
        self._compiled: dict = {}
        self._jit = functools.partial(jax.jit, compiler_options=compiler_options)

    # Shardings and compiled functions, one per bucket ------------------------------------

    def _sharding(self, axes, shape) -> NamedSharding:
        return self.layout.sharding(axes, shape)

    def _cache_sharding(self, b: int, slots: int) -> NamedSharding:
        cfg = self.config
        shape = (self.cache_layers, b, cfg.num_kv_heads, slots, cfg.head_dim)
        return self._sharding(kv_cache.CACHE_AXES, shape)

    def _decode_state_shardings(self, b: int, n: int) -> DecodeState:
        replicated = NamedSharding(self.layout.mesh, PartitionSpec())
        rows = self._sharding((ax.BATCH,), (b,))
        out = self._sharding((ax.BATCH, None), (b, n))
        return DecodeState(rows, replicated, replicated, rows, rows, out, replicated, replicated)

    def _prefill_fn(self, sampling: Sampling, b: int, t: int, slots: int):
        sampling = dataclasses.replace(sampling, seed=0)  # the seed is an argument, not code
        key = ("prefill", sampling, b, t, slots)
        if key not in self._compiled:
            rows = self._sharding((ax.BATCH,), (b,))
            fn = functools.partial(self._prefill, sampling, slots)
            self._compiled[key] = self._jit(
                self._with_runner(fn), in_shardings=(self.state_shardings, self._sharding((ax.BATCH, None), (b, t)),
                                  rows, rows, None, None),
                out_shardings=(self._cache_sharding(b, slots),
                               self._decode_state_shardings(b, slots - t),
                               self._sharding((ax.BATCH, None), (b, self.config.vocab_size))))
        return self._compiled[key]

    def _step_fn(self, sampling: Sampling, loop: str, b: int, t: int, slots: int):
        sampling = dataclasses.replace(sampling, seed=0)
        key = ("decode", sampling, loop, b, t, slots)
        if key not in self._compiled:
            cache_sh, ds_sh = self._cache_sharding(b, slots), self._decode_state_shardings(b, slots - t)
            if loop == "host":
                fn = functools.partial(self._decode_step, sampling)
                in_sh = (self.state_shardings, cache_sh, ds_sh)
            else:
                fn = functools.partial(self._decode_loop, sampling)
                in_sh = (self.state_shardings, cache_sh, ds_sh, None)
            self._compiled[key] = self._jit(self._with_runner(fn), in_shardings=in_sh, out_shardings=(cache_sh, ds_sh),
                                          donate_argnums=(1,))
        return self._compiled[key]

    def _with_runner(self, fn):
        """`fn` traced with the pipeline (if any) running the model's layer scans."""
        def traced(*args):
            with layers.use_layer_runner(self.pipeline):
                return fn(*args)

        return traced

    # Traced bodies ---------------------------------------------------------------------------

    def _prefill(self, sampling, slots, state, ids_bt, pad_b, live_b, eos, key):
        self.traces["prefill"] += 1
        model = nnx.merge(self.graphdef, state)
        b, t = ids_bt.shape
        index_t = jnp.arange(t)
        positions_bt = jnp.maximum(index_t[None] - pad_b[:, None], 0)
        valid_bt = index_t[None] >= pad_b[:, None]
        mask_btt = jnp.tril(jnp.ones((t, t), bool))[None] & valid_bt[:, None, :]
        x_btd, new_kv = model(ids_bt, positions_bt, mask_btt)
        logits_bv = model.logits(x_btd[:, -1:])[:, 0]
        cfg = self.config
        cache = kv_cache.write(
            kv_cache.empty(self.cache_layers, b, cfg.num_kv_heads, slots, cfg.head_dim,
                           self.dtype),
            new_kv, 0)
        token_b = choose(logits_bv, jax.random.fold_in(key, 0), sampling)
        out_bn = jnp.zeros((b, slots - t), jnp.int32).at[:, 0].set(token_b)
        done_b = ~live_b | (token_b == eos)
        return cache, DecodeState(token_b, jnp.int32(t), jnp.int32(1), pad_b, done_b, out_bn,
                                  eos, key), logits_bv

    def _decode_step(self, sampling, state, cache, ds: DecodeState):
        self.traces["decode"] += 1
        return _step(nnx.merge(self.graphdef, state), sampling, cache, ds)

    def _decode_loop(self, sampling, state, cache, ds: DecodeState, max_new_tokens):
        self.traces["decode"] += 1
        model = nnx.merge(self.graphdef, state)

        def cond(carry):
            _, ds = carry
            return (ds.step < max_new_tokens) & ~jnp.all(ds.done_b)

        return jax.lax.while_loop(cond, lambda carry: _step(model, sampling, *carry), (cache, ds))

    # Public entry ----------------------------------------------------------------------------

    def generate(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: Sampling = GREEDY, eos_id: int | None = None,
                 on_step: Callable[[list[int | None]], None] | None = None,
                 loop: str = "auto") -> list[list[int]]:
        """New tokens for each prompt (EOS included when reached), at most `max_new_tokens`.

        `on_step`, if given, is called once per generated position with one entry per prompt:
        its new token, or None once that prompt has stopped. `loop` is "device", "host", or
        "auto": the device loop unless streaming, which needs the host loop.
        """
        self._check(prompt_ids, max_new_tokens, loop)
        rows = len(prompt_ids)
        b = self.buckets.batch(rows, self.batch_divisor)
        t = self.buckets.prompt(max(map(len, prompt_ids)))
        slots = self.buckets.slots(t, max_new_tokens)
        ids_bt, pad_b, live_b = _left_pad(prompt_ids, b, t)
        eos = jnp.int32(-1 if eos_id is None else eos_id)
        cache, ds, _ = self._prefill_fn(sampling, b, t, slots)(
            self.state, ids_bt, pad_b, live_b, eos, jax.random.key(sampling.seed))
        if on_step is None and loop in ("auto", "device"):
            cache, ds = self._step_fn(sampling, "device", b, t, slots)(self.state, cache, ds,
                                                           jnp.int32(max_new_tokens))
        else:
            step = self._step_fn(sampling, "host", b, t, slots)
            ds = self._host_loop(step, cache, ds, max_new_tokens, rows, on_step)
        return _trim(distributed.host_array(ds.out_bn)[:rows, :max_new_tokens], eos_id)

    def last_logits(self, prompt_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Float32 logits [rows, v] after each prompt: the batched, left-padded prefill."""
        self._check(prompt_ids, 1, "host")
        b = self.buckets.batch(len(prompt_ids), self.batch_divisor)
        t = self.buckets.prompt(max(map(len, prompt_ids)))
        slots = self.buckets.slots(t, 1)
        ids_bt, pad_b, live_b = _left_pad(prompt_ids, b, t)
        _, _, logits_bv = self._prefill_fn(GREEDY, b, t, slots)(
            self.state, ids_bt, pad_b, live_b, jnp.int32(-1), jax.random.key(0))
        return distributed.host_array(logits_bv)[:len(prompt_ids)]

    def _host_loop(self, step, cache, ds, max_new_tokens, rows, on_step):
        stopped = np.zeros(rows, bool)
        for i in range(1, max_new_tokens + 1):
            previous = ds
            if i < max_new_tokens:
                cache, ds = step(self.state, cache, ds)  # dispatched; runs while we stream
            if on_step is not None:
                stopped = _stream(previous, rows, stopped, on_step)
            if i % _EOS_POLL_STEPS == 0 and bool(jnp.all(previous.done_b)):
                break
        return ds

    def _check(self, prompt_ids, max_new_tokens: int, loop: str):
        if loop not in ("auto", "host", "device"):
            raise ValueError(f"loop must be 'auto', 'host' or 'device', got {loop!r}")
        if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        vocab = self.config.vocab_size
        bad = [tok for p in prompt_ids for tok in p if not 0 <= tok < vocab]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        longest = max(map(len, prompt_ids)) + max_new_tokens
        if longest > self.config.max_length:
            raise ValueError(f"prompt + max_new_tokens = {longest} tokens exceeds the model's "
                             f"maximum length {self.config.max_length}")


def _step(model, sampling: Sampling, cache: kv_cache.KVCache, ds: DecodeState):
    """Feed the last token, write its key/value at `ds.slot`, choose the next token."""
    b = ds.token_b.shape[0]
    slots_s = jnp.arange(cache.k_lbksh.shape[3])
    positions_b1 = (ds.slot - ds.pad_b)[:, None]
    cache_mask_b1s = ((slots_s[None] >= ds.pad_b[:, None]) & (slots_s[None] < ds.slot))[:, None]
    x_b1d, new_kv = model(ds.token_b[:, None], positions_b1, jnp.ones((b, 1, 1), bool), cache,
                          cache_mask_b1s)
    cache = kv_cache.write(cache, new_kv, ds.slot)
    logits_bv = model.logits(x_b1d)[:, 0]
    token_b = choose(logits_bv, jax.random.fold_in(ds.key, ds.step), sampling)
    token_b = jnp.where(ds.done_b, ds.token_b, token_b)
    out_bn = jax.lax.dynamic_update_slice(ds.out_bn, token_b[:, None], (0, ds.step))
    done_b = ds.done_b | (token_b == ds.eos)
    return cache, ds._replace(token_b=token_b, slot=ds.slot + 1, step=ds.step + 1,
                              done_b=done_b, out_bn=out_bn)


def _stream(ds: DecodeState, rows: int, stopped: np.ndarray, on_step) -> np.ndarray:
    """Report the token `ds` chose for each row; returns which rows have now stopped."""
    token_b, done_b = jax.device_get((ds.token_b, ds.done_b))
    on_step([None if stopped[r] else int(token_b[r]) for r in range(rows)])
    return stopped | done_b[:rows]


def _left_pad(prompt_ids, batch: int, length: int):
    """ids [b, t] (padding id 0), padding per row, and which rows are real prompts."""
    ids_bt = np.zeros((batch, length), np.int32)
    pad_b = np.full(batch, length - 1, np.int32)  # batch-padding rows: one token, stopped
    for row, prompt in enumerate(prompt_ids):
        ids_bt[row, length - len(prompt):] = prompt
        pad_b[row] = length - len(prompt)
    live_b = np.arange(batch) < len(prompt_ids)
    return ids_bt, pad_b, live_b


def _trim(out_bn: np.ndarray, eos_id: int | None) -> list[list[int]]:
    """Rows as lists, cut after their first EOS."""
    rows = []
    for row in out_bn.tolist():
        if eos_id is not None and eos_id in row:
            row = row[:row.index(eos_id) + 1]
        rows.append(row)
    return rows


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


def _state_shardings(state, layout: ax.Layout):
    """A NamedSharding per parameter from its logical `axes` metadata."""
    def sharding(variable):
        value = variable.get_value()
        if isinstance(value, PackedWeight):  # packed only on one device: nothing to split
            return NamedSharding(layout.mesh, PartitionSpec())
        return layout.sharding(variable.get_metadata()["axes"], value.shape)

    return jax.tree.map(sharding, state, is_leaf=_is_variable)


def _param_dtype(state):
    return next(x.dtype for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating))


def _cast(state, dtype):
    def cast(x):
        return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != dtype else x

    return jax.tree.map(cast, state)
