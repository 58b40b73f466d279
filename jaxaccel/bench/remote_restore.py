"""Contenders of `jaxaccel bench restore CKPT --source URL`: restores from a bucket.

Run inside restore_worker (a fresh process each), everything but the timed call prepared
outside the clock:
  remote-cold     jaxaccel from URL, chunk cache enabled but empty (fills it while timed)
  remote-warm     jaxaccel from URL, every chunk already in the cache (filled before the clock)
  remote-orbax    orbax's StandardCheckpointer restoring URL/params (gs:// only: orbax reaches
                  GCS through gcsfs + tensorstore; STORAGE_EMULATOR_HOST for an emulator)
  remote-raw      a raw parallel download of the same data files with boto3 (s3://) or
                  tensorstore (gs://), `storage.concurrency()` ranged GETs in flight: what the
                  server delivers on this machine
"""

from __future__ import annotations

import concurrent.futures
import os
import tempfile

import numpy as np

from jaxaccel.checkpoint import storage

PART_BYTES = 8 << 20  # raw download: one ranged GET per 8 MiB, as s5cmd/boto3 transfers do


def prepare(contender: str, source: str, plan, orbax_restore):
    """A zero-argument function doing the timed restore of `contender`."""
    if contender == "remote-raw":
        return raw_download(source)
    if contender == "remote-orbax":
        return orbax_restore(storage.checkpoint_path(source), plan)
    os.environ["JAXACCEL_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxaccel-bench-cache-")
    os.environ.pop("JAXACCEL_NO_CACHE", None)
    restore = _jaxaccel(source, plan)
    if contender == "remote-warm":
        restore()  # fill the cache; the timed run then reads every chunk from it
    elif contender != "remote-cold":
        raise SystemExit(f"unknown contender {contender!r}")
    return restore


def _jaxaccel(source: str, plan):
    # deferred: jax and the runtime load in the worker process only, not in `jaxaccel bench`
    from jaxaccel.checkpoint.restore import restore_arrays

    return lambda: restore_arrays(source, plan.manifest, plan.targets)


def raw_download(source: str):
    """Download every object under SOURCE/params/d/ (the chunks' data files) into memory."""
    params = storage.checkpoint_path(source) / "params"
    keys = [k for k in storage.list_keys(params) if k.startswith("d/")]
    if storage.checkpoint_path(source).scheme == "s3":
        return _boto3_download(params, keys)
    store = storage.open_kvstore(params)
    return lambda: [np.frombuffer(store.read(k).result().value, np.uint8) for k in keys]


def _boto3_download(params: storage.RemotePath, keys: list[str]):
    import boto3  # deferred: a benchmark-only dependency (the test extra installs it)

    bucket, _, prefix = str(params).removeprefix("s3://").partition("/")
    client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))
    sizes = {k: client.head_object(Bucket=bucket, Key=f"{prefix}/{k}")["ContentLength"]
             for k in keys}
    parts = [(k, start, min(start + PART_BYTES, size))
             for k, size in sizes.items() for start in range(0, size, PART_BYTES)]

    def get(part):
        key, start, stop = part
        body = client.get_object(Bucket=bucket, Key=f"{prefix}/{key}",
                                 Range=f"bytes={start}-{stop - 1}")["Body"].read()
        return np.frombuffer(body, np.uint8)

    def download():
        with concurrent.futures.ThreadPoolExecutor(storage.concurrency()) as pool:
            return list(pool.map(get, parts))
    return download
