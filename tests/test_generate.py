"""Generation mechanics: batching, EOS, streaming, sampling, retracing, and sharding.

A small random Llama-family model (8 heads over 2 KV heads) stands in for a checkpoint; the
parity of these paths with transformers is in test_gpt2.py and test_llama.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decoder_reference import generator

from jaxaccel.parallel import sharding as ax
from jaxaccel.models import kv_cache, llama
from jaxaccel.models.state import abstract_model
from jaxaccel.parallel.params import fill_state, param_specs
from jaxaccel.runtime.sampling import Sampling, choose

CONFIG = llama.Config(vocab_size=101, hidden_size=48, num_layers=2, num_heads=8, num_kv_heads=2,
                      intermediate_size=72, head_dim=6, max_position_embeddings=128,
                      rope_theta=1000.0)
PROMPTS = [[5, 7, 9, 11, 3, 4, 6], [8], [10, 20, 30, 40, 50, 60, 70, 80, 90, 15, 25, 35, 45]]


def random_model():
    """Random weights, drawn in numpy (eager nnx init compiles every op and is slow)."""
    from flax import nnx

    graphdef, state = abstract_model("llama", CONFIG)
    rng = np.random.default_rng(0)
    arrays = {path: (0.3 * rng.standard_normal(spec.shape)).astype(np.float32)
              for path, spec in param_specs(state).items()}
    return nnx.merge(graphdef, fill_state(state, arrays))


@pytest.fixture(scope="module")
def gen():
    return generator(random_model(), CONFIG)


@pytest.fixture(scope="module")
def greedy(gen):
    return gen.generate(PROMPTS, 24)  # default without streaming: the device while-loop


def test_batched_prompts_of_different_lengths_equal_each_alone(gen, greedy):
    assert [len(tokens) for tokens in greedy] == [24] * 3
    for prompt, tokens in zip(PROMPTS, greedy):
        assert gen.generate([prompt], 24) == [tokens]


def test_repeated_calls_in_a_bucket_do_not_retrace(gen, greedy):
    before = dict(gen.traces)
    gen.generate(PROMPTS, 24)
    gen.generate([[4, 4], [9, 9, 9], [1]], 20)  # same (batch, prompt, cache) bucket
    assert gen.traces == before


def test_host_loop_equals_device_while_loop(gen, greedy):
    assert gen.generate(PROMPTS, 24, loop="host") == greedy


def test_eos_stops_each_row_at_its_first_eos(gen, greedy):
    eos = greedy[0][5]
    out = gen.generate(PROMPTS, 24, eos_id=eos)
    for tokens, full in zip(out, greedy):
        expected = full[:full.index(eos) + 1] if eos in full else full
        assert tokens == expected
    assert gen.generate(PROMPTS, 24, eos_id=eos, loop="host") == out


def test_streaming_reports_every_token_once(gen, greedy):
    eos = greedy[0][5]
    steps = []
    out = gen.generate(PROMPTS, 24, eos_id=eos, on_step=steps.append)
    streamed = [[step[row] for step in steps if step[row] is not None] for row in range(3)]
    assert streamed == out


def test_sampling_is_seeded_and_a_new_seed_does_not_recompile(gen, greedy):
    hot = Sampling(temperature=1.0, seed=3)
    first = gen.generate(PROMPTS, 24, sampling=hot)
    traces = dict(gen.traces)
    assert gen.generate(PROMPTS, 24, sampling=hot) == first
    assert gen.generate(PROMPTS, 24, sampling=Sampling(temperature=1.0, seed=4)) != first
    assert gen.traces == traces
    # top-k 1 leaves only the argmax: sampling reduces to greedy.
    assert gen.generate(PROMPTS, 24, sampling=Sampling(temperature=0.7, top_k=1)) == greedy


def test_top_k_and_top_p_keep_the_expected_tokens():
    logits_bv = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]]))
    keys = jax.random.split(jax.random.key(0), 200)

    def support(sampling):
        draws = jax.vmap(lambda key: choose(logits_bv, key, sampling))(keys)
        return [sorted(set(np.asarray(draws[:, row]).tolist())) for row in range(2)]

    assert support(Sampling(temperature=1.0, top_k=2)) == [[0, 1], [2, 3]]
    # Mass before token: 0, 0.5, 0.8, 0.95 -> top_p=0.6 keeps the first two, 0.85 three.
    assert support(Sampling(temperature=1.0, top_p=0.6)) == [[0, 1], [2, 3]]
    assert support(Sampling(temperature=1.0, top_p=0.85)) == [[0, 1, 2], [1, 2, 3]]
    assert support(Sampling(temperature=1.0, top_p=1e-6)) == [[0], [3]]


def test_too_long_or_bad_prompts_are_refused(gen):
    with pytest.raises(ValueError, match="maximum length"):
        gen.generate([[1] * 100], 40)
    with pytest.raises(ValueError, match="vocabulary"):
        gen.generate([[1, 101]], 4)
    with pytest.raises(ValueError, match="at least one token"):
        gen.generate([[]], 4)


@pytest.mark.parametrize("mesh, rules", [("model=8", "tp"), ("data=4,model=2", "dp_tp")])
@pytest.mark.cpu_only  # meshes of 8 simulated CPU devices (XLA_FLAGS in conftest.py)
def test_sharded_generation_equals_single_device(mesh, rules, greedy):
    assert jax.device_count() >= 8, "tests/conftest.py should simulate 8 devices"
    layout = ax.Layout.create(mesh, rules)
    gen = generator(random_model(), CONFIG, layout=layout)
    assert gen.generate(PROMPTS, 24) == greedy
    # Heads split over `model`; the cache follows the KV heads where they divide the mesh.
    assert gen.state.blocks.wq_dnh.sharding.spec == ax.logical_to_spec(
        (ax.LAYERS, ax.EMBED, ax.HEADS, ax.HEAD_DIM), gen.state.blocks.wq_dnh.shape, layout.mesh,
        layout.rules)
    spec = gen._cache_sharding(4, 64).spec
    cache_spec = tuple(spec) + (None,) * (5 - len(spec))
    assert cache_spec[2] == ("model" if layout.mesh.shape["model"] <= CONFIG.num_kv_heads else None)
    assert cache_spec[1] == ("data" if layout.mesh.shape["data"] > 1 else None)
    assert kv_cache.CACHE_AXES[2] == ax.KV_HEADS


def test_cpu_greedy_argmax_matches_numpy():
    """The CPU backend's two-reduction argmax (what greedy decoding calls there) picks what
    numpy's argmax picks: the first of tied maxima, the first NaN, an all -inf row's 0."""
    import jax
    import numpy as np

    from jaxaccel.backends import cpu

    logits = np.random.default_rng(5).standard_normal((6, 50304)).astype(np.float32)
    logits[1, [10, 700]] = 9.0
    logits[2, [5, 600]] = np.nan
    logits[3] = -np.inf
    logits[4, [3, 50303]] = np.inf
    logits[5, 50303] = 20.0
    got = jax.jit(cpu.backend().argmax)(logits)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(got), np.argmax(logits, axis=-1))
