"""Source checkpoints as they ship (issue 29): weights stored in dtypes numpy cannot hold
(fp8, with per-tensor, per-row or block scales beside them; integers), directories holding
more safetensors files than transformers loads, and a --family that contradicts the
checkpoint. Every expected value comes from transformers/torch on the same weights."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from cli_runner import one_error_line, run_cli
from real_checkpoints import build, greedy, save

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

PROMPT = [5, 9, 17, 33, 2]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def generate_cli(capsys, monkeypatch, ckpt, n=6):
    code, out, err = run_cli(capsys, monkeypatch, "generate", ckpt, "--prompt-ids",
                             ",".join(map(str, PROMPT)), "-n", n, "--json", "-q", "--greedy")
    assert code == 0, err
    return json.loads(out)["tokens"][0][len(PROMPT):]


def quantize(weight: torch.Tensor, dtype, scale_kind: str):
    """(stored weight, scale tensor or None), as an fp8/int quantizer writes them."""
    w = weight.float()
    if scale_kind == "none":
        return w.to(dtype), None
    top = {torch.int8: 127.0, torch.uint8: 255.0}.get(dtype) or float(torch.finfo(dtype).max)
    if scale_kind == "tensor":
        scale = w.abs().max() / top
    elif scale_kind == "row":
        scale = w.abs().amax(dim=1, keepdim=True) / top
    else:  # blocks of 8 x 8 (a short last block where the size is not a multiple)
        rows, cols = -(-w.shape[0] // 8), -(-w.shape[1] // 8)
        scale = torch.zeros(rows, cols)
        for i in range(rows):
            for j in range(cols):
                scale[i, j] = w[8 * i:8 * i + 8, 8 * j:8 * j + 8].abs().max() / top
        scale = scale.clamp(min=1e-8)
    expanded = scale if scale_kind != "block" else scale.repeat_interleave(8, 0).repeat_interleave(
        8, 1)[:w.shape[0], :w.shape[1]]
    q = w / expanded
    if not dtype.is_floating_point:
        q = q.round().clamp(0 if dtype == torch.uint8 else -127, top)
    return q.to(dtype), scale


def quantized_checkpoint(tmp_path, dtype, scale_kind: str, suffix="_scale"):
    """A tiny Llama whose projections are stored as `dtype` (+ scales); the transformers model
    holding exactly the dequantized values, as the reference."""
    model = build("llama", hidden=32, intermediate_size=40)
    src = save(model, tmp_path / "src")
    tensors = load_file(src / "model.safetensors")
    state = {}
    for name in list(tensors):
        if name.rsplit(".", 2)[-2] in PROJECTIONS:
            q, scale = quantize(tensors[name], dtype, scale_kind)
            tensors[name] = q
            value = q.float() if scale is None else q.float() * (
                scale if scale_kind != "block" else scale.repeat_interleave(8, 0)
                .repeat_interleave(8, 1)[:q.shape[0], :q.shape[1]])
            state[name] = value
            if scale is not None:
                tensors[name + suffix] = scale.float().contiguous()
                tensors[name.replace(".weight", ".input_scale")] = torch.tensor(0.5)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    model.load_state_dict(state, strict=False)
    return model, src


@pytest.mark.parametrize("dtype, scale_kind, suffix", [
    (torch.float8_e4m3fn, "tensor", "_scale"),
    (torch.float8_e5m2, "row", "_scale"),
    (torch.float8_e4m3fn, "block", "_scale_inv"),
    (torch.float8_e5m2, "none", ""),
    (torch.int8, "row", "_scale"),
    (torch.uint8, "tensor", "_scale"),
])
def test_quantized_source_dtypes_convert_to_their_dequantized_values(
        dtype, scale_kind, suffix, tmp_path, capsys, monkeypatch):
    model, src = quantized_checkpoint(tmp_path, dtype, scale_kind, suffix)
    code, out, err = run_cli(capsys, monkeypatch, "convert", src, tmp_path / "ckpt", "--json")
    assert code == 0, err
    ignored = json.loads(out)["ignored_tensors"]
    assert (scale_kind == "none") or any(n.endswith("input_scale") for n in ignored), ignored
    assert generate_cli(capsys, monkeypatch, tmp_path / "ckpt") == greedy(model, PROMPT, 6)


def _raw_safetensors(path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    """Write a safetensors file by hand (dtypes torch cannot make, e.g. complex or F4)."""
    header, offset, data = {}, 0, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        data += raw
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@pytest.mark.parametrize("dtype, bits", [("C64", 64), ("BOOL", 8), ("F6_E3M2", 6), ("F4", 4)])
def test_unreadable_dtype_is_refused_at_planning_naming_tensor_and_dtype(
        dtype, bits, tmp_path, capsys, monkeypatch):
    src = save(build("llama"), tmp_path / "src")
    tensors = {k: v for k, v in load_file(src / "model.safetensors").items()}
    name = "model.layers.0.mlp.up_proj.weight"
    shape = list(tensors[name].shape)
    raw = {k: ({torch.float32: "F32"}[v.dtype], list(v.shape), v.numpy().tobytes())
           for k, v in tensors.items()}
    raw[name] = (dtype, shape, bytes(-(-int(np.prod(shape)) * bits // 8)))
    _raw_safetensors(src / "model.safetensors", raw)
    code, _, err = run_cli(capsys, monkeypatch, "convert", src, tmp_path / "out", "-q")
    line = one_error_line(err)
    assert code == 1 and name in line and dtype in line, err
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_scale_of_the_wrong_shape_is_refused_naming_it(tmp_path, capsys, monkeypatch):
    _, src = quantized_checkpoint(tmp_path, torch.float8_e4m3fn, "tensor")
    tensors = load_file(src / "model.safetensors")
    name = "model.layers.0.self_attn.o_proj.weight_scale"
    tensors[name] = torch.ones(5, 3)
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli(capsys, monkeypatch, "convert", src, tmp_path / "out", "-q")
    assert code == 1 and name in one_error_line(err)


# Which files make up a checkpoint --------------------------------------------------------

def _stray(src, name: str, tensors: dict) -> None:
    save_file(tensors, src / name, metadata={"format": "pt"})


@pytest.mark.parametrize("layout", ["single", "index", "shards_without_index"])
def test_only_the_files_transformers_loads_are_read(layout, tmp_path, capsys, monkeypatch):
    from real_checkpoints import reshard

    model = build("qwen2", hidden=32)
    src = save(model, tmp_path / "src")
    original = load_file(src / "model.safetensors")
    # Copies in other layouts and names that transformers never opens (Mistral's consolidated
    # format, a PEFT adapter, an fp16 variant), plus a non-weight file.
    renamed = {k.replace("model.layers.", "layers.").replace("self_attn.", "attention."): v
               for k, v in original.items()}
    _stray(src, "consolidated.00.safetensors", renamed)
    _stray(src, "adapter_model.safetensors", {"base_model.lora_A.weight": torch.ones(2, 2)})
    (src / "params.json").write_text('{"dim": 32}')
    expected = {"consolidated.00.safetensors", "adapter_model.safetensors"}
    if layout == "single":
        _stray(src, "model.fp16.safetensors", {k: v.half() for k, v in original.items()})
        expected.add("model.fp16.safetensors")
    else:
        names = sorted(original)
        reshard(src, [names[:4], names[4:]], index=layout == "index")
    code, out, err = run_cli(capsys, monkeypatch, "convert", src, tmp_path / "ckpt", "--json")
    assert code == 0, err
    assert set(json.loads(out)["ignored_files"]) == expected
    assert generate_cli(capsys, monkeypatch, tmp_path / "ckpt") == greedy(model, PROMPT, 6)
    code, _, err = run_cli(capsys, monkeypatch, "convert", src, tmp_path / "ckpt2")
    assert code == 0 and "consolidated.00.safetensors" in err, err


def test_a_directory_of_only_consolidated_weights_is_refused(tmp_path, capsys, monkeypatch):
    src = save(build("llama"), tmp_path / "src")
    (src / "model.safetensors").rename(src / "consolidated.safetensors")
    code, _, err = run_cli(capsys, monkeypatch, "convert", src, tmp_path / "out", "-q")
    line = one_error_line(err)
    assert code == 1 and "consolidated.safetensors" in line and "model.safetensors" in line


# A --family that contradicts the checkpoint -----------------------------------------------

@pytest.mark.parametrize("kind, family", [("qwen2", "gpt2"), ("gpt2", "llama"),
                                          ("llama", "bert")])
def test_contradicting_family_is_refused_naming_both(kind, family, tmp_path, capsys,
                                                      monkeypatch):
    src = save(build(kind), tmp_path / "src")
    code, _, err = run_cli(capsys, monkeypatch, "convert", src, tmp_path / "out", "--family",
                           family)
    line = one_error_line(err)
    assert code == 1 and repr(kind) in line and family in line and "--force-family" in line
    assert not (tmp_path / "out").exists()


def test_unknown_model_type_with_family_needs_force_and_warns(tmp_path, capsys, monkeypatch):
    """A Mistral-like model_type jaxaccel does not list ('mixtral-ish'): --family llama is a
    guess; refused, then converted with --force-family and a warning, matching transformers
    (the weights really are Llama's)."""
    model = build("llama")
    src = save(model, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "my_llama"}))
    code, _, err = run_cli(capsys, monkeypatch, "convert", src, tmp_path / "a", "--family",
                           "llama")
    assert code == 1 and "'my_llama'" in one_error_line(err)
    code, _, err = run_cli(capsys, monkeypatch, "convert", src, tmp_path / "b", "--family",
                           "llama", "--force-family", "-q")
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert code == 0 and len(warnings) == 1 and "my_llama" in warnings[0], err
    assert generate_cli(capsys, monkeypatch, tmp_path / "b") == greedy(model, PROMPT, 6)


def test_force_family_on_the_python_api_warns(tmp_path):
    import jaxaccel

    src = save(build("llama"), tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "gemma"}))
    with pytest.raises(jaxaccel.ConvertError, match="'gemma'.*llama"):
        jaxaccel.convert(src, tmp_path / "a", family="llama", progress=False)
    assert not (tmp_path / "a").exists()
    with pytest.warns(UserWarning, match="'gemma'.*force"):
        jaxaccel.convert(src, tmp_path / "b", family="llama", force_family=True, progress=False)
    assert (tmp_path / "b" / "jaxaccel.json").is_file()


def test_convert_progress_counts_only_the_files_it_reads(tmp_path):
    """The bar's total is the bytes of the files transformers would load, not every
    *.safetensors file in the directory (a consolidated copy is never read)."""
    from jaxaccel import api

    (tmp_path / "model.safetensors").write_bytes(b"x" * 1000)
    (tmp_path / "consolidated.safetensors").write_bytes(b"x" * 5000)
    assert api._source_bytes(tmp_path) == 1000
    assert api._source_bytes(tmp_path / "missing") == 0
