"""Local servers for shards at URLs (tests/data/test_remote.py, tools/bench_remote_shards.py): an HTTP file server
with byte ranges (Python's http.server has none) and moto's S3-compatible server, both on free loopback ports.

``RangeServer(folder)``: GET/HEAD with ``Range: bytes=a-b`` (206), ETag, Last-Modified, keep-alive (HTTP/1.1), 404
for missing files. ``drop`` ranged GETs are answered by closing the connection (a dropped connection), and with
``ignore_range`` it answers every GET with the whole file (a server without range support). ``requests`` records
(method, path, Range header) of every request, ``peers`` the client's (host, port) of each: its connection.
"""

from __future__ import annotations

import email.utils
import logging
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import unquote, urlparse

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}  # moto accepts anything; never real credentials


class _RangeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as real servers and object stores
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall
    server: "RangeServer"

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        srv, wanted = self.server, self.headers.get("Range")
        with srv.lock:
            srv.requests.append((self.command, self.path, wanted))
            srv.peers.append(tuple(self.client_address[:2]))
            drop = body and wanted is not None and srv.drop > 0
            srv.drop -= drop
        if drop:  # close without an answer: the client sees a dropped connection
            self.close_connection = True
            return
        path = srv.folder / unquote(urlparse(self.path).path).lstrip("/")
        if not path.is_file() or srv.folder.resolve() not in path.resolve().parents:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        stat = path.stat()
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted or "")
        start, end = 0, stat.st_size
        if match and not srv.ignore_range:
            start, end = int(match[1]), min(stat.st_size, int(match[2]) + 1 if match[2] else stat.st_size)
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{stat.st_size}")
        else:
            self.send_response(200)
        with open(path, "rb") as f:  # only the range: shards are large
            f.seek(start)
            data = f.read(end - start) if body else b""
        self.send_header("Content-Length", str(end - start))
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "none" if srv.ignore_range else "bytes")
        self.send_header("ETag", f'"{stat.st_size:x}-{stat.st_mtime_ns:x}"')
        self.send_header("Last-Modified", email.utils.formatdate(stat.st_mtime, usegmt=True))
        self.end_headers()
        if body:
            self.wfile.write(data)


class RangeServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, folder: str | os.PathLike, *, drop: int = 0, ignore_range: bool = False,
                 host: str = "127.0.0.1"):
        super().__init__((host, 0), _RangeHandler)  # host: loopback, or a TwoHosts address (testing/netns.py)
        self.folder, self.drop, self.ignore_range = Path(folder), drop, ignore_range
        self.requests: list[tuple[str, str, Optional[str]]] = []
        self.peers: list[tuple[str, int]] = []  # the client address of each request: one per connection
        self.lock = threading.Lock()
        self._thread = threading.Thread(target=self.serve_forever, args=(0.05,), daemon=True, name="range-server")

    @property
    def url(self) -> str:
        return f"http://{self.server_address[0]}:{self.server_address[1]}"

    def __enter__(self) -> "RangeServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
        self.server_close()
        self._thread.join(timeout=10)


def start_moto(host: str = "127.0.0.1"):
    """moto's S3-compatible server on a free port of ``host`` (loopback, or a TwoHosts address), in a thread:
    (server, endpoint URL). stop() it."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no line per request
    server = ThreadedMotoServer(ip_address=host, port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    return server, f"http://{host}:{port}"
