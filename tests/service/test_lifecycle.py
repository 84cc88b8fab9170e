"""SIGTERM and SIGINT (service/lifecycle.py): the requests in flight finish, new ones get 503, the database is closed,
exit status 0; past --grace the ones still running are cut and the exit status says so.

The requests in flight are real enrolments held in two real ways: photos waiting in the micro-batcher for company
(--max-batch 16 with --batch-wait-ms of ten minutes: only the drain releases them), and uploads whose body the client
has sent half of (the server waits for the rest, as for any slow upload). Neither needs a hook in the service.
"""

from __future__ import annotations

import http.client
import signal
import threading
import time

import numpy as np
import pytest

from facesiam.service.database import open_database
from tests.service.conftest import REQUEST_TIMEOUT, Server, httpx, upload
from tests.service.test_metrics import value
from tests.service.test_serve import enroll, people

WAIT = 60  # seconds any one step may take on a busy machine (never reached when the service works)


class HalfSent:
    """An enrolment whose headers and first half of the body are sent; ``finish`` sends the rest and reads the
    answer (http.client: httpx cannot pause in the middle of a body)."""

    def __init__(self, srv: Server, identity: str, paths: list):
        request = httpx.Request("POST", srv.url + "/enroll", data={"identity": identity},
                                files=[("images", upload(p)) for p in paths], headers=srv.auth)
        self.body = request.read()
        self.conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=REQUEST_TIMEOUT)
        self.conn.putrequest("POST", "/enroll")
        for name in ("content-type", "content-length", "authorization"):
            self.conn.putheader(name, request.headers[name])
        self.conn.endheaders()
        self.conn.send(self.body[:len(self.body) // 2])

    def finish(self) -> tuple[int, bytes]:
        self.conn.send(self.body[len(self.body) // 2:])
        return self.answer()

    def answer(self) -> tuple[int, bytes]:
        """The server's answer (without sending the rest of the body: one given before the body was whole)."""
        try:
            answer = self.conn.getresponse()
            return answer.status, answer.read()
        finally:
            self.conn.close()


def metric(srv: Server, name: str) -> float:
    r = srv.client.get("/metrics", headers=srv.auth)
    assert r.status_code == 200, r.text
    return value(r.text, name)


def until(condition, what: str, srv: Server) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}\n{srv.output()}"
        time.sleep(0.05)


def enrolled(srv: Server) -> dict[str, int]:
    r = srv.client.get("/identities", headers=srv.auth)
    assert r.status_code == 200, r.text
    return {i["name"]: i["images"] for i in r.json()["identities"]}


def exit_status(srv: Server) -> int:
    try:
        return srv.proc.wait(timeout=WAIT)
    except Exception:
        raise AssertionError(f"serve did not exit after the signal\n{srv.output()}") from None


@pytest.fixture(params=["sqlite", "postgresql"])
def where(request, tmp_path) -> list[str]:
    """The gallery flags: a SQLite gallery folder, or a new PostgreSQL database (skipped without PostgreSQL)."""
    if request.param == "sqlite":
        return ["--gallery", str(tmp_path / "gallery")]
    return ["--db", request.getfixturevalue("postgres_db")]


@pytest.mark.slow
def test_sigterm_finishes_requests_in_flight_refuses_new_ones_and_loses_nothing(tiny_model_dir, face_folder, where,
                                                                                  tmp_path):
    paths = [p for ps in people(face_folder).values() for p in ps]
    args = ["--checkpoint", str(tiny_model_dir), *where, "--threshold", "0.5", "--device", "cpu",
            "--max-batch", "16", "--batch-wait-ms", "600000", "--grace", "600"]
    acknowledged: dict[str, int] = {}
    with Server(args, log=tmp_path / "serve.log") as srv:
        r = srv.client.post("/enroll", json={"identity": "before", "embeddings": np.eye(1, 32).tolist()},
                            headers=srv.auth)  # no photo: a write that does not wait for the batcher
        assert r.status_code == 200, r.text
        acknowledged["before"] = 1
        # three enrolments of 2 photos: 6 images held by the batcher, which waits for 16
        answers: dict[str, httpx.Response] = {}

        def held(name, batch):
            answers[name] = enroll(srv, name, batch)

        threads = [threading.Thread(target=held, args=(f"held{i}", paths[2 * i:2 * i + 2]), daemon=True)
                   for i in range(3)]
        for t in threads:
            t.start()
        until(lambda: metric(srv, "facesiam_batch_queue_depth") == 6, "6 photos wait in the batcher", srv)
        slow = [HalfSent(srv, f"slow{i}", paths[10 + 2 * i:12 + 2 * i]) for i in range(2)]
        # in flight: 3 held, 2 half sent, and the /metrics request that reads the gauge
        until(lambda: metric(srv, "facesiam_requests_in_flight") == 3 + 2 + 1, "5 requests in flight", srv)

        srv.proc.send_signal(signal.SIGTERM)
        until(lambda: srv.client.get("/readyz").status_code == 503, "/readyz 503 while draining", srv)
        assert srv.client.get("/readyz").json() == {"status": "draining"}
        assert srv.client.get("/healthz").status_code == 200  # alive, only going
        for t in threads:  # the batcher stopped waiting for company: the held ones are answered
            t.join(timeout=WAIT)
            assert not t.is_alive(), srv.output()
        for name, r in answers.items():
            assert r.status_code == 200, r.text
            acknowledged[name] = 2
        # a new request now: 503, a JSON error, Retry-After; nothing written
        r = srv.client.post("/enroll", json={"identity": "after", "embeddings": np.eye(1, 32).tolist()},
                            headers=srv.auth)
        assert r.status_code == 503 and "shutting down" in r.json()["error"], r.text
        assert int(r.headers["retry-after"]) > 0 and r.headers["x-content-type-options"] == "nosniff"
        assert srv.client.post("/search", json={"embedding": np.eye(1, 32)[0].tolist()},
                               headers=srv.auth).status_code == 503
        # the half-sent uploads were in flight at the signal: they finish, and are answered
        for i, request in enumerate(slow):
            status, body = request.finish()
            assert status == 200, body
            acknowledged[f"slow{i}"] = 2
        assert exit_status(srv) == 0, srv.output()
        with pytest.raises(httpx.TransportError):  # the socket is closed once drained: connection refused
            srv.client.get("/healthz", timeout=5)
        out = srv.output()
        assert "SIGTERM: draining: 5 request(s) in flight" in out and "closed" in out and "Traceback" not in out, out
    if where[0] == "--gallery":  # the database was closed: SQLite folded its write-ahead log into the file
        assert not (tmp_path / "gallery" / "gallery.sqlite-wal").exists()
    with Server(args, log=tmp_path / "serve2.log") as srv:  # restarted on the same gallery: every answered enrolment
        assert enrolled(srv) == acknowledged


@pytest.mark.slow
@pytest.mark.parametrize("second_signal", [False, True], ids=["grace-over", "second-signal"])
def test_requests_past_the_grace_period_are_cut_and_the_exit_status_says_so(tiny_model_dir, face_folder, tmp_path,
                                                                            second_signal):
    paths = [p for ps in people(face_folder).values() for p in ps]
    gallery = tmp_path / "gallery"
    # grace-over: 1 s for two uploads that never finish; second-signal: 600 s, but a SIGINT after the SIGTERM
    grace = "600" if second_signal else "1"
    args = ["--checkpoint", str(tiny_model_dir), "--gallery", str(gallery), "--threshold", "0.5", "--device", "cpu",
            "--grace", grace]
    with Server(args, log=tmp_path / "serve.log") as srv:
        assert enroll(srv, "before", paths[:2]).status_code == 200
        stuck = [HalfSent(srv, f"stuck{i}", paths[2 + 2 * i:4 + 2 * i]) for i in range(2)]
        until(lambda: metric(srv, "facesiam_requests_in_flight") == 2 + 1, "2 uploads in flight", srv)
        srv.proc.send_signal(signal.SIGTERM)
        if second_signal:
            until(lambda: srv.client.get("/readyz").status_code == 503, "draining", srv)
            srv.proc.send_signal(signal.SIGINT)
        assert exit_status(srv) == 1, srv.output()
        out = srv.output()
        assert "with 2 request(s) still running; they were cut" in out and "Traceback" not in out, out
        for request in stuck:  # cut: answered 503 (whose body says so) before their bodies were whole
            status, body = request.answer()
            assert status == 503 and b"shut down before this request finished" in body, body
    db = open_database(gallery / "gallery.sqlite", None, create=False)
    try:
        assert db.snapshot().names == {1: "before"}  # what was answered is there; the cut uploads are not
    finally:
        db.close()


@pytest.mark.slow
def test_drain_delay_serves_on_with_readyz_503_then_drains_and_exits_0(tiny_model_dir, tmp_path):
    """serve --drain-delay 4: after SIGTERM /readyz is 503 at once while requests are still answered; then new
    ones get 503 and serve exits 0 (nothing in flight)."""
    args = ["--checkpoint", str(tiny_model_dir), "--gallery", str(tmp_path / "gallery"), "--threshold", "0.5",
            "--device", "cpu", "--drain-delay", "4"]
    with Server(args, log=tmp_path / "serve.log") as srv:
        srv.proc.send_signal(signal.SIGTERM)
        until(lambda: srv.client.get("/readyz").status_code == 503, "/readyz 503 after the signal", srv)
        signalled = time.monotonic()
        r = srv.client.get("/identities", headers=srv.auth)
        assert r.status_code == 200 or time.monotonic() - signalled > 3, r.text  # still served during the delay

        def refused() -> bool:  # 503, or the socket already closed (drained: nothing was in flight)
            try:
                return srv.client.get("/identities", headers=srv.auth, timeout=5).status_code == 503
            except httpx.TransportError:
                return True

        until(refused, "refused after the delay", srv)
        assert time.monotonic() - signalled > 3  # not before the delay was over
        assert exit_status(srv) == 0, srv.output()
        out = srv.output()
        assert "requests still served for 4 s (--drain-delay)" in out and "SIGTERM: draining: 0 request(s)" in out


def in_process(**settings):
    """(an app with no model and no subprocess, its client, the Authorization header): the DrainGate between them."""
    from fastapi.testclient import TestClient

    from facesiam.service.app import create_app
    from facesiam.service.context import ServiceSettings
    from facesiam.service.tokens import TokenSet
    from tests.service.conftest import TOKEN
    from tests.service.test_metrics import CountingEmbedder

    app = create_app(CountingEmbedder(), ServiceSettings(tokens=TokenSet.single(TOKEN, "test"), threshold=0.5,
                                                         threshold_source="test", **settings))
    return app, TestClient(app, base_url="http://127.0.0.1"), {"Authorization": f"Bearer {TOKEN}"}


def test_draining_answers_503_except_the_probes():
    app, client, auth = in_process()
    with client:
        assert client.get("/readyz").json() == {"status": "ready"}
        assert client.get("/identities", headers=auth).status_code == 200
        app.state.service.drain.begin("test")
        for method, path in (("GET", "/identities"), ("POST", "/search"), ("GET", "/"), ("GET", "/nowhere")):
            r = client.request(method, path, headers=auth)
            assert r.status_code == 503 and r.json()["status"] == 503, (path, r.text)
            assert r.headers["retry-after"] and r.headers["connection"] == "close"
        assert client.get("/readyz").status_code == 503 and client.get("/healthz").status_code == 200
        assert app.state.service.drain.in_flight == 0


def test_drain_delay_keeps_serving_while_readyz_says_503_then_drains():
    """--drain-delay: for its seconds after the signal only /readyz changes (503); then new requests get 503. A
    second signal skips what is left of the delay and the grace period."""
    now = [100.0]
    app, client, auth = in_process(grace=20, drain_delay=5)
    drain = app.state.service.drain
    drain.clock = lambda: now[0]
    with client:
        drain.begin("SIGTERM")
        now[0] += 4.9
        assert client.get("/readyz").status_code == 503 and client.get("/healthz").status_code == 200
        assert client.get("/identities", headers=auth).status_code == 200  # still served
        assert not drain.done()  # nothing in flight, but the delay is not over
        now[0] += 0.2
        assert client.get("/identities", headers=auth).status_code == 503
        assert drain.done() and drain.left() == pytest.approx(19.9)
        drain.begin("SIGINT")  # a second signal: cut at once
        assert drain.left() == 0


def test_a_second_signal_during_the_drain_delay_refuses_at_once():
    from facesiam.service.lifecycle import Drain

    now = [0.0]
    drain = Drain(grace=20, clock=lambda: now[0], delay=30)
    drain.begin("SIGTERM")
    assert drain.draining and not drain.refusing
    now[0] = 1.0
    drain.begin("SIGINT")
    assert drain.refusing and drain.left() == 0 and drain.done()
