"""A real facesiam serve process on a free localhost port, and a real HTTP client (httpx) to call it."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, free_port

httpx = pytest.importorskip("httpx", reason='the service tests need: pip install -e ".[serve]"')
pytest.importorskip("fastapi", reason='the service tests need: pip install -e ".[serve]"')
pytest.importorskip("uvicorn", reason='the service tests need: pip install -e ".[serve]"')

TOKEN = "test-token-0123456789abcdef"
START_TIMEOUT = 120  # seconds for the server to import torch, load the model and answer /healthz
REQUEST_TIMEOUT = 120


class Server:
    """``with Server([...serve flags...]) as srv: srv.client.post(...)``; ``srv.kill()`` is a kill -9."""

    def __init__(self, args: list[str], *, token: Optional[str] = TOKEN, log: Optional[Path] = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        env.pop("FACESIAM_TOKEN", None)
        if token is not None:
            env["FACESIAM_TOKEN"] = token
        self.log_path = log
        self._log = open(log, "w") if log is not None else subprocess.DEVNULL
        self.proc = subprocess.Popen([sys.executable, str(REPO / "tools" / "serve.py"), "--port", str(self.port),
                                      *args], env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.client = httpx.Client(base_url=self.url, timeout=REQUEST_TIMEOUT)
        self.auth = {"Authorization": f"Bearer {token}"} if token else {}

    def wait(self) -> "Server":
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited with {self.proc.returncode}: {self.output()}")
            try:
                if self.client.get("/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError(f"serve did not answer /healthz within {START_TIMEOUT}s: {self.output()}")

    def output(self) -> str:
        if self.log_path is None:
            return "(no log)"
        if self._log is not subprocess.DEVNULL and not self._log.closed:
            self._log.flush()
        return Path(self.log_path).read_text()[-4000:]

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.client.close()
        if self._log is not subprocess.DEVNULL:
            self._log.close()

    def __enter__(self) -> "Server":
        return self.wait()

    def __exit__(self, *exc) -> None:
        self.stop()


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def noise_png(size: int, seed: int = 0) -> bytes:
    return png_bytes(Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), np.uint8)))


def upload(path: Path) -> tuple[str, bytes, str]:
    return (path.name, path.read_bytes(), "image/png" if path.suffix == ".png" else "image/jpeg")


# ------------------------------------------------------------------------------------------ PostgreSQL
# A real, throw-away PostgreSQL server (facesiam/testing/postgres.py): one per session, one new database per test.

def _postgres_skip(reason: str) -> None:
    pytest.skip(f"PostgreSQL unavailable: {reason}; install Debian's postgresql package (see .ci/run)")


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory):
    """The PostgreSQL server started for this session (facesiam/testing/postgres.py: PostgresServer); stopped
    (pg_ctl stop -m immediate) at session end, whatever the tests did."""
    from facesiam.testing.postgres import PostgresUnavailable, start_postgres

    try:
        import psycopg  # noqa: F401
    except ImportError:
        _postgres_skip('psycopg is not installed (pip install -e ".[postgres]")')
    try:
        server = start_postgres(tmp_path_factory.mktemp("postgres"))
    except PostgresUnavailable as exc:
        _postgres_skip(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server):
    """URL (postgresql://facesiam@127.0.0.1:PORT/facesiam_test) of a fresh database on the session's server."""
    return postgres_server.create_database("facesiam_test")


@pytest.fixture
def postgres_db(postgres_url):
    """URL of a NEW empty database for this test only (dropped afterwards), on the session's server."""
    from facesiam.testing.postgres import create_database, drop_database

    url = create_database(postgres_url)
    yield url
    drop_database(postgres_url, url.rsplit("/", 1)[1])
