"""Text generation for the decoder families: jitted prefill + decode step over a KV cache.

Shape legend as in `jaxaccel.models.layers`: b batch, t prompt (bucket) length, s cache slots,
n generated tokens, v vocab.

Layout of a batch: prompts are left-padded to a bucketed length t, so every row writes its
next key/value into the same cache slot and one `dynamic_update_slice` updates the whole
(donated) cache in place. A row's positions start at 0 after its padding and its padding is
masked out, so a batched row generates exactly what it would alone.

Compilation: prefill compiles once per (batch, prompt, cache) bucket and the decode step once
per (batch, cache) bucket; the model state is a jit argument, so new weights reuse them. A
thin user of `jaxaccel.runtime.programs`, which owns the buckets, shardings, backend and jit cache; a
`Generator` built from a `ModelPlan` (`Generator.from_plan`) compiles before the weights are
restored and takes them with `attach`.

Decode loop: without streaming it runs inside `lax.while_loop` (`loop="device"`); with a
streaming callback, on the host (one jitted step per token). Measured on CPU (GPT-2 124M):
the device loop is as fast in float32 and ~3x faster in bfloat16, because XLA hoists per-call
work on the weights out of the loop; `jaxaccel bench generate` reports both.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from jaxaccel import backends
from jaxaccel.errors import InputError
from jaxaccel.parallel import distributed, pipeline
from jaxaccel.parallel import sharding as ax
from jaxaccel.models import kv_cache
from jaxaccel.runtime.programs import (
    Buckets,
    Runtime,
    cast_state,
    param_dtype,
    placed_shardings,
    state_shardings,
)
from jaxaccel.runtime.sampling import GREEDY, Sampling, choose

# How often (in steps) the host loop asks the device whether every row has stopped: each
# question waits for the step to finish, so asking every step would serialise dispatch.
_EOS_POLL_STEPS = 8
# EOS ids travel as a fixed-length int32 vector padded with -1 (which no token equals), so the
# jitted programs keep one signature whatever the checkpoint's EOS list.
MAX_EOS_IDS = 8


class DecodeState(NamedTuple):
    token_b: jax.Array  # last chosen token
    slot: jax.Array  # cache slot (= scalar) the next token's key/value goes to
    step: jax.Array  # tokens generated so far
    pad_b: jax.Array  # left padding of each row
    done_b: jax.Array  # row has emitted EOS (or is a batch-padding row)
    out_bn: jax.Array  # generated tokens
    eos: jax.Array  # [MAX_EOS_IDS] EOS ids, padded with -1
    key: jax.Array


def eos_vector(eos_id: int | Sequence[int] | None) -> np.ndarray:
    """The EOS ids as int32 [MAX_EOS_IDS], padded with -1; ValueError for too many ids."""
    ids = eos_ids(eos_id)
    if len(ids) > MAX_EOS_IDS:
        raise ValueError(f"at most {MAX_EOS_IDS} EOS ids are supported, got {len(ids)}")
    return np.array(ids + [-1] * (MAX_EOS_IDS - len(ids)), np.int32)


def eos_ids(eos_id: int | Sequence[int] | None) -> list[int]:
    """None, one id, or a list of ids -> a list of ints (as config files write EOS)."""
    if eos_id is None:
        return []
    return [int(eos_id)] if isinstance(eos_id, int | np.integer) else [int(i) for i in eos_id]


def check_prompts(config, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int) -> None:
    """Raise InputError (a ValueError and a jaxaccel.UsageError), naming the problem, for prompts this decoder cannot run: empty,
    ids outside the vocabulary, or too long. The last new token is never fed back, so the
    rule is prompt + max_new_tokens - 1 <= the model's maximum length (as transformers).
    Needs only the config, so commands check before reading a byte of weights."""
    if not prompt_ids or any(len(p) == 0 for p in prompt_ids):
        raise InputError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    vocab = config.vocab_size
    bad = [tok for p in prompt_ids for tok in p if not 0 <= tok < vocab]
    if bad:
        raise InputError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
    longest = max(map(len, prompt_ids)) + max_new_tokens - 1
    if longest > config.max_length:
        raise InputError(f"prompt + max_new_tokens - 1 = {longest} tokens exceeds the model's "
                         f"maximum length {config.max_length}")


class Generator:
    """Generates from a decoder model held as (graphdef, state), placed by a `Layout`."""

    def __init__(self, graphdef, state, config, layout: ax.Layout | None = None, dtype=None,
                 buckets: Buckets | None = None, microbatches: int | None = None,
                 compiler_options: dict | None = None, packed_weights: bool | None = None,
                 platform: str | None = None):
        """`state` is concrete (placed here) or abstract (ShapeDtypeStructs with shardings,
        as a `ModelPlan` holds: programs compile, `attach` brings the weights).
        `compiler_options` go to every `jax.jit`. `packed_weights`: let the backend rewrite
        the weights for its decode kernels (the CPU's packed bf16 matmul); None decides.
        `platform` ("cuda", "tpu", ...) builds the programs for another platform's backend, to
        export them (`jax.export`); default: the platform of the layout's devices."""
        self.config = config
        self.runtime = rt = Runtime(graphdef, config, layout, dtype or param_dtype(state),
                                    microbatches=microbatches, compiler_options=compiler_options,
                                    backend=backends.for_platform(platform) if platform else None)
        self.layout, self.dtype, self.pipeline = rt.layout, rt.dtype, rt.pipeline
        self.cache_layers = pipeline.padded_layers(config.num_layers, rt.stages)
        self._packed_request = packed_weights
        self.state = self._place(state)
        self.packed_weights = self._prepared
        self.state_shardings = placed_shardings(self.state)
        self.buckets = buckets or Buckets(min_batch=rt.backend.min_batch(self.dtype,
                                                                         self.packed_weights))
        self.timings: dict = {}  # of the last generate: first_token_s, total_s, new_tokens

    @classmethod
    def from_plan(cls, plan, **kwargs) -> "Generator":
        """A Generator without weights yet: compile its programs, then `attach` them."""
        return cls(plan.graphdef, plan.abstract_state, plan.config, plan.layout,
                   dtype=plan.dtype, **kwargs)

    def _place(self, state):
        """Pad layer stacks to the stages, cast, place, and let the backend rewrite."""
        rt = self.runtime
        abstract = isinstance(jax.tree.leaves(state)[0], jax.ShapeDtypeStruct)
        if not abstract:
            state = pipeline.pad_stacked(state, rt.stages)  # uneven stages: identity layers
            state = jax.device_put(cast_state(state, self.dtype), state_shardings(state, rt.layout))
        state, self._prepared = rt.backend.prepare_decoder(
            state, dtype=self.dtype, single_device=rt.single_device, requested=self._packed_request)
        return state

    def attach(self, loaded) -> "Generator":
        """Give a plan-built Generator its restored weights (same layout and dtype)."""
        self.state = self._place(loaded.state)
        return self

    @property
    def traces(self) -> dict:
        """How often prefill and decode were traced (tests check that nothing retraces)."""
        return dict(self.runtime.traces)

    # Shardings and programs, one per bucket -------------------------------------------------

    def _cache_sharding(self, b: int, slots: int) -> NamedSharding:
        cfg = self.config
        shape = (self.cache_layers, b, cfg.num_kv_heads, slots, cfg.head_dim)
        return self.runtime.sharding(kv_cache.CACHE_AXES, shape)

    def _decode_state_shardings(self, b: int, n: int) -> DecodeState:
        replicated = self.runtime.replicated()
        rows = self.runtime.sharding((ax.BATCH,), (b,))
        out = self.runtime.sharding((ax.BATCH, None), (b, n))
        return DecodeState(rows, replicated, replicated, rows, rows, out, replicated, replicated)

    def prefill_program(self, sampling: Sampling, b: int, t: int, slots: int):
        """The Program (state, ids [b, t], pad [b], live [b], eos, key) -> (cache, decode
        state, last logits [b, v]) for one bucket."""
        sampling = dataclasses.replace(sampling, seed=0)  # the seed is an argument, not code
        rt = self.runtime
        rows = rt.sharding((ax.BATCH,), (b,))
        return rt.program(
            ("prefill", sampling, b, t, slots), functools.partial(self._prefill, sampling, slots),
            in_shardings=(self.state_shardings, rt.sharding((ax.BATCH, None), (b, t)), rows,
                          rows, None, None),
            out_shardings=(self._cache_sharding(b, slots),
                           self._decode_state_shardings(b, slots - t),
                           rt.sharding((ax.BATCH, None), (b, self.config.vocab_size))))

    def decode_program(self, sampling: Sampling, loop: str, b: int, t: int, slots: int):
        """The decode Program: one step (`loop="host"`) or the whole loop on the device."""
        sampling = dataclasses.replace(sampling, seed=0)
        cache_sh, ds_sh = self._cache_sharding(b, slots), self._decode_state_shardings(b, slots - t)
        if loop == "host":
            fn, in_sh = functools.partial(self._decode_step, sampling), (self.state_shardings,
                                                                          cache_sh, ds_sh)
        else:
            fn = functools.partial(self._decode_loop, sampling)
            in_sh = (self.state_shardings, cache_sh, ds_sh, None)
        return self.runtime.program(("decode", sampling, loop, b, t, slots), fn,
                                    in_shardings=in_sh, out_shardings=(cache_sh, ds_sh),
                                    donate_argnums=(1,))

    def shapes(self, prompt_lengths: Sequence[int], max_new_tokens: int) -> tuple[int, int, int]:
        """The (batch, prompt, slots) bucket prompts of these lengths run in."""
        b = self.buckets.batch(len(prompt_lengths), self.runtime.batch_divisor)
        t = self.buckets.length(max(prompt_lengths))
        return b, t, self.buckets.slots(t, max_new_tokens)

    def abstract_prefill_args(self, b: int, t: int) -> tuple:
        """ShapeDtypeStructs of the prefill program's arguments at bucket (b, t)."""
        rows = jax.ShapeDtypeStruct((b,), jnp.int32)
        return (self.state, jax.ShapeDtypeStruct((b, t), jnp.int32), rows,
                jax.ShapeDtypeStruct((b,), jnp.bool_),
                jax.ShapeDtypeStruct((MAX_EOS_IDS,), jnp.int32),
                jax.eval_shape(lambda: jax.random.key(0)))

    def abstract_decode_args(self, sampling: Sampling, loop: str, b: int, t: int,
                             slots: int) -> tuple:
        """ShapeDtypeStructs (with shardings) of the decode program's arguments."""
        prefill = self.prefill_program(sampling, b, t, slots)
        cache, ds, _ = jax.eval_shape(prefill.jitted, *self.abstract_prefill_args(b, t))
        cache_sh, ds_sh = self._cache_sharding(b, slots), self._decode_state_shardings(b, slots - t)
        with_sharding = lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)  # noqa: E731
        args = (self.state, jax.tree.map(with_sharding, cache, type(cache)(*[cache_sh] * 2)),
                jax.tree.map(with_sharding, ds, ds_sh))
        return args + ((jax.ShapeDtypeStruct((), jnp.int32),) if loop == "device" else ())

    def compile(self, prompt_lengths: Sequence[int], max_new_tokens: int,
                sampling: Sampling = GREEDY, loop: str = "device") -> None:
        """Compile prefill and the decode program (`loop`: "device" or "host") for this
        bucket ahead of time."""
        b, t, slots = self.shapes(prompt_lengths, max_new_tokens)
        self.prefill_program(sampling, b, t, slots).compile(*self.abstract_prefill_args(b, t))
        self.decode_program(sampling, loop, b, t, slots).compile(
            *self.abstract_decode_args(sampling, loop, b, t, slots))

    def prefill_memory_analysis(self, batch: int, prompt: int, slots: int):
        """XLA's memory analysis of the prefill program at exactly this bucket."""
        return self.prefill_program(GREEDY, batch, prompt, slots).memory_analysis(
            *self.abstract_prefill_args(batch, prompt))

    # Traced bodies ---------------------------------------------------------------------------

    def _prefill(self, sampling, slots, state, ids_bt, pad_b, live_b, eos, key):
        model = self.runtime.model(state)
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
        done_b = ~live_b | jnp.isin(token_b, eos)
        return cache, DecodeState(token_b, jnp.int32(t), jnp.int32(1), pad_b, done_b, out_bn,
                                  eos, key), logits_bv

    def _decode_step(self, sampling, state, cache, ds: DecodeState):
        return _step(self.runtime.model(state), sampling, cache, ds)

    def _decode_loop(self, sampling, state, cache, ds: DecodeState, max_new_tokens):
        model = self.runtime.model(state)

        def cond(carry):
            _, ds = carry
            return (ds.step < max_new_tokens) & ~jnp.all(ds.done_b)

        return jax.lax.while_loop(cond, lambda carry: _step(model, sampling, *carry), (cache, ds))

    # Public entry ----------------------------------------------------------------------------

    def generate(self, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int,
                 sampling: Sampling = GREEDY, eos_id: int | Sequence[int] | None = None,
                 on_step: Callable[[list[int | None]], None] | None = None,
                 loop: str = "auto") -> list[list[int]]:
        """New tokens for each prompt (EOS included when reached), at most `max_new_tokens`.

        `eos_id`: one id, a list of at most MAX_EOS_IDS ids (a row stops on any of them), or
        None. Raises ValueError for prompts `check_prompts` refuses.

        `on_step`, if given, is called once per generated position with one entry per prompt:
        its new token, or None once that prompt has stopped. `loop` is "device", "host", or
        "auto": the device loop unless streaming, which needs the host loop.
        """
        self._check(prompt_ids, max_new_tokens, loop)
        rows = len(prompt_ids)
        b, t, slots = self.shapes([len(p) for p in prompt_ids], max_new_tokens)
        ids_bt, pad_b, live_b = _left_pad(prompt_ids, b, t)
        eos = jnp.asarray(eos_vector(eos_id))
        start = time.perf_counter()
        cache, ds, _ = self.prefill_program(sampling, b, t, slots)(
            self.state, ids_bt, pad_b, live_b, eos, jax.random.key(sampling.seed))
        # Waiting for the first token costs nothing measurable (decode needs it anyway) and
        # gives the time to first token.
        jax.block_until_ready(ds.token_b)
        self.timings = {"first_token_s": time.perf_counter() - start}
        if on_step is None and loop in ("auto", "device"):
            cache, ds = self.decode_program(sampling, "device", b, t, slots)(
                self.state, cache, ds, jnp.int32(max_new_tokens))
        else:
            step = self.decode_program(sampling, "host", b, t, slots)
            ds = self._host_loop(step, cache, ds, max_new_tokens, rows, on_step)
        new = _trim(distributed.host_array(ds.out_bn)[:rows, :max_new_tokens], eos_ids(eos_id))
        self.timings["total_s"] = time.perf_counter() - start
        self.timings["new_tokens"] = sum(map(len, new))
        return new

    def last_logits(self, prompt_ids: Sequence[Sequence[int]]) -> np.ndarray:
        """Float32 logits [rows, v] after each prompt: the batched, left-padded prefill."""
        self._check(prompt_ids, 1, "host")
        b, t, slots = self.shapes([len(p) for p in prompt_ids], 1)
        ids_bt, pad_b, live_b = _left_pad(prompt_ids, b, t)
        _, _, logits_bv = self.prefill_program(GREEDY, b, t, slots)(
            self.state, ids_bt, pad_b, live_b, jnp.asarray(eos_vector(None)),
            jax.random.key(0))
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
        if isinstance(jax.tree.leaves(self.state)[0], jax.ShapeDtypeStruct):
            raise RuntimeError("this Generator was built from a plan: attach() the weights first")
        check_prompts(self.config, prompt_ids, max_new_tokens)


def _step(model, sampling: Sampling, cache: kv_cache.KVCache, ds: DecodeState):
    """Feed the last token, write its key/value at `ds.slot`, choose the next token."""
    b = ds.token_b.shape[0]
    slots_s = jnp.arange(cache.k_lbksh.shape[3])
    positions_b1 = (ds.slot - ds.pad_b)[:, None]
    cache_mask_b1s = ((slots_s[None] >= ds.pad_b[:, None]) & (slots_s[None] < ds.slot))[:, None]
    x_b1d, new_kv = model(ds.token_b[:, None], positions_b1, jnp.ones((b, 1, 1), bool), cache,
                          cache_mask_b1s, cache_positions_bs=slots_s[None] - ds.pad_b[:, None])
    cache = kv_cache.write(cache, new_kv, ds.slot)
    logits_bv = model.logits(x_b1d)[:, 0]
    token_b = choose(logits_bv, jax.random.fold_in(ds.key, ds.step), sampling)
    token_b = jnp.where(ds.done_b, ds.token_b, token_b)
    out_bn = jax.lax.dynamic_update_slice(ds.out_bn, token_b[:, None], (0, ds.step))
    done_b = ds.done_b | jnp.isin(token_b, ds.eos)
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


def _trim(out_bn: np.ndarray, eos: list[int]) -> list[list[int]]:
    """Rows as lists, cut after their first token that is any of the EOS ids."""
    rows = []
    for row in out_bn.tolist():
        stop = next((i for i, tok in enumerate(row) if tok in eos), None)
        rows.append(row if stop is None else row[:stop + 1])
    return rows
