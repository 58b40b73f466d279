"""The notebooks run top to bottom (so they cannot rot), each writing only to a temporary
directory: the repository is left as it was, and stored notebooks carry no outputs."""

import pathlib
import subprocess
import time

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = pathlib.Path(__file__).parents[1] / "notebooks"


def git_status() -> str:
    return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"],
                          cwd=NOTEBOOKS.parent, capture_output=True, text=True).stdout


@pytest.mark.parametrize("name", ["quickstart.ipynb", "sharding.ipynb", "benchmarks.ipynb"])
def test_notebook_executes_and_leaves_the_repository_clean(name, tmp_path, monkeypatch):
    monkeypatch.setenv("JAXACCEL_NOTEBOOK_DIR", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    stored = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not cell.get("outputs") for cell in stored.cells), f"{name} has stored outputs"
    before = git_status()
    start = time.perf_counter()
    NotebookClient(stored, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    print(f"{name}: {time.perf_counter() - start:.1f} s")
    outputs = [o for cell in stored.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert git_status() == before, "the notebook wrote into the repository"
    assert any(tmp_path.iterdir()), "the notebook wrote nothing where it was told to"
