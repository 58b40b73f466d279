"""Remote checkpoints against real servers on 127.0.0.1: moto's S3, the GCS emulator, a plain
HTTP server with Range support (tests/servers.py). References: the local restore of the same
checkpoint, and request/byte counts taken at a proxy in front of the server."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import crc32c
import numpy as np
import pytest
from cli_runner import run_subprocess

from jaxaccel.parallel import launcher
from jaxaccel.errors import CheckpointError, StorageError

pytestmark = pytest.mark.cpu_only  # meshes of the 8 simulated host devices

ROOT = pathlib.Path(__file__).resolve().parents[1]
SENTENCES = ["A man is eating food.", "Short.", "ünïcödé and emoji 🙂 tokenise too"]
DATA = "/params/d/"  # OCDBT data files: the chunks' bytes


def _embed(ckpt, mesh="data=2,model=4"):
    from jaxaccel.runtime.embed import Embedder
    from jaxaccel.startup.loader import load_model
    from jaxaccel.parallel.sharding import Layout

    loaded = load_model(ckpt, Layout.create(mesh))
    return Embedder(loaded, batch_size=4).embed_texts(SENTENCES)[0], loaded


@pytest.fixture(scope="module")
def local_embeddings(minilm_ckpt):
    return _embed(minilm_ckpt)[0]


def _cache_entries(cache_dir: pathlib.Path) -> list[pathlib.Path]:
    return [p for p in cache_dir.rglob("*") if p.is_file() and p.name != "source.json"]


def _entry_ok(path: pathlib.Path) -> bool:
    """An entry is a chunk's stored bytes: values then their crc32c (little-endian)."""
    data = path.read_bytes()
    return len(data) > 4 and crc32c.crc32c(data[:-4]) == int.from_bytes(data[-4:], "little")


def test_restore_from_s3_gcs_and_http_equals_local(s3_minilm, gcs_minilm, http_server,
                                                    s3_proxy, local_embeddings, monkeypatch):
    """Embeddings on data=2,model=4 are bit-for-bit the local restore's, from each server."""
    monkeypatch.setenv("JAXACCEL_NO_CACHE", "1")
    for url in (s3_minilm, gcs_minilm, f"{http_server.url}/minilm"):
        got, loaded = _embed(url)
        np.testing.assert_array_equal(got, local_embeddings, err_msg=url)
        assert loaded.stats.bytes_from_network > 0 and loaded.stats.bytes_from_cache == 0
    assert s3_proxy.count(DATA)[1] > 0  # the s3 restore went through the proxy


def test_unwritable_cache_directory_still_restores_and_tokenizes(
        s3_minilm, s3_proxy, local_embeddings, tmp_path, monkeypatch, capfd):
    """Every cache is optional (chunks, and the remote tokenizer.json's local copy): under a
    directory that cannot be created, one warning each, and the embeddings are the local ones."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("JAXACCEL_CACHE_DIR", str(blocker / "chunks"))
    monkeypatch.delenv("JAXACCEL_NO_CACHE", raising=False)
    got, _ = _embed(s3_minilm)
    np.testing.assert_array_equal(got, local_embeddings)
    warnings = [line for line in capfd.readouterr().err.splitlines()
                if line.startswith("warning: cannot write")]
    assert any("file cache" in line for line in warnings), warnings
    assert all("JAXACCEL_CACHE_DIR" in line for line in warnings), warnings


def test_second_restore_asks_the_server_for_no_chunk(s3_minilm, s3_proxy, local_embeddings,
                                                     tmp_path):
    first, loaded = _embed(s3_minilm)
    requests = s3_proxy.count(DATA)[0]  # chunks, plus the OCDBT b-tree node(s)
    index_requests = requests - loaded.stats.network_requests
    assert loaded.stats.network_requests > 0 and 0 < index_requests <= 2
    s3_proxy.reset_counts()
    second, again = _embed(s3_minilm)
    assert s3_proxy.count(DATA)[0] == index_requests  # not one chunk requested
    assert again.stats.network_requests == 0
    assert again.stats.bytes_from_cache >= loaded.stats.bytes_from_network
    np.testing.assert_array_equal(first, local_embeddings)
    np.testing.assert_array_equal(second, local_embeddings)


def test_corrupted_cache_entry_is_evicted_and_fetched_again(s3_minilm, s3_proxy,
                                                            local_embeddings, tmp_path):
    _embed(s3_minilm)
    entries = _cache_entries(tmp_path / "cache")
    victim = max(entries, key=lambda p: p.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0x01
    victim.write_bytes(bytes(data))
    s3_proxy.reset_counts()
    got, loaded = _embed(s3_minilm)
    np.testing.assert_array_equal(got, local_embeddings)
    assert loaded.stats.network_requests == 1  # only the bad entry came again
    assert loaded.stats.bytes_from_network == len(data)
    assert _entry_ok(victim)


def _restore_process(url: str, env: dict, extra: str = "") -> subprocess.Popen:
    code = ("import sys; from jaxaccel.startup.loader import load_model; "
            f"m = load_model({url!r}); print('OK', m.stats.bytes_from_network, "
            f"m.stats.bytes_from_cache); {extra}")
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)


def test_sigkill_during_cache_fill_leaves_nothing_served(s3_minilm, s3_proxy, tmp_path,
                                                         local_embeddings):
    # After the first few chunks, every request hangs: the process is killed mid-fill.
    s3_proxy.stall(20, -1, match=DATA, after=3)
    proc = _restore_process(s3_minilm, dict(os.environ))
    deadline = time.monotonic() + 60
    while s3_proxy.count(DATA)[0] < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    s3_proxy.clear_faults()
    entries = _cache_entries(tmp_path / "cache")
    served = [p for p in entries if not p.name.startswith(".tmp-")]
    assert all(_entry_ok(p) for p in served), served
    got, _ = _embed(s3_minilm)
    np.testing.assert_array_equal(got, local_embeddings)


def test_two_concurrent_restores_fill_one_cache(s3_minilm, s3_proxy, tmp_path):
    procs = [_restore_process(s3_minilm, dict(os.environ)) for _ in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for proc, (out, err) in zip(procs, outs):
        assert proc.returncode == 0 and out.startswith("OK"), err[-2000:]
    entries = _cache_entries(tmp_path / "cache")
    assert entries and all(_entry_ok(p) for p in entries)
    assert not [p for p in entries if p.name.startswith(".tmp-")]


def test_server_errors_then_success_restore(s3_minilm, s3_proxy, local_embeddings,
                                            monkeypatch):
    monkeypatch.setenv("JAXACCEL_NO_CACHE", "1")
    monkeypatch.setenv("JAXACCEL_REMOTE_RETRIES", "8")
    s3_proxy.fail(3, 500, match=DATA)
    s3_proxy.fail(2, 503, match="jaxaccel.json")
    s3_proxy.drop(2, match=DATA)
    got, _ = _embed(s3_minilm)
    np.testing.assert_array_equal(got, local_embeddings)


def test_permanent_server_error_names_url_and_array(s3_minilm, s3_proxy, monkeypatch):
    from jaxaccel.startup.loader import load_model

    monkeypatch.setenv("JAXACCEL_NO_CACHE", "1")
    s3_proxy.fail(-1, 500, match=DATA, after=2)  # the b-tree index reads get through
    with pytest.raises(StorageError) as err:
        load_model(s3_minilm)
    message = str(err.value)
    assert "\n" not in message and f"{s3_minilm}/params/d/" in message
    assert "array '" in message and "chunk (" in message
    # With a small budget the prefetch waits for room that the failed reads never free: the
    # restore must still end with the error, not hang.
    s3_proxy.clear_faults()
    s3_proxy.fail(-1, 500, match=DATA, after=2)
    with pytest.raises(StorageError, match="read failed"):
        load_model(s3_minilm, host_memory_budget=4 << 20)


def test_corrupted_response_is_fetched_again(s3_minilm, s3_proxy, local_embeddings):
    s3_proxy.corrupt(1, match=DATA)  # the b-tree index: read again
    s3_proxy.corrupt(2, match=DATA, after=3)  # two chunks: fetched again
    got, loaded = _embed(s3_minilm)
    np.testing.assert_array_equal(got, local_embeddings)
    assert loaded.stats.network_requests >= 2  # the two corrupted chunks came twice
    assert all(_entry_ok(p) for p in _cache_entries(s3_proxy_cache(s3_proxy)))


def s3_proxy_cache(proxy) -> pathlib.Path:
    return pathlib.Path(os.environ["JAXACCEL_CACHE_DIR"])


def test_always_corrupted_response_is_a_clear_error(s3_minilm, s3_proxy):
    from jaxaccel.startup.loader import load_model

    s3_proxy.corrupt(-1, match=DATA, after=2)
    with pytest.raises(CheckpointError, match=r"array '.*', chunk \(.*crc32c mismatch"):
        load_model(s3_minilm)
    assert all(_entry_ok(p) for p in _cache_entries(s3_proxy_cache(s3_proxy)))


def test_server_dying_mid_restore_is_a_clear_error_and_caches_nothing_bad(s3_minilm,
                                                                         s3_proxy, minilm_ckpt):
    from jaxaccel.startup.loader import load_model

    s3_proxy.drop(-1, match=DATA, after=10)
    with pytest.raises(StorageError, match=r"^s3://.*read failed"):
        load_model(s3_minilm)
    entries = _cache_entries(s3_proxy_cache(s3_proxy))
    stored = json.loads((minilm_ckpt / "jaxaccel.json").read_text())["arrays"].values()
    chunks = sum(len(a["chunk_checksums"]) for a in stored)
    assert len(entries) < chunks and all(_entry_ok(p) for p in entries)  # only whole ones


def test_missing_checkpoint_and_unreachable_endpoint_fail_before_reading(s3_minilm, s3_proxy,
                                                                        monkeypatch):
    from jaxaccel.startup.loader import load_model

    with pytest.raises(CheckpointError, match=r"^s3://jaxaccel-test/nothere/jaxaccel.json: "):
        load_model("s3://jaxaccel-test/nothere")
    with pytest.raises(StorageError, match=r"^s3://no-such-bucket/x: .*bucket does not exist"):
        load_model("s3://no-such-bucket/x")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("JAXACCEL_REMOTE_RETRIES", "1")
    with pytest.raises(StorageError, match="unreachable"):
        load_model(s3_minilm)


def test_wrong_credentials_fail_before_reading(monkeypatch):
    """An S3 server that checks signatures: an unknown access key is one line naming the URL
    and saying the credentials are wrong, raised on the first request (the manifest)."""
    import servers

    from jaxaccel.startup.loader import load_model

    server = servers.MotoS3(check_credentials=True)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIANOTAKEYOFTHISSERVER")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        monkeypatch.setenv("JAXACCEL_REMOTE_RETRIES", "1")
        with pytest.raises((StorageError, CheckpointError),
                           match=r"^s3://jaxaccel-test/ckpt/jaxaccel.json: .*wrong credentials"
                           ) as raised:
            load_model("s3://jaxaccel-test/ckpt")
        assert "\n" not in str(raised.value)
    finally:
        server.stop()


def test_two_processes_each_fetch_half(s3_minilm, s3_server, minilm_ckpt, tmp_path,
                                       local_embeddings):
    """2 processes x 4 devices, `model` split across them: each process's proxy sees about
    half of the checkpoint's chunk bytes, and the embeddings equal the local restore's."""
    import servers

    proxies = [servers.FaultProxy(s3_server.url) for _ in range(2)]
    port = launcher.free_port()
    worker = ROOT / "tests" / "multihost_worker.py"
    procs = []
    for i, proxy in enumerate(proxies):
        env = launcher.process_env(i, 2, port, 4, 120)
        env.update(AWS_ENDPOINT_URL=proxy.url, JAXACCEL_NO_CACHE="1",
                   PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
        procs.append(subprocess.Popen([sys.executable, str(worker), s3_minilm,
                                       "model=2,stage=4", "dp_tp_pp"], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True, cwd=ROOT))
    outs = [p.communicate(timeout=300) for p in procs]
    for proc, (_, err) in zip(procs, outs):
        assert proc.returncode == 0, err[-3000:]
    result = json.loads(outs[0][0])
    total = sum(p.stat().st_size for p in (minilm_ckpt / "params" / "d").iterdir())
    shares = [proxy.count(DATA)[1] / total for proxy in proxies]
    print("per-process chunk bytes / stored bytes:", shares)
    assert all(0.45 <= share <= 0.55 for share in shares), shares
    got = np.array(result["embeddings"])
    from multihost_worker import SENTENCES as WORKER_SENTENCES

    want = _embed(minilm_ckpt, "data=1")[1]
    from jaxaccel.runtime.embed import Embedder

    want = Embedder(want, batch_size=8).embed_texts(WORKER_SENTENCES)[0]
    assert (got * want).sum(-1).min() >= 0.99999
    for proxy in proxies:
        proxy.stop()


def _convert_process(src, dest: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "jaxaccel.cli.main", "convert", str(src), dest,
                             "--quiet"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)


def test_convert_to_s3_then_restore(minilm_src, s3_minilm, s3_proxy, local_embeddings,
                                    monkeypatch):
    """(gs:// writes are not tested: gcp-storage-emulator answers OCDBT's conditional
    manifest update with a generation tensorstore rejects, "Malformed StorageGeneration".)"""
    from jaxaccel.conversion.hf import convert

    monkeypatch.setenv("JAXACCEL_NO_CACHE", "1")
    for url in ("s3://jaxaccel-test/converted",):
        convert(minilm_src, url)
        got, _ = _embed(url)
        np.testing.assert_array_equal(got, local_embeddings, err_msg=url)
        with pytest.raises(CheckpointError, match="already holds"):
            convert(minilm_src, url)


def test_killed_convert_to_bucket_leaves_nothing_that_loads(minilm_src, s3_minilm, s3_proxy):
    from jaxaccel.startup.loader import load_model

    url = "s3://jaxaccel-test/killed"
    s3_proxy.stall(60, -1, match="/killed/params/d/", after=2)  # hang mid-write
    proc = _convert_process(minilm_src, url, dict(os.environ))
    deadline = time.monotonic() + 120
    while s3_proxy.count("/killed/params/d/")[0] < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    s3_proxy.clear_faults()
    with pytest.raises(CheckpointError, match=r"killed/jaxaccel.json: missing"):
        load_model(url)
    code, _, err = run_subprocess("convert", minilm_src, url, env=dict(os.environ), cwd=ROOT)
    assert code == 1 and "already holds" in err and "--overwrite" in err


def test_cli_inspect_verify_plan_and_cache_commands(s3_minilm, s3_proxy, minilm_ckpt, capsys,
                                                    monkeypatch, tmp_path):
    from cli_runner import run_cli

    code, out, err = run_cli(capsys, monkeypatch, "inspect", s3_minilm, "--json")
    assert code == 0, err
    local = json.loads((minilm_ckpt / "jaxaccel.json").read_text())
    assert json.loads(out)["arrays"].keys() == local["arrays"].keys()
    code, out, err = run_cli(capsys, monkeypatch, "verify", s3_minilm, "--json")
    assert code == 0 and json.loads(out)["ok"] is True, err
    from jaxaccel.startup.loader import load_model

    load_model(s3_minilm)  # fills the cache
    cache_dir = tmp_path / "cache"
    code, out, _ = run_cli(capsys, monkeypatch, "--cache-dir", cache_dir, "cache", "ls", "--json")
    listing = json.loads(out)
    entries = _cache_entries(cache_dir)
    assert [c["url"] for c in listing["checkpoints"]] == [s3_minilm]
    assert listing["total_bytes"] == sum(p.stat().st_size for p in entries) > 0
    # LRU: the oldest entries go first, down to the size asked for
    for age, path in enumerate(sorted(entries)):
        os.utime(path, (1000 + age, 1000 + age))
    keep = sum(p.stat().st_size for p in sorted(entries)[-5:])
    code, out, _ = run_cli(capsys, monkeypatch, "--cache-dir", cache_dir, "cache", "prune",
                           "--max-size", str(keep), "--json")
    assert code == 0 and json.loads(out)["total_bytes"] == keep
    assert sorted(_cache_entries(cache_dir)) == sorted(entries)[-5:]
    code, out, _ = run_cli(capsys, monkeypatch, "--cache-dir", cache_dir, "cache", "clear",
                           "--json")
    assert code == 0 and json.loads(out)["freed_bytes"] == keep
    assert not _cache_entries(cache_dir)
