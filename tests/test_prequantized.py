"""Pre-quantized Hugging Face checkpoints loaded as stored (`conversion.prequantized`):
compressed-tensors INT8 channel-wise and INT4 pack-quantized, against transformers running
the same weights dequantized to float32 by the format's own package."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from decoder_reference import causal_logits
from prequantized_reference import PROMPT, STEPS, STREAM

from jaxaccel.conversion.hf_checkpoint import open_checkpoint
from jaxaccel.parallel.params import flat_arrays
from jaxaccel.runtime.generate import Generator
from jaxaccel.startup.loader import load_model

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

import prequantized_reference as ref  # noqa: E402  (after the skips: it needs torch)

# One case per format and packing runs by default; the others are opt-in
# (JAXACCEL_SLOW=1 pytest -m slow): each is a load, two compiles and a transformers
# reference (~20 s on 2 shared cores).
SLOW = [pytest.mark.slow, pytest.mark.skipif(not os.environ.get("JAXACCEL_SLOW"),
                                             reason="opt-in: JAXACCEL_SLOW=1")]
CT_KINDS = ["w8a16", pytest.param("w8a8", marks=SLOW), pytest.param("w4a16", marks=SLOW),
            "w4a16_asym"]
PACKED_KINDS = ["awq", "gptq_sym", pytest.param("gptq_asym", marks=SLOW),
                pytest.param("gptq_act", marks=SLOW), "gptq_act_perm"]


@pytest.fixture(scope="module")
def base():
    return ref.base_llama()


@pytest.fixture(scope="module")
def checkpoints(base, tmp_path_factory):
    """kind -> (directory, reference logits, reference greedy tokens), built once each."""
    built = {}

    def get(kind):
        if kind not in built:
            directory = ref.compressed_tensors_dir(base, kind, tmp_path_factory.mktemp(kind) / "hf")
            logits, tokens = ref.reference(ref.compressed_tensors_dequantized(base, directory))
            built[kind] = directory, logits, tokens
        return built[kind]

    return get


def _load_and_compare_logits(directory, logits):
    """(loaded model, its Generator) of the pre-quantized `directory` in float32, after
    checking its causal logits against the dequantized reference's within 1e-4 relative."""
    loaded = load_model(directory, dtype="float32")
    ours = causal_logits(loaded, STREAM)
    scale = np.abs(logits).max()
    assert np.abs(ours - logits).max() <= 1e-4 * scale, np.abs(ours - logits).max() / scale
    return loaded, Generator(loaded.graphdef, loaded.state, loaded.config, loaded.layout,
                             dtype=loaded.dtype)


def _held_quantized_bytes(state) -> int:
    """Bytes of the quantized weights as held: values and zero points at their bit width,
    scales at their dtype, row orders (NAME.perm) at int32."""
    total = sum(a.nbytes for n, a in flat_arrays(state).items() if n.endswith(".perm"))
    for leaf in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, qwix.QArray)):
        if isinstance(leaf, qwix.QArray):
            bits = jnp.iinfo(leaf.qvalue.dtype).bits
            total += leaf.qvalue.size * bits // 8 + leaf.scale.nbytes
            if leaf.zero_point is not None:
                total += leaf.zero_point.size * bits // 8
    return total


@pytest.mark.parametrize("kind", CT_KINDS)
def test_compressed_tensors_matches_dequantized_reference(kind, checkpoints):
    directory, logits, tokens = checkpoints(kind)
    loaded, generator = _load_and_compare_logits(directory, logits)
    # Greedy decode (prefill + KV cache; the CPU kernels where the weights fit them).
    assert generator.generate([PROMPT], STEPS, loop="device")[0] == tokens
    assert _held_quantized_bytes(loaded.state) == ref.stored_quantized_bytes(directory)
    arrays = flat_arrays(loaded.state)
    bits = 4 if kind.startswith("w4") else 8
    assert jnp.iinfo(arrays["blocks.wq_dnh.values"].dtype).bits == bits


def test_inspect_and_plan_show_the_format_and_bytes(checkpoints, capsys, monkeypatch):
    from cli_runner import run_cli

    directory, _, _ = checkpoints("w4a16_asym")
    manifest = open_checkpoint(directory)
    quant = manifest.quantization
    assert quant["scheme"] == "int4" and quant["group_size"] == ref.GROUP
    label = "compressed-tensors pack-quantized int4 group 32 asymmetric"
    assert quant["format"] == label
    assert "blocks.wq_dnh.zeros" in manifest.arrays and "lm_head_vd" in manifest.arrays
    code, out, _ = run_cli(capsys, monkeypatch, "inspect", str(directory))
    out = " ".join(out.split())  # the console wraps long lines
    assert code == 0 and f"stored as {label}" in out and "NAME.zeros" in out
    assert "blocks.wq_dnh.values" in out
    code, out, _ = run_cli(capsys, monkeypatch, "plan", str(directory))
    out = " ".join(out.split())
    assert code == 0 and f"quantized int4 ({label}, group 32)" in out


def test_w8a8_runs_weight_only_and_says_so(checkpoints, capsys):
    directory, _, _ = checkpoints("w8a8")
    load_model(directory, dtype="float32", quiet=False)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if "weight-only" in ln]
    assert len(lines) == 1 and "W8A8" in lines[0], lines


@pytest.fixture(scope="module")
def packed_checkpoints(base, tmp_path_factory):
    """kind -> (directory, reference logits, reference greedy tokens), built once each;
    `get(kind, model=True)`: the dequantized transformers model instead."""
    built, models = {}, {}

    def get(kind, model=False):
        if kind not in built:
            directory, models[kind] = ref.packed_int32_dir(base, kind,
                                                           tmp_path_factory.mktemp(kind) / "hf")
            built[kind] = (directory, *ref.reference(models[kind]))
        return models[kind] if model else built[kind]

    return get


@pytest.mark.parametrize("kind", PACKED_KINDS)
def test_awq_gptq_match_dequantized_reference(kind, packed_checkpoints):
    directory, logits, tokens = packed_checkpoints(kind)
    loaded, generator = _load_and_compare_logits(directory, logits)
    # Decode runs the CPU int4 kernel, zero points included (their correction term); rows
    # reordered by g_idx are held sorted by group, the activations gathered to meet them.
    reordered = kind.startswith("gptq_act_perm")
    wq = generator.state["blocks"]["wq_dnh"].get_value()
    assert (type(wq).__name__ == "Permuted") == reordered
    wq = wq.inner if reordered else wq
    assert type(wq).__name__ == "PackedQuantWeight"
    assert (wq.zeros is not None) == (kind != "gptq_sym")
    assert generator.generate([PROMPT], STEPS, loop="device")[0] == tokens
    zeros = kind != "gptq_sym"  # symmetric GPTQ's zero points are all 8: not held
    assert _held_quantized_bytes(loaded.state) == ref.packed_int32_bytes(directory, zeros,
                                                                         reordered)
    arrays = flat_arrays(loaded.state)
    assert ("blocks.wq_dnh.zeros" in arrays) == zeros
    assert ("blocks.wq_dnh.perm" in arrays) == reordered
    assert arrays["blocks.wq_dnh.values"].dtype == jnp.int4


def test_gptq_desc_act_on_a_data_model_mesh(packed_checkpoints, capsys, monkeypatch):
    """Symmetric GPTQ with desc_act on data=2,model=4: down_proj's input rows are split
    over `model`, its row order replicated; logits and greedy tokens as on the
    dequantized reference. inspect and plan name the reordered rows."""
    from cli_runner import run_cli

    from jaxaccel.parallel.sharding import Layout

    directory, logits, tokens = packed_checkpoints("gptq_act_perm_sym")
    loaded = load_model(directory, Layout.create("data=2,model=4", "dp_tp"), dtype="float32")
    arrays = flat_arrays(loaded.state)
    # down_proj's 128 input rows split over model=4: 32 rows, one group, per device.
    assert arrays["blocks.wm_fd.values"].sharding.spec[1] == "model"
    assert arrays["blocks.wm_fd.perm"].sharding.is_fully_replicated
    assert arrays["blocks.wm_fd.perm"].shape == (2, 128)
    ours = causal_logits(loaded, STREAM)
    assert np.abs(ours - logits).max() <= 1e-4 * np.abs(logits).max()
    generator = Generator(loaded.graphdef, loaded.state, loaded.config, loaded.layout,
                          dtype=loaded.dtype)
    assert generator.generate([PROMPT], STEPS, loop="device")[0] == tokens
    code, out, _ = run_cli(capsys, monkeypatch, "inspect", str(directory))
    out = " ".join(out.split())
    assert code == 0 and "NAME.perm (rows sorted by group, g_idx)" in out
    assert "blocks.wm_fd.perm" in out
    code, out, _ = run_cli(capsys, monkeypatch, "plan", str(directory))
    assert code == 0 and "rows reordered by g_idx" in " ".join(out.split())


def test_gptq_desc_act_row_order_splits_with_pipeline_stages(packed_checkpoints):
    """On stage=2,data=4 each stage holds its own layers' row orders (NAME.perm's layers
    axis split like the weights'), and the logits are the reference's."""
    from jaxaccel.parallel.sharding import Layout

    directory, logits, _ = packed_checkpoints("gptq_act_perm_sym")
    loaded = load_model(directory, Layout.create("stage=2,data=4", "pp"), dtype="float32")
    perm = flat_arrays(loaded.state)["blocks.wq_dnh.perm"]
    assert perm.sharding.spec[0] == "stage" and perm.addressable_shards[0].data.shape == (1, 64)
    ours = causal_logits(loaded, STREAM)
    assert np.abs(ours - logits).max() <= 1e-4 * np.abs(logits).max()


def test_gptq_desc_act_seen_as_its_float_weight(packed_checkpoints):
    """The plan's float view of a desc_act linear (`QuantizedSource.read`: the held rows
    dequantized, put back in the stored order) is the reference's dequantized weight."""
    from jaxaccel.conversion.hf_checkpoint import TensorFiles
    from jaxaccel.conversion.prequantized import QuantizedSource, format_of

    directory = packed_checkpoints("gptq_act_perm")[0]
    model = packed_checkpoints("gptq_act_perm", model=True)
    config = json.loads((directory / "config.json").read_text())
    source = QuantizedSource(TensorFiles.open(directory, directory, {}),
                             format_of(config, directory / "config.json"))
    name = "model.layers.1.mlp.down_proj"
    assert source.quantized(name + ".weight").permuted
    expected = model.model.layers[1].mlp.down_proj.weight.detach().numpy()
    np.testing.assert_allclose(source.read(name + ".weight"), expected, rtol=1e-6, atol=0)


def test_gptq_g_idx_with_uneven_groups_is_refused_in_one_line(packed_checkpoints, tmp_path):
    import shutil

    import safetensors.numpy

    from jaxaccel.checkpoint.manifest import CheckpointError

    directory = shutil.copytree(packed_checkpoints("gptq_act_perm")[0], tmp_path / "uneven")
    tensors = safetensors.numpy.load_file(directory / "model.safetensors")
    name = "model.layers.1.mlp.up_proj.g_idx"
    tensors[name][:2] = 0  # two more rows in group 0, two fewer elsewhere
    safetensors.numpy.save_file(tensors, directory / "model.safetensors")
    with pytest.raises(CheckpointError, match=rf"{name} \[64\] does not put 32 of the 64 "
                                              r"input rows in each of 2 groups") as err:
        open_checkpoint(directory)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def fp8_checkpoints(base, tmp_path_factory):
    """kind -> (directory, the package's dequantized float32 model), built once each."""
    built = {}

    def get(kind):
        if kind not in built:
            directory = ref.compressed_tensors_dir(base, kind, tmp_path_factory.mktemp(kind) / "hf")
            built[kind] = directory, ref.compressed_tensors_dequantized(base, directory)
        return built[kind]

    return get


@pytest.mark.parametrize("kind", ["fp8", "fp8_block"])
def test_fp8_is_held_as_stored_and_refused_on_the_cpu(kind, fp8_checkpoints):
    """FP8 per channel and in blocks: the held float8 values and scales, read through the
    manifest's reader and dequantized by qwix, are the package's dequantized weights; the
    CPU refuses FP8 compute in one line."""
    from jaxaccel.errors import UsageError
    from jaxaccel.startup.loader import plan_model

    directory, model = fp8_checkpoints(kind)
    manifest = open_checkpoint(directory)
    assert manifest.quantization["scheme"] == "fp8"
    values = manifest.arrays["blocks.wq_dnh.values"]
    scales = manifest.arrays["blocks.wq_dnh.scales"]
    assert values.dtype == "float8_e4m3fn"
    held = {}
    for name, entry in (("values", values), ("scales", scales)):
        held[name] = np.empty(entry.shape, entry.dtype)
        manifest.reader.read_into(f"blocks.wq_dnh.{name}",
                                  tuple(slice(0, d) for d in entry.shape), held[name])
    weight = np.asarray(qwix.dequantize(qwix.QArray(jnp.asarray(held["values"]),
                                                    jnp.asarray(held["scales"]),
                                                    None, jnp.float8_e4m3fn)))
    for layer in range(2):  # [d, n, h] holds q_proj.weight [n * h, d] transposed
        expected = model.model.layers[layer].self_attn.q_proj.weight.detach().numpy()
        np.testing.assert_array_equal(weight[layer].reshape(64, -1).T, expected)
    assert held["values"].nbytes + held["scales"].nbytes == _stored_bytes(directory, "q_proj")
    with pytest.raises(UsageError, match=r"stored as fp8 .*the cpu backend has no float8"):
        plan_model(directory)


def _stored_bytes(directory, module: str) -> int:
    """Bytes of every layer's MODULE.weight and .weight_scale as stored."""
    from safetensors import safe_open

    with safe_open(directory / "model.safetensors", "pt") as f:
        return sum(t.numel() * t.element_size() for t in (
            f.get_tensor(n) for n in f.keys() if n.endswith((f".{module}.weight",
                                                           f".{module}.weight_scale"))))


def test_fp8_block_decode_step_lowers_for_cuda_with_fp8_weights(fp8_checkpoints):
    """The decode step of a 128x128-style block FP8 checkpoint lowers for `cuda` (jax.export
    on this CPU) with its weights still float8_e4m3fn among the inputs."""
    import re

    from jaxaccel.models import config_from_dict, quantization
    from jaxaccel.models.state import abstract_model
    from jaxaccel.parallel.sharding import Layout
    from jaxaccel.runtime.sampling import GREEDY

    directory, _ = fp8_checkpoints("fp8_block")
    manifest = open_checkpoint(directory)
    config = config_from_dict(manifest.family, manifest.config)
    graphdef, abstract = abstract_model(manifest.family, config, jnp.bfloat16)
    abstract = quantization.apply_specs(abstract, quantization.manifest_specs(manifest))
    layout = Layout.create()  # one device: every array whole
    whole = jax.sharding.NamedSharding(layout.mesh, jax.sharding.PartitionSpec())
    state = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                                           sharding=whole), abstract)
    gen = Generator(graphdef, state, config, layout, dtype=jnp.bfloat16, platform="cuda")
    b, t, slots = gen.shapes([5, 9], 16)
    jitted = gen.decode_program(GREEDY, "device", b, t, slots).jitted
    text = jax.export.export(jitted, platforms=["cuda"])(
        *gen.abstract_decode_args(GREEDY, "device", b, t, slots)).mlir_module()
    assert re.search(r"%arg\d+: tensor<2x64x8x8xf8E4M3FN>", text), "no fp8 wq among the inputs"
    assert "custom_call" not in text


def test_an_unread_format_is_refused_in_one_line(checkpoints, tmp_path):
    import json
    import shutil

    from jaxaccel.checkpoint.manifest import CheckpointError

    directory = shutil.copytree(checkpoints("w8a16")[0], tmp_path / "bnb")
    config = json.loads((directory / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "bits": 4}
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"quant_method 'bitsandbytes' \(bits 4\) is not "
                                              r"a format jaxaccel loads as stored") as err:
        open_checkpoint(directory)
    assert "\n" not in str(err.value)
