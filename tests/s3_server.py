"""A real S3 API on 127.0.0.1 for tests: moto's server, behind a proxy that can break replies.

    client (s3fs, via AWS_ENDPOINT_URL) --> FaultProxy --> moto ThreadedMotoServer

`FaultProxy.plan(key, *actions, method="GET")` decides what happens to the next requests of
that method whose path holds `key`: "ok" (relayed), "drop" (the response is cut in the middle
of its body and the connection closed) or "stall" (no answer at all for `stall_seconds`).
The last action of a plan repeats. Every request line and its Range header is kept in `requests`.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import fsspec
import pytest
from moto.server import ThreadedMotoServer

BUCKET = "vlp-test"


@dataclass(frozen=True)
class SeenRequest:
    """One request that reached the proxy."""

    method: str
    path: str
    range: str
    """Value of its Range header ("" if none)."""


def _read_head(sock: socket.socket, buffer: bytearray) -> bytes | None:
    """Bytes up to and including the blank line after the headers; None at EOF."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    end = buffer.index(b"\r\n\r\n") + 4
    head = bytes(buffer[:end])
    del buffer[:end]
    return head


def _read_exact(sock: socket.socket, buffer: bytearray, size: int) -> bytes:
    while len(buffer) < size:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("peer closed inside a body")
        buffer += chunk
    body = bytes(buffer[:size])
    del buffer[:size]
    return body


def _header(head: bytes, name: str) -> str:
    for line in head.decode("latin-1").split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name:
            return value.strip()
    return ""


class FaultProxy:
    """TCP proxy in front of an HTTP server; one thread per client connection."""

    def __init__(self, upstream: tuple[str, int], stall_seconds: float = 20.0) -> None:
        self.upstream = upstream
        self.stall_seconds = stall_seconds
        self.requests: list[SeenRequest] = []
        self._plans: dict[tuple[str, str], list[str]] = {}
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def plan(self, key: str, *actions: str, method: str = "GET") -> None:
        """What happens to the next `method` requests whose path contains `key` (the last
        action repeats)."""
        assert actions and set(actions) <= {"ok", "drop", "stall"}, actions
        with self._lock:
            self._plans[(method, key)] = list(actions)

    def clear(self) -> None:
        with self._lock:
            self._plans.clear()
            self.requests.clear()

    def seen(self, key: str, method: str = "GET") -> list[SeenRequest]:
        """Requests with `method` whose path contains `key`."""
        with self._lock:
            return [r for r in self.requests if r.method == method and key in r.path]

    def _action(self, method: str, path: str) -> str:
        with self._lock:
            for (planned, key), actions in self._plans.items():
                if planned == method and key in path:
                    return actions.pop(0) if len(actions) > 1 else actions[0]
        return "ok"

    def _accept(self) -> None:
        while True:
            client, _ = self._listener.accept()
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            self._relay(client)
        except OSError:  # a side went away (the client timed out, the server stopped)
            pass
        finally:
            client.close()

    def _relay(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream)
        from_client, from_upstream = bytearray(), bytearray()
        with upstream:
            while True:
                head = _read_head(client, from_client)
                if head is None:
                    return
                body = _read_exact(client, from_client, int(_header(head, "content-length") or 0))
                method, path = head.decode("latin-1").split(" ", 2)[:2]
                with self._lock:
                    self.requests.append(SeenRequest(method, path, _header(head, "range")))
                action = self._action(method, path)
                if action == "stall":
                    time.sleep(self.stall_seconds)
                    return
                upstream.sendall(head + body)
                reply_head = _read_head(upstream, from_upstream)
                if reply_head is None:
                    return
                assert "chunked" not in _header(reply_head, "transfer-encoding")
                length = 0 if method == "HEAD" else int(_header(reply_head, "content-length") or 0)
                reply = reply_head + _read_exact(upstream, from_upstream, length)
                if action == "drop":  # headers promise `length` bytes; half of them arrive
                    client.sendall(reply[: len(reply_head) + length // 2])
                    client.shutdown(socket.SHUT_RDWR)
                    return
                client.sendall(reply)


@dataclass
class S3Server:
    """A running moto server, the proxy in front of it, and a direct client for uploads."""

    moto: ThreadedMotoServer
    proxy: FaultProxy
    direct: fsspec.AbstractFileSystem
    """s3fs talking to moto directly (uploads, overwrites), not through the proxy."""

    def put(self, key: str, data: bytes, public: bool = False) -> str:
        """Upload `data` as `key` of the test bucket; returns its s3:// URL. `public`: also
        readable without credentials, at `http_url(key)`."""
        self.direct.pipe_file(f"{BUCKET}/{key}", data, **({"ACL": "public-read"} if public else {}))
        return f"s3://{BUCKET}/{key}"

    def http_url(self, key: str) -> str:
        """The plain-HTTP URL of `key` (path style, through the proxy)."""
        return f"{self.proxy.url}/{BUCKET}/{key}"


@contextmanager
def s3_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Server]:
    """Start moto + proxy and point clients at the proxy the way any s3fs user would: AWS_*
    variables (fake credentials, AWS_ENDPOINT_URL), with no ~/.aws files read."""
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    proxy = FaultProxy((host, port))
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": proxy.url,
        "AWS_CONFIG_FILE": "/nonexistent/aws-config",
        "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    direct = fsspec.filesystem(
        "s3",
        skip_instance_cache=True,
        key="testing",
        secret="testing",
        endpoint_url=f"http://{host}:{port}",
    )
    direct.mkdir(BUCKET)
    try:
        yield S3Server(moto, proxy, direct)
    finally:
        moto.stop()
