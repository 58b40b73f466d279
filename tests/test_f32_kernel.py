"""The packed float32 matmul kernel (`f32_matmul.cc`) against float64 numpy, in every build
the CPU can run: native (AVX-512), AVX2 + FMA (`-march=x86-64-v3`) and the portable C++ loop;
packing round trips; and a float32 decoder whose weights it reads against the same decoder
on XLA's own dots.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_generate import PROMPTS
from test_packed_decode import generator_pair

from jaxaccel.backends.cpu import build, packed

pytestmark = pytest.mark.cpu_only  # XLA:CPU custom calls

# Row counts around the tiles (AVX-512: 6 rows, AVX2: 4), n not a multiple of 64, odd k.
SHAPES = [(1, 7, 5), (1, 768, 2304), (2, 97, 50), (7, 65, 130), (13, 31, 161), (64, 96, 64)]
BUILDS = {"native": ((), "avx512"), "avx2": ((), "avx2"),
          "portable": (("-mno-avx512f", "-mno-avx2"), "avx512")}


def kernel_build(variant):
    name = build.target(packed.F32_SOURCE, packed.F32_SYMBOL, *variant)
    assert name is not None, "the kernel must build wherever the tests run (gcc is present)"
    return name


def assert_matches_float64(y, x, w):
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    bound = 1e-5 * (np.abs(x64) @ np.abs(w64)).max() + 1e-6  # float32 accumulation only
    np.testing.assert_allclose(np.asarray(y, np.float64), x64 @ w64, atol=bound, rtol=0)


@pytest.mark.parametrize("build_name", BUILDS)
@pytest.mark.parametrize("m,k,n", SHAPES)
def test_matmul_matches_numpy(build_name, m, k, n):
    rng = np.random.default_rng(m * 1000 + k + n)
    x, w = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
    kernel = kernel_build(BUILDS[build_name])
    pw = packed.pack(jnp.asarray(w), 1, dtype=jnp.float32)
    y = jax.jit(lambda x, w: packed.matmul(x, w, kernel))(jnp.asarray(x), pw)
    assert y.shape == (m, n) and y.dtype == jnp.float32
    assert_matches_float64(y, x, w)


def test_stacked_layers_are_read_in_place_by_index_inside_a_scan():
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((3, 40), np.float32), rng.standard_normal((4, 40, 70), np.float32)
    stack = packed.pack(jnp.asarray(w), 1, stacked=1, dtype=jnp.float32)

    def per_layer(carry, layer):
        return carry, packed.matmul(jnp.asarray(x), dataclasses.replace(stack, layer=layer))

    _, ys = jax.jit(lambda: jax.lax.scan(per_layer, 0, jnp.arange(4)))()
    for layer in range(4):
        assert_matches_float64(ys[layer], x, w[layer])


def test_unpack_and_row_lookups_return_the_weight_exactly():
    rng = np.random.default_rng(3)
    for shape, contracting, stacked in [((7, 5), 1, 0), ((3, 33, 2, 9), 1, 1), ((4, 6, 10), 2, 0)]:
        w = rng.standard_normal(shape, np.float32)
        pw = packed.pack(jnp.asarray(w), contracting, stacked=stacked, dtype=jnp.float32)
        assert pw.lines.dtype == jnp.float32
        assert np.array_equal(np.asarray(packed.unpack(pw)), w)
    table_vd = rng.standard_normal((101, 48), np.float32)  # a tied head, [vocab, d]
    head = packed.pack(jnp.asarray(table_vd), 1, transposed=True, dtype=jnp.float32)
    ids = np.array([[0, 100, 17], [64, 63, 99]])
    assert np.array_equal(np.asarray(packed.lookup_rows(head, jnp.asarray(ids))), table_vd[ids])


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def pair(request):
    """(packed float32 generator, XLA-dot generator) on the same weights."""
    return generator_pair(request.param, jnp.float32)


def test_float32_decoder_reads_packed_weights_and_matches_xla_dots(pair):
    packed_gen, plain_gen = pair
    assert packed_gen.packed_weights and not plain_gen.packed_weights
    assert isinstance(packed_gen.state["blocks"]["wq_dnh"].get_value(), packed.PackedWeight)
    ours, reference = packed_gen.last_logits(PROMPTS), plain_gen.last_logits(PROMPTS)
    for row, ref in zip(ours, reference):
        assert np.abs(row - ref).max() <= 1e-4 * np.abs(ref).max()
    assert packed_gen.generate(PROMPTS, 12) == plain_gen.generate(PROMPTS, 12)
