"""Fault injection on 127.0.0.1 for the reliability tests: servers that never answer, and a proxy in front
of a real server that fails or stalls its first requests.

- ``silent_server()``: accepts TCP connections and never sends a byte (a hung S3 or MLflow endpoint);
- ``closed_port()``: a port nobody listens on (a dead server: connection refused);
- ``FaultyProxy(upstream, fail=N, status=500, stall=S)``: forwards HTTP to ``upstream`` except that the
  first ``fail`` requests get ``status`` (or, with ``stall``, wait ``stall`` seconds without answering).
Every server here is bounded: it stops when its context exits.
"""

from __future__ import annotations

import contextlib
import http.client
import http.server
import socket
import threading
import time
from typing import Iterator
from urllib.parse import urlsplit


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def closed_port() -> Iterator[str]:
    yield f"http://127.0.0.1:{_free_port()}"


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """Accept connections, read nothing back, never answer."""
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    srv.settimeout(0.2)
    conns: list[socket.socket] = []
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            try:
                conns.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{srv.getsockname()[1]}"
    finally:
        stop.set()
        t.join(2)
        for c in conns:
            c.close()
        srv.close()


class FaultyProxy:
    """An HTTP proxy to ``upstream`` whose first ``fail`` requests fail (``status``) or stall (``stall`` s)."""

    def __init__(self, upstream: str, fail: int, status: int = 500, stall: float = 0.0) -> None:
        self.upstream = urlsplit(upstream)
        self.remaining = fail
        self.status = status
        self.stall = stall
        self.requests = 0
        self.failed = 0
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy._lock:
                    proxy.requests += 1
                    inject = proxy.remaining > 0
                    if inject:
                        proxy.remaining -= 1
                        proxy.failed += 1
                if inject and proxy.stall:
                    time.sleep(proxy.stall)
                    self.close_connection = True
                    return
                if inject:
                    msg = b"<Error><Code>InternalError</Code><Message>injected</Message></Error>"
                    self.send_response(proxy.status)
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    self.wfile.write(msg)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                headers["Host"] = f"{proxy.upstream.hostname}:{proxy.upstream.port}"
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "FaultyProxy":
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
