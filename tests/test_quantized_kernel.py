"""The weight-only int8 / int4 matmul kernel (`jaxaccel.backends.cpu.quantized`) against numpy,
in both builds the CPU can run, and decoding through it against qwix's plain XLA path.

Builds: the native one (AVX512-VNNI `vpdpbusd` on this machine) and the portable C++ loop (no
AVX-512). The reference is float64 numpy: x . (q * scale), with q and scale straight from the
qwix QArray. The kernel rounds x to int16 per row (x16 = round(x / sx), sx = max|x| / 32639),
so the bound allowed is that step, sx / 2 per entry, times sum_k |w|, plus float32
accumulation. The many-rows entry point (bf16 panels) takes bf16 x as it is: float32
accumulation only.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import qwix
from decoder_reference import generator
from flax import nnx
from test_generate import CONFIG, PROMPTS
from test_packed_decode import random_bf16_model

from jaxaccel import backends
from jaxaccel.models import quantization
from jaxaccel.backends import cpu
from jaxaccel.backends.cpu import build, isa, quantized
from jaxaccel.backends.cpu.quantized import PackedQuantWeight
from jaxaccel.models import family_spec

# Device checks skip these (`-m "not cpu_only"`): the kernel is an XLA:CPU custom call.
pytestmark = pytest.mark.cpu_only

# name -> (extra compiler flags, kernel build)
BUILDS = {"native": ((), "avx512"), "avx2": ((), "avx2"),
          "portable": (("-mno-avx512f", "-mno-avx2"), "avx512")}
# (m, k, n, group): odd k and n, n not a multiple of 16, rows on both sides of the 2-row tile;
# group None = int8 per channel (int4 then uses one group over all of k).
SHAPES = [(1, 7, 5, None), (1, 768, 2304, None), (2, 97, 50, None), (3, 64, 33, 32),
          (5, 256, 100, 128), (8, 768, 130, 128), (7, 40, 161, 8), (37, 64, 70, 16)]


def kernel_build(variant):
    name = build.target(quantized.KERNEL_SOURCE, quantized.KERNEL_SYMBOL, *variant)
    assert name is not None, "the kernel must build wherever the tests run (gcc is present)"
    return name


def qarray(rng, k, n, qtype, group):
    w = rng.standard_normal((k, n)).astype(np.float32)
    tiled = {0: group} if group else None
    return qwix.quantize(jnp.asarray(w), qtype, channelwise_axes=[1], tiled_axes=tiled)


def dequantized(q):
    """float64 q * scale from the QArray's own arrays (scale rows repeated over their tile)."""
    values = np.asarray(q.qvalue.astype(jnp.int8), np.float64)
    scale = np.asarray(q.scale, np.float64)
    return values * np.repeat(scale, values.shape[0] // scale.shape[0], axis=0)


def assert_matches_float64(y, x, w64):
    x64 = np.asarray(x, np.float64)
    step = np.abs(x64).max(axis=1, keepdims=True) / 32639 / 2  # x's int16 rounding, per row
    bound = step @ np.abs(w64).sum(0, keepdims=True) + 1e-5 * (np.abs(x64) @ np.abs(w64))
    assert np.all(np.abs(np.asarray(y, np.float64) - x64 @ w64) <= bound + 1e-6)


def test_kernel_builds_on_this_machine():
    assert quantized.kernel_available()


@pytest.mark.parametrize("build_name", BUILDS)
@pytest.mark.parametrize("qtype", [jnp.int8, jnp.int4], ids=["int8", "int4"])
@pytest.mark.parametrize("m,k,n,group", SHAPES)
@pytest.mark.parametrize("x_dtype", [np.float32, ml_dtypes.bfloat16], ids=["f32", "bf16"])
def test_matmul_matches_numpy(build_name, qtype, m, k, n, group, x_dtype):
    rng = np.random.default_rng(m * 1000 + k + n)
    q = qarray(rng, k, n, qtype, group if qtype == jnp.int4 else None)
    x = rng.standard_normal((m, k)).astype(x_dtype)
    kernel = kernel_build(BUILDS[build_name])
    y = jax.jit(lambda x, w: quantized.matmul(x, w, kernel))(jnp.asarray(x), quantized.pack(q, 1))
    assert y.shape == (m, n) and y.dtype == jnp.float32
    assert_matches_float64(y, x, dequantized(q))


# Many rows (prefill), through the bf16-panel entry point: rows on both sides of its 6-row
# (one group) and 3-row (several groups) tiles, odd n, k not a multiple of the int4 step.
PANEL_SHAPES = [(1, 7, 5, None), (16, 97, 50, None), (37, 64, 70, 16), (130, 768, 130, 128),
                (512, 768, 200, 128), (20, 3072, 70, 128)]


def panels_build(variant):
    name = build.target(quantized.KERNEL_SOURCE, quantized.PANELS_SYMBOL, *variant)
    assert name is not None, "the kernel must build wherever the tests run (gcc is present)"
    return name


@pytest.mark.parametrize("build_name", BUILDS)
@pytest.mark.parametrize("qtype", [jnp.int8, jnp.int4], ids=["int8", "int4"])
@pytest.mark.parametrize("m,k,n,group", PANEL_SHAPES)
def test_panels_match_numpy(build_name, qtype, m, k, n, group):
    """bf16 x times q (exact in bf16), summed in float32, scaled per group: within float32
    accumulation of the float64 product (no x rounding beyond bf16's own)."""
    rng = np.random.default_rng(m * 1000 + k + n + 7)
    q = qarray(rng, k, n, qtype, group if qtype == jnp.int4 else None)
    x = rng.standard_normal((m, k)).astype(ml_dtypes.bfloat16)
    kernel = panels_build(BUILDS[build_name])
    y = jax.jit(lambda x, w: quantized.matmul_panels(x, w, kernel))(jnp.asarray(x),
                                                                    quantized.pack(q, 1))
    assert y.shape == (m, n) and y.dtype == jnp.float32
    x64, w64 = np.asarray(x, np.float64), dequantized(q)
    bound = 1e-5 * (np.abs(x64) @ np.abs(w64)) + 1e-6
    assert np.all(np.abs(np.asarray(y, np.float64) - x64 @ w64) <= bound)


def _custom_calls(fn, *args) -> str:
    return jax.jit(fn).lower(*args).as_text()


def test_many_bf16_rows_take_the_panels_where_the_cpu_has_bf16_dots():
    """The dispatch of `quantized.matmul`: bf16 x of `panel_rows` rows or more goes to the
    panels (on a CPU with AVX512-BF16 and VNNI), fewer rows or float32 x to VNNI."""
    q = quantized.pack(qarray(np.random.default_rng(8), 64, 40, jnp.int8, None), 1)
    threshold = quantized.panel_rows(isa.detect())
    if threshold is None:
        pytest.skip("this CPU has no AVX512-BF16 + VNNI: the panels are never chosen")
    for rows, dtype, panels in [(threshold, jnp.bfloat16, True), (threshold - 1, jnp.bfloat16, False),
                                (threshold, jnp.float32, False)]:
        text = _custom_calls(lambda x: quantized.matmul(x, q), jnp.zeros((rows, 64), dtype))
        assert (quantized.PANELS_SYMBOL in text) == panels, (rows, dtype)
        assert (f"{quantized.KERNEL_SYMBOL}_" in text) == (not panels), (rows, dtype)


def test_panel_rows_per_cpu():
    zen4 = isa.CpuInfo(flags=frozenset({"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"}))
    no_bf16 = isa.CpuInfo(flags=frozenset({"avx512f", "avx512bw", "avx512_vnni"}))
    assert quantized.panel_rows(zen4) == quantized.PANEL_ROWS
    assert quantized.panel_rows(no_bf16) is None and quantized.panel_rows(isa.CpuInfo()) is None


def test_a_zero_row_gives_zeros():
    q = qarray(np.random.default_rng(0), 64, 40, jnp.int8, None)
    y = quantized.matmul(jnp.zeros((2, 64), jnp.float32), quantized.pack(q, 1))
    assert np.array_equal(np.asarray(y), np.zeros((2, 40)))


def test_xla_dequantize_then_dot_matches_numpy():
    """`matmul_xla` (the benchmark's XLA contender) on the same packed weights."""
    rng = np.random.default_rng(5)
    q = qarray(rng, 96, 70, jnp.int4, 32)
    x = rng.standard_normal((35, 96)).astype(np.float32)
    y = quantized.matmul_xla(jnp.asarray(x), quantized.pack(q, 1))
    np.testing.assert_allclose(np.asarray(y), x.astype(np.float64) @ dequantized(q),
                               rtol=1e-4, atol=1e-4)


def test_unpack_restores_the_values_bit_for_bit():
    rng = np.random.default_rng(3)
    for qtype, group in [(jnp.int8, None), (jnp.int4, 16)]:
        q = qarray(rng, 48, 70, qtype, group)
        values = np.asarray(quantized.unpack_values(quantized.pack(q, 1)))[:48, :70]
        assert np.array_equal(values, np.asarray(q.qvalue.astype(jnp.int8)))


def test_stacked_layers_with_multi_dim_k_groups_spanning_heads():
    """wo [layers, n, h, d] contracting (n, h), int4 groups of 8 rows of the flattened k that
    span 2 heads of h = 4 (qwix scale [layers, n/2, 1, d]), read in place inside a scan."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((3, 6, 4, 10)).astype(np.float32)
    q = qwix.quantize(jnp.asarray(w), jnp.int4, channelwise_axes=[0, 3], tiled_axes={1: 2})
    assert q.scale.shape == (3, 3, 1, 10)
    stack = quantized.pack(q, 2, stacked=1)
    x = rng.standard_normal((2, 6, 4)).astype(np.float32)

    def per_layer(carry, layer):
        return carry, quantized.matmul(jnp.asarray(x), dataclasses.replace(stack, layer=layer))

    _, ys = jax.jit(lambda: jax.lax.scan(per_layer, 0, jnp.arange(3)))()
    deq = np.asarray(qwix.dequantize(q), np.float64)
    for layer in range(3):
        assert_matches_float64(ys[layer], x.reshape(2, 24), deq[layer].reshape(24, 10))


def test_transposed_head_packs_like_its_transpose():
    rng = np.random.default_rng(4)
    head_vd = qwix.quantize(jnp.asarray(rng.standard_normal((101, 48)), jnp.float32), jnp.int8,
                            channelwise_axes=[0])
    head_dv = qwix.QArray(head_vd.qvalue.T, head_vd.scale.T, None, head_vd.qtype)
    a, b = quantized.pack(head_vd, 1, transposed=True), quantized.pack(head_dv, 1)
    assert np.array_equal(np.asarray(a.lines), np.asarray(b.lines))
    assert np.array_equal(np.asarray(a.scales), np.asarray(b.scales))


def test_unsupported_quantization_is_refused_by_name():
    q = qwix.quantize(jnp.ones((8, 16)), jnp.int4, channelwise_axes=[1], tiled_axes={0: 4})
    assert "multiple of the kernel's step" in quantized.packable(q, 1)
    with pytest.raises(ValueError, match="cannot pack this quantized weight"):
        quantized.pack(q, 1)


def test_cpu_backend_hook_takes_qarrays_and_packed_weights():
    """`CpuBackend.quantized_matmul`: a plain QArray goes to the base (qwix) path, a packed one
    to the kernel; both agree with numpy."""
    rng = np.random.default_rng(6)
    w = rng.standard_normal((5, 32, 4, 6)).astype(np.float32)  # [layers, d, n, h]
    q = qwix.quantize(jnp.asarray(w[0]), jnp.int8, channelwise_axes=[1, 2])
    x = jnp.asarray(rng.standard_normal((2, 3, 32)), jnp.float32)
    reference = np.asarray(x, np.float64) @ np.asarray(qwix.dequantize(q), np.float64).reshape(
        32, 24)
    backend = cpu.backend()
    for weight in (q, quantized.pack(q, 1)):
        y = backend.quantized_matmul(x, weight, 1)
        assert y.shape == (2, 3, 4, 6)
        np.testing.assert_allclose(np.asarray(y).reshape(2, 3, 24), reference, rtol=2e-3,
                                   atol=2e-3)


def quantized_model(config, scheme):
    """The random bf16 test Llama with its block weights quantized by jaxaccel's own scheme
    (`jaxaccel.models.quantization`, qwix underneath), as a concrete state."""
    model = random_bf16_model(config)
    graphdef, state = nnx.split(model)
    _, specs = quantization.quantize_abstract(state, family_spec("llama"),
                                              quantization.Scheme.parse(scheme, 16))
    flat = []
    for path, variable in nnx.to_flat_state(state):
        spec = specs.get(".".join(map(str, path)))
        if spec is not None:
            values, scales = quantization.quantize_block(np.asarray(variable.get_value()), spec)
            variable = variable.replace(value=qwix.QArray(jnp.asarray(values), jnp.asarray(scales),
                                                          None, values.dtype))
        flat.append((path, variable))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


@pytest.fixture(scope="module", params=[("int8", "float32"), ("int4", "float32"),
                                        ("int8", "bfloat16"), ("int4", "bfloat16")],
                ids=lambda p: "-".join(p))
def pair(request):
    """(kernel generator, qwix-XLA generator) on the same quantized weights."""
    scheme, dtype = request.param
    model = quantized_model(CONFIG, scheme)
    return (generator(model, CONFIG, dtype=jnp.dtype(dtype), packed_weights=True),
            generator(model, CONFIG, dtype=jnp.dtype(dtype), packed_weights=False))


def test_decoder_quantized_weights_are_packed(pair):
    """Every quantized matmul weight is packed, except int4 wo [n, h, d] here: head_dim 6
    leaves groups of 2 k rows, which the kernel's 8-row steps cannot hold (qwix's path)."""
    kernel_gen, plain_gen = pair
    int4 = plain_gen.state["blocks"]["wq_dnh"].get_value().qtype == jnp.int4
    for name in ("wq_dnh", "wk_dkh", "wv_dkh", "wo_nhd", "wg_df", "wu_df", "wm_fd"):
        packed = not (int4 and name == "wo_nhd")
        value = kernel_gen.state["blocks"][name].get_value()
        assert isinstance(value, PackedQuantWeight if packed else qwix.QArray), name
        assert isinstance(plain_gen.state["blocks"][name].get_value(), qwix.QArray), name


def test_decoder_logits_and_greedy_tokens_match_qwix(pair):
    """float32: only x's int16 rounding differs (0.2% of the logit range allowed) and greedy
    tokens agree; bfloat16: qwix's path also rounds every dequantized weight to bfloat16 and
    the kernel does not, so logits may differ by bf16's step per layer (5% allowed), and this
    random model's near-ties let greedy tokens part after a few steps (not compared)."""
    kernel_gen, plain_gen = pair
    f32 = kernel_gen.dtype == jnp.float32
    ours, reference = kernel_gen.last_logits(PROMPTS), plain_gen.last_logits(PROMPTS)
    for row, ref in zip(ours, reference):
        assert np.abs(row - ref).max() <= (0.002 if f32 else 0.05) * np.abs(ref).max()
    if f32:
        assert kernel_gen.generate(PROMPTS, 12) == plain_gen.generate(PROMPTS, 12)


def test_plain_backend_never_sees_packed_weights():
    """Other platforms keep qwix's path: only the CPU backend packs."""
    model = quantized_model(CONFIG, "int8")
    _, state = nnx.split(model)
    plain_state, prepared = backends.Backend().prepare_decoder(
        state, dtype=jnp.bfloat16, single_device=True, requested=None)
    assert not prepared and plain_state is state
