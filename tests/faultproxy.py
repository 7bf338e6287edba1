"""Helpers for the fault tests: a loopback proxy that plays an S3 outage, and process/file probes.

`FaultProxy` sits between the code under test and the S3 server. It reads the HTTP requests that
pass through it (keep-alive, fixed-length and chunked bodies), and the first request that
`trips` matches (say, a PUT of a checkpoint's `state.pt`) starts an outage of `outage_s` seconds.
While it lasts, each request that `affects` matches (every request when it is None) meets the
`fault`, as S3 and MinIO produce them:

- "reset": the connection is cut with a TCP reset (and, when every request is affected, every new
  connection too);
- "slowdown": an HTTP 503 with S3's `SlowDown` error;
- "internal": an HTTP 500 with S3's `InternalError`;
- "stall": no reply for `stall_s` seconds (past the client's read timeout), then a reset;
- "cut": the request goes to the server with half of its body, then both sides are reset (an
  upload that dies in the middle).

A short outage is a blip the client's retries outlast; a long one outlasts them. The proxy records
what it forwarded and what it failed, so a test proves the fault happened.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


FAULTS = ("reset", "slowdown", "internal", "stall", "cut")
ERRORS = {  # fault: (HTTP status, reason, S3 error code, message), as S3 and MinIO send them
    "slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
    "internal": (500, "Internal Server Error", "InternalError", "We encountered an internal error. Please try again."),
}


@dataclass(frozen=True)
class Request:
    at_s: float  # time.monotonic() when its head arrived
    method: str
    target: str  # path and query, as sent


def _reset(sock: socket.socket) -> None:
    """Close with a TCP reset (what a peer sees when a server dies), waking any reader."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()


class _Reader:
    """Buffered reads from one socket: a line, a head, or exactly n bytes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock, self.buffer = sock, b""

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def until(self, marker: bytes) -> bytes | None:
        """Bytes up to and including `marker`; None at end of stream."""
        while marker not in self.buffer:
            if not self._fill():
                return None
        end = self.buffer.index(marker) + len(marker)
        data, self.buffer = self.buffer[:end], self.buffer[end:]
        return data

    def exactly(self, count: int) -> bytes | None:
        while len(self.buffer) < count:
            if not self._fill():
                return None
        data, self.buffer = self.buffer[:count], self.buffer[count:]
        return data


@dataclass
class FaultProxy:
    """A threaded TCP proxy to `127.0.0.1:upstream_port` that plays one outage when `trips` matches."""

    upstream_port: int
    trips: Callable[[str, str], bool]  # (method, target) -> start the outage with this request
    outage_s: float = 1.0  # how long the endpoint stays "down" after the trip
    fault: str = "reset"  # what a failed request meets: reset, slowdown (503), internal (500), stall or cut
    affects: Callable[[str, str], bool] | None = None  # (method, target) -> fails while down; None = every request
    stall_s: float = 2.0  # how long a "stall" holds a request before resetting it
    forwarded: list[Request] = field(default_factory=list)
    dropped: list[Request] = field(default_factory=list)  # the request that tripped, then those failed while down
    refused_connections: int = 0  # connections reset at accept while down

    def __post_init__(self) -> None:
        if self.fault not in FAULTS:
            raise ValueError(f"fault {self.fault!r} is not one of {FAULTS}")
        self._lock = threading.Lock()
        self._down_until = 0.0
        self._tripped = False
        self._closed = False
        self._sockets: set[socket.socket] = set()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self._accept_loop, name="faultproxy-accept", daemon=True).start()

    # Public --------------------------------------------------------------------------------

    @property
    def tripped_at_s(self) -> float | None:
        return self.dropped[0].at_s if self._tripped else None

    def forwarded_after(self, at_s: float) -> list[Request]:
        with self._lock:
            return [r for r in self.forwarded if r.at_s > at_s]

    def close(self) -> None:
        self._closed = True
        _reset(self._listener)
        with self._lock:
            for sock in list(self._sockets):
                _reset(sock)

    # Inside --------------------------------------------------------------------------------

    def _is_down(self) -> bool:
        return time.monotonic() < self._down_until

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self._is_down() and self.affects is None and self.fault == "reset":
                with self._lock:
                    self.refused_connections += 1
                _reset(client)
                continue
            threading.Thread(target=self._serve, args=(client,), name="faultproxy-conn", daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
            upstream.settimeout(None)
        except OSError:
            _reset(client)
            return
        with self._lock:
            self._sockets |= {client, upstream}
        threading.Thread(target=self._pump, args=(upstream, client), name="faultproxy-down", daemon=True).start()
        try:
            self._forward_requests(_Reader(client), upstream)
        except OSError:
            pass
        finally:
            for sock in (client, upstream):
                _reset(sock)
            with self._lock:
                self._sockets -= {client, upstream}

    def _forward_requests(self, client: _Reader, upstream: socket.socket) -> None:
        """Forward request after request, deciding on each head whether the endpoint is 'down'."""
        while True:
            head = client.until(b"\r\n\r\n")
            if head is None:
                return
            method, target = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")[:2]
            request = Request(time.monotonic(), method, target)
            with self._lock:
                if self._is_down():
                    drop = self.affects is None or self.affects(method, target)
                elif not self._tripped and self.trips(method, target):
                    self._tripped, drop = True, True
                    self._down_until = request.at_s + self.outage_s
                else:
                    drop = False
                (self.dropped if drop else self.forwarded).append(request)
            headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(":") for line in head.decode("latin-1").split("\r\n")[1:] if line)
            }
            if drop and self.fault == "cut":
                upstream.sendall(head)
                half = client.exactly(int(headers.get("content-length", "0") or 0) // 2)
                upstream.sendall(half or b"")
                time.sleep(0.1)  # the server has read the half before the reset
                return  # _serve resets both sides: the upload dies in the middle of its body
            if drop:
                self._fail(client.sock, method)
                return  # _serve resets both sides: an upload dies mid-request
            upstream.sendall(head)
            if "chunked" in headers.get("transfer-encoding", "").lower():
                self._forward_chunked(client, upstream)
            else:
                body = client.exactly(int(headers.get("content-length", "0") or 0))
                if body is None:
                    return
                upstream.sendall(body)

    def _fail(self, client: socket.socket, method: str) -> None:
        """Play the fault on one request; the caller then resets the connection."""
        if self.fault == "stall":
            time.sleep(self.stall_s)
        elif self.fault in ERRORS:
            status, reason, code, message = ERRORS[self.fault]
            body = (
                b""
                if method == "HEAD"
                else (
                    f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                    f"<RequestId>faultproxy</RequestId></Error>"
                ).encode()
            )
            head = (
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n"
                f"Connection: close\r\n\r\n"
            ).encode()
            client.sendall(head + body)
            client.shutdown(socket.SHUT_WR)
            time.sleep(0.05)  # let the reply reach the client before the reset

    @staticmethod
    def _forward_chunked(client: _Reader, upstream: socket.socket) -> None:
        while True:
            size_line = client.until(b"\r\n")
            if size_line is None:
                raise OSError("client closed inside a chunked body")
            upstream.sendall(size_line)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    line = client.until(b"\r\n")
                    if line is None:
                        raise OSError("client closed inside chunked trailers")
                    upstream.sendall(line)
                    if line == b"\r\n":
                        return
            data = client.exactly(size + 2)
            if data is None:
                raise OSError("client closed inside a chunk")
            upstream.sendall(data)

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                target.sendall(chunk)
        except OSError:
            pass
        finally:
            try:
                target.shutdown(socket.SHUT_WR)
            except OSError:
                pass


# Processes ---------------------------------------------------------------------------------


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def descendants(root: int) -> list[int]:
    """Every live process below `root` (its children, their children, ...)."""
    seen, todo = [], [root]
    while todo:
        for child in _children(todo.pop()):
            if child not in seen:
                seen.append(child)
                todo.append(child)
    return seen


def ray_actor_pids(*class_names: str, root: int | None = None) -> list[int]:
    """Processes of these Ray actor classes in the Ray cluster this process started (never another one's)."""
    root = os.getpid() if root is None else root
    return sorted(
        pid for pid in descendants(root) if _cmdline(pid).startswith(tuple(f"ray::{name}" for name in class_names))
    )


def train_worker_pids() -> list[int]:
    """Ray Train's worker processes (one per rank) in this process's Ray cluster."""
    return ray_actor_pids("RayTrainWorker")


def wait_until(predicate: Callable[[], object], timeout_s: float, what: str, poll_s: float = 0.05):
    """Poll until `predicate()` is truthy and return it; fail naming `what` after `timeout_s` (a hang guard)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise TimeoutError(f"gave up after {timeout_s:.0f}s waiting for {what}")


def ray_session_dir() -> Path:
    """The folder of the Ray session this process is connected to (logs, sockets, runtime files)."""
    import ray

    return Path(ray._private.worker._global_node.get_session_dir_path())  # noqa: SLF001 (no public accessor)


def ray_worker_log_lines(needle: str) -> list[str]:
    """Lines of this Ray session's worker logs (their stdout and stderr files) that contain `needle`.

    Worker output reaches the driver's console asynchronously; the files are written as it happens.
    """
    logs = ray_session_dir() / "logs"
    return [
        line
        for path in logs.glob("worker-*")
        for line in path.read_text(errors="replace").splitlines()
        if needle in line
    ]


# Files -------------------------------------------------------------------------------------


def tree_state(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` with its size and mtime: equal before and after = nothing written."""
    if not folder.exists():
        return {}
    return {
        str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def files_containing(roots: list[Path], needles: list[bytes]) -> list[str]:
    """The regular files under `roots` whose bytes contain any of `needles` (sockets, fifos skipped)."""
    hits = []
    for root in roots:
        paths = [root] if root.is_file() else root.rglob("*")
        for path in paths:
            try:
                if not path.is_file() or path.is_symlink():
                    continue
                data = path.read_bytes()
            except OSError:
                continue
            hits += [f"{path}: {needle[:6]!r}..." for needle in needles if needle in data]
    return hits
