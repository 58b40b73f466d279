"""Exit statuses after a failure (issue 29, kind 1): a launched child's failure is the launch's
status, named on one line; Ctrl-C (SIGINT) at any point of `convert`, `embed` and `generate`
exits 130 (or 1 with one `error:` line) without a traceback and leaves nothing half-written."""

from __future__ import annotations

import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from cli_runner import one_error_line, run_cli

import real_checkpoints as rc

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("child, code, named", [
    ("import sys; sys.exit(5)", 5, "exited with status 5"),
    ("raise SystemExit('boom')", 1, "exited with status 1"),
    ("import os, signal; os.kill(os.getpid(), signal.SIGTERM)", 128 + 15, "SIGTERM"),
])
def test_launch_exits_with_the_childs_status(child, code, named, capsys, monkeypatch):
    status, _, err = run_cli(capsys, monkeypatch, "launch", "-q", "-n", "2", "--",
                             sys.executable, "-c",
                             f"import os\nif os.environ['JAX_PROCESS_ID'] == '1':\n    {child}")
    assert status == code, err
    line = one_error_line(err)
    assert "process 1" in line and named in line, err


def test_launch_of_a_succeeding_child_exits_0(capsys, monkeypatch):
    assert run_cli(capsys, monkeypatch, "launch", "-n", "1", "--", sys.executable, "-c",
                   "pass")[0] == 0


# -- SIGINT fuzz: subprocesses, a few random points of each command ------------------------

def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "JAXACCEL_KERNELS": "0"}


def _start(args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jaxaccel.cli.main", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env())


def _interrupt_after(args, seconds: float) -> tuple[int | None, str]:
    """(exit code, stderr) of `args` sent SIGINT after `seconds`; code None when the command
    had already finished. It is 0 when the signal came during the interpreter's shutdown,
    after the work was done: the caller checks that the output is whole."""
    proc = _start(args)
    time.sleep(seconds)
    finished = proc.poll() is not None
    if not finished:
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    return (None if finished else proc.returncode), err


def _duration(args) -> float:
    start = time.monotonic()
    proc = _start(args)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return time.monotonic() - start


def _no_partial_files(directory: pathlib.Path) -> None:
    leftovers = [p.name for p in directory.rglob("*") if ".partial" in p.name or ".old-" in p.name]
    assert leftovers == [], leftovers


@pytest.fixture(scope="module")
def llama_dirs(tmp_path_factory):
    """A tiny Llama source (transformers) and its converted checkpoint."""
    from jaxaccel.conversion.hf import convert

    root = tmp_path_factory.mktemp("sigint")
    src = rc.save(rc.build("llama", hidden=32, layers=2), root / "src")
    convert(src, root / "ckpt")
    return src, root / "ckpt"


def _check_convert(out: pathlib.Path, code) -> None:
    dest = out / "ckpt"
    if dest.exists():  # published only whole: the manifest is there and names every array
        manifest = json.loads((dest / "jaxaccel.json").read_text())
        assert manifest["arrays"]
    _no_partial_files(out)


def _check_npy(out: pathlib.Path, code) -> None:
    if (out / "e.npy").exists():
        assert np.load(out / "e.npy").shape[0] == 3
    _no_partial_files(out)


def _check_jsonl(out: pathlib.Path, code) -> None:
    if (out / "g.jsonl").exists():
        rows = [json.loads(line) for line in (out / "g.jsonl").read_text().splitlines()]
        assert len(rows) == 2
    _no_partial_files(out)


def _commands(llama_src, llama_ckpt, minilm_ckpt):
    return {
        "convert": (lambda out: ["convert", llama_src, out / "ckpt", "--dtype", "bfloat16"],
                    _check_convert),
        "embed": (lambda out: ["embed", minilm_ckpt, "-t", "a", "-t", "b c", "-t", "d",
                               "--out", out / "e.npy"], _check_npy),
        "generate": (lambda out: ["generate", llama_ckpt, "--prompt-ids", "1,2,3;4,5",
                                  "-n", "6", "--greedy", "--output", out / "g.jsonl"],
                     _check_jsonl),
    }


@pytest.mark.parametrize("command", ["convert", "embed", "generate"])
def test_sigint_at_random_points_exits_130_and_leaves_nothing_half_written(
        command, llama_dirs, minilm_ckpt, tmp_path):
    make_args, check = _commands(*llama_dirs, minilm_ckpt)[command]
    (tmp_path / "baseline").mkdir()
    whole = _duration(make_args(tmp_path / "baseline"))
    rng = random.Random(f"sigint-{command}")
    for attempt in range(4):  # bounded: 4 runs per command, each under `whole` seconds
        out = tmp_path / f"run{attempt}"
        out.mkdir()
        code, err = _interrupt_after(make_args(out), rng.uniform(0.05, 0.95) * whole)
        assert "Traceback" not in err, err
        if code in (None, 0):  # finished before the signal (or it came at shutdown): whole
            check(out, code)
            continue
        assert code in (130, 1), (code, err)
        if code == 130:
            assert err.rstrip().splitlines()[-1] == "error: interrupted", err
        else:
            one_error_line(err)
        check(out, code)
