"""facesiam serve end to end: the real server (uvicorn on a free localhost port) called with a real client (httpx).

Expected scores are computed independently in this process: the same checkpoint through facesiam.eval.embed and
a gallery searched by brute force with numpy.
"""

from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from facesiam.eval.embed import TorchEmbedder
from facesiam.service.database import open_database
from tests.conftest import run_python
from tests.service.conftest import REQUEST_TIMEOUT, TOKEN, Server, httpx, noise_png, png_bytes, upload

from PIL import Image


def people(face_folder: Path) -> dict[str, list[Path]]:
    return {d.name: sorted(d.glob("*.png")) for d in sorted(face_folder.iterdir()) if d.is_dir()}


@pytest.fixture(scope="module")
def expected(tiny_model_dir, face_folder):
    """Unit embeddings of every synthetic face, computed in this process."""
    paths = [p for ps in people(face_folder).values() for p in ps]
    emb = TorchEmbedder(tiny_model_dir, device="cpu").embed(paths)
    return {p: e for p, e in zip(paths, emb)}


def gallery_size(gallery: Path) -> int:
    """Faces in a served gallery folder's database, read directly (not through the service)."""
    if not (gallery / "gallery.sqlite").exists():
        return 0
    db = open_database(gallery / "gallery.sqlite", None, create=False)
    try:
        return len(db.snapshot().face_ids)
    finally:
        db.close()


def status(srv: Server) -> dict:
    return srv.client.get("/status", headers=srv.auth).json()


def verify(srv: Server, a: Path, b: Path, **kw):
    return srv.client.post("/verify", files={"image1": upload(a), "image2": upload(b)}, **kw)


def enroll(srv: Server, identity: str, paths: list[Path], headers=None):
    return srv.client.post("/enroll", data={"identity": identity}, files=[("images", upload(p)) for p in paths],
                           headers=srv.auth if headers is None else headers)


def test_every_endpoint_round_trip_and_persistence(tiny_model_dir, face_folder, expected, tmp_path):
    gallery = tmp_path / "gallery"
    report = tmp_path / "report"
    report.mkdir()
    ppl = people(face_folder)
    names = list(ppl)
    a, b = ppl[names[0]][:2]
    c = ppl[names[1]][0]
    want_ab, want_ac = float(expected[a] @ expected[b]), float(expected[a] @ expected[c])
    assert abs(want_ab - want_ac) > 1e-5, "pick two pairs whose similarities differ"
    threshold = (want_ab + want_ac) / 2  # the report's threshold: one of the two pairs is "same", the other not
    (report / "metrics.json").write_text(json.dumps({"verification": {"threshold_at_far": {"1e-03": threshold},
                                                                      "tar_at_far": {"1e-03": 0.5}}}))
    args = ["--checkpoint", str(tiny_model_dir), "--gallery", str(gallery), "--report", str(report),
            "--max-batch", "1", "--device", "cpu"]
    with Server(args, log=tmp_path / "serve.log") as srv:
        assert srv.client.get("/healthz").json() == {"status": "ok"}  # no token needed, and says nothing more
        assert srv.client.get("/status").status_code == 401 and status(srv)["gallery_size"] == 0
        page = srv.client.get("/")
        assert page.status_code == 200 and "<form" in page.text

        for other, want in ((b, want_ab), (c, want_ac)):
            r = verify(srv, a, other, headers=srv.auth)
            assert r.status_code == 200, r.text
            out = r.json()
            assert out["similarity"] == pytest.approx(want, abs=1e-4)
            assert out["threshold"] == threshold and "far=1e-3" in out["threshold_source"]
            assert out["same"] is (want >= threshold)
            assert out["decision"] == ("same" if want >= threshold else "different")
        assert verify(srv, a, a, headers=srv.auth).json()["similarity"] == pytest.approx(1.0, abs=1e-5)
        # the same by embedding (a client that runs the ONNX model itself), and the timings of each stage
        r = srv.client.post("/verify", json={"embedding1": expected[a].tolist(), "embedding2": expected[b].tolist()},
                            headers=srv.auth)
        assert r.status_code == 200 and r.json()["similarity"] == pytest.approx(want_ab, abs=1e-4)
        assert set(verify(srv, a, b, headers=srv.auth).json()["timings"]) == {"decode_ms", "detect_ms", "embed_ms",
                                                                               "total_ms"}

        # an empty gallery: a search answers, "unknown"
        r = srv.client.post("/search", files={"image": upload(a)}, headers=srv.auth)
        assert r.status_code == 200 and r.json()["identity"] == "unknown" and r.json()["matches"] == []

        # enrol 5 people with all but their last image; search with the last
        for n in names[:5]:
            r = enroll(srv, n, ppl[n][:-1])
            assert r.status_code == 200, r.text
            assert r.json()["added"] == len(ppl[n]) - 1
        listed = srv.client.get("/identities", headers=srv.auth).json()
        assert listed["count"] == 5
        assert {i["name"]: i["images"] for i in listed["identities"]} == {n: len(ppl[n]) - 1 for n in names[:5]}
        assert enroll(srv, names[0], ppl[names[0]][-1:]).json()["images"] == len(ppl[names[0]])  # adds to a person

        enrolled = {n: ppl[n] if n == names[0] else ppl[n][:-1] for n in names[:5]}
        gx = np.stack([expected[p] for n in enrolled for p in enrolled[n]])
        gid = [n for n in enrolled for _ in enrolled[n]]

        def brute(q: np.ndarray, k: int) -> list[tuple[str, float]]:
            best: dict[str, float] = {}
            for name, s in zip(gid, gx @ q):
                best[name] = max(best.get(name, -2.0), float(s))
            return sorted(best.items(), key=lambda t: -t[1])[:k]

        def check_search(server: Server, probe: Path) -> None:
            r = server.client.post("/search", files={"image": upload(probe)}, data={"k": "3"}, headers=server.auth)
            assert r.status_code == 200, r.text
            got = r.json()
            want = brute(expected[probe], 3)
            assert [m["identity"] for m in got["matches"]] == [n for n, _ in want]
            assert [m["score"] for m in got["matches"]] == pytest.approx([s for _, s in want], abs=1e-4)
            if abs(want[0][1] - threshold) > 1e-4:  # (FAISS and numpy may round a score at the threshold apart)
                assert got["identity"] == (want[0][0] if want[0][1] >= threshold else "unknown")

        for n in names[1:5]:
            check_search(srv, ppl[n][-1])
        probe = ppl[names[2]][-1]
        r = srv.client.post("/search", json={"embedding": (expected[probe] * 3).tolist(), "k": 3}, headers=srv.auth)
        assert [m["identity"] for m in r.json()["matches"]] == [n for n, _ in brute(expected[probe], 3)]
        assert "search_ms" in r.json()["timings"]

        # faces have ids: list them, delete one, rename a person
        faces = srv.client.get(f"/identities/{names[0]}/faces", headers=srv.auth).json()
        assert faces["count"] == len(ppl[names[0]]) and all(f["source"] == "upload" for f in faces["faces"])
        one = faces["faces"][-1]["id"]
        r = srv.client.delete(f"/faces/{one}", headers=srv.auth)
        assert r.status_code == 200 and r.json()["identity"] == names[0] and r.json()["images"] == faces["count"] - 1
        assert srv.client.delete(f"/faces/{one}", headers=srv.auth).status_code == 404
        drop = gid.index(names[0]) + faces["count"] - 1  # faces are listed in enrolment order
        gx, gid = np.delete(gx, drop, 0), gid[:drop] + gid[drop + 1:]
        r = srv.client.patch(f"/identities/{names[3]}", json={"name": "Renamed"}, headers=srv.auth)
        assert r.status_code == 200 and r.json()["identity"] == "Renamed"
        r = srv.client.patch(f"/identities/{names[4]}", json={"name": "Renamed"}, headers=srv.auth)
        assert r.status_code == 409 and "exists already" in r.json()["error"]
        gid = ["Renamed" if n == names[3] else n for n in gid]
        check_search(srv, ppl[names[3]][-1])

        # delete one person; deleting them again is a 404
        r = srv.client.delete(f"/identities/{names[1]}", headers=srv.auth)
        assert r.status_code == 200 and r.json()["removed"] == len(ppl[names[1]]) - 1
        r = srv.client.delete(f"/identities/{names[1]}", headers=srv.auth)
        assert r.status_code == 404 and "not enrolled" in r.json()["error"]
        keep = [i for i, n in enumerate(gid) if n != names[1]]
        gx, gid = gx[keep], [gid[i] for i in keep]
        check_search(srv, ppl[names[2]][-1])
        assert status(srv)["gallery_size"] == len(gid)

    # a restart serves the same gallery
    with Server(args, log=tmp_path / "serve2.log") as srv:
        listed = srv.client.get("/identities", headers=srv.auth).json()
        assert [i["name"] for i in listed["identities"]] == [names[0], names[2], "Renamed", names[4]]
        check_search(srv, ppl[names[3]][-1])
    assert gallery_size(gallery) == len(gid)
    # the biometric data is the owner's only; no upload was written anywhere (no --keep-images)
    assert gallery.stat().st_mode & 0o777 == 0o700
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in gallery.iterdir()), list(gallery.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gallery", "report", "serve.log", "serve2.log"]


def test_tokens_public_read_and_bad_input(tiny_model_dir, face_folder, tmp_path):
    ppl = people(face_folder)
    a, b = next(iter(ppl.values()))[:2]
    token_file = tmp_path / "token"
    token_file.write_text("file-token-abcdefghijklmnop\n")
    args = ["--checkpoint", str(tiny_model_dir), "--gallery", str(tmp_path / "g"), "--threshold", "0.5",
            "--token-file", str(token_file), "--max-upload-mb", "0.02", "--max-pixels", "10000"]
    with Server(args, token=None, log=tmp_path / "serve.log") as srv:
        good = {"Authorization": "Bearer file-token-abcdefghijklmnop"}
        # tokens: none -> 401 with a challenge, wrong -> 403, right -> 200
        r = verify(srv, a, b)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer" and "token" in r.json()["error"]
        assert verify(srv, a, b, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 403
        assert verify(srv, a, b, headers={"Authorization": "Basic abc"}).status_code == 401
        assert verify(srv, a, b, headers=good).status_code == 200
        for method, path in (("GET", "/identities"), ("DELETE", "/identities/x"), ("POST", "/search")):
            assert srv.client.request(method, path).status_code == 401, path

        def post(path: str, files, data=None):
            r = srv.client.post(path, files=files, data=data, headers=good)
            assert r.headers["content-type"] == "application/json", r.text
            assert r.json()["status"] == r.status_code
            return r

        img = upload(a)
        assert post("/verify", {"image1": img, "image2": ("x.txt", b"hello", "text/plain")}).status_code == 415
        r = post("/verify", {"image1": img, "image2": ("x.png", b"not an image at all", "image/png")})
        assert r.status_code == 400 and "x.png" in r.json()["error"]
        r = post("/verify", {"image1": img, "image2": ("big.png", noise_png(100), "image/png")})  # 30 kB > 20 kB
        assert r.status_code == 413 and "big.png" in r.json()["error"]
        flat = png_bytes(Image.new("RGB", (200, 200), (90, 90, 90)))  # 40,000 px in a few hundred bytes
        r = post("/verify", {"image1": img, "image2": ("wide.png", flat, "image/png")})
        assert r.status_code == 413 and "pixels" in r.json()["error"]
        r = post("/verify", {"image1": img})
        assert r.status_code == 400 and "image2" in r.json()["error"]
        r = post("/search", {"image": img}, {"k": "0"})
        assert r.status_code == 400 and "k must be" in r.json()["error"]
        r = post("/enroll", [("images", img)], {"identity": "a/b"})
        assert r.status_code == 400 and "identity" in r.json()["error"]
        r = post("/enroll", [("images", img), ("images", ("x.png", b"junk", "image/png"))], {"identity": "alice"})
        assert r.status_code == 400  # all or nothing: alice is not half enrolled
        assert srv.client.get("/identities", headers=good).json()["count"] == 0
        r = srv.client.post("/verify", content=b"x" * 2_000_000, headers={**good, "content-type": "multipart/form-data"})
        assert r.status_code == 413  # refused from its declared length
        r = srv.client.post("/verify", content=iter([b"x" * 1000]), headers={**good, "content-type": "multipart/form-data"})
        assert r.status_code == 411  # chunked: no length to check
    assert gallery_size(tmp_path / "g") == 0  # nothing was enrolled

    # --public-read: verify, search and the list without a token; enrol and delete still need it
    with Server(args + ["--public-read"], token=None, log=tmp_path / "serve2.log") as srv:
        assert verify(srv, a, b).status_code == 200
        assert srv.client.get("/identities").status_code == 200
        assert srv.client.post("/search", files={"image": upload(a)}).status_code == 200
        assert enroll(srv, "alice", [a], headers={}).status_code == 401
        assert srv.client.delete("/identities/alice").status_code == 401
        assert enroll(srv, "alice", [a], headers=good).status_code == 200


def test_a_token_is_required_to_start(tiny_model_dir, tmp_path):
    short = tmp_path / "short"
    short.write_text("abc")
    proc = run_python(["tools/serve.py", "--checkpoint", str(tiny_model_dir), "--threshold", "0.5", "--token-file",
                       str(short), "--port", "1"], check=False, cwd=str(Path(__file__).parents[2]), timeout=120)
    assert proc.returncode == 1 and "at least 16 characters" in proc.stderr and "Traceback" not in proc.stderr
    notgallery = tmp_path / "notgallery"
    notgallery.mkdir()
    (notgallery / "holiday.jpg").write_bytes(b"x")
    proc = run_python(["tools/serve.py", "--checkpoint", str(tiny_model_dir), "--threshold", "0.5", "--gallery",
                       str(notgallery), "--port", "1"], check=False, cwd=str(Path(__file__).parents[2]), timeout=120,
                      env={"FACESIAM_TOKEN": TOKEN})
    assert proc.returncode == 1 and "is not a gallery" in proc.stderr and "Traceback" not in proc.stderr
    assert (notgallery / "holiday.jpg").exists()


def test_batching_gives_the_same_scores_and_batches(tiny_model_dir, face_folder, expected, tmp_path):
    paths = [p for ps in people(face_folder).values() for p in ps][:16]
    pairs = [(paths[i], paths[(i * 5 + 3) % 16]) for i in range(16)]
    kept = tmp_path / "kept"
    # A batch closes only when it holds 16 images (it would wait 10 minutes for them): the 8 clients of a round send
    # 2 images each, so each round is one pass of 16, however slowly the requests arrive.
    args = ["--checkpoint", str(tiny_model_dir), "--threshold", "0.5", "--max-batch", "16", "--batch-wait-ms",
            "600000", "--keep-images", str(kept)]
    with Server(args, log=tmp_path / "serve.log") as srv:
        barrier = threading.Barrier(8)  # 16 calls on 8 threads: 2 rounds, the second after the first has answered

        def call(pair):
            barrier.wait(timeout=60)  # the 8 clients send together
            r = verify(srv, *pair, headers=srv.auth)
            assert r.status_code == 200, r.text
            return r.json()["similarity"]

        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(call, pairs))
        stats = status(srv)["batching"]
    want = [float(expected[a] @ expected[b]) for a, b in pairs]
    assert got == pytest.approx(want, abs=1e-4)
    assert stats == {"batches": 2, "images": 32, "largest_batch": 16, "mean_batch": 16.0}
    assert len(list(kept.glob("*-image1.png"))) == len(list(kept.glob("*-image2.png"))) == 16  # --keep-images


@pytest.mark.slow
def test_kill_9_during_enrolment_leaves_a_whole_gallery(tiny_model_dir, face_folder, tmp_path):
    gallery = tmp_path / "gallery"
    paths = [p for ps in people(face_folder).values() for p in ps]
    args = ["--checkpoint", str(tiny_model_dir), "--gallery", str(gallery), "--threshold", "0.5"]
    acknowledged = 0

    for round_ in range(3):
        with Server(args, log=tmp_path / f"serve{round_}.log") as srv:
            done, killed = threading.Event(), threading.Event()
            failures: list[str] = []  # what went wrong in the enrolling thread, other than the kill

            def enrol_forever():
                nonlocal acknowledged
                i = 0
                while not done.is_set():
                    batch = [paths[(i + j) % len(paths)] for j in range(2)]
                    try:
                        r = enroll(srv, f"r{round_}-{i}", batch)
                    except httpx.TransportError as err:
                        if not killed.is_set():
                            failures.append(f"request {i} failed before the kill: {err!r}")
                        return
                    except BaseException as err:  # anything else is a bug: reported by the test, not swallowed
                        failures.append(f"request {i}: {err!r}")
                        return
                    if r.status_code != 200:
                        failures.append(f"request {i}: {r.status_code} {r.text}")
                        return
                    acknowledged += len(batch)
                    i += 1

            t = threading.Thread(target=enrol_forever, daemon=True)
            t.start()
            target = gallery_size(gallery) + 12 + 6 * round_
            size = 0
            while t.is_alive() and size < target:  # a dead thread or server ends the wait (its error is below)
                size = status(srv)["gallery_size"]
                time.sleep(0.05)
            assert not failures, failures
            assert size >= target, f"the gallery held {size} of {target} images when enrolling stopped"
            killed.set()
            srv.kill()  # SIGKILL while enrolments keep arriving
            done.set()
            t.join(timeout=REQUEST_TIMEOUT + 10)
            assert not t.is_alive(), "the enrolling thread is still waiting on a killed server"
            assert not failures, failures  # after the kill: only transport errors (connection lost or refused)
        size = gallery_size(gallery)
        # every acknowledged enrolment is there; at most the one in flight beyond it
        assert acknowledged <= size <= acknowledged + 2
        acknowledged = size


@pytest.mark.slow
def test_serve_onnx_equals_the_checkpoint(tiny_model_dir, face_folder, expected, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    model = tmp_path / "model.onnx"
    run_python(["tools/export.py", str(tiny_model_dir), "--onnx", str(model)], cwd=str(Path(__file__).parents[2]),
               timeout=300)
    a, b = next(iter(people(face_folder).values()))[:2]
    with Server(["--onnx", str(model), "--threshold", "0.5", "--threads", "1"], log=tmp_path / "serve.log") as srv:
        r = verify(srv, a, b, headers=srv.auth)
        assert r.status_code == 200, r.text
        assert r.json()["similarity"] == pytest.approx(float(expected[a] @ expected[b]), abs=1e-4)
        assert "onnxruntime" in status(srv)["model"]


def test_a_model_trained_on_aligned_faces_aligns_uploads(aligned_model, tmp_path):
    pytest.importorskip("facenet_pytorch")
    from tests.conftest import photo

    raw1, raw2 = tmp_path / "raw1.png", tmp_path / "raw2.png"
    photo(0.8, 0, (60, 60)).save(raw1)
    photo(0.6, 12, (150, 40), (90, 120, 160)).save(raw2)
    want = TorchEmbedder(aligned_model, device="cpu").embed([raw1, raw2])  # detected and aligned in this process
    with Server(["--checkpoint", str(aligned_model), "--threshold", "0.5"], log=tmp_path / "serve.log") as srv:
        r = verify(srv, raw1, raw2, headers=srv.auth)
        assert r.status_code == 200, r.text
        assert r.json()["similarity"] == pytest.approx(float(want[0] @ want[1]), abs=1e-4)
        r = srv.client.post("/verify", files={"image1": upload(raw1), "image2": ("noise.png", noise_png(200), "image/png")},
                            headers=srv.auth)
        assert r.status_code == 400 and "noise.png" in r.json()["error"] and "face" in r.json()["error"]
    assert "aligned as the model was trained" in srv.output()


def test_every_route_declares_a_scope_and_one_without_is_refused():
    from fastapi.testclient import TestClient

    from facesiam.service.app import create_app
    from facesiam.service.context import ServiceSettings
    from facesiam.service.tokens import SCOPES, PUBLIC, TokenSet

    class Embedder:  # the routes only; nothing here runs the model
        embedding_dim, aligner, alignment = 8, None, None

    app = create_app(Embedder(), ServiceSettings(tokens=TokenSet.single(TOKEN, "test"), threshold=0.5,
                                                 threshold_source="test"))
    declared = {(route.path, method): route.endpoint.scope for route in app.state.routes for method in route.methods}
    assert set(declared.values()) <= {*SCOPES, PUBLIC}
    assert {k for k, v in declared.items() if v == PUBLIC} == {("/", "GET"), ("/healthz", "GET"), ("/readyz", "GET")}
    assert declared[("/enroll", "POST")] == declared[("/faces/{face_id}", "DELETE")] == "write"

    @app.get("/forgotten")  # a route added without @scoped: refused, not public
    async def forgotten():
        return {"secret": 1}

    client = TestClient(app, base_url="http://127.0.0.1")
    for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}):
        r = client.get("/forgotten", headers=headers)
        assert r.status_code == 403 and "declares no access scope" in r.json()["error"]
    assert client.get("/healthz").json() == {"status": "ok"}


def test_scoped_tokens_rotate_on_sighup_and_public_reads_are_rate_limited(tiny_model_dir, tmp_path):
    import signal

    token_file = tmp_path / "tokens"
    token_file.write_text("# scoped tokens\nread-token-aaaaaaaaaaaa read\nwrite-token-bbbbbbbbbbb read,write  # kiosk\n"
                          "admin-token-cccccccccccc admin\n")
    token_file.chmod(0o600)
    args = ["--checkpoint", str(tiny_model_dir), "--threshold", "0.5", "--token-file", str(token_file),
            "--public-read", "--public-rate", "0.2", "--public-burst", "3"]

    def bearer(t):
        return {"Authorization": f"Bearer {t}"}

    emb = {"identity": "alice", "embeddings": [[1.0] * 8]}
    with Server(args, token=None, log=tmp_path / "serve.log") as srv:
        read, write, admin = "read-token-aaaaaaaaaaaa", "write-token-bbbbbbbbbbb", "admin-token-cccccccccccc"
        assert srv.client.get("/identities", headers=bearer(read)).status_code == 200
        r = srv.client.post("/enroll", json=emb, headers=bearer(read))
        assert r.status_code == 403 and "may not write" in r.json()["error"]
        assert srv.client.get("/status", headers=bearer(write)).status_code == 403
        assert srv.client.post("/enroll", json=emb, headers=bearer(write)).status_code in (200, 400)  # scope passed
        assert srv.client.get("/status", headers=bearer(admin)).json()["tokens"] == 3
        # without a token: reads within the burst, then 429 with Retry-After; a token is never rate-limited
        codes = [srv.client.get("/identities").status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        r = srv.client.get("/identities")
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert srv.client.get("/identities", headers=bearer(read)).status_code == 200
        assert srv.client.post("/enroll", json=emb).status_code == 401  # writes always need a token

        # rotate: the read token goes, a new one comes; SIGHUP, no restart
        token_file.write_text("new-read-token-dddddddddd read\nadmin-token-cccccccccccc admin\n")
        srv.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while srv.client.get("/identities", headers=bearer("new-read-token-dddddddddd")).status_code != 200:
            assert time.monotonic() < deadline, srv.output()
            time.sleep(0.1)
        assert srv.client.get("/identities", headers=bearer(read)).status_code == 403
        # a broken file keeps the tokens in force (a typo must not lock everyone out)
        token_file.write_text("short read\n")
        srv.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while "kept the 2 tokens in force" not in srv.output():
            assert time.monotonic() < deadline, srv.output()
            time.sleep(0.1)
        assert srv.client.get("/status", headers=bearer(admin)).status_code == 200


def test_detect_and_recognize_every_face_of_a_group_photo(aligned_model, tmp_path):
    """Two people on one photo: /detect and /recognize against the detector, aligner and model run in this process."""
    pytest.importorskip("facenet_pytorch")
    from facesiam.faces.quality import sharpness
    from tests.conftest import photo

    left, right = photo(0.6, 0, (40, 60)), photo(0.5, 0, (60, 90), (60, 90, 140))
    group = Image.new("RGB", (800, 400), (128, 128, 128))
    group.paste(left, (0, 0))
    group.paste(right.transpose(Image.FLIP_LEFT_RIGHT), (400, 0))  # a mirrored astronaut: another "person"
    embedder = TorchEmbedder(aligned_model, device="cpu")
    aligner = embedder.aligner
    found = aligner.align_each(group, aligner.detect(group))
    usable = [r for r in found if r.image is not None]
    assert len(usable) == 2, "the photo must hold two usable faces"
    want = embedder.embed_faces([r.image for r in usable])
    single = [(tmp_path / "left.png", left), (tmp_path / "right.png", right.transpose(Image.FLIP_LEFT_RIGHT))]
    for path, image in single:
        image.save(path)
    threshold = float(want[0] @ want[1]) + 1e-3  # above the two people's similarity: each is only themselves
    with Server(["--checkpoint", str(aligned_model), "--threshold", str(min(threshold, 0.999))],
                log=tmp_path / "serve.log") as srv:
        files = {"image": ("group.png", png_bytes(group), "image/png")}
        r = srv.client.post("/detect", files=files, headers=srv.auth)
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["count"] == len(found) and (got["width"], got["height"]) == group.size
        for face, ref in zip(got["faces"], found):
            assert face["box"] == pytest.approx(ref.box, abs=0.1) and face["score"] == pytest.approx(ref.score, abs=1e-4)
            assert face["usable"] is (ref.image is not None)
            if ref.image is not None:
                assert face["quality"]["sharpness"] == pytest.approx(sharpness(ref.image, aligner.size), abs=0.1)
        assert set(got["timings"]) == {"decode_ms", "detect_ms", "embed_ms", "total_ms"}
        for name, (path, _) in zip(("Left", "Right"), single):
            assert srv.client.post("/enroll", data={"identity": name}, files=[("images", upload(path))],
                                   headers=srv.auth).status_code == 200
        r = srv.client.post("/recognize", files=files, headers=srv.auth)
        assert r.status_code == 200, r.text
        faces = [f for f in r.json()["faces"] if f["usable"]]
        assert [f["identity"] for f in faces] == ["Left" if f["box"][0] < 400 else "Right" for f in faces]
        assert r.json()["known"] == 2
        enrolled = embedder.embed([path for path, _ in single])
        for face, vector, ref in zip(faces, want, usable):
            assert face["score"] == pytest.approx(ref.score, abs=1e-4)  # the detector's
            assert face["similarity"] == pytest.approx(float(np.max(enrolled @ vector)), abs=1e-3)
        r = srv.client.post("/recognize", files={"image": ("noise.png", noise_png(200), "image/png")},
                            headers=srv.auth)
        assert r.status_code == 200 and r.json()["count"] == 0  # no face is an answer, not an error
