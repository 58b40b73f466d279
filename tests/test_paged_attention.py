"""Ragged paged attention (`jaxaccel.backends.paged`) on every platform, against numpy.

The oracle is a float64 numpy loop over sequences (each one's cached slots read through its
page table, then its fresh keys, causal, optional window and soft cap), written from the
contract, not from the code. Checked against it: the plain-XLA version (every platform's
default), jax's own TPU reference (`ref_ragged_paged_attention`, which the XLA version must
match on jax's layout), the CPU kernel reading pages in place (float32 and bf16, the AVX-512
and AVX2 builds, pools stacked over layers), and on TPU/GPU the programs `jax.export` lowers:
the engine's step shows jax's Pallas kernel and no CPU-only op. TPU's kernel cannot run here
(its interpret mode fails inside jax on a ref reshape), GPU's runs in Pallas interpret mode.
"""

import contextlib
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxaccel import backends, models
from jaxaccel.backends import gpu, paged, tpu
from jaxaccel.backends.base import Backend

NULL = 0
# Sequences: (cached keys, new query tokens): decode rows (one over more than 16 keys, the
# CPU kernel's vector width), prefill chunks, an empty cache, a cache ending mid-page; the
# last sequence is past num_seqs (ignored).
SEQS = [(9, 1), (0, 5), (13, 3), (4, 1), (17, 1), (6, 2)]
NUM_SEQS = 5
PAGE = 5  # slots per page (odd: page boundaries fall anywhere)
WIDTH = 4  # pages per sequence in the table (null-padded)
POOL = 17


def make_case(rng, n=6, kv_heads=2, h=32, dtype=np.float32, padding_tokens=3):
    """Random queries/keys, a pool with each sequence's pages scattered in it, and the ragged
    metadata; `padding_tokens` tokens at the end belong to no sequence."""
    q_lens = [q for _, q in SEQS]
    tokens = sum(q_lens) + padding_tokens
    cu = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    kv_lens = np.array([c + q for c, q in SEQS], np.int32)
    free = list(rng.permutation(np.arange(1, POOL)))
    table = np.full((len(SEQS), WIDTH), NULL, np.int32)
    for i, (cached, new) in enumerate(SEQS):  # pages for the new tokens' slots too
        for p in range(-(-(cached + new) // PAGE)):
            table[i, p] = free.pop()

    def rand(*shape):
        return rng.standard_normal(shape).astype(np.float32).astype(dtype)

    return dict(q=rand(tokens, n, h), k=rand(tokens, kv_heads, h), v=rand(tokens, kv_heads, h),
                k_pages=rand(POOL, kv_heads, PAGE, h), v_pages=rand(POOL, kv_heads, PAGE, h),
                kv_lens=kv_lens, page_indices=table, cu_q_lens=cu,
                num_seqs=np.array([NUM_SEQS], np.int32))


def numpy_paged(case, sm_scale, sliding_window=None, soft_cap=None):
    """float64 [T, n, h]: the contract, one sequence at a time (zero rows for padding)."""
    f = {k: np.asarray(v, np.float64) for k, v in case.items() if k in ("q", "k", "v", "k_pages", "v_pages")}
    tokens, n, h = f["q"].shape
    kv_heads = f["k"].shape[1]
    out = np.zeros((tokens, n, h))
    for i in range(int(case["num_seqs"][0])):
        lo, hi = case["cu_q_lens"][i], case["cu_q_lens"][i + 1]
        cached = case["kv_lens"][i] - (hi - lo)
        slots = [(case["page_indices"][i, j // PAGE], j % PAGE) for j in range(cached)]
        keys = np.concatenate([np.stack([f["k_pages"][p, :, s] for p, s in slots]).reshape(-1, kv_heads, h)
                               if slots else np.zeros((0, kv_heads, h)), f["k"][lo:hi]])
        values = np.concatenate([np.stack([f["v_pages"][p, :, s] for p, s in slots]).reshape(-1, kv_heads, h)
                                 if slots else np.zeros((0, kv_heads, h)), f["v"][lo:hi]])
        for j in range(hi - lo):
            position = cached + j
            for head in range(n):
                kv = head // (n // kv_heads)
                scores = keys[:, kv] @ f["q"][lo + j, head] * sm_scale
                if soft_cap is not None:
                    scores = soft_cap * np.tanh(scores / soft_cap)
                key_pos = np.arange(len(scores))
                allowed = key_pos <= position
                if sliding_window is not None:
                    allowed &= key_pos > position - sliding_window
                scores = np.where(allowed, scores, -np.inf)
                weights = np.exp(scores - scores.max())
                out[lo + j, head] = weights @ values[:, kv] / weights.sum()
    return out


def owned(case):
    """Rows of tokens some sequence owns (the rest are unspecified off the CPU kernel)."""
    return slice(0, int(case["cu_q_lens"][NUM_SEQS]))


def call(fn, case, **kw):
    args = [jnp.asarray(case[k]) for k in ("q", "k", "v", "k_pages", "v_pages", "kv_lens",
                                           "page_indices", "cu_q_lens", "num_seqs")]
    return np.asarray(jax.jit(lambda *a: fn(*a, **kw))(*args).astype(jnp.float32))


SETTINGS = [dict(), dict(sliding_window=4), dict(soft_cap=2.0)]


@pytest.mark.parametrize("settings", SETTINGS, ids=["causal", "window", "soft_cap"])
@pytest.mark.parametrize("max_q_len", [None, 5])
def test_plain_xla_matches_numpy(settings, max_q_len):
    case = make_case(np.random.default_rng(0))
    scale = 32 ** -0.5
    got = call(Backend().paged_attention, case, sm_scale=scale, max_q_len=max_q_len, **settings)
    want = numpy_paged(case, scale, **settings)
    np.testing.assert_allclose(got[owned(case)], want[owned(case)], rtol=2e-5, atol=2e-5)


def test_plain_xla_matches_jax_tpu_reference():
    """jax's own reference for its TPU kernel, on its layout (combined [P, c, 2k, h] pages
    holding the fresh keys), gives what the XLA version gives on ours."""
    from jax.experimental.pallas.ops.tpu import ragged_paged_attention as rpa

    case = make_case(np.random.default_rng(1))
    kv_pages = tpu.combined_pages(*(jnp.asarray(case[k]) for k in (
        "k", "v", "k_pages", "v_pages", "kv_lens", "page_indices", "cu_q_lens", "num_seqs")))
    assert kv_pages.shape[-1] == 128  # head dim padded to the kernel's lanes
    q = jnp.pad(jnp.asarray(case["q"]), ((0, 0), (0, 0), (0, 96)))
    kw = dict(sm_scale=0.2, sliding_window=6, soft_cap=3.0)
    want = rpa.ref_ragged_paged_attention(q, kv_pages, *(jnp.asarray(case[k]) for k in (
        "kv_lens", "page_indices", "cu_q_lens", "num_seqs")), **kw)[..., :32]
    got = call(Backend().paged_attention, case, **kw)
    np.testing.assert_allclose(got[owned(case)], np.asarray(want)[owned(case)], rtol=2e-5,
                               atol=2e-5)


def test_gpu_decode_kernel_in_interpret_mode_matches_numpy():
    """jax's Pallas GPU paged attention (decode) as the GPU backend calls it, run by the
    Pallas interpreter on this CPU: one query per sequence, fresh keys written to pages."""
    if gpu.gpu_paged is None:
        pytest.skip(f"jax {jax.__version__} has no Pallas GPU paged attention")
    gpu_paged = gpu.gpu_paged
    rng = np.random.default_rng(2)
    case = make_case(rng, n=16, kv_heads=2, h=16, padding_tokens=0)
    # Decode only: every sequence one query token (T == S).
    case["cu_q_lens"] = np.arange(len(SEQS) + 1, dtype=np.int32)
    case["kv_lens"] = np.array([c + 1 for c, _ in SEQS], np.int32)
    case["q"], case["k"], case["v"] = (x[:len(SEQS)] for x in (case["q"], case["k"], case["v"]))
    interpreted = _interpret(gpu_paged)
    with interpreted:
        got = call(gpu.backend().paged_attention, case, sm_scale=0.3, max_q_len=1)
    want = numpy_paged(case, 0.3)
    np.testing.assert_allclose(got[owned(case)], want[owned(case)], rtol=1e-4, atol=1e-4)


@contextlib.contextmanager
def _interpret(module):
    """module.paged_attention with interpret=True (Pallas's interpreter, for a CPU host)."""
    original = module.paged_attention

    def interpreted(*args, **kwargs):
        return original(*args, **kwargs, interpret=True)

    module.paged_attention = interpreted
    try:
        yield
    finally:
        module.paged_attention = original


# The CPU kernel over pages ---------------------------------------------------------------------

BUILDS = {"native": ((), "avx512"), "no-avx512bf16": (("-mno-avx512bf16",), "avx512"),
          "avx2": ((), "avx2")}


def cpu_target(dtype, flags=(), isa_build="avx512"):
    from jaxaccel.backends.cpu import attention as kernel_module
    from jaxaccel.backends.cpu import build, isa

    if not kernel_module.cpu_supported(isa.detect()):
        pytest.fail("these tests need AVX-512 (F, BW, VL); run them on such a CPU")
    name = build.target(kernel_module.KERNEL_SOURCE,
                        kernel_module.PAGED_SYMBOLS[jnp.dtype(dtype)], flags, isa_build)
    assert name is not None, "the kernel must build wherever the tests run (gcc is present)"
    return name


@pytest.mark.cpu_only
@pytest.mark.parametrize("variant", list(BUILDS.values()), ids=list(BUILDS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(6, 2, 32), (4, 4, 48), (3, 1, 128)],
                         ids=["n6k2-h32", "n4k4-h48", "n3k1-h128"])
def test_cpu_kernel_over_pages_matches_numpy(shape, dtype, variant):
    """The kernel reads the pool of one layer of a stack [l, P, k, c, h] in place (as the
    engine's layer scan hands it over); padding tokens get zero rows."""
    from jaxaccel.backends.cpu import attention as kernel_module

    n, kv_heads, h = shape
    np_dtype = ml_dtypes.bfloat16 if dtype == jnp.bfloat16 else np.float32
    case = make_case(np.random.default_rng(3), n=n, kv_heads=kv_heads, h=h, dtype=np_dtype)
    layer = 1
    stacked = {k: np.stack([np.zeros_like(case[k]), case[k], np.ones_like(case[k])])
               for k in ("k_pages", "v_pages")}
    target = cpu_target(dtype, *variant)
    for settings in (dict(), dict(sliding_window=3)):
        def run(q, k, v, k_stack, v_stack, *meta):
            pages = [kernel_module.CacheLayer(x, jnp.int32(layer), jnp.dtype(dtype))
                     for x in (k_stack, v_stack)]
            return kernel_module.paged_attention(q, k, v, *pages, *meta, sm_scale=h ** -0.5,
                                                 target=target, **settings)
        got = call(run, {**case, **stacked})
        want = numpy_paged(case, h ** -0.5, **settings)
        # float32: accumulation order only; bf16: probabilities and output rounded to 8 bits.
        tolerance = 2e-5 if dtype == jnp.float32 else 2e-2
        np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance)


@pytest.mark.cpu_only
def test_cpu_backend_picks_the_kernel_and_falls_back_for_soft_cap():
    from jaxaccel.backends import cpu

    case = make_case(np.random.default_rng(4))
    backend = cpu.backend()
    args = [jnp.asarray(case[k]) for k in ("q", "k", "v", "k_pages", "v_pages", "kv_lens",
                                           "page_indices", "cu_q_lens", "num_seqs")]
    for kw, kernel in ((dict(), True), (dict(soft_cap=2.0), False)):
        text = jax.jit(lambda *a: backend.paged_attention(*a, sm_scale=0.2, **kw)).lower(
            *args).as_text()
        assert ("JaxaccelPagedAttention" in text) == kernel
        got = call(backend.paged_attention, case, sm_scale=0.2, **kw)
        np.testing.assert_allclose(got[owned(case)], numpy_paged(case, 0.2, **kw)[owned(case)],
                                   rtol=2e-5, atol=2e-5)


@pytest.mark.cpu_only
def test_cpu_kernel_refuses_a_page_outside_the_pool():
    from jaxaccel.backends.cpu import attention as kernel_module

    case = make_case(np.random.default_rng(5))
    case["page_indices"] = case["page_indices"].copy()
    case["page_indices"][0, 0] = POOL + 3
    target = cpu_target(jnp.float32)
    with pytest.raises(Exception, match="page index outside the pool"):
        call(lambda *a, **kw: kernel_module.paged_attention(*a, **kw, target=target), case,
             sm_scale=0.2)


# Engine step programs exported for another platform -----------------------------------------

LLAMA = models.family_spec("llama").config(
    vocab_size=256, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=4,
    intermediate_size=128, head_dim=8, max_position_embeddings=128, eos_token_id=3)
KERNEL_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
CPU_ONLY = ("ui16", "optimization_barrier", "jaxaccel_")


def exported_step(platform: str, bucket, config=LLAMA):
    """The StableHLO of the engine's step for `platform` on one device (bf16 Llama, GQA);
    for "cpu" the lowered (not exported) text, whose kernel target has no export guarantee."""
    from jax.sharding import AbstractDevice, AbstractMesh, use_abstract_mesh

    from jaxaccel.engine.page_pool import KVPages
    from jaxaccel.engine.step import Bucket, StepInputs, StepPrograms
    from jaxaccel.parallel.sharding import Layout
    from jaxaccel.runtime.generate import Generator
    from test_export import sharded_abstract_state

    layout = Layout.create("data=1", "dp_tp")
    graphdef, state = sharded_abstract_state("llama", config, layout)
    generator = Generator(graphdef, state, config, layout, dtype=jnp.bfloat16, platform=platform,
                          packed_weights=False)
    programs = StepPrograms(generator.runtime, generator.state_shardings)
    pages_shape = (config.num_layers, 32, config.num_kv_heads, 16, config.head_dim)
    page = jax.ShapeDtypeStruct(pages_shape, jnp.bfloat16,
                                sharding=programs.page_sharding(pages_shape))
    bucket, width = Bucket(*bucket), 4
    inputs = StepInputs.specs(bucket, width)
    if platform == "cpu":
        return programs.program(bucket, width, pages_shape).lower(
            state, KVPages(page, page), inputs).as_text()
    # Pallas's TPU lowering asks which chip; without a TPU, an abstract mesh names one.
    # (jax 0.12 wants it to be the program's mesh, axis types included.)
    mesh = layout.mesh.abstract_mesh
    chip = AbstractMesh(mesh.axis_sizes, mesh.axis_names, axis_types=mesh.axis_types,
                        abstract_device=AbstractDevice(device_kind="TPU v6 lite", num_cores=1,
                                                       platform="tpu"))
    with use_abstract_mesh(chip) if platform == "tpu" else contextlib.nullcontext():
        exported = jax.export.export(
            programs.program(bucket, width, pages_shape).jitted, platforms=[platform],
            disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(KERNEL_CALL["cuda"])])
        return exported(state, KVPages(page, page), inputs).mlir_module()


@pytest.mark.parametrize("platform,bucket,kernel", [
    # buckets: (tokens, sequences, decode)
    ("tpu", (4, 4, True), True), ("tpu", (16, 4, False), True),  # RPA: decode and prefill
    ("cuda", (4, 4, True), True), ("cuda", (16, 4, False), False),  # Pallas GPU: decode only
])
def test_engine_step_lowers_to_the_platform_kernel(platform, bucket, kernel):
    kernel = kernel and (platform != "cuda" or gpu.gpu_paged is not None)  # gone in jax 0.12
    text = exported_step(platform, bucket)
    calls = set(re.findall(r"custom_call @([\w$.]+)", text))
    assert calls == ({KERNEL_CALL[platform]} if kernel else set()), calls
    for op in CPU_ONLY:
        assert op not in text, f"{op} in a {platform} program"


@pytest.mark.cpu_only
def test_engine_step_on_cpu_reads_pages_with_the_kernel():
    """The engine's step routes attention to the CPU kernel over pages (head dim 16: the
    kernel's; LLAMA's 8 stays on the gather path)."""
    import dataclasses

    config = dataclasses.replace(LLAMA, head_dim=16)
    for bucket in ((4, 4, True), (16, 2, False)):
        assert "JaxaccelPagedAttentionBf16" in exported_step("cpu", bucket, config)
    assert "JaxaccelPagedAttention" not in exported_step("cpu", (4, 4, True))


def test_sharded_programs_keep_plain_xla():
    """Mosaic refuses automatic partitioning and a Triton call would be gathered whole: over
    several devices the TPU/GPU backends run the plain-XLA version."""
    for module in (tpu, gpu):
        assert module.backend().for_layout(single_device=False).kernels is False
        assert module.backend().for_layout(single_device=True).kernels is True
    assert isinstance(backends.for_platform("tpu"), tpu.TpuBackend)
    assert isinstance(backends.for_platform("cuda"), gpu.GpuBackend)
