"""A fault-injecting HTTP proxy in front of an S3 endpoint: what a throttled store and a flaky network do.

    proxy = FaultProxy("http://127.0.0.1:5000", slow_down=0.05, reset=0.01, truncate=0.02, seed=0)
    proxy.url      # point a client's endpoint here
    proxy.faults   # Counter: requests, slow_down, reset, truncate, forward (bodies passed whole)

Seeded RNGs decide, one draw per request in the order they arrive (so how many of each fault is a
function of the seed and the number of requests, whichever threads send them):

    slow_down   a fraction of all requests: 503 with S3's own SlowDown XML, not forwarded (what S3
                answers when throttling)
    reset       a fraction of the GET responses with a body: the status line and headers, half the
                body, then a TCP reset (SO_LINGER 0), a connection dropped mid-response
    truncate    as many more: the headers (with the full Content-Length), half the body, then a clean
                close, a short read

The Host header is passed on as signed: moto does not check signatures, and S3 paths are the same.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOW_DOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>FAULTPROXY</RequestId>"
    b"<HostId>faultproxy</HostId></Error>"
)
# Headers that describe one hop's connection, not the message (RFC 9110 7.6.1).
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade"}


class FaultProxy:
    def __init__(
        self, upstream: str, *, slow_down: float = 0.0, reset: float = 0.0, truncate: float = 0.0, seed: int = 0
    ):
        target = urlsplit(upstream)
        self.upstream = (target.hostname, target.port)
        self.rates = {"slow_down": slow_down, "reset": reset, "truncate": truncate}
        self.faults: Counter = Counter()
        self._throttle_rng, self._body_rng = random.Random(seed), random.Random(seed + 1)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def throttle(self) -> bool:
        """Whether to answer the next request 503 SlowDown."""
        with self._lock:
            self.faults["requests"] += 1
            if self._throttle_rng.random() < self.rates["slow_down"]:
                self.faults["slow_down"] += 1
                return True
            return False

    def break_body(self) -> str:
        """What to do with the next response body: "reset", "truncate" or "forward"."""
        with self._lock:
            draw = self._body_rng.random()
            fault = "forward"
            if draw < self.rates["reset"]:
                fault = "reset"
            elif draw < self.rates["reset"] + self.rates["truncate"]:
                fault = "truncate"
            self.faults[fault] += 1
            return fault


def _handler(proxy: FaultProxy):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

        def log_message(self, *args) -> None:  # one line per request otherwise
            pass

        def _request_body(self) -> bytes | None:
            if "chunked" in self.headers.get("Transfer-Encoding", ""):
                chunks = []
                while (size := int(self.rfile.readline().split(b";")[0], 16)) > 0:
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                while self.rfile.readline() not in (b"\r\n", b""):  # trailers
                    pass
                return b"".join(chunks)
            length = int(self.headers.get("Content-Length", 0))
            return self.rfile.read(length) if length else None

        def _forward(self) -> None:
            body = self._request_body()
            if proxy.throttle():  # decided before forwarding: a throttled request never reaches the store
                self._send(503, [("Content-Type", "application/xml")], SLOW_DOWN_BODY, head=self.command == "HEAD")
                return
            upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
            try:
                upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    if name.lower() not in HOP_BY_HOP and name.lower() != "content-length":
                        upstream.putheader(name, value)
                if body is not None:
                    upstream.putheader("Content-Length", str(len(body)))
                upstream.endheaders(body)
                response = upstream.getresponse()
                payload = response.read()
                headers = [
                    (k, v)
                    for k, v in response.getheaders()
                    if k.lower() not in HOP_BY_HOP and k.lower() != "content-length"
                ]
            finally:
                upstream.close()
            fault = proxy.break_body() if payload and self.command == "GET" else "forward"
            if fault == "forward":
                self._send(
                    response.status,
                    headers,
                    payload,
                    head=self.command == "HEAD",
                    length=response.getheader("Content-Length"),
                )
                return
            # Headers promise the whole body; part of it comes, then the connection goes.
            self._send_headers(response.status, headers, len(payload))
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            if fault == "reset":
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            else:
                self.connection.shutdown(socket.SHUT_WR)
            self.close_connection = True

        def _send_headers(self, status: int, headers, length: int) -> None:
            self.send_response_only(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(length))
            self.end_headers()

        def _send(self, status: int, headers, payload: bytes, *, head: bool = False, length: str | None = None):
            # A HEAD answer carries the length a GET would have, and no body.
            self._send_headers(status, headers, int(length) if head and length is not None else len(payload))
            if not head:
                self.wfile.write(payload)

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _forward

    return Handler
