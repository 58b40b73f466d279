"""Compile-while-restoring gives the same embeddings as a plain load, its first call runs the
ahead-of-time executable, and a warm persistent compile cache is actually hit."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jaxaccel.startup import coldstart
from jaxaccel.runtime.embed import Embedder
from jaxaccel.startup.loader import load_model
from jaxaccel.parallel.sharding import Layout

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
    assert started.embedder.forward.jitted._cache_size() == 0, "first call traced instead of AOT"
    want = Embedder(load_model(minilm_ckpt, layout), batch_size=8).embed_texts(TEXTS)[0]
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_warm_compile_cache_is_hit(minilm_ckpt, tmp_path):
    cache = tmp_path / "xla-cache"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    argv = [sys.executable, "-m", "jaxaccel.bench.coldstart_worker", json.dumps(
        {"ckpt": str(minilm_ckpt), "mesh": "data=2,model=4", "rules": "dp_tp",
         "mode": "overlap", "cache": str(cache), "rows": 8, "length": 16})]
    runs = []
    for _ in range(2):
        out = subprocess.run(argv, capture_output=True, text=True, env=env, check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    assert runs[0]["cache_hits"] == 0 and any(cache.iterdir())
    assert runs[1]["cache_hits"] >= 1
    assert runs[0]["precompiled_used"] and runs[1]["precompiled_used"]


@pytest.fixture(scope="module")
def gpt2_ckpt(tmp_path_factory):
    """A tiny random GPT-2 from transformers, converted."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from jaxaccel.conversion.hf import convert

    root = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=96, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    transformers.GPT2LMHeadModel(config).save_pretrained(root / "src", safe_serialization=True)
    convert(root / "src", root / "ckpt")
    return root / "ckpt"


@pytest.mark.parametrize("dtype,mesh", [("bfloat16", "data=1,model=1"),
                                        ("float32", "data=2,model=2")])
def test_start_generator_compiles_while_restoring(gpt2_ckpt, dtype, mesh):
    """generate's cold start: programs compiled from the plan before the weights arrive
    (bf16 on one CPU device: for the packed weights) serve the first call without tracing,
    and generate what a Generator built on the restored weights generates."""
    from jaxaccel.runtime.generate import Generator

    layout = Layout.create(mesh, "dp_tp")
    prompts = [[1, 2, 3, 4, 5], [7, 8]]
    started = coldstart.start_generator(gpt2_ckpt, layout, dtype,
                                        prompt_lengths=list(map(len, prompts)), max_new_tokens=6)
    assert set(started.timings) >= {"plan", "restore", "compile", "ready"}
    traced = dict(started.generator.traces)
    got = started.generator.generate(prompts, 6)
    assert started.generator.traces == traced, "first call traced instead of AOT"
    assert all(p.jitted._cache_size() == 0 for p in started.generator.runtime.programs.values())
    loaded = load_model(gpt2_ckpt, layout, dtype)
    want = Generator(loaded.graphdef, loaded.state, loaded.config, layout).generate(prompts, 6)
    assert got == want
