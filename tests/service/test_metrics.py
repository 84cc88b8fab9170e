"""GET /metrics (Prometheus' text format), --metrics-port and the JSON access log (service/metrics.py), on the app
in process with a fake embedder (and once the real `facesiam serve`): the expected numbers are the requests each
test made and what its fake network counted itself."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from tests.conftest import free_port
from tests.service.conftest import TOKEN, httpx, png_bytes

parser = pytest.importorskip("prometheus_client.parser", reason='/metrics needs: pip install -e ".[serve]"')

READER = "reader-token-0123456789abcdef"  # read scope only
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class CountingEmbedder:
    """No detector (uploads are faces already); embeds a photo by its mean colour and counts its network passes and
    the images in each."""

    embedding_dim, aligner, alignment = 8, None, None

    def __init__(self):
        self.passes: list[int] = []

    def embed_faces(self, crops):
        self.passes.append(len(crops))
        rows = [np.r_[np.asarray(c, np.float32).reshape(-1, 3).mean(0) + 1, np.ones(5)] for c in crops]
        return np.asarray(rows, np.float32)


def client_for(embedder=None, **settings):
    from fastapi.testclient import TestClient

    from facesiam.service.app import create_app
    from facesiam.service.context import ServiceSettings
    from facesiam.service.tokens import Token, TokenSet

    tokens = TokenSet([Token(TOKEN, frozenset({"read", "write", "admin"}), "test"),
                       Token(READER, frozenset({"read"}), "test")])
    app = create_app(embedder or CountingEmbedder(), ServiceSettings(tokens=tokens, threshold=0.5,
                                                                     threshold_source="test", **settings))
    return TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False)


def samples(text: str) -> list:
    """Every sample of a /metrics page, parsed by prometheus_client's own parser."""
    return [s for family in parser.text_string_to_metric_families(text) for s in family.samples]


def value(text: str, name: str, **labels) -> float:
    found = [s.value for s in samples(text) if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def scrape(client) -> str:
    r = client.get("/metrics", headers=AUTH)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return r.text


def photo(seed: int) -> tuple[str, bytes, str]:
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), np.uint8)
    return f"face{seed}.png", png_bytes(Image.fromarray(pixels)), "image/png"


def test_counters_and_histograms_count_the_requests_made():
    embedder = CountingEmbedder()
    with client_for(embedder, max_batch=1) as client:
        for i in range(3):
            r = client.post("/verify", files={"image1": photo(i), "image2": photo(i + 10)}, headers=AUTH)
            assert r.status_code == 200, r.text
        bad = client.post("/verify", json={"embedding1": [1.0] * 3, "embedding2": [1.0] * 8}, headers=AUTH)
        assert bad.status_code == 400
        assert client.post("/search", files={"image": photo(7)}, headers=AUTH).status_code == 200
        client.get("/no/such/page", headers=AUTH)
        client.request("BREW", "/verify", headers=AUTH)  # a made-up method: counted, without a label of its own
        text = scrape(client)
    assert value(text, "facesiam_requests_total", route="/verify", method="POST", status="200") == 3
    assert value(text, "facesiam_requests_total", route="/verify", method="POST", status="400") == 1
    assert value(text, "facesiam_requests_total", route="/search", method="POST", status="200") == 1
    assert value(text, "facesiam_requests_total", route="(unmatched)", method="GET", status="404") == 1
    assert value(text, "facesiam_requests_total", route="/verify", method="other", status="405") == 1
    # decode: one per image (3 x 2 + 1); detect and embed: one per embedding call; search: one
    assert value(text, "facesiam_stage_seconds_count", stage="decode") == 7
    assert value(text, "facesiam_stage_seconds_count", stage="embed") == 4
    assert value(text, "facesiam_stage_seconds_count", stage="detect") == 4
    assert value(text, "facesiam_stage_seconds_count", stage="search") == 1
    assert value(text, "facesiam_stage_seconds_sum", stage="decode") > 0
    # micro-batches as the fake network saw them (max_batch=1: one image a pass)
    assert value(text, "facesiam_batch_size_count") == len(embedder.passes) == 7
    assert value(text, "facesiam_batch_size_sum") == sum(embedder.passes)
    assert value(text, "facesiam_batch_queue_depth") == 0


def test_metrics_need_the_admin_scope_and_refusals_are_counted_by_scope():
    with client_for() as client:
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", headers={"Authorization": f"Bearer {READER}"}).status_code == 403
        assert client.post("/enroll", json={"identity": "a", "embeddings": [[1.0] * 8]},
                           headers={"Authorization": f"Bearer {READER}"}).status_code == 403
        assert client.get("/identities").status_code == 401
        text = scrape(client)
    assert value(text, "facesiam_auth_refusals_total", scope="admin", status="401") == 1
    assert value(text, "facesiam_auth_refusals_total", scope="admin", status="403") == 1
    assert value(text, "facesiam_auth_refusals_total", scope="write", status="403") == 1
    assert value(text, "facesiam_auth_refusals_total", scope="read", status="401") == 1
    assert value(text, "facesiam_requests_total", route="/metrics", method="GET", status="401") == 1


def test_gallery_gauges_are_the_stores_counts_when_scraped():
    rng = np.random.default_rng(0)
    with client_for() as client:
        text = scrape(client)
        assert value(text, "facesiam_gallery_faces") == 0
        statements = value(text, "facesiam_database_seconds_count")
        for name, faces in (("Ann", 3), ("Bo", 1), ("Cy", 2)):
            r = client.post("/enroll", json={"identity": name, "embeddings": rng.normal(size=(faces, 8)).tolist()},
                            headers=AUTH)
            assert r.status_code == 200, r.text
        listed = client.get("/identities", headers=AUTH).json()["identities"]
        store = client.app.state.service.store
        text = scrape(client)
        assert value(text, "facesiam_gallery_faces") == sum(i["images"] for i in listed) == store.size == 6
        assert value(text, "facesiam_gallery_identities") == len(listed) == 3
        assert value(text, "facesiam_index_info", kind="flat") == 1
        assert value(text, "facesiam_database_seconds_count") > statements  # each enrolment wrote to the database
        assert client.delete("/identities/Ann", headers=AUTH).status_code == 200
        text = scrape(client)
        assert value(text, "facesiam_gallery_faces") == store.size == 3
        assert value(text, "facesiam_gallery_identities") == 2


def access_lines(caplog) -> list[dict]:
    from facesiam.service.metrics import JsonFormatter

    formatter = JsonFormatter()
    return [json.loads(formatter.format(r)) for r in caplog.records if r.name == "facesiam.access"]


@pytest.mark.parametrize("log_identities", [False, True])
def test_json_access_lines_carry_no_token_and_no_name(caplog, log_identities):
    name = "Zelda Quintessa"
    caplog.set_level(logging.INFO, logger="facesiam.access")
    with client_for(json_access_log=True, log_identities=log_identities) as client:
        sent = [client.post("/enroll", json={"identity": name, "embeddings": [[1.0] * 8]}, headers=AUTH),
                client.get(f"/identities/{name}/faces?token={TOKEN}", headers={**AUTH, "X-Request-ID": "abc-1"}),
                client.get("/status", headers={"Authorization": "Bearer not-a-token-0123456789"}),
                client.delete(f"/identities/{name}", headers=AUTH)]
    lines = access_lines(caplog)
    assert [(line["method"], line["route"], line["status"]) for line in lines] == [
        ("POST", "/enroll", 200), ("GET", "/identities/{name}/faces", 200), ("GET", "/status", 403),
        ("DELETE", "/identities/{name}", 200)]
    assert [line["request_id"] for line in lines] == [r.headers["x-request-id"] for r in sent]
    assert lines[1]["request_id"] == "abc-1" and all(isinstance(line["ms"], float) for line in lines)
    raw = "\n".join(json.dumps(line) for line in lines)
    assert TOKEN not in raw and "not-a-token" not in raw and "?" not in raw
    assert (name in raw) == log_identities
    if log_identities:
        assert [line.get("identity") for line in lines] == [None, name, None, name]


def test_text_access_log_is_uvicorns_and_json_replaces_it():
    from facesiam.commands.serve import _parser, uvicorn_options
    from facesiam.errors import InputError

    def options(*flags):
        return uvicorn_options(_parser().parse_args(["--onnx", "x.onnx", "--threshold", "0.5", *flags]))

    assert options("--access-log")["access_log"] is True and "log_config" not in options("--access-log")
    json_options = options("--access-log", "--log-format", "json")
    assert json_options["access_log"] is False and json_options["log_config"] is None
    with pytest.raises(InputError, match="--metrics-port"):
        options("--port", "8000", "--metrics-port", "8000")
    args = _parser().parse_args(["--onnx", "x.onnx", "--threshold", "0.5", "--metrics-port", "9100",
                                 "--log-format", "json", "--log-identities"])
    assert (args.metrics_port, args.log_format, args.log_identities) == (9100, "json", True)


def test_metrics_port_answers_without_a_token_on_loopback():
    port = free_port()
    with client_for(metrics_port=port) as client:
        assert client.post("/enroll", json={"identity": "a", "embeddings": [[1.0] * 8]},
                           headers=AUTH).status_code == 200
        r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30)
        assert r.status_code == 200
        assert value(r.text, "facesiam_gallery_faces") == 1
        assert value(r.text, "facesiam_requests_total", route="/enroll", method="POST", status="200") == 1
        assert client.get("/metrics").status_code == 401  # the main port still wants the admin token
    with pytest.raises(httpx.TransportError):  # closed with the app
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_serve_writes_json_lines_and_serves_the_metrics_port(tiny_model_dir, tmp_path):
    """The real `facesiam serve --log-format json --metrics-port`: every line on its stderr is a JSON object, the
    access lines name the route template and carry neither the token nor the name."""
    from tests.service.conftest import Server

    name, port = "Yolanda Prest", free_port()
    with Server(["--checkpoint", str(tiny_model_dir), "--threshold", "0.5", "--device", "cpu", "--log-format", "json",
                 "--metrics-port", str(port)], log=tmp_path / "serve.log") as srv:
        assert srv.client.get("/metrics", headers=srv.auth).status_code == 200
        dim = 32  # tiny_model_dir's embedding_dim
        r = srv.client.post("/enroll", json={"identity": name, "embeddings": [[1.0] * dim]}, headers=srv.auth)
        assert r.status_code == 200, r.text
        assert srv.client.get(f"/identities/{name}/faces?token={TOKEN}").status_code == 401
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        assert value(text, "facesiam_gallery_faces") == 1
        assert value(text, "facesiam_requests_total", route="/enroll", method="POST", status="200") == 1
    lines = [json.loads(line) for line in (tmp_path / "serve.log").read_text().splitlines() if line.strip()]
    access = [line for line in lines if line["logger"] == "facesiam.access"]
    # sorted: a line is written once its answer has gone out, so the next request's line may come first
    assert sorted((a["route"], a["status"]) for a in access if a["route"] != "/healthz") == sorted([
        ("/metrics", 200), ("/enroll", 200), ("/identities/{name}/faces", 401)])
    everything = json.dumps(lines)
    assert TOKEN not in everything and name not in everything
    assert any("facesiam serve: http://" in line.get("message", "") for line in lines)
