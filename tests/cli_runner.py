"""Run the `jaxaccel` CLI in-process, exactly as `main()` does (errors -> one line + exit code).

In-process is ~50x faster than a subprocess (no jax start-up), so the bad-input and fault
tests stay quick; tests that must kill or limit a process use subprocesses instead.
"""

from __future__ import annotations

import subprocess
import sys


def run_cli(capsys, monkeypatch, *args) -> tuple[int, str, str]:
    from jaxaccel.cli.main import app, run_with_clean_errors

    capsys.readouterr()  # drop anything printed before
    monkeypatch.setattr(sys, "argv", ["jaxaccel", *map(str, args)])
    code = run_with_clean_errors(app)
    out, err = capsys.readouterr()
    return code, out, err


def run_subprocess(*args, timeout: int = 120, **kwargs) -> tuple[int, str, str]:
    proc = subprocess.run([sys.executable, "-m", "jaxaccel.cli.main", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout, **kwargs)
    return proc.returncode, proc.stdout, proc.stderr


def one_error_line(err: str) -> str:
    """The single `error: ...` line a failing command must print (status lines such as
    "restored ..." may precede it; a traceback may not)."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err
    return errors[0]
