"""Compile-while-restoring gives the same embeddings as a plain load, its first call runs the
ahead-of-time executable, and a warm persistent compile cache is actually hit."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxaccel import coldstart
from jaxaccel.embed import Embedder
from jaxaccel.loader import load_model
from jaxaccel.sharding import Layout

# Device checks skip these (`-m "not cpu_only"`): they need meshes of 8 simulated CPU devices
# (data=2,model=4).
pytestmark = pytest.mark.cpu_only

TEXTS = ["A man is eating food.", "The new movie is awesome.", "short", "x " * 20]


@pytest.mark.parametrize("overlap", [True, False])
def test_start_embedder_matches_plain_load(minilm_ckpt, overlap):
    layout = Layout.create("data=2,model=4", "dp_tp")
    started = coldstart.start_embedder(minilm_ckpt, layout, rows=len(TEXTS), tokens=32,
                                       batch_size=8, overlap=overlap)
    assert set(started.timings) >= {"plan", "restore", "compile", "ready"}
    got = started.embedder.embed_texts(TEXTS)[0]
    assert started.embedder.fn.jitted._cache_size() == 0, "first call traced instead of AOT"
    want = Embedder(load_model(minilm_ckpt, layout), batch_size=8).embed_texts(TEXTS)[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_warm_compile_cache_is_hit(minilm_ckpt, tmp_path):
    cache = tmp_path / "xla-cache"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    argv = [sys.executable, "-m", "jaxaccel.bench.coldstart_worker", str(minilm_ckpt),
            "data=2,model=4", "dp_tp", "overlap", str(cache), "8", "16"]
    runs = []
    for _ in range(2):
        out = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0]["cache_hits"] == 0 and any(cache.iterdir())
    assert runs[1]["cache_hits"] >= 1
    assert runs[0]["precompiled_used"] and runs[1]["precompiled_used"]
