"""Where a checkpoint lives: a local directory, or a prefix in a bucket or on a web server.

A checkpoint location is one of
  /path/to/ckpt, file:///path/to/ckpt     local directory (pathlib.Path from here on)
  gs://bucket/prefix                      Google Cloud Storage (tensorstore's `gcs` driver)
  s3://bucket/prefix                      S3 or an S3-compatible store (`s3` driver)
  https://host/prefix, http://host/...    any web server with Range support (read-only)

Remote locations become `RemotePath`s: they join (`/`), name and print like pathlib's paths, so
the checkpoint code that builds `ckpt / "params"` serves both. Every byte goes through
tensorstore's own kvstore drivers, configured the documented ways, as each cloud's SDK is:

* S3: credentials from `AWS_ACCESS_KEY_ID`/`AWS_SECRET_ACCESS_KEY`/`AWS_SESSION_TOKEN`,
  `AWS_PROFILE` and ~/.aws, or the instance (tensorstore's `aws_credentials` "default" chain);
  `AWS_ENDPOINT_URL` (or `jaxaccel --s3-endpoint`) for S3-compatible stores; region from
  `AWS_REGION`/`AWS_DEFAULT_REGION`.
* GCS: `GOOGLE_APPLICATION_CREDENTIALS`, gcloud's application-default credentials or the VM's
  metadata server; `TENSORSTORE_GCS_HTTP_URL` points the driver at an emulator.
* Requests in flight per driver: `JAXACCEL_REMOTE_CONCURRENCY` (`jaxaccel --concurrency`,
  default 32); retries with exponential backoff on 5xx/429/timeouts: tensorstore's
  `*_request_retries` (`JAXACCEL_REMOTE_RETRIES`, default 8).
"""

from __future__ import annotations

import os
import pathlib
import re
import urllib.parse

import tensorstore as ts

from jaxaccel.errors import CheckpointError, StorageError, UsageError
from jaxaccel.utils.files import write_atomically

REMOTE_SCHEMES = ("gs", "s3", "http", "https")
DEFAULT_CONCURRENCY = 32
DEFAULT_RETRIES = 8
_DRIVER = {"gs": "gcs", "s3": "s3", "http": "http", "https": "http"}
_URL = re.compile(r"^([a-z0-9]+)://(.*)$", re.IGNORECASE)
# A remote scheme, also after pathlib.Path collapsed "s3://bucket" into "s3:/bucket".
_REMOTE_PREFIX = re.compile(rf"^({'|'.join(REMOTE_SCHEMES)}):/", re.IGNORECASE)


class RemotePath:
    """A location in object storage or on a web server, e.g. `s3://bucket/ckpt/params`."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(f"{self.url}/{str(name).strip('/')}")

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def parent(self) -> RemotePath:
        return RemotePath(self.url.rsplit("/", 1)[0])

    @property
    def scheme(self) -> str:
        return self.url.split("://", 1)[0].lower()

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)


CheckpointPath = pathlib.Path | RemotePath


def checkpoint_path(location: str | os.PathLike) -> CheckpointPath:
    """A local path (`file://` stripped) or a RemotePath; raises UsageError for an unknown
    scheme or a URL without a bucket/host."""
    if isinstance(location, RemotePath):
        return location
    if isinstance(location, pathlib.PurePath):
        return pathlib.Path(location)
    text = os.fspath(location)
    match = _URL.match(text)
    if match is None:
        return pathlib.Path(text)
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme == "file":
        return pathlib.Path(urllib.parse.unquote(rest) or "/")
    if scheme not in REMOTE_SCHEMES:
        raise UsageError(f"{text}: unsupported location scheme {scheme!r} (expected a path, "
                         "file://, gs://, s3://, http:// or https://)")
    if not rest.split("/", 1)[0]:
        raise UsageError(f"{text}: no {'host' if scheme.startswith('http') else 'bucket'} "
                         "in the URL")
    return RemotePath(f"{scheme}://{rest}")


def is_remote(location) -> bool:
    """True for gs://, s3://, http(s):// locations: RemotePaths, URL strings, and pathlib
    paths into which such a URL collapsed (`Path("s3://b/x")` is `s3:/b/x`). Never raises:
    an unknown scheme is not remote (checkpoint_path refuses it)."""
    if isinstance(location, RemotePath):
        return True
    return bool(_REMOTE_PREFIX.match(os.fspath(location)))


def concurrency() -> int:
    """Requests in flight per storage driver (JAXACCEL_REMOTE_CONCURRENCY, default 32)."""
    return _env_int("JAXACCEL_REMOTE_CONCURRENCY", DEFAULT_CONCURRENCY)


def retries() -> int:
    """Retries of a failed request (5xx, 429, timeouts, dropped connections) before failing."""
    return _env_int("JAXACCEL_REMOTE_RETRIES", DEFAULT_RETRIES)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if not value:
        return default
    if not value.isdigit() or int(value) < 1 and name.endswith("CONCURRENCY"):
        raise UsageError(f"${name}={value!r}: expected a positive integer")
    return int(value)


def kvstore_spec(location, directory: bool = True) -> dict:
    """The tensorstore kvstore spec of `location` (a directory when `directory`: its path ends
    with '/', so keys are names inside it)."""
    path = checkpoint_path(location)
    if isinstance(path, pathlib.Path):
        text = str(path.absolute())
        return {"driver": "file", "path": text + "/" if directory else text}
    scheme = path.scheme
    rest = path.url.split("://", 1)[1]
    host, _, prefix = rest.partition("/")
    prefix = prefix + "/" if directory and prefix else prefix
    driver = _DRIVER[scheme]
    if driver == "http":
        spec = {"driver": "http", "base_url": f"{scheme}://{host}", "path": "/" + prefix}
    else:
        spec = {"driver": driver, "bucket": host, "path": prefix}
    if driver == "s3":
        spec.update(_s3_settings())
    spec["context"] = _context_resources(driver)
    return spec


def _s3_settings() -> dict:
    settings = {}
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        settings["endpoint"] = endpoint.rstrip("/")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        settings["aws_region"] = region
    elif endpoint:  # an S3-compatible store answers for any region; skip the region probe
        settings["aws_region"] = "us-east-1"
    return settings


def _context_resources(driver: str) -> dict:
    retry = {"max_retries": retries(), "initial_delay": "50ms", "max_delay": "5s"}
    resources = {f"{driver}_request_concurrency": {"limit": concurrency()},
                 f"{driver}_request_retries": retry}
    if driver == "s3" and (os.environ.get("AWS_NO_SIGN_REQUEST", "").lower() in ("1", "true")):
        resources["aws_credentials"] = {"type": "anonymous"}
    elif driver == "s3" and os.environ.get("AWS_ACCESS_KEY_ID"):
        # The SDKs' first choice; skips the profile-file probe that logs errors without ~/.aws.
        resources["aws_credentials"] = {"type": "environment"}
    return resources


def open_kvstore(location, directory: bool = True) -> ts.KvStore:
    """An open kvstore of `location`; raises StorageError naming the URL."""
    try:
        return ts.KvStore.open(kvstore_spec(location, directory)).result()
    except Exception as err:  # tensorstore raises ValueError subclasses with status text
        raise StorageError(f"{location}: cannot be opened ({first_line(err)})") from None


def read_bytes(location) -> bytes | None:
    """The whole object/file at `location`, or None when it does not exist. Raises
    StorageError (one line naming the URL) when the bucket or server cannot be read."""
    path = checkpoint_path(location)
    if isinstance(path, pathlib.Path):
        try:
            return path.read_bytes()
        except FileNotFoundError:
            return None
    store = open_kvstore(path.parent)
    try:
        result = store.read(path.name).result()
    except Exception as err:  # tensorstore's status errors: 403, unreachable, no bucket
        raise StorageError(f"{path}: cannot be read ({explain(err)})") from None
    return bytes(result.value) if result.state == "value" else None


def write_bytes(location, data: bytes) -> None:
    """Write one object/file; raises StorageError naming the URL."""
    path = checkpoint_path(location)
    if isinstance(path, pathlib.Path):
        path.write_bytes(data)
        return
    store = open_kvstore(path.parent)
    try:
        store.write(path.name, data).result()
    except Exception as err:  # tensorstore's status errors
        raise StorageError(f"{path}: cannot be written ({explain(err)})") from None


def local_copy(location, dest: pathlib.Path) -> pathlib.Path:
    """`dest`, holding the bytes of the file/object at `location` (downloaded once, written
    atomically). Raises CheckpointError when it does not exist."""
    if dest.is_file():
        return dest
    data = read_bytes(location)
    if data is None:
        raise CheckpointError(f"{location}: listed in the manifest but missing")
    dest.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(dest, data, temp_prefix=f".tmp-{dest.name}-")
    return dest


def list_keys(location) -> list[str]:
    """Every key under the remote prefix `location` (relative to it)."""
    store = open_kvstore(location)
    try:
        return [key.decode() for key in store.list().result()]
    except Exception as err:  # tensorstore's status errors
        raise StorageError(f"{location}: cannot be listed ({explain(err)})") from None


def delete_keys(location, names) -> None:
    """Delete the objects `names` under the remote prefix `location` (absent ones are fine)."""
    store = open_kvstore(location)
    try:
        for future in [store.delete_range(ts.KvStore.KeyRange(n, n + "\0")) for n in names]:
            future.result()
    except Exception as err:  # tensorstore's status errors
        raise StorageError(f"{location}: cannot delete ({explain(err)})") from None


def delete_tree(location) -> None:
    """Delete every object under the remote prefix `location` (for convert --overwrite)."""
    store = open_kvstore(location)
    try:
        store.delete_range(ts.KvStore.KeyRange()).result()
    except Exception as err:  # tensorstore's status errors
        raise StorageError(f"{location}: cannot be deleted ({explain(err)})") from None


def first_line(err: Exception) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0][:300]


def explain(err: Exception) -> str:
    """A short reason out of a tensorstore status message, naming the likely cause."""
    text = first_line(err)
    hints = (("NoSuchBucket", "the bucket does not exist"),
             ("InvalidAccessKeyId", "wrong credentials: unknown access key"),
             ("SignatureDoesNotMatch", "wrong credentials: bad secret key"),
             ("AccessDenied", "access denied: check the credentials"),
             ("PERMISSION_DENIED", "access denied: check the credentials"),
             ("UNAUTHENTICATED", "not authenticated: check the credentials"),
             ("Couldn't connect", "the endpoint is unreachable"),
             ("Could not connect", "the endpoint is unreachable"),
             ("Connection refused", "the endpoint is unreachable"),
             ("resolve host", "the endpoint's host name does not resolve"))
    for needle, hint in hints:
        if needle.lower() in text.lower():
            return f"{hint}; {text[:200]}"
    return text
