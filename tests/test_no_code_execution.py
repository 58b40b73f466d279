"""Loading a checkpoint never runs code from it, and never touches files outside it."""

import ast
import json
import pathlib
import pickle
import shutil

import pytest
from cli_runner import one_error_line, run_cli

PACKAGE = pathlib.Path(__file__).parents[1] / "jaxaccel"
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "marshal", "shelve", "joblib",
                  "torch", "transformers"}  # the last two: reference code for tests only
UNSAFE_BUILTINS = {"eval", "exec", "compile", "__import__"}
UNSAFE_CALLS = {("torch", "load"), ("yaml", "load"), ("yaml", "unsafe_load"),
                ("pickle", "loads"), ("pickle", "load")}


def unsafe_uses(path: pathlib.Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        where = f"{path.name}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names
                      if a.name.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNSAFE_MODULES:
            found.append(f"{where} from {node.module} import")
        elif isinstance(node, ast.Call):
            func = node.func
            constant_import = (isinstance(func, ast.Name) and func.id == "__import__"
                               and node.args and isinstance(node.args[0], ast.Constant))
            if isinstance(func, ast.Name) and func.id in UNSAFE_BUILTINS and not constant_import:
                found.append(f"{where} {func.id}()")
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                if (func.value.id, func.attr) in UNSAFE_CALLS:
                    found.append(f"{where} {func.value.id}.{func.attr}()")
                if func.attr == "load" and func.value.id in ("np", "numpy") and any(
                        k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant)
                                                         and k.value.value is False)
                        for k in node.keywords):
                    found.append(f"{where} np.load(allow_pickle=...)")
    return found


def test_no_pickle_torch_load_or_eval_in_the_package():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    problems = [use for path in files for use in unsafe_uses(path)]
    assert problems == []


def test_the_scan_catches_what_it_should(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text("import pickle\nimport torch\nx = eval('1')\ntorch.load('f')\n"
                   "import numpy as np\nnp.load('f', allow_pickle=True)\n")
    assert len(unsafe_uses(bad)) == 5


class _Boom:
    """Unpickling this would create a marker file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_pickle_weights_are_refused_without_unpickling(capsys, monkeypatch, tmp_path, minilm_src):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(minilm_src / "config.json", src)
    marker = tmp_path / "code-ran"
    (src / "pytorch_model.bin").write_bytes(pickle.dumps(_Boom(str(marker))))
    code, _, err = run_cli(capsys, monkeypatch, "convert", src, tmp_path / "out")
    assert code == 1 and "pickle" in one_error_line(err)
    assert not marker.exists() and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../secret.json", "/etc/passwd", "a/../../x", "~/.ssh/id",
                                  ".", "sub/./x", "..\\x", "x\x00y"])
def test_manifest_file_names_cannot_escape(capsys, monkeypatch, tmp_path, minilm_ckpt, name):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(minilm_ckpt, ckpt)
    path = ckpt / "jaxaccel.json"
    raw = json.loads(path.read_text())
    raw["tokenizer_files"] = ["tokenizer.json", name]
    path.write_text(json.dumps(raw))
    for command in (["embed", ckpt, "--text", "hi"], ["verify", ckpt], ["inspect", ckpt]):
        code, _, err = run_cli(capsys, monkeypatch, *command)
        assert code == 1, (command, err)
        assert "would escape the checkpoint directory" in one_error_line(err)
