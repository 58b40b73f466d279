"""The GPipe schedule over `stage` (jaxaccel.parallel.pipeline): equal to the plain layer scan.

Uses 8 simulated CPU devices (tests/conftest.py). Odd sizes (3 or 5 layers, 7 features) so
padding and shape bugs show.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxaccel.parallel import pipeline
from jaxaccel.parallel import sharding as ax
from jaxaccel.models import layers

# Device checks skip these (`-m "not cpu_only"`): they need meshes of up to 8 simulated CPU
# devices (XLA_FLAGS in conftest.py).
pytestmark = pytest.mark.cpu_only


class Toy(nnx.Module):
    """A stack of residual tanh layers: enough to see every layer's order and identity."""

    def __init__(self, num_layers: int, d: int = 7):
        rngs = nnx.Rngs(0)
        self.w_dd = layers.make_param(rngs, (d, d), (ax.EMBED, ax.MLP), jnp.float32,
                                      layers.normal_init(0.5), num_layers)

    def __call__(self, x_bd, scale_b, extra_lbd=None):
        def body(block, carry, extra_bd):
            x, s = carry
            y = x + s[:, None] * jnp.tanh(x @ block.w_dd[...])
            if extra_bd is not None:
                y = y + extra_bd
            return (y, s), 2.0 * y  # per-layer output [b, d], like a KV cache write

        return layers.scan_layers(self, (x_bd, scale_b), body, extra_lbd)


def _inputs(batch=8, d=7, num_layers=5):
    key = jax.random.split(jax.random.key(1), 3)
    return (jax.random.normal(key[0], (batch, d)), jax.random.uniform(key[1], (batch,)),
            jax.random.normal(key[2], (num_layers, batch, d)))


@pytest.mark.parametrize("num_layers,mesh,microbatches", [
    (4, "stage=2", 1), (4, "stage=2", 4), (3, "stage=2", 2),  # 3 layers on 2 stages: padded
    (5, "stage=4,data=2", 2), (5, "stage=2,model=2,data=2", 4), (3, "stage=8", 8),
])
def test_schedule_equals_plain_scan(num_layers, mesh, microbatches):
    model = Toy(num_layers)
    x, s, extra = _inputs(num_layers=num_layers)
    (want_x, _), want_y = jax.jit(lambda m, *a: m(*a))(model, x, s, extra)
    runner = pipeline.Pipeline(ax.make_mesh(mesh), num_layers, microbatches)

    @jax.jit
    def piped(m, *a):
        with layers.use_layer_runner(runner):
            return m(*a)

    (got_x, got_s), got_y = piped(model, x, s, extra)
    np.testing.assert_allclose(got_x, want_x, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got_s, s)  # carried pass-through values come back in order
    assert got_y.shape == want_y.shape == (num_layers, 8, 7)
    np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-5)


def test_zero_padded_layers_are_identities():
    """A stack stored padded (as the loader does for uneven stages) skips the extra layers."""
    model, padded = Toy(3), Toy(4)
    padded.w_dd[...] = jnp.concatenate([model.w_dd[...], jnp.zeros((1, 7, 7))])
    x, s, _ = _inputs()
    runner = pipeline.Pipeline(ax.make_mesh("stage=4"), num_layers=3, microbatches=2)
    with layers.use_layer_runner(runner):
        (got, _), ys = padded(x, s)
    (want, _), _ = model(x, s)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert ys.shape[0] == 4  # per-layer outputs follow the stack the caller passed


def test_one_program_with_ppermute_and_no_param_gather():
    """Activations move by collective-permute; stage-sharded weights are never all-gathered."""
    mesh = ax.make_mesh("stage=4,data=2")
    model = Toy(4, d=8)
    w = jax.device_put(model.w_dd[...], jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("stage")))
    model.w_dd[...] = w
    x, s, _ = _inputs(d=8, num_layers=4)
    runner = pipeline.Pipeline(mesh, 4, microbatches=4)

    def piped(m, *a):
        with layers.use_layer_runner(runner):
            return m(*a)

    hlo = jax.jit(piped).lower(model, x, s).compile().as_text()
    assert "collective-permute" in hlo
    assert "all-gather" not in hlo


def test_bad_microbatch_count_names_the_batch():
    runner = pipeline.Pipeline(ax.make_mesh("stage=2"), 4, microbatches=3)
    x, s, _ = _inputs()
    with pytest.raises(pipeline.PipelineError, match="8 rows .* 3 microbatches"):
        with layers.use_layer_runner(runner):
            Toy(4)(x, s)


def test_bubble_fraction_and_padding():
    runner = pipeline.Pipeline(ax.make_mesh("stage=4"), 32, microbatches=8)
    assert runner.steps == 11 and runner.bubble_fraction() == pytest.approx(3 / 11)
    assert pipeline.padded_layers(32, 3) == 33 and pipeline.padded_layers(6, 8) == 8
    assert pipeline.for_layout(ax.Layout.create("model=2", "dp_tp_pp"), 6) is None
    assert pipeline.for_layout(ax.Layout.create("stage=2", "dp_tp"), 6) is None  # layers not on stage
    assert pipeline.for_layout(ax.Layout.create("stage=2", "pp"), 6).microbatches == 2


MESHES = [("stage=2,model=2,data=2", "dp_tp_pp", None), ("stage=4,data=2", "pp", None),
          ("stage=8", "pp", None), ("stage=4,data=2", "dp_tp_pp", 8)]
SENTENCES = ["A man is eating food.", "Short.", "ünïcödé and emoji 🙂 tokenise too",
             "The quick brown fox jumps over the lazy dog, twice, and then sleeps for a while."]


@pytest.fixture(scope="module")
def minilm_single(minilm_ckpt):
    from jaxaccel.runtime.embed import Embedder
    from jaxaccel.startup.loader import load_model

    return Embedder(load_model(minilm_ckpt), batch_size=8).embed_texts(SENTENCES)[0]


@pytest.mark.parametrize("mesh,rules,microbatches", MESHES)
def test_minilm_pipelined_equals_single_device(minilm_ckpt, minilm_single, mesh, rules,
                                               microbatches):
    from jaxaccel.runtime.embed import Embedder
    from jaxaccel.startup.loader import load_model
    from jaxaccel.parallel.sharding import Layout

    layout = Layout.create(mesh, rules)
    loaded = load_model(minilm_ckpt, layout)
    # MiniLM has 6 layers: on 4 or 8 stages the stack is padded to 8, each stage reading only
    # its own layers, so one process reads every checkpoint byte exactly once.
    assert loaded.stats.bytes_read == loaded.manifest.total_bytes
    wq = loaded.state["blocks"]["wq_dnh"][...]
    stages = layout.mesh.shape["stage"]
    assert wq.shape[0] == pipeline.padded_layers(6, stages)
    assert wq.sharding.is_equivalent_to(layout.sharding(("layers", "embed", "heads", "head_dim"),
                                                        wq.shape), wq.ndim)
    embedder = Embedder(loaded, batch_size=8, microbatches=microbatches)
    got = embedder.embed_texts(SENTENCES)[0]
    cosine = (got * minilm_single).sum(-1)
    assert cosine.min() >= 0.99999, cosine


# Decoders: tiny random transformers models with 3 layers (uneven on 2, 4 and 8 stages).
DECODERS = {
    "gpt2": lambda tr: tr.GPT2LMHeadModel(tr.GPT2Config(
        vocab_size=101, n_positions=96, n_embd=46, n_layer=3, n_head=2, bos_token_id=1,
        eos_token_id=2)),
    "llama": lambda tr: tr.LlamaForCausalLM(tr.LlamaConfig(
        vocab_size=101, hidden_size=48, intermediate_size=88, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96)),
}
PROMPTS = [[5, 7, 9, 11, 3], [8], [10, 20, 30, 40, 50, 60, 70, 80, 90, 15, 25, 35]]


@pytest.fixture(scope="module", params=sorted(DECODERS))
def decoder(request, tmp_path_factory):
    """(family, graphdef, state, config, single-device greedy tokens)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from decoder_reference import load_jax, save_hf

    from jaxaccel.runtime.generate import Generator

    torch.manual_seed(0)
    directory = save_hf(DECODERS[request.param](transformers).eval(),
                        tmp_path_factory.mktemp(request.param))
    model, cfg = load_jax(request.param, directory)
    graphdef, state = nnx.split(model)
    return request.param, graphdef, state, cfg, Generator(graphdef, state, cfg).generate(PROMPTS, 8)


@pytest.mark.parametrize("mesh,rules", [m[:2] for m in MESHES[:3]])
def test_greedy_generation_pipelined_equals_single_device(decoder, mesh, rules):
    """Prefill and every KV-cache decode step run as a pipeline; tokens are identical."""
    from jaxaccel.runtime.generate import Generator
    from jaxaccel.parallel.sharding import Layout

    family, graphdef, state, cfg, want = decoder
    layout = Layout.create(mesh, rules)
    generator = Generator(graphdef, state, cfg, layout)
    assert generator.pipeline is not None
    assert generator.generate(PROMPTS, 8) == want
    assert generator.traces == {"prefill": 1, "decode": 1}
    # Each stage owns the cache of its own layers (3 layers padded to a multiple of S).
    cache = generator._cache_sharding(4, 64)
    assert cache.spec[0] == "stage"
