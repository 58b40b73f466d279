"""The packed bf16 matmul kernel against numpy, in every build the CPU can run.

Builds: the native one (AVX512-BF16 `vdpbf16ps` on this machine), an AVX-512F one without
BF16 instructions, the AVX2 + FMA build (`-march=x86-64-v3`, bf16 widened in registers) and
the portable C++ loop (no AVX-512, no AVX2). The reference is float64
numpy on the same bfloat16 inputs, so only float32 accumulation error is allowed.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from jaxaccel.backends.cpu import build, packed

# Device checks skip these (`-m "not cpu_only"`): they need the C++ kernels are XLA:CPU custom
# calls.
pytestmark = pytest.mark.cpu_only

# Odd k, n not a multiple of 16, row counts on both sides of the 8-row register tile.
# (AVX2 tiles: 4 rows, the rest 1-3 rows: 7 = 4 + 3, 6 = 4 + 2.)
SHAPES = [(1, 7, 5), (1, 768, 3072), (2, 97, 50), (8, 64, 33), (9, 130, 100), (17, 31, 161),
          (7, 65, 40), (6, 33, 129)]
# name -> (extra compiler flags, kernel build)
BUILDS = {"native": ((), "avx512"), "avx512f": (("-mno-avx512bf16",), "avx512"),
          "avx2": ((), "avx2"), "portable": (("-mno-avx512f", "-mno-avx2"), "avx512")}


def kernel_build(variant):
    name = build.target(packed.KERNEL_SOURCE, packed.KERNEL_SYMBOL, *variant)
    assert name is not None, "the kernel must build wherever the tests run (gcc is present)"
    return name


def bf16_normal(rng, shape):
    return rng.standard_normal(shape).astype(ml_dtypes.bfloat16)


def assert_matches_float64(y, x, w):
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    bound = 1e-5 * (np.abs(x64) @ np.abs(w64)).max() + 1e-6  # float32 accumulation only
    np.testing.assert_allclose(np.asarray(y, np.float64), x64 @ w64, atol=bound, rtol=0)


def test_kernel_builds_on_this_machine():
    assert packed.kernel_available()


@pytest.mark.parametrize("build_name", BUILDS)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_matmul_matches_numpy(build_name, m, k, n):
    rng = np.random.default_rng(m * 1000 + k + n)
    x, w = bf16_normal(rng, (m, k)), bf16_normal(rng, (k, n))
    kernel = kernel_build(BUILDS[build_name])
    y = jax.jit(lambda x, w: packed.matmul(x, w, kernel))(jnp.asarray(x), packed.pack(w, 1))
    assert y.shape == (m, n) and y.dtype == jnp.float32
    assert_matches_float64(y, x, w)


def test_stacked_layers_are_read_in_place_by_index_inside_a_scan():
    rng = np.random.default_rng(1)
    x, w = bf16_normal(rng, (3, 40)), bf16_normal(rng, (4, 40, 24))
    stack = packed.pack(jnp.asarray(w), 1, stacked=1)

    def per_layer(carry, layer):
        return carry, packed.matmul(jnp.asarray(x), dataclasses.replace(stack, layer=layer))

    _, ys = jax.jit(lambda: jax.lax.scan(per_layer, 0, jnp.arange(4)))()
    for layer in range(4):
        assert_matches_float64(ys[layer], x, w[layer])


def test_multi_dim_contraction_and_output_shapes():
    """[b, t, n, h] x [n, h, d] (an attention output projection) and back into heads."""
    rng = np.random.default_rng(2)
    a, w = bf16_normal(rng, (2, 3, 4, 6)), bf16_normal(rng, (4, 6, 10))
    y = packed.matmul(jnp.asarray(a), packed.pack(jnp.asarray(w), contracting=2))
    assert y.shape == (2, 3, 10)
    assert_matches_float64(np.asarray(y).reshape(6, 10), a.reshape(6, 24), w.reshape(24, 10))
    w_in = bf16_normal(rng, (10, 4, 6))
    y_in = packed.matmul(jnp.asarray(a.reshape(6, 24)[:, :10]), packed.pack(jnp.asarray(w_in), 1))
    assert y_in.shape == (6, 4, 6)


def test_unpack_restores_the_weight_bit_for_bit():
    rng = np.random.default_rng(3)
    for shape, contracting, stacked in [((7, 5), 1, 0), ((3, 33, 2, 9), 1, 1), ((4, 6, 10), 2, 0)]:
        w = bf16_normal(rng, shape)
        restored = packed.unpack(packed.pack(jnp.asarray(w), contracting, stacked=stacked))
        assert np.array_equal(np.asarray(restored).view(np.uint16), w.view(np.uint16))


def test_transposed_head_packs_alike_and_serves_row_lookups():
    """A Hugging Face head [v, d] packs to the same lines as its [d, v] transpose, and its
    rows (the tied token embedding) are gathered straight from the packed lines."""
    rng = np.random.default_rng(4)
    table_vd = bf16_normal(rng, (101, 48))
    head = packed.pack(jnp.asarray(table_vd), 1, transposed=True)
    plain = packed.pack(jnp.asarray(table_vd.T.copy()), 1)
    assert np.array_equal(np.asarray(head.lines), np.asarray(plain.lines))
    ids = np.array([[0, 100, 17], [16, 15, 99]])
    rows = packed.lookup_rows(head, jnp.asarray(ids))
    assert np.array_equal(np.asarray(rows).view(np.uint16), table_vd[ids].view(np.uint16))


def test_wrong_contraction_size_is_a_clear_error():
    w = packed.pack(jnp.zeros((8, 16), jnp.bfloat16), 1)
    with pytest.raises(ValueError, match=r"does not end in the packed weight's k dims \(8,\)"):
        packed.matmul(jnp.zeros((2, 9), jnp.bfloat16), w)


def test_a_stack_without_a_layer_index_is_refused():
    w = packed.pack(jnp.zeros((2, 8, 16), jnp.bfloat16), 1, stacked=1)
    with pytest.raises(ValueError, match="stack"):
        packed.matmul(jnp.zeros((1, 8), jnp.bfloat16), w)


def test_a_failed_build_falls_back_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    build.target.cache_clear()
    try:
        with pytest.warns(UserWarning, match="falling back to plain XLA"):
            assert build.target(packed.KERNEL_SOURCE, packed.KERNEL_SYMBOL) is None
    finally:
        monkeypatch.undo()
        build.target.cache_clear()
    assert packed.kernel_available()
