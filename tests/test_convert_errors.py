"""`jaxaccel convert` refuses bad sources with one line naming the file, and writes nothing."""

import json
import shutil
import subprocess
import sys

import pytest


def run_convert(src, dest):
    proc = subprocess.run([sys.executable, "-m", "jaxaccel.cli.main", "convert", str(src), str(dest),
                           "--quiet"], capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stderr.strip()


def copy_model(minilm_src, tmp_path, name="src"):
    dest = tmp_path / name
    shutil.copytree(minilm_src, dest)
    return dest


def assert_refused(code, err, dest, *needles):
    assert code != 0
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, err)
    assert not dest.exists()
    assert not list(dest.parent.glob(f".{dest.name}.*"))


def test_pickle_weights_are_refused(tmp_path, minilm_src):
    src = tmp_path / "pickled"
    src.mkdir()
    shutil.copy(minilm_src / "config.json", src)
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    code, err = run_convert(src, tmp_path / "out")
    assert_refused(code, err, tmp_path / "out", "pytorch_model.bin", "pickle")


def test_missing_config_is_refused(tmp_path, minilm_src):
    src = copy_model(minilm_src, tmp_path)
    (src / "config.json").unlink()
    code, err = run_convert(src, tmp_path / "out")
    assert_refused(code, err, tmp_path / "out", "config.json", "missing")


def test_unknown_model_type_is_refused(tmp_path, minilm_src):
    src = copy_model(minilm_src, tmp_path)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "wavenet"}))
    code, err = run_convert(src, tmp_path / "out")
    assert_refused(code, err, tmp_path / "out", "config.json", "wavenet")


def test_shapes_disagreeing_with_config_are_refused(tmp_path, minilm_src):
    src = copy_model(minilm_src, tmp_path)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "intermediate_size": 1024}))
    code, err = run_convert(src, tmp_path / "out")
    assert_refused(code, err, tmp_path / "out", "model.safetensors", "intermediate.dense",
                   "config.json")


@pytest.mark.parametrize("bad", ["missing", "extra"])
def test_missing_or_extra_tensors_are_refused(tmp_path, minilm_src, bad):
    from safetensors.numpy import load_file, save_file

    src = copy_model(minilm_src, tmp_path)
    tensors = load_file(str(src / "model.safetensors"))
    if bad == "missing":
        del tensors["encoder.layer.3.output.dense.bias"]
    else:
        tensors["encoder.layer.3.surprise.weight"] = tensors["encoder.layer.3.output.dense.bias"]
    save_file(tensors, str(src / "model.safetensors"))
    code, err = run_convert(src, tmp_path / "out")
    assert_refused(code, err, tmp_path / "out", "model.safetensors", "encoder.layer.3.")
