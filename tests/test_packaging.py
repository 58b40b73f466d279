"""A non-editable install works: a wheel built from a clean copy of the repository ships
everything the CPU kernels need, and an installed copy builds and runs them.

The wheel is built offline with this interpreter's setuptools (`--no-build-isolation`) and
installed with `--no-deps` into a fresh venv that sees this environment's site-packages
through a `.pth` line (jax and friends) but not the editable jaxaccel: a path added by a
`.pth` line is not itself a site directory, so the editable install's finder in it never
runs, and the venv's own site-packages, holding the wheel, comes first.
"""

import json
import os
import pathlib
import re
import shutil
import site
import subprocess
import sys
import zipfile

import jax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
KERNEL_DIR = "jaxaccel/backends/cpu"
QUOTED_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.M)

# Run inside the fresh venv: build the bf16 matmul kernel (which includes both headers) into
# the empty cache the environment names, then multiply with it. Warnings are errors, so a
# fallback to plain XLA ("falling back to plain XLA ...") fails instead of passing slowly.
IN_VENV = """
import json, sys, warnings
warnings.simplefilter("error")
import jax.numpy as jnp, ml_dtypes, numpy as np
import jaxaccel
from jaxaccel.backends.cpu import build, packed
library = build.compile_library(build.SOURCE_DIR / packed.KERNEL_SOURCE)
rng = np.random.default_rng(0)
x = rng.standard_normal((3, 40)).astype(ml_dtypes.bfloat16)
w = rng.standard_normal((40, 70)).astype(ml_dtypes.bfloat16)
y = np.asarray(packed.matmul(jnp.asarray(x), packed.pack(jnp.asarray(w), 1)))
print(json.dumps({"jaxaccel": jaxaccel.__file__, "prefix": sys.prefix,
                  "library": str(library), "kernel": packed.kernel_available(),
                  "y": y.tolist(), "x": x.astype(np.float32).tolist(),
                  "w": w.astype(np.float32).tolist()}))
"""


def _clean_copy(dest: pathlib.Path) -> pathlib.Path:
    """The files git tracks (as they are in the work tree), nothing built or ignored."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True,
                            check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the work tree is not copied
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    tmp = tmp_path_factory.mktemp("packaging")
    source = _clean_copy(tmp / "src")
    out = tmp / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "--no-index", "--quiet", "-w", str(out), str(source)], check=True,
                   capture_output=True, timeout=300)
    (built,) = out.glob("jaxaccel-*.whl")
    return built


def test_wheel_ships_every_file_the_kernels_include(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    sources = sorted(p.name for p in (REPO / KERNEL_DIR).glob("*.cc"))
    assert sources and {f"{KERNEL_DIR}/{s}" for s in sources} <= names
    ffi_headers = pathlib.Path(jax.ffi.include_dir())
    for source in sources:
        for header in QUOTED_INCLUDE.findall((REPO / KERNEL_DIR / source).read_text()):
            # Our headers sit beside the sources; XLA's FFI headers come with jaxlib.
            assert f"{KERNEL_DIR}/{header}" in names or (ffi_headers / header).is_file(), (
                f"{source} includes {header!r}, which the wheel does not ship")
    # Every C++ source under jaxaccel/ (the restore's transpose too) is compiled at first use.
    everywhere = {str(p.relative_to(REPO)) for p in (REPO / "jaxaccel").rglob("*.cc")}
    assert everywhere <= names, sorted(everywhere - names)


def _fresh_venv(path: pathlib.Path) -> pathlib.Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True,
                   timeout=120)
    python = path / "bin" / "python"
    target = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path"
                             "('purelib'))"], capture_output=True, text=True, check=True)
    here = [p for p in site.getsitepackages() if pathlib.Path(p).is_dir()]
    pathlib.Path(target.stdout.strip(), "outer-site-packages.pth").write_text(
        "\n".join(here) + "\n")
    return python


@pytest.mark.cpu_only  # builds and runs the C++ XLA:CPU kernels
def test_installed_wheel_builds_and_runs_the_cpu_kernels(wheel, tmp_path):
    import numpy as np

    python = _fresh_venv(tmp_path / "venv")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                    "--no-deps", "--no-index", "--ignore-installed", "--quiet", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    cache, workdir = tmp_path / "cache", tmp_path / "run"
    workdir.mkdir()  # not the repository: `python -c` puts the working directory on sys.path
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "JAXACCEL_KERNELS", "CXXFLAGS")}
    # A fresh kernel cache, whichever variable the build reads, so no prebuilt library is
    # picked up: the compile below must succeed from the installed files alone.
    env.update(XDG_CACHE_HOME=str(cache), JAXACCEL_CACHE_DIR=str(cache / "jaxaccel"),
               JAX_PLATFORMS="cpu")
    done = subprocess.run([str(python), "-c", IN_VENV], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    venv = (tmp_path / "venv").resolve()
    assert pathlib.Path(result["jaxaccel"]).resolve().is_relative_to(venv), result["jaxaccel"]
    assert pathlib.Path(result["library"]).resolve().is_relative_to(cache.resolve())
    assert result["kernel"]
    x, w = np.array(result["x"], np.float32), np.array(result["w"], np.float32)
    np.testing.assert_allclose(np.array(result["y"]), x @ w, rtol=1e-5, atol=1e-4)
