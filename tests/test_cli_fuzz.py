"""Fuzz (issue #11): every CLI command with malformed arguments and files (empty, binary,
truncated JSON, wrong types) exits 1 or 2 with one stderr line, and writes nothing half-done."""

import json

import pytest
from cli_runner import run_cli

BAD_FILES = {"empty": b"", "binary": bytes(range(256)) * 4, "truncated": b'{"model_type": "ll',
             "wrong_types": b'{"model_type": 7, "weight_map": [1, 2], "family": 3}',
             "list": b"[1, 2, 3]"}


def bad_dir(tmp_path, kind, content):
    """A directory whose every file a command may read holds `content`."""
    directory = tmp_path / kind
    directory.mkdir()
    for name in ("config.json", "jaxaccel.json", "model.safetensors",
                 "model.safetensors.index.json", "generation_config.json", "modules.json",
                 "tokenizer.json"):
        (directory / name).write_bytes(content)
    return directory


def commands(src, out_dir):
    return [
        ["convert", src, out_dir / "ckpt"],
        ["convert", src, out_dir / "ckpt", "--dtype", "int3"],
        ["inspect", src], ["inspect", src, "--json"],
        ["verify", src],
        ["embed", src, "--text", "hi"], ["embed", src, "--input", src / "config.json"],
        ["embed", src, "--text", "hi", "--batch-size", "x"],
        ["generate", src, "--prompt-ids", "1,2"], ["generate", src, "--prompt-ids", ""],
        ["generate", src, "--prompt-ids", "a;b"], ["generate", src, "-n", "-3", "--prompt-ids", "1"],
        ["plan", src, "--mesh", "data=2"], ["plan", src, "--mesh", "nonsense"],
        ["bench", "embed", src, "--json", out_dir / "b.json"],
        ["launch", "-n", "0", "--", "true"],
    ]


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_malformed_inputs_fail_with_one_line(kind, tmp_path, capsys, monkeypatch):
    src = bad_dir(tmp_path, kind, BAD_FILES[kind])
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    for args in commands(src, out_dir):
        code, _, err = run_cli(capsys, monkeypatch, *args)
        assert code in (1, 2), (args, code, err)
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), (args, err)
        assert list(out_dir.iterdir()) == [], (args, list(out_dir.iterdir()))


def test_debug_adds_the_traceback_only_for_unexpected_errors(tmp_path, capsys, monkeypatch):
    src = bad_dir(tmp_path, "trunc", BAD_FILES["truncated"])
    code, _, err = run_cli(capsys, monkeypatch, "--debug", "inspect", src)
    assert code == 1 and "Traceback" not in err and json  # jaxaccel's own error: one line
