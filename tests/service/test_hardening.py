"""Hardening found by the attack test of issue 30, each reproduced: a Host outside the allow-list (DNS rebinding), a
body larger than its Content-Length said (Content-Length + Transfer-Encoding), security headers, and identity names
that hide characters (NUL, bidi overrides, zero-width) or differ only in Unicode form."""

from __future__ import annotations

import socket
import unicodedata

import pytest
from PIL import Image

from facesiam.service.hardening import BadName, RateLimiter, host_of, normalize_identity
from tests.service.conftest import TOKEN, Server, png_bytes, upload
from tests.service.test_serve import people


@pytest.mark.parametrize("name", ["dup\x00", "evil\u202etxt", "zero\u200bwidth", "a/b", "line\nbreak", " ", ""])
def test_names_hiding_characters_are_refused(name):
    with pytest.raises(BadName):
        normalize_identity(name)


def test_names_are_compared_in_one_unicode_form():
    decomposed, composed = "Jose\u0301", "Jos\u00e9"
    assert normalize_identity(decomposed) == normalize_identity(composed) == composed
    assert normalize_identity("  Ann Lee ") == "Ann Lee"
    assert unicodedata.is_normalized("NFC", normalize_identity("Ame\u0301lie"))


@pytest.mark.parametrize("header, host", [("127.0.0.1:8000", "127.0.0.1"), ("[::1]:80", "::1"),
                                          ("LOCALHOST", "localhost"), ("evil.example.com", "evil.example.com"),
                                          ("::1", "::1")])
def test_host_of(header, host):
    assert host_of(header) == host


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height grey pixels and holds none (what a decompression bomb's header says)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _raw(port: int, head: bytes, body: bytes) -> bytes:
    """Send the head and as much of the body as the server takes; what it answered (it may answer and close
    before the body is all sent: that is the point)."""
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        try:
            s.sendall(head)
            for start in range(0, len(body), 65536):
                s.sendall(body[start:start + 65536])
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            while data := s.recv(65536):
                chunks.append(data)
        except ConnectionResetError:
            pass
    return b"".join(chunks)


def test_host_allow_list_smuggling_headers_and_names(tiny_model_dir, face_folder, tmp_path):
    a = next(iter(people(face_folder).values()))[0]
    args = ["--checkpoint", str(tiny_model_dir), "--threshold", "0.5", "--public-read", "--max-upload-mb", "0.05",
            "--body-timeout", "6", "--max-pixels", "4e8"]
    with Server(args, log=tmp_path / "serve.log") as srv:
        # DNS rebinding: a page on evil.example.com resolving to 127.0.0.1 gets nothing, even with --public-read
        r = srv.client.get("/identities", headers={"Host": "evil.example.com"})
        assert r.status_code == 400 and "--allow-host" in r.json()["error"]
        assert srv.client.get("/identities").status_code == 200
        # security headers everywhere; JSON is never cached
        for path in ("/", "/identities", "/healthz"):
            r = srv.client.get(path)
            assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY"
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
        assert srv.client.get("/identities").headers["cache-control"] == "no-store"
        # Content-Length 10 with a chunked body of 3 MB: refused before the body is read
        body = b"".join(b"%x\r\n%s\r\n" % (65536, b"x" * 65536) for _ in range(48)) + b"0\r\n\r\n"
        head = (f"POST /verify HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nContent-Length: 10\r\n"
                "Transfer-Encoding: chunked\r\nContent-Type: multipart/form-data; boundary=x\r\n\r\n").encode()
        reply = _raw(srv.port, head, body)
        assert reply.split(b"\r\n", 1)[0].split()[1] in (b"400", b"413"), reply[:200]
        # a client that announces 1,000 bytes and sends 10 is cut off after the idle timeout (1 s here), not held
        head = (f"POST /verify HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nContent-Length: 1000\r\n"
                "Content-Type: multipart/form-data; boundary=x\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as s:
            s.sendall(head + b"--x\r\nabcd")
            reply = s.recv(65536)
        assert reply.split(b"\r\n", 1)[0].split()[1] == b"408", reply[:400]
        # a strip of pixels under the pixel budget but 100 times longer than wide: refused from its header
        strip = Image.new("RGB", (2000, 20), (128, 128, 128))
        r = srv.client.post("/search", files={"image": ("strip.png", png_bytes(strip), "image/png")})
        assert r.status_code == 413 and "longer than wide" in r.json()["error"]
        # a decompression bomb past Pillow's own limit (under this --max-pixels): 413, as documented (was 400)
        r = srv.client.post("/search", files={"image": ("bomb.png", png_header(14000, 14000), "image/png")})
        assert r.status_code == 413 and "pixels" in r.json()["error"]
        # parts per endpoint: verify takes 2 files, search 1 file and 1 field
        img = upload(a)
        r = srv.client.post("/verify", files=[("image1", img), ("image2", img), ("image3", img)])
        assert r.status_code == 413 and "Too many files" in r.json()["error"]
        r = srv.client.post("/search", files=[("image", img), ("image", img)])
        assert r.status_code == 413 and "Too many files" in r.json()["error"]
        r = srv.client.post("/search", files={"image": img}, data={"k": "1", "x": "y"})
        assert r.status_code == 413 and "Too many fields" in r.json()["error"]
        # names: one Unicode form, nothing hidden
        auth = {"Authorization": f"Bearer {TOKEN}"}

        def enrol(name):
            return srv.client.post("/enroll", data={"identity": name}, files=[("images", upload(a))], headers=auth)

        assert enrol("Jose\u0301").status_code == 200
        assert enrol("Jos\u00e9").json()["images"] == 2  # the same identity
        for bad in ("dup\x00", "evil\u202etxt", "zero\u200bwidth"):
            r = enrol(bad)
            assert r.status_code == 400 and "U+" in r.json()["error"], bad
        assert [i["name"] for i in srv.client.get("/identities").json()["identities"]] == ["Jos\u00e9"]
        assert srv.client.delete("/identities/Jose\u0301", headers=auth).json()["removed"] == 2


def test_large_uploads_are_shrunk_before_detection():
    import io

    from facesiam.service.context import ServiceSettings, decode_upload
    from facesiam.service.tokens import TokenSet

    settings = ServiceSettings(tokens=TokenSet.single("t" * 16, "test"), threshold=0.5, threshold_source="test", max_side=512)
    buf = io.BytesIO()
    Image.new("RGB", (3000, 1500), (90, 120, 150)).save(buf, "PNG")
    assert decode_upload(buf.getvalue(), "big.png", settings).size == (512, 256)
    small = io.BytesIO()
    Image.new("RGB", (300, 200)).save(small, "PNG")
    assert decode_upload(small.getvalue(), "small.png", settings).size == (300, 200)


# ---------------------------------------------------------------------------------------------- issue 40
@pytest.mark.parametrize("name", ["alice\ufe0f", "ali\u034fce", "ali\u00a0ce", "\u0430lice", "\u3164", "\u2800",
                                  "\u0301", "\u3164\u3164", ".", "..", "x\u2800y"])
def test_invisible_and_mixed_script_names_are_refused(name):
    with pytest.raises(BadName):
        normalize_identity(name)


@pytest.mark.parametrize("name", ["Иван", "Ελένη", "山田 はな", "김민준", "O'Brien", "Zoë", "R2-D2",
                                  "\uff41\uff4c\uff49"])
def test_names_in_one_script_are_accepted(name):
    assert normalize_identity(name) == unicodedata.normalize("NFC", name)


def test_look_alike_names_of_an_enrolled_identity_are_a_conflict():
    import numpy as np

    from facesiam.errors import ConflictError
    from facesiam.service.database import open_database
    from facesiam.service.store import GalleryStore

    store = GalleryStore(open_database(":memory:", 4))
    x = np.eye(4, dtype=np.float32)[:1]
    store.enroll("alice", x, ["t"])
    for look_alike in ("\uff41\uff4c\uff49\uff43\uff45", "Alice", "ALICE"):  # fullwidth, case
        with pytest.raises(ConflictError, match="looks like the enrolled 'alice'"):
            store.enroll(normalize_identity(look_alike), x, ["t"])
    assert store.enroll("alice", x, ["t"])[1] == 2  # the same name adds to the person
    store.enroll("bob", x, ["t"])
    with pytest.raises(ConflictError):
        store.rename("bob", "Alice")
    assert store.rename("alice", "Alice") and store.identities() == {"Alice": 2, "bob": 1}  # its own key: fine
    store.delete("Alice")
    assert store.enroll("ALICE", x, ["t"])[1] == 1  # the key is free once the identity is gone


@pytest.mark.parametrize("header", ["localhost:evil", "127.0.0.1:80x", "[::1]evil", "localhost:"])
def test_malformed_host_headers_match_no_host(header):
    assert host_of(header) == ""


class FakeEmbedder:  # the routes only; nothing here runs a model
    embedding_dim, aligner, alignment = 8, None, None


def in_process(**settings):
    """The app on a fake embedder and an in-memory gallery, through Starlette's TestClient (lifespan included)."""
    from fastapi.testclient import TestClient

    from facesiam.service.app import create_app
    from facesiam.service.context import ServiceSettings
    from facesiam.service.tokens import TokenSet

    app = create_app(FakeEmbedder(), ServiceSettings(tokens=TokenSet.single(TOKEN, "test"), threshold=0.5,
                                                     threshold_source="test", **settings))
    return TestClient(app, base_url="http://127.0.0.1", raise_server_exceptions=False)


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_input_that_gave_500s_is_a_400_or_404():
    """Issue 40: an integer of 10**400, true or "1" in an embedding, JSON nested 100k deep, a face id past 64 bits,
    k: true, and an embedding whose length overflows (stored as zeros) were 500s or accepted."""
    with in_process() as client:
        good = [0.5] * 8
        assert client.post("/enroll", json={"identity": "a", "embeddings": [good]}, headers=AUTH).status_code == 200
        for bad in ([10 ** 400] + good[1:], [True] + good[1:], ["1"] + good[1:], [1e300] * 8, [[0.5]] * 8):
            body = '{"identity": "b", "embeddings": [%s]}' % ",".join(map(str, bad)).replace("True", "true") \
                .replace("'", '"')
            r = client.post("/enroll", content=body, headers={**AUTH, "content-type": "application/json"})
            assert r.status_code == 400 and "finite numbers" in r.json()["error"], (bad[:1], r.text)
        assert [i["name"] for i in client.get("/identities", headers=AUTH).json()["identities"]] == ["a"]
        deep = '{"embedding": ' + "[" * 100_000 + "]" * 100_000 + "}"
        r = client.post("/search", content=deep, headers={**AUTH, "content-type": "application/json"})
        assert r.status_code == 400 and "nested" in r.json()["error"]
        for k in (True, 2.5, "2.5"):
            r = client.post("/search", json={"embedding": good, "k": k}, headers=AUTH)
            assert r.status_code == 400 and "k must be" in r.json()["error"], k
        assert client.post("/search", json={"embedding": good, "k": 2}, headers=AUTH).status_code == 200
        for face in ("9223372036854775808", "99999999999999999999999", "0"):
            assert client.delete(f"/faces/{face}", headers=AUTH).status_code == 404, face


def test_the_guards_own_refusals_carry_the_security_headers():
    with in_process(public_read=True, public_rate=0.01, public_burst=1) as client:
        answers = [client.get("/status"),  # 401
                   client.get("/status", headers={"Authorization": "Bearer wrong-token-0123456789"}),  # 403
                   client.post("/enroll", headers={**AUTH, "content-length": "999999999999"}),  # 413
                   client.get("/identities"), client.get("/identities")]  # 200, 429
        assert [r.status_code for r in answers] == [401, 403, 413, 200, 429]
        for r in answers:
            assert r.headers["x-frame-options"] == "DENY" and r.headers["x-content-type-options"] == "nosniff"
            assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
            assert r.headers["cache-control"] == "no-store"
        r = client.get("/identities", headers={**AUTH, "Host": "localhost:evil"})
        assert r.status_code == 400 and "not served here" in r.json()["error"]


def test_readyz_says_ready_once_started():
    with in_process() as client:
        assert client.get("/readyz").json() == {"status": "ready"}
        assert client.get("/healthz").json() == {"status": "ok"}


class Uvicorn:
    """The in-process app (fake embedder) on a real uvicorn with facesiam serve's options, in a thread."""

    def __init__(self, flags: list[str], **settings):
        from facesiam.commands.serve import _parser, uvicorn_options
        from tests.conftest import free_port

        uvicorn = pytest.importorskip("uvicorn")
        self.port = free_port()
        args = _parser().parse_args(["--onnx", "x.onnx", "--threshold", "0.5", "--port", str(self.port), *flags])
        self.server = uvicorn.Server(uvicorn.Config(in_process(**settings).app, **uvicorn_options(args)))

    def __enter__(self) -> "Uvicorn":
        import threading
        import time

        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (reading whatever it still sends)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(65536):
            pass
        return True
    except socket.timeout:
        return False
    except ConnectionResetError:
        return True


def test_idle_and_slow_header_connections_are_closed():
    """Issue 40: a connection that sent nothing, or dribbled its headers, was held for ever (slowloris)."""
    import time

    with Uvicorn(["--header-timeout", "1"]) as srv:
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as idle:
            assert _closed_within(idle, 1 + 10)  # the bound: the header timeout and a generous margin
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as slow:
            slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            closed = False
            for i in range(40):  # a header line every 0.3 s: 12 s of headers if nobody stops it
                try:
                    slow.sendall(b"X-Slow-%d: y\r\n" % i)
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
                time.sleep(0.3)
            assert closed or _closed_within(slow, 0.5)
        with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as kept:  # a whole request: answered
            kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert kept.recv(65536).startswith(b"HTTP/1.1 200")
            assert _closed_within(kept, 5 + 10)  # then closed after the keep-alive timeout


def test_forwarded_for_is_trusted_only_from_the_given_proxies():
    """Issue 40: uvicorn trusted X-Forwarded-For from 127.0.0.1, so a local client chose its rate-limit address."""
    import httpx

    public = {"public_read": True, "public_rate": 0.01, "public_burst": 1}
    with Uvicorn([], **public) as srv, httpx.Client(base_url=f"http://127.0.0.1:{srv.port}") as client:
        codes = [client.get("/identities", headers={"X-Forwarded-For": f"10.0.0.{i}"}).status_code for i in range(3)]
        assert codes == [200, 429, 429]
    with Uvicorn(["--forwarded-allow-ips", "127.0.0.1"], **public) as srv, \
            httpx.Client(base_url=f"http://127.0.0.1:{srv.port}") as client:
        codes = [client.get("/identities", headers={"X-Forwarded-For": f"10.0.0.{i}"}).status_code for i in range(3)]
        assert codes == [200, 200, 200]  # behind a proxy that says so: each client its own bucket


def test_access_log_lines_drop_the_query_string():
    import logging

    from facesiam.service.hardening import AccessLogWithoutQuery

    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "GET", "/identities?token=secret-token-0123456789", "1.1", 200), None)
    assert AccessLogWithoutQuery().filter(record)
    assert "secret-token" not in record.getMessage() and "GET /identities?" in record.getMessage()


class CrowdEmbedder:
    """A fake detector that finds ``faces`` faces in any photo, and a network that counts its passes."""

    embedding_dim, alignment = 8, None

    def __init__(self, faces: int):
        from types import SimpleNamespace

        self.passes = 0

        def align_each(image, found):
            return [SimpleNamespace(box=(i, 0.0, i + 10.0, 10.0), landmarks=[(0.0, 0.0)] * 5, score=0.99, image=None,
                                    reason="too small") for i in range(len(found))]

        self.aligner = SimpleNamespace(detect=lambda image: list(range(faces)), align_each=align_each, size=112)

    def embed_faces(self, crops):
        import numpy as np

        self.passes += 1
        return np.ones((len(crops), 8), np.float32)


def crowd_client(faces: int, **settings):
    from fastapi.testclient import TestClient

    from facesiam.service.app import create_app
    from facesiam.service.context import ServiceSettings
    from facesiam.service.tokens import TokenSet

    embedder = CrowdEmbedder(faces)
    app = create_app(embedder, ServiceSettings(tokens=TokenSet.single(TOKEN, "test"), threshold=0.5,
                                               threshold_source="test", **settings))
    return TestClient(app, base_url="http://127.0.0.1"), embedder


def test_too_many_faces_are_refused_before_embedding():
    """Issue 40: a crowd photo had every face aligned and embedded (no cap)."""
    photo = {"image": ("crowd.png", png_bytes(Image.new("RGB", (64, 64))), "image/png")}
    client, embedder = crowd_client(30, max_faces=20)
    with client:
        for path in ("/recognize", "/detect"):
            r = client.post(path, files=photo, headers=AUTH)
            assert r.status_code == 413 and "30 faces" in r.json()["error"] and "--max-faces" in r.json()["error"]
        assert embedder.passes == 0
    client, embedder = crowd_client(20, max_faces=20)
    with client:
        assert client.post("/detect", files=photo, headers=AUTH).json()["count"] == 20


def test_public_reads_have_a_cost_budget_in_pixels_times_faces():
    """Issue 40: the public rate limit counted requests only; a large crowd photo cost the same as a tiny one."""
    big = {"image": ("big.png", png_bytes(Image.new("RGB", (1000, 1000))), "image/png")}
    small = {"image": ("small.png", png_bytes(Image.new("RGB", (10, 10))), "image/png")}
    # 0.1 megapixel-faces a second, bursts of 1: a 1 Mpx photo of 5 faces leaves the client 4 s in debt
    client, _ = crowd_client(5, public_read=True, public_cost_rate=0.1)
    with client:
        assert client.post("/detect", files=big).status_code == 200
        r = client.post("/detect", files=small)
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 40
        assert client.post("/detect", files=big, headers=AUTH).status_code == 200  # a token is never limited
    client, _ = crowd_client(5, public_read=True, public_cost_rate=0.1)
    with client:
        assert [client.post("/detect", files=small).status_code for _ in range(3)] == [200] * 3  # 500 px x 5: cheap


def test_rate_limiter_charges_work_into_debt():
    now = [0.0]
    limiter = RateLimiter(rate=2.0, burst=4, clock=lambda: now[0])
    assert limiter.allow("a", 0) == 0
    limiter.charge("a", 10)  # 4 - 10 = -6 tokens: 3 s at 2/s to be out of debt
    assert limiter.allow("a", 0) == pytest.approx(3.0) and limiter.allow("b", 0) == 0
    now[0] += 3
    assert limiter.allow("a", 0) == 0


def test_uploads_never_spool_to_disk_and_each_endpoint_has_its_own_byte_limit(monkeypatch):
    """Issue 40: a file part over --max-upload-mb was spooled to a temporary file (the README says bodies stay in
    memory), and every endpoint took the body of the largest (32 images)."""
    import tempfile

    rolled = []
    monkeypatch.setattr(tempfile.SpooledTemporaryFile, "rollover", lambda self: rolled.append(self))
    limit = 100_000
    with in_process(max_bytes=limit, max_files=4) as client:
        big = {"image": ("big.png", b"\x89PNG" + b"x" * (3 * limit), "image/png")}
        r = client.post("/search", files=big, headers=AUTH)  # 3 images' worth to an endpoint that takes one
        assert r.status_code == 413 and "request of" in r.json()["error"] and "/search" in r.json()["error"]
        files = [("images", ("big.png", b"\x89PNG" + b"x" * (2 * limit), "image/png"))]
        r = client.post("/enroll", data={"identity": "a"}, files=files, headers=AUTH)  # within /enroll's 4 images
        assert r.status_code == 413 and "over the limit of 100,000 bytes" in r.json()["error"]
        r = client.patch("/identities/a", content=b'{"name": "' + b"b" * 70_000 + b'"}',
                         headers={**AUTH, "content-type": "application/json"})
        assert r.status_code == 413
    assert rolled == []
