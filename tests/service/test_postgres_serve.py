"""Two facesiam serve processes on one PostgreSQL (a real server started by the test; skipped cleanly without
Debian's postgresql package): a face enrolled through one is found through the other, and a kill -9 during
enrolments loses no acknowledged one."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from facesiam.service.database import open_database
from tests.service.conftest import REQUEST_TIMEOUT, Server, httpx

pytestmark = pytest.mark.timeout(300)


@pytest.mark.slow
def test_two_servers_follow_each_other_and_kill_9_loses_nothing(tiny_model_dir, postgres_db, tmp_path):
    from facesiam.eval.embed import TorchEmbedder

    dim = TorchEmbedder(tiny_model_dir, device="cpu").embedding_dim
    rng = np.random.default_rng(0)
    args = ["--checkpoint", str(tiny_model_dir), "--db", postgres_db, "--threshold", "0.5", "--device", "cpu"]
    with Server(args, log=tmp_path / "a.log") as a, Server(args, log=tmp_path / "b.log") as b:
        x = rng.normal(size=(1, dim))
        assert a.client.post("/enroll", json={"identity": "alice", "embeddings": x.tolist()},
                             headers=a.auth).status_code == 200
        deadline = time.monotonic() + 10  # LISTEN/NOTIFY: milliseconds in practice (tools/bench_serve.py)
        while b.client.post("/search", json={"embedding": x[0].tolist()}, headers=b.auth).json()["identity"] != "alice":
            assert time.monotonic() < deadline, b.output()
            time.sleep(0.02)
        r = b.client.patch("/identities/alice", json={"name": "Alice"}, headers=b.auth)
        assert r.status_code == 200
        deadline = time.monotonic() + 10
        while [i["name"] for i in a.client.get("/identities", headers=a.auth).json()["identities"]] != ["Alice"]:
            assert time.monotonic() < deadline, a.output()
            time.sleep(0.02)

        # kill -9 the first while it acknowledges enrolments; the second keeps serving and sees every one
        acknowledged, failures, killed = [1], [], threading.Event()

        def enrol_forever():
            i = 0
            while True:
                try:
                    r = a.client.post("/enroll", json={"identity": f"p{i}", "embeddings": rng.normal(size=(1, dim)).tolist()},
                                      headers=a.auth)
                except httpx.TransportError as err:
                    if not killed.is_set():
                        failures.append(repr(err))
                    return
                if r.status_code != 200:
                    failures.append(r.text)
                    return
                acknowledged[0] += 1
                i += 1

        t = threading.Thread(target=enrol_forever, daemon=True)
        t.start()
        while t.is_alive() and acknowledged[0] < 30:
            time.sleep(0.01)
        killed.set()
        a.kill()
        t.join(timeout=REQUEST_TIMEOUT + 10)
        assert not t.is_alive() and not failures, failures
        db = open_database(postgres_db, None)
        try:
            stored = len(db.snapshot().face_ids)
        finally:
            db.close()
        assert acknowledged[0] <= stored <= acknowledged[0] + 1
        deadline = time.monotonic() + 10
        while b.client.get("/status", headers=b.auth).json()["gallery_size"] != stored:
            assert time.monotonic() < deadline, b.output()
            time.sleep(0.02)


def test_writes_and_readiness_come_back_after_postgres_restarts(tiny_model_dir, postgres_server, postgres_db, tmp_path):
    """Issue 40: after a PostgreSQL restart every write answered 500 until serve itself was restarted, while /healthz
    said ok and searches ran on a stale index. Now: 503 (and /readyz 503) while the database is away, then writes,
    listings and other processes' changes (caught up by seq) work again without restarting serve."""
    from facesiam.eval.embed import TorchEmbedder

    dim = TorchEmbedder(tiny_model_dir, device="cpu").embedding_dim
    rng = np.random.default_rng(1)
    args = ["--checkpoint", str(tiny_model_dir), "--db", postgres_db, "--threshold", "0.5", "--device", "cpu"]

    def enrol(srv, name):
        return srv.client.post("/enroll", json={"identity": name, "embeddings": rng.normal(size=(1, dim)).tolist()},
                               headers=srv.auth)

    with Server(args, log=tmp_path / "serve.log") as srv:
        assert enrol(srv, "before").status_code == 200
        assert srv.client.get("/readyz").json() == {"status": "ready"}
        postgres_server.pause()
        try:
            for name in ("during", "during2"):  # the first finds the connection gone, the second the server away
                r = enrol(srv, name)
                assert r.status_code == 503 and "unreachable" in r.json()["error"], r.text
            assert srv.client.get("/identities/before/faces", headers=srv.auth).status_code == 503
            r = srv.client.get("/readyz")
            assert r.status_code == 503 and r.json()["waiting_for"] == ["database"]
            assert srv.client.get("/healthz").status_code == 200  # alive, only not ready
        finally:
            postgres_server.resume()
        deadline = time.monotonic() + 15
        while (r := enrol(srv, "after")).status_code != 200:
            assert r.status_code == 503 and time.monotonic() < deadline, (r.text, srv.output())
            time.sleep(0.2)
        assert srv.client.get("/readyz").status_code == 200
        assert srv.client.get("/identities/after/faces", headers=srv.auth).json()["count"] == 1
        # another process writes: the listener reconnected and the index catches up (not stale)
        x = rng.normal(size=(1, dim)).astype(np.float32)
        db = open_database(postgres_db, None)
        try:
            db.add_faces("elsewhere", x, ["test"], "test")
        finally:
            db.close()
        deadline = time.monotonic() + 15
        while srv.client.post("/search", json={"embedding": x[0].tolist()},
                              headers=srv.auth).json()["identity"] != "elsewhere":
            assert time.monotonic() < deadline, srv.output()
            time.sleep(0.2)
        assert "Traceback" not in srv.output()
