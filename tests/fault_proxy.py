"""A loopback HTTP proxy that makes an OpenAI-compatible server misbehave, for retry tests.

    with FaultProxy("http://127.0.0.1:8000", fault_rate=0.3, seed=0, hang_s=2.0) as proxy:
        client = OpenAI(base_url=proxy.url + "/v1")  # ~30% of requests now fail in some way
        proxy.fault_rate = 0.0                       # from here on, everything is forwarded

Each fault is one of ``FAULTS``: 429 (``Retry-After: 0`` or ``1``), 500, 503, a hang past the
client's timeout, a truncated JSON body or a non-JSON body (both with status 200). On request,
``unscored`` (not in ``FAULTS``): a well-formed completion whose text states no score. Whether a
request fails, and how, is drawn from ``seed``, the request body and how many times that body was
seen before - not from arrival order - so a run is reproducible even with concurrent clients.
Binds 127.0.0.1 only and serves only inside the ``with`` block.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Self
from urllib.parse import urlsplit

FAULTS = ("429", "500", "503", "hang", "truncated", "garbage")
UNSCORED_REPLY = "I would rather not grade this answer."
_ALL_FAULTS = (*FAULTS, "unscored")  # unscored is a judge-level failure, asked for by the tests that need it
_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer", "upgrade"}


class FaultProxy:
    """Forwards ``POST`` requests to ``upstream`` except for a seeded ``fault_rate`` of them.

    ``requests`` counts every request received; ``served`` what they got (a fault, or ``forwarded``).
    """

    def __init__(self, upstream: str, *, fault_rate: float = 0.3, seed: int = 0, hang_s: float = 2.0,
                 faults: tuple[str, ...] = FAULTS):
        unknown = set(faults) - set(_ALL_FAULTS)
        if unknown:
            raise ValueError(f"unknown faults {sorted(unknown)}; known: {_ALL_FAULTS}")
        self.upstream = urlsplit(upstream)
        self.fault_rate = fault_rate
        self.seed = seed
        self.hang_s = hang_s
        self.faults = faults
        self.requests = 0
        self.served = Counter()
        self._seen = Counter()  # request body hash -> times seen, so retries draw afresh
        self._lock = threading.Lock()
        self._stop = threading.Event()  # wakes hanging handlers at shutdown
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> Self:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def draw(self, body: bytes) -> tuple[str | None, random.Random]:
        """The fault for this request (None: forward it), and the generator that chose it, for
        the fault's own details."""
        digest = hashlib.sha256(body).hexdigest()
        with self._lock:
            self.requests += 1
            nth = self._seen[digest]
            self._seen[digest] += 1
        rng = random.Random(f"{self.seed}:{digest}:{nth}")
        fault = rng.choice(self.faults) if rng.random() < self.fault_rate else None
        with self._lock:
            self.served[fault or "forwarded"] += 1
        return fault, rng

    def hang(self) -> bool:
        """Wait ``hang_s`` (past the client's timeout); True when cut short by the shutdown."""
        return self._stop.wait(self.hang_s)

    def forward(self, path: str, body: bytes, headers: dict[str, str]) -> tuple[int, list[tuple[str, str]], bytes]:
        conn = http.client.HTTPConnection(self.upstream.hostname, self.upstream.port, timeout=60)
        try:
            conn.request("POST", path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.getheaders(), resp.read()
        finally:
            conn.close()


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, like a real server: clients reuse connections

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            fault, rng = proxy.draw(body)
            if fault == "hang":
                if not proxy.hang():  # the client has given up by now; answer late, as a slow server would
                    self._reply(504, b'{"error": {"message": "upstream timed out"}}')
            elif fault == "429":
                retry_after = rng.choice(["0", "1"])
                self._reply(429, b'{"error": {"message": "rate limited"}}', [("Retry-After", retry_after)])
            elif fault in ("500", "503"):
                self._reply(int(fault), b'{"error": {"message": "server error"}}')
            else:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP | {"host"}}
                status, upstream_headers, content = proxy.forward(self.path, body, headers)
                if fault == "truncated":
                    content = content[: len(content) // 2]
                elif fault == "garbage":
                    content = b"<html><body>502 Bad Gateway (but status 200)</body></html>"
                elif fault == "unscored":
                    completion = json.loads(content)
                    completion["choices"][0]["message"]["content"] = UNSCORED_REPLY
                    content = json.dumps(completion).encode()
                kept = [(k, v) for k, v in upstream_headers if k.lower() not in _HOP_BY_HOP]
                self._reply(status, content, kept)

        def _reply(self, status: int, content: bytes, headers: list[tuple[str, str]] = ()) -> None:
            headers = list(headers)
            if not any(k.lower() == "content-type" for k, _ in headers):
                headers.append(("Content-Type", "application/json"))
            try:
                self.send_response(status)
                for k, v in headers:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True  # the client stopped waiting (a timeout): nothing to tell it

        def log_message(self, *args) -> None:  # keep test output clean
            pass

    return Handler
