"""Shards at URLs (facesiam/data/remote.py): a real S3-compatible server (moto's server mode) and an HTTP server with
Range support (facesiam/testing/servers.py), both started here on free loopback ports. Every sample read from them is
compared byte for byte with the same shards on local disk. Skips when fsspec, s3fs, aiohttp or moto is missing
(``pip install -e ".[dev]"`` installs them)."""

from __future__ import annotations

import os
import pickle
import shutil
import time
from types import SimpleNamespace

import numpy as np
import pytest

fsspec = pytest.importorskip("fsspec")

from facesiam.commands.make_shards import main as make_shards  # noqa: E402
from facesiam.data import ShardDataset, open_dataset, write_shards  # noqa: E402
from facesiam.data import remote  # noqa: E402
from facesiam.data.remote import is_remote  # noqa: E402
from facesiam.errors import InputError  # noqa: E402

from facesiam.testing.servers import S3_ENV, RangeServer, start_moto  # noqa: E402

pytestmark = pytest.mark.timeout(120)  # a hung server fails its test; none should take more than a few seconds
SPLITS = ("train", "val")


@pytest.fixture(autouse=True)
def _fast_and_private(tmp_path, monkeypatch):
    """A private metadata cache per test, and short retry waits."""
    monkeypatch.setenv("FACESIAM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(remote, "BACKOFF", 0.01)


@pytest.fixture(scope="module")
def local_shards(face_folder, tmp_path_factory):
    """face_folder (10 identities x 4) as shards on local disk: 3 identities held out, several shards per split."""
    dst = tmp_path_factory.mktemp("remote") / "shards"
    write_shards(face_folder, dst, val_identities=3, max_samples_per_shard=7, workers=1, progress=False)
    return dst


@pytest.fixture(scope="module")
def s3():
    """moto's S3 server; fsspec's s3 options point at it (what FSSPEC_S3_ENDPOINT_URL=... does); bucket 'faces'."""
    pytest.importorskip("aiohttp")
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")  # moto[server]: flask and werkzeug
    patch = pytest.MonkeyPatch()
    for key, value in S3_ENV.items():
        patch.setenv(key, value)
    server, endpoint = start_moto()
    try:
        patch.setitem(fsspec.config.conf, "s3", {"endpoint_url": endpoint})
        fsspec.filesystem("s3", skip_instance_cache=True).mkdir("faces")
        yield endpoint
    finally:
        server.stop()
        patch.undo()


@pytest.fixture
def http(local_shards):
    pytest.importorskip("aiohttp")  # fsspec's HTTP file system
    with RangeServer(local_shards) as server:
        yield server


def _same_samples(local, url, split):
    a, b = ShardDataset(local, split), ShardDataset(url, split)
    assert len(a) == len(b) > 0
    assert b.classes == a.classes and b.paths == a.paths
    np.testing.assert_array_equal(b.labels, a.labels)
    assert [b.read_bytes(i) for i in range(len(b))] == [a.read_bytes(i) for i in range(len(a))]
    keys = [(i, 100 + i) for i in reversed(range(len(a)))] + [0, 0]  # a batch as the sampler hands it out
    for (image_b, label_b), (image_a, label_a) in zip(b.__getitems__(keys), a.__getitems__(keys)):
        assert label_b == label_a
        np.testing.assert_array_equal(np.asarray(image_b), np.asarray(image_a))
    return b


def test_is_remote():
    assert is_remote("s3://bucket/shards") and is_remote("gs://b/x") and is_remote("https://host/shards")
    assert not is_remote("shards/") and not is_remote("file:///tmp/shards") and not is_remote("C:/data")
    from pathlib import Path
    assert not is_remote(Path("s3://bucket"))


def test_make_shards_to_s3_then_read_back(face_folder, local_shards, s3, capsys):
    url = "s3://faces/set"
    make_shards([str(face_folder), url, "--val-identities", "3", "--max-samples-per-shard", "7", "--workers", "1",
                 "--no-progress"])
    fs = fsspec.filesystem("s3")
    local_files = sorted(p.relative_to(local_shards).as_posix() for p in local_shards.rglob("*") if p.is_file())
    assert sorted(f[len("faces/set/"):] for f in fs.find("faces/set")) == local_files
    for name in local_files:  # make_shards is reproducible: the uploaded set is the local one, byte for byte
        assert fs.cat_file(f"faces/set/{name}") == (local_shards / name).read_bytes(), name
    for split in SPLITS:
        _same_samples(local_shards, url, split)

    with pytest.raises(SystemExit) as exc:  # an existing set is replaced only with --overwrite
        make_shards([str(face_folder), url, "--workers", "1", "--no-progress"])
    assert "--overwrite" in str(exc.value.code) and "\n" not in str(exc.value.code)
    make_shards([str(face_folder), url, "--workers", "1", "--no-progress", "--overwrite"])  # no val split now
    assert not any("val" in f for f in fs.find("faces/set")), "the old set's val shards and index are removed"
    assert ShardDataset(url).labels.tolist() == sorted(ShardDataset(local_shards).labels.tolist()
                                                       + ShardDataset(local_shards, "val").labels.tolist())


def test_missing_bucket_or_url_is_one_line(face_folder, s3, http):
    with pytest.raises(InputError) as exc:
        ShardDataset("s3://no-such-bucket/shards")
    assert "s3://no-such-bucket" in str(exc.value) and "does not exist" in str(exc.value)
    with pytest.raises(SystemExit) as exc:
        make_shards([str(face_folder), "s3://no-such-bucket/shards", "--workers", "1", "--no-progress"])
    message = str(exc.value.code)
    assert message.startswith("make_shards: s3://no-such-bucket") and "\n" not in message
    with pytest.raises(InputError) as exc:
        open_dataset(f"{http.url}/no/such/folder")
    assert f"{http.url}/no/such/folder/dataset.json not found" in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(InputError, match="read-only"):
        write_shards(face_folder, f"{http.url}/new", workers=1, progress=False)


def test_http_reads_equal_local_and_feed_the_training_loader(local_shards, http):
    import torch

    from facesiam.config import TrainConfig
    from facesiam.training.setup import build_data

    for split in SPLITS:
        _same_samples(local_shards, http.url, split)
    gets = [r for r in http.requests if r[0] == "GET" and r[1].endswith(".tar")]
    assert gets and all(r[2] for r in gets), "a tar is only ever read by byte ranges, never whole"
    assert len(gets) < 2 * len(ShardDataset(local_shards)), "a batch's neighbouring ranges share requests"

    def batches(data):  # training's own loader: per-class batch sampler, 2 workers, seeded augmentation
        cfg = TrainConfig(data=str(data), output="", batch_size=6, m_per_class=2, num_workers=2)
        cfg.model.image_size = 32
        accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0)
        train = build_data(cfg, accelerator, loader_timeout=60)
        train.sampler.set_epoch(0)
        return list(train.loader)

    local, served = batches(local_shards), batches(http.url)
    assert len(served) == len(local) > 0
    for (images_b, labels_b), (images_a, labels_a) in zip(served, local):
        assert torch.equal(labels_b, labels_a) and torch.equal(images_b, images_a)


def test_embedding_shards_at_a_url_equals_local(local_shards, http, tiny_model_dir):
    from facesiam.eval.embed import embed_path

    local = embed_path(tiny_model_dir, str(local_shards), split="val", batch_size=5, device="cpu", progress=False)
    served = embed_path(tiny_model_dir, http.url, split="val", batch_size=5, device="cpu", progress=False)
    np.testing.assert_array_equal(served["embeddings"], local["embeddings"])
    assert served["paths"] == local["paths"] and served["labels"].tolist() == local["labels"].tolist()


def test_dropped_connections_are_retried_with_the_same_bytes(local_shards, http, monkeypatch):
    expected = ShardDataset(local_shards)
    ds = ShardDataset(http.url)
    # the next 4 ranged GETs are answered by closing the connection: more than aiohttp's own one retry of a reused
    # connection, so facesiam's retries must do the rest
    http.drop = 4
    assert ds.read_bytes(5) == expected.read_bytes(5)
    assert http.drop == 0, "every dropped request was tried again"
    http.drop = 4  # a batch, its ranges in parallel
    assert [raw for _, raw in sorted(ds.iter_bytes([0, 9, 17]))] == [expected.read_bytes(i) for i in (0, 9, 17)]
    assert http.drop == 0
    monkeypatch.setattr(remote, "RETRIES", 1)  # the same drops without facesiam's retries: they are failures
    http.drop = 4
    with pytest.raises(OSError):
        ds.read_bytes(5)
    monkeypatch.setattr(remote, "RETRIES", 3)
    http.drop = 10**6  # a server that never answers: bounded retries, then one line naming the range
    with pytest.raises(OSError) as exc:
        ds.read_bytes(1)
    assert "failed 3 times" in str(exc.value) and f"{http.url}/train-000000.tar bytes" in str(exc.value)
    assert "\n" not in str(exc.value)


def test_server_without_range_support_is_refused(local_shards):
    pytest.importorskip("aiohttp")
    with RangeServer(local_shards, ignore_range=True) as server:
        ds = ShardDataset(server.url)
        with pytest.raises(InputError, match="ignores HTTP Range"):
            ds.read_bytes(3)


def test_metadata_is_cached_until_the_remote_changes(local_shards, tmp_path):
    pytest.importorskip("aiohttp")
    copy = shutil.copytree(local_shards, tmp_path / "served")
    with RangeServer(copy) as server:
        def fetches(name):
            return sum(1 for method, path, _ in server.requests if method == "GET" and path.endswith(name))

        ShardDataset(server.url)
        ShardDataset(server.url)
        assert fetches("dataset.json") == 1 and fetches("train.npz") == 1, "the second open reads the cache"
        meta = copy / "dataset.json"
        meta.write_bytes(meta.read_bytes())
        os.utime(meta, ns=(time.time_ns(), time.time_ns() + 10**9))  # the same size, a new ETag
        ds = pickle.loads(pickle.dumps(ShardDataset(server.url)))  # pickles without its connection (loader workers)
        assert fetches("dataset.json") == 2 and fetches("train.npz") == 1
        assert ds.read_bytes(2) == ShardDataset(local_shards).read_bytes(2)

        with open(copy / "train-000000.tar", "ab") as f:  # the shards changed under the index
            f.write(b"\0" * 512)
        with pytest.raises(InputError, match="does not match the shards"):
            ShardDataset(server.url)
        (copy / "train-000000.tar").unlink()
        with pytest.raises(InputError, match="train-000000.tar not found"):
            ShardDataset(server.url)


# ---------------------------------------------------------------------------------------------- fewer, cheaper requests
@pytest.fixture(scope="module")
def s3_shards(s3, local_shards):
    """local_shards uploaded as they are to s3://faces/copy."""
    fsspec.filesystem("s3", skip_instance_cache=True).put(f"{local_shards}/", "faces/copy/", recursive=True)
    return "s3://faces/copy"


@pytest.fixture
def s3_requests(s3, monkeypatch):
    """Every request moto's S3 server receives for an object: SimpleNamespace(method, path, range, signature (the
    query's X-Amz-Signature or Signature, or None), authorization (an Authorization header: signed by botocore))."""
    from urllib.parse import parse_qs, urlparse

    from moto.s3.responses import S3Response

    seen: list[SimpleNamespace] = []
    respond = S3Response.key_response

    def recording(self, request, full_url, headers):
        url = urlparse(full_url)
        query = parse_qs(url.query)  # SigV4 or SigV2 presigned URLs
        seen.append(SimpleNamespace(method=request.method, path=url.path, range=request.headers.get("Range"),
                                    signature=next(iter(query.get("X-Amz-Signature") or query.get("Signature")
                                                        or [None])),
                                    authorization="Authorization" in request.headers))
        return respond(self, request, full_url, headers)

    monkeypatch.setattr(S3Response, "key_response", recording)
    return seen


def _ranged(requests):
    return [r for r in requests if r.method == "GET" and r.range]


def test_s3_ranges_are_plain_gets_on_urls_presigned_once_per_shard(local_shards, s3_shards, s3_requests,
                                                                   monkeypatch):
    for split in SPLITS:
        _same_samples(local_shards, s3_shards, split)  # byte for byte, single reads and batches
    ranged = _ranged(s3_requests)
    assert ranged and all(r.signature and not r.authorization for r in ranged), "no botocore call per range"
    for path in {r.path for r in ranged}:  # one signature per shard (and dataset), not one per request
        assert len({r.signature for r in ranged if r.path == path}) == 1, path

    s3_requests.clear()  # the switch back: every range through botocore, signed in its Authorization header
    monkeypatch.setattr(remote, "PRESIGN", False)
    _same_samples(local_shards, s3_shards, "train")
    ranged = _ranged(s3_requests)
    assert ranged and all(r.authorization and not r.signature for r in ranged)


def test_s3_options_a_plain_get_cannot_carry_keep_botocore(s3_shards, s3_requests, local_shards):
    ds = ShardDataset(s3_shards, storage_options={"requester_pays": True})  # RequestPayer on every request
    assert ds.read_bytes(3) == ShardDataset(local_shards).read_bytes(3)
    assert [r.authorization for r in _ranged(s3_requests)] == [True]


def test_a_refused_presigned_get_is_read_through_botocore_then_presigning_stops(local_shards, s3_shards,
                                                                                s3_requests):
    expected, ds = ShardDataset(local_shards), ShardDataset(s3_shards)
    folder, shard = ds.remote, ds._index.shards[int(ds._index.shard[0])]
    assert ds.read_bytes(0) == expected.read_bytes(0)  # signs the shard's URL
    for refusal in range(1, remote.PRESIGN_GIVE_UP + 1):
        url, signed_at = folder._signed[shard]
        folder._signed[shard] = (url.replace(f"/{shard}?", "/no-such-object?"), signed_at)  # the server says 404
        s3_requests.clear()
        assert ds.read_bytes(0) == expected.read_bytes(0)
        assert [(r.path.endswith("/no-such-object"), r.authorization) for r in _ranged(s3_requests)] == [
            (True, False), (False, True)], "the refused GET, then the same range through botocore"
        assert folder._refused == refusal
        if refusal < remote.PRESIGN_GIVE_UP:  # signed afresh at the next read
            s3_requests.clear()
            assert ds.read_bytes(0) == expected.read_bytes(0) and folder._refused == 0
            assert [r.authorization for r in _ranged(s3_requests)] == [False]
            folder._refused = refusal  # as if the refusals came in a row
    s3_requests.clear()  # PRESIGN_GIVE_UP refusals in a row: a server that takes no presigned URLs
    assert [raw for _, raw in sorted(ds.iter_bytes([0, 9, 17]))] == [expected.read_bytes(i) for i in (0, 9, 17)]
    assert all(r.authorization for r in _ranged(s3_requests))


def test_a_presigned_url_never_shows_in_an_error(s3_shards, monkeypatch):
    import aiohttp
    from fsspec.implementations.http import HTTPFileSystem

    secret = "X-Amz-Security-Token=SESSION-TOKEN&X-Amz-Signature=0123abcd"
    url = f"http://127.0.0.1:9/faces/copy/train-000000.tar?X-Amz-Algorithm=AWS4-HMAC-SHA256&{secret}"
    assert "SESSION-TOKEN" not in remote.hide_signature(f"cannot read {url}, status 500")
    assert remote.hide_signature("no URL here: Server disconnected") == "no URL here: Server disconnected"

    async def payload_error(self, signed, start=None, end=None, **kwargs):  # an aiohttp error that quotes its URL
        raise aiohttp.ClientPayloadError(f"Response payload is not completed: {signed}")

    monkeypatch.setattr(HTTPFileSystem, "_cat_file", payload_error)
    monkeypatch.setattr(remote, "RETRIES", 2)
    ds = ShardDataset(s3_shards)
    with pytest.raises(OSError) as exc:
        ds.read_bytes(1)
    text = str(exc.value) + repr(exc.value.__cause__) + repr(exc.value.__context__)
    assert "failed 2 times" in text and "Response payload is not completed" in text
    assert "X-Amz-Signature" not in text and "SESSION-TOKEN" not in text and "\n" not in str(exc.value)


def test_a_batchs_neighbouring_ranges_are_one_get(local_shards, http, monkeypatch):
    ds, expected = ShardDataset(http.url), ShardDataset(local_shards)
    everything = list(range(len(ds)))  # every image of the split: adjacent in their shards, so one GET per shard
    http.requests.clear()
    assert [raw for _, raw in sorted(ds.iter_bytes(everything))] == [expected.read_bytes(i) for i in everything]
    shards = {int(s) for s in ds._index.shard}
    gets = [r for r in http.requests if r[0] == "GET"]
    assert len(gets) == len(shards) < len(everything)
    http.requests.clear()
    monkeypatch.setattr(remote, "MERGE_GAP", -1)  # no merging: one GET per image
    assert [raw for _, raw in sorted(ds.iter_bytes(everything))] == [expected.read_bytes(i) for i in everything]
    assert len([r for r in http.requests if r[0] == "GET"]) == len(everything)


def test_training_loader_workers_keep_their_connections_across_epochs(local_shards, http):
    """Persistent workers: the second epoch reuses the first epoch's connections (new workers would open new ones),
    and delivers the same batches as local disk."""
    import torch

    from facesiam.config import TrainConfig
    from facesiam.training.setup import build_data

    def loader(data):
        cfg = TrainConfig(data=str(data), output="", batch_size=6, m_per_class=2, num_workers=2)
        cfg.model.image_size = 32
        accelerator = SimpleNamespace(device=torch.device("cpu"), num_processes=1, process_index=0)
        return build_data(cfg, accelerator, loader_timeout=60)

    def epoch(train, number):
        train.sampler.set_epoch(number)
        return list(train.loader)

    served, local = loader(http.url), loader(local_shards)
    connections = []
    for number in (0, 1):
        first = len(http.requests)
        batches = epoch(served, number)
        assert len(http.requests) > first, "the epoch read ranges"
        connections.append(set(http.peers[first:]))
        for (images_b, labels_b), (images_a, labels_a) in zip(batches, epoch(local, number), strict=True):
            assert torch.equal(labels_b, labels_a) and torch.equal(images_b, images_a)
    assert connections[1] <= connections[0], "the second epoch opened no new connection"
