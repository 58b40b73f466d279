"""The fused CPU attention kernel (`jaxaccel/backends/cpu/attention.cc`) against numpy, and the
models with it in place against transformers.

The reference is float64 numpy softmax attention on the same (bf16-rounded) inputs, masked
the way the plain jnp code masks (finfo(float32).min; a row with nothing to attend to is
uniform). Builds: the native one (AVX512-BF16 on this machine), one without AVX512-BF16
instructions (its emulated dot and rounding) and the AVX2 + FMA one (`-march=x86-64-v3`,
what an AVX2-only CPU such as Zen 3 runs: 16-lane vectors as pairs of ymm registers).
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from decoder_reference import generator, load_jax, save_hf

from jaxaccel.backends import cpu
from jaxaccel.backends.cpu import attention as kernel_module
from jaxaccel.backends.cpu import build, isa
from jaxaccel.runtime.sampling import GREEDY

pytestmark = pytest.mark.cpu_only

# name -> (extra compiler flags, kernel build)
BUILDS = {"native": ((), "avx512"), "no-avx512bf16": (("-mno-avx512bf16",), "avx512"),
          "avx2": ((), "avx2")}
# (b, t, s, n, kv heads, h, mask): odd lengths, s != t, GQA 3:1 and 4:1, head dims 16-128.
CASES = [
    (2, 7, 7, 4, 4, 32, "padding"),
    (3, 37, 37, 6, 2, 64, "causal_left_pad"),
    (2, 13, 21, 4, 1, 16, "random"),
    (1, 130, 130, 2, 2, 128, "causal_left_pad"),
    (2, 128, 128, 12, 12, 32, "padding"),
    (1, 5, 40, 3, 1, 48, "random"),
]


def needs_kernel():
    if not kernel_module.cpu_supported(isa.detect()):
        pytest.fail("these tests need AVX-512 (F, BW, VL); run them on such a CPU")


def kernel_build(flags, dtype, isa_build="avx512"):
    needs_kernel()
    name = build.target(kernel_module.KERNEL_SOURCE, kernel_module.SYMBOLS[jnp.dtype(dtype)],
                        flags, isa_build)
    assert name is not None, "the kernel must build wherever the tests run (gcc is present)"
    return name


def make_mask(rng, b, t, s, kind):
    """bool [b, t, s]: BERT-style right padding, decoder-style causal + left padding, or
    random; row 0 of batch 0 always attends to nothing (uniform weights)."""
    if kind == "padding":
        lengths = rng.integers(1, s + 1, b)
        mask = np.broadcast_to(np.arange(s)[None, None] < lengths[:, None, None], (b, t, s))
    elif kind == "causal_left_pad":
        pads = rng.integers(0, t // 2, b)
        valid = np.arange(s)[None] >= pads[:, None]
        mask = np.tril(np.ones((t, s), bool))[None] & valid[:, None, :]
    else:
        mask = rng.random((b, t, s)) > 0.4
    mask = np.array(mask)
    mask[0, 0, :] = False
    return mask


def reference(q, k, v, mask):
    """float64 numpy: softmax(q k^T / sqrt(h), masked) v, kv heads shared by query groups."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    _b, _t, n, h = q.shape
    groups = n // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    scores = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(h)
    scores = np.where(mask[:, None], scores, np.finfo(np.float32).min)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    return np.einsum("bnts,bsnh->btnh", weights, v)


def operands(case, dtype, seed=0):
    b, t, s, n, kv, h, kind = case
    rng = np.random.default_rng(seed)
    np_dtype = ml_dtypes.bfloat16 if dtype == jnp.bfloat16 else np.float32
    q = (2 * rng.standard_normal((b, t, n, h))).astype(np_dtype)
    k = (2 * rng.standard_normal((b, s, kv, h))).astype(np_dtype)
    v = rng.standard_normal((b, s, kv, h)).astype(np_dtype)
    return q, k, v, make_mask(rng, b, t, s, kind)


@pytest.mark.parametrize("variant", list(BUILDS.values()), ids=list(BUILDS))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[6]}-t{c[1]}-s{c[2]}-n{c[3]}k{c[4]}-h{c[5]}"
                                              for c in CASES])
def test_kernel_matches_numpy(case, dtype, variant):
    q, k, v, mask = operands(case, dtype)
    target = kernel_build(*variant[:1], dtype, variant[1])
    out = jax.jit(kernel_module.attention, static_argnums=4)(q, k, v, mask, target)
    assert out.dtype == dtype and out.shape == q.shape
    # float32: accumulation order only; bf16: probabilities and output rounded to 8 bits.
    tolerance = 2e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(out, np.float64), reference(q, k, v, mask),
                               atol=tolerance, rtol=tolerance)


def cache_layout(x, cached):
    """The first `cached` keys or values [b, s, k, h] as a cache holds them, [b, k, s, h]."""
    return x[:, :cached].transpose(0, 2, 1, 3)


def assert_attention_over_cache(q, k, v, mask, cached, dtype, past=None, isa_build="avx512"):
    """The kernel (build `isa_build`) over the first `cached` keys/values as a cache (`past`,
    by default the plain layer) and the rest as fresh ones equals numpy over all of them."""
    if past is None:
        past = (cache_layout(k, cached), cache_layout(v, cached), mask[:, :, :cached])
    target = kernel_build((), dtype, isa_build)
    out = jax.jit(kernel_module.attention, static_argnums=4)(
        q, k[:, cached:], v[:, cached:], mask[:, :, cached:], target, past)
    tolerance = 2e-5 if dtype == jnp.float32 else 2e-2
    np.testing.assert_allclose(np.asarray(out, np.float64), reference(q, k, v, mask),
                               atol=tolerance, rtol=tolerance)


# (b, t, cached, n, kv heads, h): decode steps (t = 1) and a chunk of 3 over a cache, GQA.
CACHE_CASES = [(3, 1, 37, 4, 2, 64), (2, 1, 130, 2, 1, 32), (2, 3, 20, 6, 3, 16)]


ISA_BUILDS = pytest.mark.parametrize("isa_build", ["avx512", "avx2"])


@ISA_BUILDS
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CACHE_CASES, ids=[f"t{c[1]}-cache{c[2]}-n{c[3]}k{c[4]}-h{c[5]}"
                                                    for c in CACHE_CASES])
def test_kernel_over_a_cache_matches_numpy(case, dtype, isa_build):
    """Cached keys/values in cache layout [b, k, s, h] before the fresh ones; the cache's
    unwritten slots (past each row's length) and left padding masked, as in decoding."""
    b, t, cached, n, kv, h = case
    q, k, v, mask = operands((b, t, cached + t, n, kv, h, "random"), dtype, seed=1)
    lengths = np.random.default_rng(2).integers(1, cached + 1, b)
    mask[:, :, :cached] &= np.arange(cached)[None, None] < lengths[:, None, None]
    assert_attention_over_cache(q, k, v, mask, cached, dtype, isa_build=isa_build)


STORED = {"fp32": (jnp.float32, np.float32), "bf16": (jnp.bfloat16, ml_dtypes.bfloat16),
          "bf16-bits": (jnp.bfloat16, np.uint16)}


@ISA_BUILDS
@pytest.mark.parametrize("stored", list(STORED))
@pytest.mark.parametrize("layer", [0, 2])
def test_kernel_reads_one_layer_of_a_stacked_cache(stored, layer, isa_build):
    """A whole cache stack [l, b, k, s, h] and a layer index (`CacheLayer`, what decode steps
    hand over): the other layers hold large values, so reading any of them is caught; bf16
    also stored as its uint16 bits (the carrier before jax 0.12)."""
    dtype, np_stored = STORED[stored]
    b, t, cached, n, kv, h = 2, 1, 45, 4, 2, 32
    q, k, v, mask = operands((b, t, cached + t, n, kv, h, "random"), dtype, seed=3)
    mask[:, :, 0] = True
    stacks = []
    for x in (k, v):
        stack = np.full((3, b, kv, cached, h), 300.0, np.float32).astype(x.dtype)
        stack[layer] = cache_layout(x, cached)
        stacks.append(stack.view(np.uint16) if np_stored == np.uint16 else stack)
    past = tuple(kernel_module.CacheLayer(jnp.asarray(s_), jnp.int32(layer), jnp.dtype(dtype))
                 for s_ in stacks) + (mask[:, :, :cached],)
    assert_attention_over_cache(q, k, v, mask, cached, dtype, past, isa_build)
    # What code other than the kernel reads: the same layer, in the compute dtype.
    np.testing.assert_array_equal(np.asarray(past[0].value(), np.float32),
                                  np.asarray(cache_layout(k, cached), np.float32))


@ISA_BUILDS
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_decode_over_a_mostly_unwritten_cache_matches_numpy(dtype, isa_build):
    """A decode step in a 256-slot bucket: row 0 sees slots 0-19, row 1 (left padded) slots
    40-60, both their fresh key; the kernel skips the unseen 16-key blocks between them, and
    large values there must not leak in."""
    b, t, cached, n, kv, h = 2, 1, 256, 4, 2, 64
    q, k, v, mask = operands((b, t, cached + t, n, kv, h, "random"), dtype, seed=4)
    mask[:] = False
    mask[0, :, :20] = True
    mask[1, :, 40:61] = True
    mask[:, :, cached:] = True
    k[:, :cached][~mask[:, 0, :cached]] = 1e4
    v[:, :cached][~mask[:, 0, :cached]] = 1e4
    assert_attention_over_cache(q, k, v, mask, cached, dtype, isa_build=isa_build)


@ISA_BUILDS
def test_fully_masked_row_is_the_mean_of_the_values(isa_build):
    q, k, v, mask = operands(CASES[0], jnp.float32)
    out = kernel_module.attention(q, k, v, mask, kernel_build((), jnp.float32, isa_build))
    np.testing.assert_allclose(np.asarray(out)[0, 0], v[0].mean(0), atol=1e-5)


def lowered_attention(backend, q, k, v, mask, past=None):
    return jax.jit(lambda *a: backend.attention(*a, past)).lower(q, k, v, mask).as_text()


def test_backend_uses_the_kernel_only_where_it_applies():
    needs_kernel()
    q, k, v, mask = (jnp.asarray(x) for x in operands(CASES[1], jnp.bfloat16))
    one_device = cpu.backend().for_layout(single_device=True)
    assert "JaxaccelAttention" in lowered_attention(one_device, q, k, v, mask)
    # Several devices (XLA would gather a custom call's operands), a cache handed over as a
    # slice (it would be copied out of its stack every step), a head dim of 10.
    sharded = cpu.backend().for_layout(single_device=False)
    assert "custom_call" not in lowered_attention(sharded, q, k, v, mask)
    b, t, _n, h = q.shape
    past = (jnp.zeros((b, k.shape[2], 4, h), q.dtype),) * 2 + (jnp.ones((b, t, 4), bool),)
    assert "custom_call" not in lowered_attention(one_device, q, k, v, mask, past)
    stack = jnp.zeros((3, b, k.shape[2], 4, h), jnp.uint16)
    view = kernel_module.CacheLayer(stack, jnp.int32(1), jnp.dtype(jnp.bfloat16))
    assert "JaxaccelAttention" in lowered_attention(one_device, q, k, v, mask,
                                                    (view, view, past[2]))
    assert "custom_call" not in lowered_attention(one_device, q[..., :10], k[..., :10],
                                                  v[..., :10], mask)


def test_bert_embed_program_runs_the_kernel(minilm_ckpt):
    """MiniLM (head dim 32): tests/test_bert_parity.py then checks it against transformers."""
    needs_kernel()
    from jaxaccel.runtime.embed import Embedder
    from jaxaccel.startup.loader import plan_model
    from jaxaccel.parallel.sharding import Layout

    embedder = Embedder(plan_model(minilm_ckpt, Layout.create("data=1", "replicated"),
                                   "bfloat16"), batch_size=4)
    text = embedder.forward.jitted.lower(*embedder.abstract_args((4, 32))).as_text()
    assert "JaxaccelAttentionBf16" in text


PROMPTS = [[5, 7, 9, 11, 3], [8], [10, 20, 30, 40, 50, 60, 70, 80, 90] + list(range(15, 95, 10))]
DECODERS = {
    # head dim 32 (64 / 2)
    "gpt2": ("gpt2", "GPT2LMHeadModel", "GPT2Config", {
        "vocab_size": 101, "n_positions": 96, "n_embd": 64, "n_layer": 2, "n_head": 2,
        "bos_token_id": 1, "eos_token_id": 2}),
    # grouped-query attention 2:1, head dim 16
    "llama_gqa": ("llama", "LlamaForCausalLM", "LlamaConfig", {
        "vocab_size": 101, "hidden_size": 48, "head_dim": 16, "intermediate_size": 67,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 96,
        "bos_token_id": 1, "eos_token_id": 2}),
}


@pytest.mark.parametrize("name", sorted(DECODERS))
def test_decoder_with_kernel_matches_transformers(name, tmp_path):
    """fp32 last-position logits of left-padded batched prompts (causal + padding masks
    through the kernel, which the prefill program runs) and 8 greedy tokens after it."""
    needs_kernel()
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    family, model_class, config_class, fields = DECODERS[name]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(**fields)
    hf = getattr(transformers, model_class)(config).eval()
    gen = generator(*load_jax(family, save_hf(hf, tmp_path)))
    b, t, slots = gen.shapes([len(p) for p in PROMPTS], 8)
    prefill = gen.prefill_program(GREEDY, b, t, slots).jitted
    assert "JaxaccelAttentionF32" in prefill.lower(*gen.abstract_prefill_args(b, t)).as_text()
    # Decode steps read the stacked cache in place (the stack and a layer index go in).
    decode = gen.decode_program(GREEDY, "device", b, t, slots).jitted
    assert "JaxaccelAttentionF32" in decode.lower(
        *gen.abstract_decode_args(GREEDY, "device", b, t, slots)).as_text()
    for prompt, logits in zip(PROMPTS, gen.last_logits(PROMPTS)):
        with torch.no_grad():
            ref = hf(torch.tensor([prompt])).logits[0, -1].numpy()
        np.testing.assert_allclose(logits, ref, atol=1e-4, rtol=0)
    for prompt, tokens in zip(PROMPTS, gen.generate(PROMPTS, 8)):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                              eos_token_id=None, pad_token_id=0)
        assert tokens == ref[0, len(prompt):].tolist()
