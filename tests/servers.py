"""Real storage servers on 127.0.0.1 for the remote-checkpoint tests, and a fault proxy.

* `MotoS3`: moto's S3 server (`moto[server]`), a subprocess.
* `GcsEmulator`: `gcp-storage-emulator`, a subprocess; tensorstore reaches it through
  `TENSORSTORE_GCS_HTTP_URL`.
* `RangeHTTPServer`: a directory served over plain HTTP with `Range` support (the stdlib's
  server answers ranges with the whole file), a thread.
* `FaultProxy`: an HTTP reverse proxy in front of any of them that counts requests and body
  bytes per path, and on request fails (status N for the next k requests), drops
  connections, corrupts one byte of response bodies, stalls, or dies.

Tests get them through the session fixtures of tests/conftest.py; `FaultProxy` is cheap
(a thread) and made per test where counts or faults matter.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import http.client
import http.server
import os
import pathlib
import re
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, process: subprocess.Popen | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


class _Subprocess:
    """A server subprocess on a free port; `url` is its endpoint."""

    def __init__(self, argv_for_port, env: dict | None = None):
        self.port = free_port()
        self.process = subprocess.Popen(argv_for_port(self.port), stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL,
                                        env=None if env is None else {**os.environ, **env})
        wait_listening(self.port, self.process)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.process.kill()  # in-memory servers: nothing to flush
        self.process.wait(10)


class MotoS3(_Subprocess):
    """moto's S3 server; `client()` is a boto3 client of it."""

    def __init__(self, check_credentials: bool = False):
        # moto checks signatures against its IAM users only when told to (from the first
        # request on: INITIAL_NO_AUTH_ACTION_COUNT=0); by default any key is accepted.
        env = {"INITIAL_NO_AUTH_ACTION_COUNT": "0"} if check_credentials else None
        super().__init__(lambda port: [sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                       "-p", str(port)], env)

    def client(self):
        import boto3  # deferred: test-only dependency, needed only when S3 tests run

        return boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                            aws_access_key_id="test", aws_secret_access_key="test")

    def upload_dir(self, directory: pathlib.Path, bucket: str, prefix: str) -> None:
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=bucket)
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                key = f"{prefix}/{path.relative_to(directory).as_posix()}"
                client.upload_file(str(path), bucket, key)


class GcsEmulator(_Subprocess):
    """gcp-storage-emulator, in memory, with `bucket` created."""

    def __init__(self, bucket: str):
        code = "import sys; from gcp_storage_emulator.__main__ import main; sys.exit(main())"
        super().__init__(lambda port: [sys.executable, "-c", code, "start", "--host",
                                       "127.0.0.1", "--port", str(port), "--in-memory",
                                       "--default-bucket", bucket])

    def upload_dir(self, directory: pathlib.Path, bucket: str, prefix: str) -> None:
        import tensorstore as ts  # deferred: tensorstore's gcs driver reads the env var

        assert os.environ.get("TENSORSTORE_GCS_HTTP_URL") == self.url
        store = ts.KvStore.open({"driver": "gcs", "bucket": bucket, "path": prefix + "/"}).result()
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                store.write(path.relative_to(directory).as_posix(), path.read_bytes()).result()


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        path = pathlib.Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match:
            start = int(match.group(1))
            stop = int(match.group(2)) + 1 if match.group(2) else len(data)
            body = data[start:stop]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{path.stat().st_mtime_ns:x}-{len(data):x}"')
        self.end_headers()
        self.wfile.write(body)


class RangeHTTPServer:
    """`directory` served at `url` with Range support (a daemon thread)."""

    def __init__(self, directory: pathlib.Path):
        handler = lambda *a, **k: _RangeHandler(*a, directory=str(directory), **k)  # noqa: E731
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclasses.dataclass
class _Fault:
    kind: str  # "status", "drop", "corrupt", "stall"
    remaining: int  # requests left to hit; -1: every request
    match: str = ""  # only requests whose path contains this
    status: int = 500
    seconds: float = 0.0
    after: int = 0  # let this many matching requests through first


class FaultProxy:
    """A reverse proxy to `upstream` (http://host:port) on its own port, counting requests and
    response body bytes per request path (query dropped) and injecting faults."""

    def __init__(self, upstream: str):
        self.upstream = upstream.removeprefix("http://").rstrip("/")
        self.requests: collections.Counter = collections.Counter()
        self.bytes: collections.Counter = collections.Counter()
        self._faults: list[_Fault] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self):
                try:
                    proxy._handle(self)
                except (BrokenPipeError, ConnectionResetError):  # the client hung up first
                    self.close_connection = True

            do_HEAD = do_PUT = do_POST = do_DELETE = do_GET

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    # -- faults ----------------------------------------------------------------------------
    def fail(self, times: int, status: int = 500, match: str = "", after: int = 0) -> None:
        """Answer the next `times` matching requests (-1: all) with `status`, after letting
        `after` through."""
        self._add(_Fault("status", times, match, status=status, after=after))

    def drop(self, times: int, match: str = "", after: int = 0) -> None:
        """Close the connection without an answer, for the next `times` matching requests
        (after `after` more have been served: `drop(-1, after=n)` is a server dying mid-way)."""
        self._add(_Fault("drop", times, match, after=after))

    def corrupt(self, times: int, match: str = "", after: int = 0) -> None:
        """Flip one byte in the middle of the next `times` matching response bodies."""
        self._add(_Fault("corrupt", times, match, after=after))

    def stall(self, seconds: float, times: int, match: str = "", after: int = 0) -> None:
        """Hold the next `times` matching requests for `seconds` before answering."""
        self._add(_Fault("stall", times, match, seconds=seconds, after=after))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
            self.bytes.clear()

    def count(self, match: str = "") -> tuple[int, int]:
        """(requests, body bytes) of the paths containing `match`."""
        with self._lock:
            return (sum(n for p, n in self.requests.items() if match in p),
                    sum(n for p, n in self.bytes.items() if match in p))

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _add(self, fault: _Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.remaining != 0 and fault.match in path and (
                        fault.kind != "corrupt" or method == "GET"):
                    if fault.after > 0:
                        fault.after -= 1
                        continue
                    if fault.remaining > 0:
                        fault.remaining -= 1
                    return fault
        return None

    # -- proxying --------------------------------------------------------------------------
    def _handle(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        path = handler.path.split("?", 1)[0]
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else b""
        with self._lock:  # counted on arrival: a stalled or dropped request counts too
            self.requests[path] += 1
        fault = self._take_fault(handler.command, path)
        if fault is not None and fault.kind == "stall":
            time.sleep(fault.seconds)
        if fault is not None and fault.kind == "drop":
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
            return
        if fault is not None and fault.kind == "status":
            self._reply(handler, fault.status, [("Content-Type", "text/plain")],
                        b"injected failure", path, count=False)
            return
        status, headers, data = self._forward(handler, body)
        if fault is not None and fault.kind == "corrupt" and len(data) > 16:
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]
        self._reply(handler, status, headers, data, path)

    def _forward(self, handler, body: bytes):
        conn = http.client.HTTPConnection(self.upstream, timeout=60)
        try:
            conn.putrequest(handler.command, handler.path, skip_host=True,
                            skip_accept_encoding=True)
            for name, value in handler.headers.items():
                if name.lower() not in ("connection", "keep-alive", "proxy-connection"):
                    conn.putheader(name, value)
            conn.endheaders(body or None)
            response = conn.getresponse()
            data = response.read()
            headers = [(k, v) for k, v in response.getheaders()
                       if k.lower() not in ("transfer-encoding", "connection", "content-length",
                                            "keep-alive")]
            return response.status, headers, data
        finally:
            conn.close()

    def _reply(self, handler, status: int, headers, data: bytes, path: str,
               count: bool = True) -> None:
        if count:
            with self._lock:
                self.bytes[path] += len(data)
        handler.send_response(status)
        for name, value in headers:
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command != "HEAD":
            handler.wfile.write(data)
