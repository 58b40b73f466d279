"""Input files as editors write them, and caches in places that cannot be written (issue 29).

A UTF-8 byte-order mark at the start of any text input (texts, prompts, JSON Lines, image
lists, JSON metadata) is dropped; a file in another encoding is a one-line error naming it.
With HOME and XDG_CACHE_HOME unwritable, every optional cache falls back with one warning
naming the directory and what moves it, and the command's output is unchanged."""

from __future__ import annotations

import codecs
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from cli_runner import one_error_line, run_cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "fixtures" / "minilm_reference.npz"
BOM = codecs.BOM_UTF8


def _reference(n: int):
    """The first n sentences and their sentence-transformers embeddings (fixture)."""
    data = np.load(REFERENCE, allow_pickle=True)
    return [str(s) for s in data["sentences"][:n]], data["embeddings"][:n]


@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_embed_input_with_a_bom_embeds_the_texts(newline, minilm_ckpt, tmp_path, capsys,
                                                   monkeypatch):
    sentences, expected = _reference(3)
    path = tmp_path / "texts.txt"
    path.write_bytes(BOM + newline.join(sentences).encode("utf-8") + newline.encode())
    code, out, err = run_cli(capsys, monkeypatch, "embed", minilm_ckpt, "--input", path,
                             "--json", "-q")
    assert code == 0, err
    got = np.array(json.loads(out)["embeddings"])
    np.testing.assert_allclose(got, expected, atol=2e-5)


def test_generate_jsonl_with_a_bom_reads_the_prompts(tmp_path):
    from jaxaccel.cli.generate import read_prompts

    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "Once upon"}, {"prompt": "é, then \u2603"}]
    path.write_bytes(BOM + "\n".join(json.dumps(r) for r in rows).encode("utf-8"))
    assert read_prompts(path) == [r["prompt"] for r in rows]


def test_image_list_with_a_bom_names_the_files(tmp_path):
    from jaxaccel.inputs.images import read_list

    path = tmp_path / "images.txt"
    path.write_bytes(BOM + b"a.png\r\nsub/b.jpg\r\n")
    assert read_list(path) == [tmp_path / "a.png", tmp_path / "sub" / "b.jpg"]


def test_json_metadata_with_a_bom_is_read(tmp_path):
    from jaxaccel.utils.files import read_json

    (tmp_path / "modules.json").write_bytes(BOM + b'[{"type": "x"}]')
    assert read_json(tmp_path / "modules.json", list) == [{"type": "x"}]


OTHER_ENCODINGS = {
    "utf-16": ("hello\nworld\n".encode("utf-16"), "UTF-16"),  # with its BOM, as Notepad saves
    "utf-16-be": (codecs.BOM_UTF16_BE + "hi\n".encode("utf-16-be"), "UTF-16-BE"),
    "utf-32": ("hi\n".encode("utf-32"), "UTF-32"),
    "latin-1": ("café\nnaïve\n".encode("latin-1"), "not UTF-8"),
}


@pytest.mark.parametrize("encoding", sorted(OTHER_ENCODINGS))
@pytest.mark.parametrize("command", ["embed", "generate", "classify"])
def test_a_file_in_another_encoding_is_one_line_naming_it(encoding, command, minilm_ckpt,
                                                          tmp_path, capsys, monkeypatch):
    data, needle = OTHER_ENCODINGS[encoding]
    path = tmp_path / "input.txt"
    path.write_bytes(data)
    code, _, err = run_cli(capsys, monkeypatch, command, minilm_ckpt, "--input", path)
    line = one_error_line(err)
    assert code == 2 and str(path) in line and needle in line, err


# Caches that cannot be written ----------------------------------------------------------

def _blocked_env(tmp_path) -> dict:
    """HOME and XDG_CACHE_HOME below a regular file: nothing can be created there, even by
    root (for whom a read-only mode bit does not stop writes)."""
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    return {**os.environ, "PYTHONPATH": str(ROOT), "HOME": str(blocker / "home"),
            "XDG_CACHE_HOME": str(blocker / "cache")}


def _run(env, *args) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-m", "jaxaccel.cli.main", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning: cannot write")]


def test_embed_under_an_unwritable_cache_warns_once_per_cache_and_runs(minilm_ckpt, tmp_path):
    env = _blocked_env(tmp_path)
    sentences, expected = _reference(2)
    code, out, err = _run(env, "embed", minilm_ckpt, "-t", sentences[0], "-t", sentences[1],
                          "--json")
    assert code == 0, err
    np.testing.assert_allclose(np.array(json.loads(out)["embeddings"]), expected, atol=2e-5)
    lines = _warnings(err)
    caches = {line.split(" at ")[0] for line in lines}
    assert len(caches) == len(lines), err  # one warning per cache
    compile_line = next(line for line in lines if "compile cache" in line)
    assert env["XDG_CACHE_HOME"] in compile_line and "--compile-cache" in compile_line
    assert all("XDG_CACHE_HOME" in line or "--" in line for line in lines), err
    assert "Traceback" not in err and "error:" not in err


def test_an_unwritable_compile_cache_flag_warns_and_runs(minilm_ckpt, tmp_path):
    """--compile-cache pointing below a file: the same fallback, naming that directory."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAXACCEL_KERNELS": "0"}
    (tmp_path / "file").write_text("")
    code, out, err = _run(env, "embed", minilm_ckpt, "-t", "hi", "--compile-cache",
                          tmp_path / "file" / "xla", "-q")
    assert code == 0, err
    [line] = _warnings(err)
    assert str(tmp_path / "file" / "xla") in line and "--compile-cache" in line


def test_generate_and_convert_under_an_unwritable_cache(tmp_path):
    from real_checkpoints import build, greedy, save

    model = build("gpt2")
    src = save(model, tmp_path / "src")
    env = _blocked_env(tmp_path)
    code, _, err = _run(env, "convert", src, tmp_path / "ckpt", "-q")
    assert code == 0 and "Traceback" not in err, err
    code, out, err = _run(env, "generate", tmp_path / "ckpt", "--prompt-ids", "3,4,5", "-n",
                          "5", "--greedy", "--json", "-q")
    assert code == 0, err
    assert json.loads(out)["tokens"][0][3:] == greedy(model, [3, 4, 5], 5)
    assert _warnings(err) and "Traceback" not in err


def test_chunk_cache_directory_that_cannot_be_written_is_skipped(tmp_path, monkeypatch, capsys):
    from jaxaccel.checkpoint import chunk_cache

    (tmp_path / "file").write_text("")
    monkeypatch.setenv("JAXACCEL_CACHE_DIR", str(tmp_path / "file" / "chunks"))
    monkeypatch.delenv("JAXACCEL_NO_CACHE", raising=False)
    assert chunk_cache.enabled() is False
    err = capsys.readouterr().err
    assert str(tmp_path / "file" / "chunks") in err and "--cache-dir" in err
    monkeypatch.setenv("JAXACCEL_CACHE_DIR", str(tmp_path / "ok"))
    assert chunk_cache.enabled() is True and (tmp_path / "ok").is_dir()


def test_user_cache_dir_follows_xdg_and_home(tmp_path, monkeypatch):
    from jaxaccel.utils.files import user_cache_dir

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert user_cache_dir("xla") == tmp_path / "xdg" / "jaxaccel" / "xla"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_cache_dir("kernels") == tmp_path / "home" / ".cache" / "jaxaccel" / "kernels"
