"""Servers that facesiam's tests and benchmarks start on this machine: an HTTP file server with byte ranges and moto's
S3 server (servers.py), a throw-away PostgreSQL (postgres.py), and the free loopback port they bind to.

They live in the package, not in tests/, so that tools/bench_*.py can start the same servers without importing a test
module. Every server listens on 127.0.0.1 (or an address of netns.py's two hosts) and is stopped by its owner;
netns.py makes those two hosts: network namespaces joined by a veth link that a test can cut.
"""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a server a test or benchmark starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
