"""Weight-only quantization (qwix QArray, `jaxaccel.models.quantization`): quality against the fp32
transformers/sentence-transformers references, quantize-on-load against quantize-then-save,
device bytes during a quantize-on-load restore, and scales sharded with their weights."""

import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import qwix
from decoder_reference import save_hf
from flax import nnx

from jaxaccel import backends
from jaxaccel.models import quantization
from jaxaccel.conversion.hf import convert
from jaxaccel.conversion.quantize import quantize_checkpoint
from jaxaccel.startup.loader import load_model
from jaxaccel.parallel.params import flat_arrays
from jaxaccel.parallel.sharding import Layout

STREAM = np.random.default_rng(0).integers(3, 101, 256).tolist()  # fixed 256-token stream
# sentence-transformers' own fp32 embeddings of 11 fixture sentences (scripts/make_reference.py)
FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "minilm_reference.npz"


def _minilm_cosines(ckpt, quantize):
    import jaxaccel

    data = np.load(FIXTURE)
    model = jaxaccel.load(ckpt, quantize=quantize, progress=False)
    assert model.quantization == quantize and f"{quantize} weights" in repr(model)
    with pytest.warns(UserWarning, match="truncated"):  # the fixture's long sentence
        ours = model.embed([str(s) for s in data["sentences"]])
    return (ours * data["embeddings"]).sum(-1) / np.linalg.norm(ours, axis=-1)


def test_minilm_int8_cosine_vs_sentence_transformers(minilm_ckpt):
    cosine = _minilm_cosines(minilm_ckpt, quantize="int8")
    assert cosine.min() >= 0.995, cosine


def test_minilm_int4_g128_cosine_vs_sentence_transformers(minilm_ckpt):
    """Measured min 0.884, mean 0.944 over the 11 sentences (round-to-nearest in groups of 128
    along k with the per-group clipping search; plain absmax gave min 0.831, mean 0.930). The
    issue's 0.98 is out of reach of weight-only int4 g128 on MiniLM: the independent torch
    experiments of scripts/int4_quality_ceiling.py reach at most 0.91 (GPTQ with calibration
    data; zero points 0.87, Hadamard-rotated groups 0.89). This pins the measured level so a regression shows."""
    cosine = _minilm_cosines(minilm_ckpt, quantize="int4")
    assert cosine.min() >= 0.87 and cosine.mean() >= 0.935, cosine


def test_int4_clip_search_matches_numpy_and_qwix():
    """Each int4 group's scale is the absmax scale times the ratio in CLIP_RATIOS of least
    squared error (numpy brute force), values are round-half-even(x / scale) clipped to
    [-8, 7], and groups that keep ratio 1.0 equal qwix.quantize's own output."""
    rng = np.random.default_rng(3)
    block = rng.standard_normal((2, 256, 24)).astype(np.float32)
    block[:, rng.integers(0, 256, 6), rng.integers(0, 24, 6)] *= 12.0  # outliers to clip
    spec = quantization.QuantSpec("int4", (1, 128, 1))
    values, scales = quantization.quantize_block(block, spec)
    assert values.dtype == ml_dtypes.int4 and scales.shape == (2, 2, 24)

    groups = block.reshape(2, 2, 128, 24)
    absmax_scale = np.abs(groups).max(axis=2) / 7.5  # qwix's symmetric int4 bound is 7 + 0.5

    def error(scale):
        q = np.clip(np.round(groups / scale[:, :, None]), -8, 7)
        return np.square(q * scale[:, :, None] - groups).sum(axis=2)

    errors = np.stack([error(absmax_scale * r) for r in quantization.CLIP_RATIOS["int4"]])
    np.testing.assert_allclose(error(scales), errors.min(axis=0), rtol=1e-5)
    assert (scales < absmax_scale * 0.999).any()  # the search did clip some groups
    expected = np.clip(np.round(groups / scales[:, :, None]), -8, 7).reshape(block.shape)
    np.testing.assert_array_equal(values.astype(np.int8), expected.astype(np.int8))
    plain = qwix.quantize(jnp.asarray(block), jnp.int4, channelwise_axes=[0, 2],
                          tiled_axes={1: 128})
    kept = np.repeat(np.isclose(scales, absmax_scale, rtol=1e-6), 128, axis=1)
    ours, theirs = values.astype(np.int8)[kept], np.asarray(plain.qvalue).astype(np.int8)[kept]
    # x / scale landing within float rounding of a .5 tie (a group's absmax is 7.5 scales
    # exactly) may round either way: qwix on jax 0.12.1 multiplies by 1/scale instead.
    ratio = (groups / scales[:, :, None]).reshape(block.shape)[kept]
    tie = np.abs(np.abs(ratio - np.floor(ratio)) - 0.5) < 1e-5
    np.testing.assert_array_equal(ours[~tie], theirs[~tie])
    assert np.abs(ours[tie].astype(int) - theirs[tie]).max(initial=0) <= 1


@pytest.fixture(scope="module")
def decoders(tmp_path_factory):
    """kind -> (transformers fp32 logits over STREAM, fp32 jaxaccel checkpoint), built once."""
    built = {}

    def get(kind):
        if kind not in built:
            built[kind] = _decoder(kind, tmp_path_factory.mktemp(kind))
        return built[kind]

    return get


# Random-weight checkpoints written with numpy (no torch: these tests run on the newest jax
# too) for what needs no transformers reference: equality, sharding, memory, plan.
SMALL = {"gpt2": dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=4,
                      intermediate_size=256, max_position_embeddings=128, eos_token_id=3),
         "llama": dict(vocab_size=128, hidden_size=64, num_layers=2, num_heads=8, num_kv_heads=2,
                       intermediate_size=128, head_dim=8, max_position_embeddings=128,
                       eos_token_id=3, tie_word_embeddings=False)}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """family -> a float32 jaxaccel checkpoint of random weights, written once."""
    import dataclasses

    from jaxaccel.bench import synthetic
    from jaxaccel.models import family_spec

    built = {}

    def get(family):
        if family not in built:
            config = dataclasses.asdict(family_spec(family).config(**SMALL[family]))
            built[family] = tmp_path_factory.mktemp(family) / "ckpt"
            synthetic.write(built[family], config, "float32", family=family)
        return built[family]

    return get


def _decoder(kind, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=101, n_positions=256, n_embd=64, n_layer=2, n_head=4,
            bos_token_id=1, eos_token_id=2)).eval()
    else:  # Llama with grouped-query attention (4 query heads per kv head), untied head
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256,
            bos_token_id=1, eos_token_id=2, tie_word_embeddings=kind == "llama_tied")).eval()
    with torch.no_grad():  # peaked next-token distributions, so top-1 is meaningful
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
        reference = hf(torch.tensor([STREAM])).logits[0].numpy()
    convert(save_hf(hf, tmp_path / "hf"), tmp_path / "fp32")
    return reference, tmp_path / "fp32"


def generator_for(loaded):
    from jaxaccel.runtime.generate import Generator

    return Generator(loaded.graphdef, loaded.state, loaded.config, loaded.layout,
                     dtype=loaded.dtype)


def _all_logits(loaded, ids):
    """Float32 logits [t, v] of one causal pass over `ids`, traced with the mesh's backend."""
    graphdef = loaded.graphdef

    def forward(state, ids_t):
        model = nnx.merge(graphdef, state)
        t = ids_t.shape[0]
        mask = jnp.tril(jnp.ones((t, t), bool))[None]
        x, _ = model(ids_t[None], jnp.arange(t)[None], mask)
        return model.logits(x)[0]

    with backends.use(backends.for_mesh(loaded.layout.mesh)):
        return np.asarray(jax.jit(forward)(loaded.state, jnp.asarray(ids, jnp.int32)))


@pytest.mark.parametrize("kind", ["gpt2", "llama_gqa"])
def test_decoder_int8_top1_agreement_with_fp32(kind, decoders):
    reference, ckpt = decoders(kind)
    fp32 = _all_logits(load_model(ckpt), STREAM)
    np.testing.assert_allclose(fp32, reference, atol=2e-4, rtol=1e-4)  # the fp32 path is exact
    loaded = load_model(ckpt, quantize="int8")
    int8 = _all_logits(loaded, STREAM)
    agreement = (int8.argmax(-1) == reference.argmax(-1)).mean()
    assert agreement >= 0.95, agreement
    assert not np.array_equal(int8, fp32)  # the weights really were quantized
    # The Generator (prefill + KV-cache decode) on the same quantized weights: its greedy
    # tokens are the argmax of its own full-pass logits, token by token.
    new = generator_for(loaded).generate([STREAM[:8]], 8, loop="device")[0]
    ids = STREAM[:8] + new
    np.testing.assert_array_equal(_all_logits(loaded, ids)[7:-1].argmax(-1), new)


@pytest.mark.parametrize("kind", ["gpt2", "llama_tied"])
def test_quantized_tied_head_top1_agreement_with_fp32(kind, decoders):
    """`quantize_head` on a tied model: the head is an int8 copy of the embedding (which the
    lookup keeps in float32), in the plain path and packed for the CPU kernel alike."""
    reference, ckpt = decoders(kind)
    loaded = load_model(ckpt, quantize=quantization.Scheme.parse("int8", head=True))
    arrays = flat_arrays(loaded.state)
    assert arrays["lm_head_vd.values"].dtype == jnp.int8
    assert arrays["token_vd"].dtype == jnp.float32
    with_head = _all_logits(loaded, STREAM)
    agreement = (with_head.argmax(-1) == reference.argmax(-1)).mean()
    assert agreement >= 0.95, agreement
    body_only = _all_logits(load_model(ckpt, quantize="int8"), STREAM)
    assert not np.array_equal(with_head, body_only)  # the head really was quantized
    # Prefill + decode with the packed head (the CPU kernel): greedy tokens are the argmax of
    # the plain path's logits.
    generator = generator_for(loaded)
    head = generator.state["lm_head_vd"].get_value()
    assert generator.packed_weights and type(head).__name__ == "PackedQuantWeight"
    new = generator.generate([STREAM[:8]], 8, loop="device")[0]
    np.testing.assert_array_equal(_all_logits(loaded, STREAM[:8] + new)[7:-1].argmax(-1), new)


@pytest.mark.parametrize("scheme", ["int8", "int4", "int8+head", "int4+head"])
@pytest.mark.parametrize("mesh", [None, "data=2,model=4"])
def test_quantize_on_load_equals_quantize_then_save(scheme, mesh, small, tmp_path):
    ckpt = small("gpt2")  # tied: +head quantizes a copy of the embedding as the head
    quantize_checkpoint(ckpt, tmp_path / "q", quantization.Scheme.from_label(scheme, 32),
                        chunk_bytes=None)
    layout = Layout.create(mesh, "dp_tp" if mesh else None)
    on_load = load_model(ckpt, layout, quantize=quantization.Scheme.from_label(scheme, 32))
    saved = load_model(tmp_path / "q", layout)
    a, b = flat_arrays(on_load.state), flat_arrays(saved.state)
    assert sorted(a) == sorted(b) and "blocks.wq_dnh.values" in a
    assert ("lm_head_vd.values" in a) == scheme.endswith("+head")
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].sharding == b[name].sharding, name
        np.testing.assert_array_equal(np.asarray(a[name]).view(np.uint8),
                                      np.asarray(b[name]).view(np.uint8), err_msg=name)


def test_quantize_on_load_device_bytes_stay_quantized(small):
    """Restore-time accounting: each device receives exactly its share of the quantized state
    (values + scales, plus the full-precision embeddings/norms/biases), never a float32 slice
    of a quantized weight; the float32 blocks live on the host, at most one budget's worth."""
    ckpt = small("llama")
    layout = Layout.create("data=2,model=4", "dp_tp")
    fp32 = load_model(ckpt, layout)
    int8 = load_model(ckpt, layout, quantize="int8", host_memory_budget=1 << 16)
    held = {}
    for array in jax.tree.leaves(int8.state):
        for shard in array.addressable_shards:
            held[shard.device.id] = held.get(shard.device.id, 0) + shard.data.nbytes
    assert dict(int8.stats.bytes_placed_per_device) == held
    for name, array in flat_arrays(int8.state).items():
        if name.endswith(".values"):
            assert array.dtype == jnp.int8, name
    for device, nbytes in held.items():
        assert nbytes < fp32.stats.bytes_placed_per_device[device]
    assert int8.stats.peak_bytes_in_flight <= max(1 << 16, int8.stats.largest_read)


@pytest.mark.parametrize("rules,mesh", [("dp", "data=8"), ("tp", "model=4"),
                                        ("dp_tp", "data=2,model=4"), ("pp", "stage=2,data=4")])
def test_scales_shard_with_their_weights(rules, mesh, small, tmp_path):
    ckpt = small("gpt2")  # tied: the head's quantized copy shards like every other weight
    quantize_checkpoint(ckpt, tmp_path / "q",
                        quantization.Scheme.parse("int4", 32, head="int4"), chunk_bytes=None)
    loaded = load_model(tmp_path / "q", Layout.create(mesh, rules))
    specs = quantization.manifest_specs(loaded.manifest)
    arrays = flat_arrays(loaded.state)
    split = 0
    for name, spec in specs.items():
        values, scales = arrays[name + ".values"], arrays[name + ".scales"]
        assert values.dtype == ml_dtypes.int4
        v_spec = tuple(values.sharding.spec) + (None,) * values.ndim
        s_spec = tuple(scales.sharding.spec) + (None,) * values.ndim
        for dim, (tile, v, s) in enumerate(zip(spec.tiles, v_spec, s_spec)):
            assert s == (None if tile == values.shape[dim] else v), (name, dim)
            split += v is not None
        # Each device's scales are those of its own values: dequantize shard by shard.
        whole = np.asarray(qwix.dequantize(qwix.QArray(jnp.asarray(np.asarray(values)),
                                                       jnp.asarray(np.asarray(scales)))))
        for v_shard in values.addressable_shards:
            s_shard = next(s for s in scales.addressable_shards if s.device == v_shard.device)
            part = qwix.dequantize(qwix.QArray(v_shard.data, s_shard.data))
            np.testing.assert_array_equal(np.asarray(part), whole[v_shard.index], err_msg=name)
    assert split or rules == "dp"


@pytest.mark.parametrize("source", ["on load", "checkpoint"])
@pytest.mark.parametrize("family,label", [("llama", "int4"), ("gpt2", "int4+head")])
def test_plan_predicts_quantized_bytes_exactly(source, family, label, small, tmp_path):
    from jaxaccel.startup import planner

    ckpt = small(family)
    scheme = quantization.Scheme.from_label(label, 32)
    if source == "checkpoint":
        quantize_checkpoint(ckpt, tmp_path / "q", scheme, chunk_bytes=None)
        ckpt, scheme = tmp_path / "q", None
    layout = Layout.create("data=2,model=4", "dp_tp")
    plan = planner.plan(ckpt, layout, compile_activations=False, quantize=scheme)
    loaded = load_model(ckpt, layout, quantize=scheme)
    per_device = {}
    for array in jax.tree.leaves(loaded.state):
        for shard in array.addressable_shards:
            per_device[shard.device.id] = per_device.get(shard.device.id, 0) + shard.data.nbytes
    assert set(per_device.values()) == {plan.param_bytes}
    assert plan.quantization["scheme"] == "int4"
    if label.endswith("+head"):  # the head's int8 copy, split over `model` like the table
        assert plan.quantization["head_copy"] == {"lm_head_vd": "token_vd"}
        head = flat_arrays(loaded.state)["lm_head_vd.values"]
        assert head.dtype == jnp.int8 and tuple(head.sharding.spec)[:1] == ("model",)


def test_quantized_head_labels_and_rules():
    parse = quantization.Scheme.from_label
    assert parse("int4").head is False and parse("int4+head").head_scheme == "int8"
    assert parse("int4+head=int4").head_scheme == "int4" and parse("int8+head").label == "int8+head"
    assert parse("int4+head=int4").label == "int4+head=int4"
    from jaxaccel.errors import UsageError
    from jaxaccel.models import family_spec

    with pytest.raises(UsageError, match="SCHEME\\+head"):
        parse("int4+tail")
    rules = parse("int4+head", 64).rules(family_spec("gpt2"))
    assert [(r.weight_qtype, r.tile_size) for r in rules] == [("int4", 64), ("int8", None)]
    assert quantization.matching(rules, "lm_head_vd") is rules[1]


def test_fp8_is_refused_on_the_cpu_with_a_clear_message(minilm_ckpt):
    from jaxaccel.errors import UsageError

    with pytest.raises(UsageError, match="fp8: the cpu backend has no float8 matmuls"):
        load_model(minilm_ckpt, quantize="fp8")
    with pytest.raises(UsageError, match="--quantize must be one of"):
        quantization.Scheme.parse("int3")


def test_bench_quality_decoder_metrics_by_hand():
    from jaxaccel.bench.quality import decoder_metrics

    p = np.log(np.array([[0.5, 0.5], [0.9, 0.1]]))
    q = np.log(np.array([[0.25, 0.75], [0.9, 0.1]]))
    kl, top1 = decoder_metrics(p, q)
    expected = (0.5 * np.log(0.5 / 0.25) + 0.5 * np.log(0.5 / 0.75)) / 2  # row 2 adds 0
    assert kl == pytest.approx(expected) and top1 == 0.5  # row 1: argmax 0 vs 1


def test_convert_and_inspect_show_the_tied_head_copy(small, tmp_path, capsys, monkeypatch):
    """`convert --quantize int4 --quantize-head` on a tied GPT-2: the manifest records the copy,
    `inspect` names it, and `plan --json` counts exactly what a load places on the device."""
    import json

    from cli_runner import run_cli

    dest = tmp_path / "q"
    code, _, err = run_cli(capsys, monkeypatch, "convert", "--quantize", "int4",
                           "--group-size", "32", "--quantize-head", small("gpt2"), dest)
    assert code == 0, err
    code, out, err = run_cli(capsys, monkeypatch, "inspect", dest)
    assert code == 0, err
    out = " ".join(out.split())  # rich wraps long lines
    assert "LM head too (int8); lm_head_vd: int8 copy of the tied token_vd" in out
    code, out, err = run_cli(capsys, monkeypatch, "inspect", dest, "--json")
    payload = json.loads(out)
    assert payload["quantization"]["head_copy"] == {"lm_head_vd": "token_vd"}
    assert payload["arrays"]["lm_head_vd.values"]["dtype"] == "int8"
    assert payload["arrays"]["token_vd"]["dtype"] == "float32"
    code, out, err = run_cli(capsys, monkeypatch, "plan", dest, "--json")
    assert code == 0, err
    held = sum(a.nbytes for a in jax.tree.leaves(load_model(dest).state))
    assert json.loads(out)["per_device"]["param_bytes"] == held


def test_step_bytes_leave_the_tied_table_to_the_lookup(small):
    """`bench generate`'s bytes/token with a quantized head copy: the int4 values at half a
    byte, the scales, everything else whole, except the table only looked up."""
    from jaxaccel.models import family_spec

    loaded = load_model(small("gpt2"), dtype="bfloat16",
                        quantize=quantization.Scheme.from_label("int4+head=int4", 32))
    skip = quantization.lookup_only(loaded.state, family_spec("gpt2"))
    assert skip == ("token_vd",)
    expected = 0
    for name, array in flat_arrays(loaded.state).items():
        size = np.asarray(array).size
        if name == "token_vd":
            continue
        expected += size // 2 if array.dtype == ml_dtypes.int4 else size * array.dtype.itemsize
    assert quantization.read_bytes(loaded.state, skip) == expected
    plain = load_model(small("gpt2"), dtype="bfloat16", quantize="int4")
    assert quantization.lookup_only(plain.state, family_spec("gpt2")) == ()
