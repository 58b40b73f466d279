"""The CLI contract: commands, flags and JSON fields that scripts depend on."""

import json
import subprocess
import sys

import numpy as np
import pytest


def jaxaccel(*args, cwd=None, timeout=300):
    proc = subprocess.run([sys.executable, "-m", "jaxaccel.cli.main", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def reference_vectors(minilm_ckpt):
    """Embeddings through the library API (itself checked against transformers elsewhere)."""
    from jaxaccel.runtime.embed import Embedder
    from jaxaccel.startup.loader import load_model

    return Embedder(load_model(minilm_ckpt)).embed_texts(["first text", "second, longer text"])[0]


def test_embed_json_and_out_agree(minilm_ckpt, tmp_path, reference_vectors):
    out = tmp_path / "vectors.npy"
    code, stdout, stderr = jaxaccel("embed", minilm_ckpt, "--text", "first text", "--text",
                                    "second, longer text", "--json", "--out", out)
    assert code == 0, stderr
    payload = json.loads(stdout)
    assert set(payload) == {"model", "dtype", "embeddings"}
    assert payload["dtype"] == "float32"
    vectors = np.load(out)
    assert vectors.dtype == np.float32 and vectors.shape == (2, 384)
    np.testing.assert_allclose(np.array(payload["embeddings"]), vectors, atol=1e-6)
    np.testing.assert_allclose(vectors, reference_vectors, atol=1e-5)


def test_embed_input_file_keeps_order(minilm_ckpt, tmp_path, reference_vectors):
    texts = tmp_path / "texts.txt"
    texts.write_text("second, longer text\nfirst text\n", encoding="utf-8")
    out = tmp_path / "v.npy"
    code, _, stderr = jaxaccel("embed", minilm_ckpt, "--input", texts, "--out", out,
                               "--batch-size", "1")
    assert code == 0, stderr
    np.testing.assert_allclose(np.load(out), reference_vectors[::-1], atol=1e-5)


def test_inspect_json_lists_every_array(minilm_ckpt):
    code, stdout, stderr = jaxaccel("inspect", minilm_ckpt, "--json")
    assert code == 0, stderr
    payload = json.loads(stdout)
    assert payload["family"] == "bert" and len(payload["arrays"]) == 21
    assert payload["total_bytes"] == sum(a["nbytes"] for a in payload["arrays"].values())


def test_demo_converts_once_and_prints_similarities(tmp_path):
    code, stdout, stderr = jaxaccel("demo", cwd=tmp_path)
    assert code == 0, stderr
    assert (tmp_path / "checkpoints" / "minilm" / "jaxaccel.json").is_file()
    assert "cosine similarity" in stdout and "A monkey is playing" in stdout
    code, stdout, stderr = jaxaccel("demo", "--json", cwd=tmp_path)
    assert code == 0, stderr
    payload = json.loads(stdout)
    assert "convert" not in payload["seconds"]  # converted once, reused
    similarity = np.array(payload["similarity"])
    np.testing.assert_allclose(np.diag(similarity), 1.0, atol=1e-5)
    assert similarity[0, 1] > 0.5 > similarity[0, 2]  # eating ~ eating, not ~ movies


def test_help_explains_every_command():
    code, stdout, _ = jaxaccel("--help")
    assert code == 0
    for command in ("convert", "inspect", "embed", "demo", "bench"):
        assert command in stdout


@pytest.mark.cpu_only  # --host-devices simulates CPU devices only
def test_host_devices_flag_simulates_devices(minilm_ckpt):
    """Without --host-devices a data=4 mesh cannot be built; with it the same command runs."""
    import os

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    args = [sys.executable, "-m", "jaxaccel.cli.main"]
    embed = ["embed", str(minilm_ckpt), "--text", "hi", "--mesh", "data=4", "--json", "--quiet"]
    refused = subprocess.run(args + embed, env=env, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "needs 4 devices" in refused.stderr, refused.stderr
    ran = subprocess.run(args + ["--host-devices", "4"] + embed, env=env, capture_output=True,
                         text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    assert len(json.loads(ran.stdout)["embeddings"]) == 1
