"""Hardening found by the attack test of issue 30, each reproduced: a Host outside the allow-list (DNS rebinding), a
body larger than its Content-Length said (Content-Length + Transfer-Encoding), security headers, and identity names
that hide characters (NUL, bidi overrides, zero-width) or differ only in Unicode form."""

from __future__ import annotations

import socket
import unicodedata

import pytest
from PIL import Image

from facesiam.service.hardening import BadName, host_of, normalize_identity
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
