"""Pre-quantized Hugging Face checkpoints loaded as stored (`conversion.prequantized`):
compressed-tensors INT8 channel-wise and INT4 pack-quantized, against transformers running
the same weights dequantized to float32 by the format's own package."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import qwix
from flax import nnx
from prequantized_reference import PROMPT, STEPS, STREAM

from jaxaccel import backends
from jaxaccel.conversion.hf_checkpoint import open_checkpoint
from jaxaccel.parallel.params import flat_arrays
from jaxaccel.runtime.generate import Generator
from jaxaccel.startup.loader import load_model

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")

import prequantized_reference as ref  # noqa: E402  (after the skips: it needs torch)

CT_KINDS = ["w8a16", "w8a8", "w4a16", "w4a16_asym"]


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


def _all_logits(loaded, ids):
    """Float32 logits [t, v] of one causal pass over `ids` (the plain quantized path)."""
    graphdef = loaded.graphdef

    def forward(state, ids_t):
        model = nnx.merge(graphdef, state)
        t = ids_t.shape[0]
        x, _ = model(ids_t[None], jnp.arange(t)[None], jnp.tril(jnp.ones((t, t), bool))[None])
        return model.logits(x)[0]

    with backends.use(backends.for_mesh(loaded.layout.mesh)):
        return np.asarray(jax.jit(forward)(loaded.state, jnp.asarray(ids, jnp.int32)))


def _held_quantized_bytes(state) -> int:
    """Bytes of the quantized weights as held: values and zero points at their bit width,
    scales at their dtype."""
    total = 0
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
    loaded = load_model(directory, dtype="float32")
    ours = _all_logits(loaded, STREAM)
    scale = np.abs(logits).max()
    assert np.abs(ours - logits).max() <= 1e-4 * scale, np.abs(ours - logits).max() / scale
    # Greedy decode (prefill + KV cache; the CPU kernels where the weights fit them).
    new = Generator(loaded.graphdef, loaded.state, loaded.config, loaded.layout,
                    dtype=loaded.dtype).generate([PROMPT], STEPS, loop="device")[0]
    assert new == tokens
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
    """kind -> (directory, reference logits, reference greedy tokens), built once each."""
    built = {}

    def get(kind):
        if kind not in built:
            directory, model = ref.packed_int32_dir(base, kind,
                                                    tmp_path_factory.mktemp(kind) / "hf")
            built[kind] = (directory, *ref.reference(model))
        return built[kind]

    return get


@pytest.mark.parametrize("kind", ["awq", "gptq_sym", "gptq_asym", "gptq_act"])
def test_awq_gptq_match_dequantized_reference(kind, packed_checkpoints):
    directory, logits, tokens = packed_checkpoints(kind)
    loaded = load_model(directory, dtype="float32")
    ours = _all_logits(loaded, STREAM)
    scale = np.abs(logits).max()
    assert np.abs(ours - logits).max() <= 1e-4 * scale, np.abs(ours - logits).max() / scale
    new = Generator(loaded.graphdef, loaded.state, loaded.config, loaded.layout,
                    dtype=loaded.dtype).generate([PROMPT], STEPS, loop="device")[0]
    assert new == tokens
    zeros = kind != "gptq_sym"  # symmetric GPTQ's zero points are all 8: not held
    assert _held_quantized_bytes(loaded.state) == ref.packed_int32_bytes(directory, zeros)
    arrays = flat_arrays(loaded.state)
    assert ("blocks.wq_dnh.zeros" in arrays) == zeros
    assert arrays["blocks.wq_dnh.values"].dtype == jnp.int4


def test_gptq_reordered_groups_are_refused_in_one_line(packed_checkpoints):
    from jaxaccel.checkpoint.manifest import CheckpointError

    directory, _, _ = packed_checkpoints("gptq_act_perm")
    with pytest.raises(CheckpointError, match=r"g_idx puts input rows of one group apart"):
        open_checkpoint(directory)
