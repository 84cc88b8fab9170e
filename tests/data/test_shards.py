"""Tests for shard writing and reading: facesiam.data.writer, format and readers, tools/make_shards.py."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from facesiam.augment.transforms import build_eval_transform, build_train_transform
from facesiam.data import ImageFolderDataset, ShardDataset, build_stream, open_dataset, write_shards
from facesiam.data import writer as writer_module
from facesiam.data.images import load_rgb
from facesiam.commands.make_shards import main
from facesiam.data.writer import ustar_header
from facesiam.errors import InputError

from ..conftest import REPO, SHARED_DATA, run_python
WEIRD_NAME = "name_wplw.jpeg..png.png.png_0_align_resize_refined.png"
RGB16 = np.random.default_rng(0).integers(0, 65536, (16, 20, 3)).astype(np.uint16)


# ----------------------------------------------------------------------------- tiny data built with PIL

def _image(seed: int, size=(24, 20), mode="RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    a = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    return Image.fromarray(a[..., 0] if channels == 1 else a, mode)


def _save(path: Path, img: Image.Image, fmt: str, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)
    return path


def _png16_rgb(a: np.ndarray) -> bytes:
    """A 16-bit RGB PNG written by hand (PIL cannot write one): signature, IHDR, IDAT, IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    h, w, _ = a.shape
    rows = b"".join(b"\0" + a[y].astype(">u2").tobytes() for y in range(h))  # filter 0 per row
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def make_folder(root: Path, identities: int, per_identity: int, size=(24, 20)) -> Path:
    for i in range(identities):
        for k in range(per_identity):
            _save(root / f"person_{i:02d}" / f"{k}.png", _image(100 * i + k, size), "PNG")
    return root


def make_messy_folder(root: Path) -> Path:
    """Every kind of input make_shards must handle: good, broken, convertible, odd names, empty folders."""
    _save(root / "Alice" / "a.jpg", _image(1), "JPEG", quality=90)
    _save(root / "Alice" / "b.png", _image(2), "PNG")
    _save(root / "Alice" / "c.webp", _image(3), "WEBP", quality=80)
    _save(root / "Alice" / "grey.jpg", _image(4, mode="L"), "JPEG")
    _save(root / "Alice" / "sub" / "nested.png", _image(5), "PNG")  # torchvision walks sub-folders too
    _save(root / "Émile Zola" / WEIRD_NAME, _image(6), "PNG")
    _save(root / "Émile Zola" / "png named.jpg", _image(7), "PNG")  # content decides the stored format
    _save(root / "山田 太郎" / "写真 1.jpg", _image(8), "JPEG")
    _save(root / "山田 太郎" / "写真.2.jpg", _image(9), "JPEG")
    _save(root / "single" / "only.jpg", _image(10), "JPEG")
    (root / "empty").mkdir()
    broken = root / "broken"
    good = _save(broken / "good.jpg", _image(11, (64, 48)), "JPEG").read_bytes()
    (broken / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (broken / "zero.jpg").write_bytes(b"")
    (broken / "text.jpg").write_text("this is not an image\n")
    (broken / "notes.txt").write_text("ignored: not an image extension\n")
    conv = root / "convert"
    _save(conv / "cmyk.jpg", Image.new("CMYK", (20, 16), (200, 30, 40, 10)), "JPEG", quality=95)
    grey16 = (np.arange(20 * 16, dtype=np.uint16).reshape(16, 20) * 200)
    _save(conv / "grey16.png", Image.fromarray(grey16), "PNG")
    (conv / "rgb16.png").write_bytes(_png16_rgb(RGB16))
    rgba = np.zeros((16, 20, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:, :10, 3] = 255  # left half opaque red, right half fully transparent
    _save(conv / "rgba.png", Image.fromarray(rgba, "RGBA"), "PNG")
    _save(conv / "palette.png", _image(12).convert("P", palette=Image.Palette.ADAPTIVE), "PNG")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    _save(conv / "exif.jpg", _image(13, (30, 12)), "JPEG", exif=exif, quality=95)
    _save(conv / "portable.pgm", _image(14, mode="L"), "PPM")
    _save(conv / "bitmap.bmp", _image(15), "BMP")
    _save(root / "loose.jpg", _image(16), "JPEG")  # not inside an identity folder
    return root


def _read_tar_samples(dst: Path, split: str = "train") -> list[dict]:
    meta = json.loads((dst / "dataset.json").read_text(encoding="utf-8"))
    samples = []
    for name in meta["splits"][split]["shards"]:
        with tarfile.open(dst / name) as tar:
            for member in tar:
                key, ext = member.name.split(".", 1)
                if not samples or samples[-1]["__key__"] != key:
                    samples.append({"__key__": key})
                samples[-1][ext] = tar.extractfile(member).read()
    return samples


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> tuple[Path, Path, dict]:
    root = tmp_path_factory.mktemp("messy")
    src = make_messy_folder(root / "src")
    meta = write_shards(src, root / "shards", workers=2, progress=False)
    return src, root / "shards", meta


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, Path]:
    """6 identities x 5 images in shards of at most 7 samples (several shards), 2 identities held out."""
    root = tmp_path_factory.mktemp("small")
    src = make_folder(root / "src", 6, 5)
    write_shards(src, root / "shards", val_identities=2, max_samples_per_shard=7, workers=1, progress=False)
    return src, root / "shards"


# ----------------------------------------------------------------------------- writing

def test_messy_input_is_packed_skipped_and_reported(messy, capsys):
    src, dst, meta = messy
    tv = ImageFolder(src, allow_empty=True, loader=lambda p: p)  # torchvision's label rule and order
    assert meta["classes"] == tv.classes
    assert "Émile Zola" in meta["classes"] and "山田 太郎" in meta["classes"]
    assert {(s["path"], s["reason"].split(" ")[0]) for s in meta["skipped"]} == {
        ("broken/truncated.jpg", "cannot"), ("broken/zero.jpg", "empty"), ("broken/text.jpg", "not")}
    assert meta["identities_without_images"] == ["empty"]
    assert meta["ignored_files"] == 1 and meta["loose_images"] == ["loose.jpg"]
    skipped = {src / s["path"] for s in meta["skipped"]}
    expected = [(os.path.relpath(p, src).replace(os.sep, "/"), y) for p, y in tv.samples if Path(p) not in skipped]

    samples = _read_tar_samples(dst)
    assert [(json.loads(s["json"])["path"], int(s["cls"])) for s in samples] == expected
    assert meta["num_samples"] == len(expected) == meta["splits"]["train"]["num_samples"]
    assert meta["images_per_identity"] == np.bincount([y for _, y in expected], minlength=len(tv.classes)).tolist()
    keys = [s["__key__"] for s in samples]
    assert len(set(keys)) == len(keys) and all(k.isascii() and "." not in k for k in keys)
    for s in samples:
        info = json.loads(s["json"].decode("utf-8"))
        assert info["identity"] == meta["classes"][info["label"]] == info["path"].split("/")[0]
        assert s["cls"] == str(info["label"]).encode()
        (ext,) = set(s) & {"jpg", "png", "webp"}
        raw = (src / info["path"]).read_bytes()
        name = info["path"].rsplit("/", 1)[-1]
        if not info["path"].startswith("convert/"):  # 8-bit RGB/grey JPEG, PNG, WebP: the file itself
            assert s[ext] == raw, f"{info['path']} should be stored byte for byte"
            if name != "png named.jpg":
                assert ext == {".jpg": "jpg", ".png": "png", ".webp": "webp"}[Path(name).suffix]
        else:
            assert s[ext] != raw, f"{info['path']} should have been converted"
    stored = {json.loads(s["json"])["path"]: s for s in samples}
    assert "png" in stored["Émile Zola/png named.jpg"]  # PNG content named .jpg keeps its real extension
    assert "png" in stored[f"Émile Zola/{WEIRD_NAME}"]

    # every sample reads with a standard WebDataset pipeline
    urls = [str(dst / n) for n in meta["splits"]["train"]["shards"]]
    read = list(wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("jpg;png;webp", "cls", "json"))
    assert [(m["path"], c) for _, c, m in read] == expected
    assert all(img.mode == "RGB" for img, _, _ in read)


def test_conversions_give_correct_pixels(messy):
    src, dst, meta = messy
    ds = ShardDataset(dst)
    images = {p: ds[i][0] for i, p in enumerate(ds.paths)}
    exif = images["convert/exif.jpg"]
    assert exif.size == (12, 30)  # orientation 6 applied: 30x12 displayed as 12x30
    grey16 = np.asarray(images["convert/grey16.png"])[..., 0]
    original = np.asarray(Image.open(src / "convert/grey16.png")).astype(np.int64)
    np.testing.assert_array_equal(grey16, original >> 8)  # 16 -> 8 bit by scaling, not clipping to white
    np.testing.assert_array_equal(np.asarray(images["convert/rgb16.png"]), RGB16 >> 8)
    assert meta["converted"].get("16-bit", 0) == 2  # the grey and the RGB 16-bit PNG
    rgba = np.asarray(images["convert/rgba.png"])
    assert (rgba[:, :10] == [255, 0, 0]).all() and (rgba[:, 10:] == 255).all()  # transparent -> white
    palette = Image.open(src / "convert/palette.png").convert("RGB")
    np.testing.assert_array_equal(np.asarray(images["convert/palette.png"]), np.asarray(palette))
    pgm = Image.open(src / "convert/portable.pgm").convert("RGB")
    np.testing.assert_array_equal(np.asarray(images["convert/portable.pgm"]), np.asarray(pgm))
    cmyk = np.asarray(images["convert/cmyk.jpg"]).astype(int)
    reference = np.asarray(Image.open(src / "convert/cmyk.jpg").convert("RGB")).astype(int)
    assert np.abs(cmyk - reference).mean() < 3
    assert set(meta["converted"]) >= {"EXIF orientation", "16-bit", "alpha", "palette", "CMYK", "PPM format",
                                      "BMP format"}
    # the raw folder reader applies the same policy: identical pixels wherever the conversion is lossless
    folder = ImageFolderDataset(src)
    for i, path in enumerate(folder.paths):
        if path.startswith("broken/") and path != "broken/good.jpg":
            with pytest.raises(ValueError, match=path.split("/")[1]):
                folder[i]
            continue
        if path not in ("convert/cmyk.jpg", "convert/exif.jpg"):  # re-encoded as JPEG: close, not equal
            np.testing.assert_array_equal(np.asarray(folder[i][0]), np.asarray(images[path]), err_msg=path)


def test_skipped_files_are_summarised_on_stderr(tmp_path, capsys):
    src = make_messy_folder(tmp_path / "src")
    write_shards(src, tmp_path / "out", workers=1, progress=False)
    err = capsys.readouterr().err
    assert "skipped 3 unusable file(s)" in err
    for name in ("broken/truncated.jpg", "broken/zero.jpg", "broken/text.jpg", "empty", "loose.jpg"):
        assert name in err


def test_labels_and_order_match_torchvision(small):
    src, dst = small
    tv = ImageFolder(src)
    train, val = ShardDataset(dst, "train"), ShardDataset(dst, "val")
    assert train.classes == val.classes == tv.classes and train.num_classes == 6
    tv_pairs = [(os.path.relpath(p, src), y) for p, y in tv.samples]
    assert sorted(list(zip(train.paths, train.labels.tolist())) + list(zip(val.paths, val.labels.tolist()))) \
        == sorted(tv_pairs)
    assert list(zip(train.paths, train.labels.tolist())) == [pair for pair in tv_pairs if pair[1] in set(train.labels)]
    for i in range(len(train)):
        img, label = train[i]
        assert label == train.labels[i]
        np.testing.assert_array_equal(np.asarray(img), np.asarray(Image.open(src / train.paths[i]).convert("RGB")))


def test_shard_limits(small, tmp_path):
    src, dst = small
    meta = json.loads((dst / "dataset.json").read_text())
    train = meta["splits"]["train"]
    assert train["shard_samples"] == [7, 7, 6] and len(train["shards"]) == 3
    one = _read_tar_samples(dst)[0]
    per_sample = sum(512 + -(-len(v) // 512) * 512 for k, v in one.items() if k != "__key__")
    limit = 2 * per_sample + 1024 + 10240  # room for two samples plus the tar's end blocks
    meta = write_shards(src, tmp_path / "bytes", max_bytes_per_shard=2 * per_sample, workers=1, progress=False)
    assert set(meta["splits"]["train"]["shard_samples"]) == {2}
    assert all((tmp_path / "bytes" / n).stat().st_size <= limit for n in meta["splits"]["train"]["shards"])
    assert len(ShardDataset(tmp_path / "bytes")) == 30


def test_val_split_is_identity_disjoint_and_seeded(tmp_path):
    src = make_folder(tmp_path / "src", 12, 2, size=(8, 8))
    chosen = []
    for seed in (0, 0, 1, 2):
        meta = write_shards(src, tmp_path / f"s{len(chosen)}", val_identities=0.25, seed=seed, workers=1,
                            progress=False)
        train, val = ShardDataset(tmp_path / f"s{len(chosen)}"), ShardDataset(tmp_path / f"s{len(chosen)}", "val")
        assert len(val) == 6 and len(train) == 18 and val.classes == train.classes == meta["classes"]
        assert not set(train.labels) & set(val.labels)
        assert sorted(val.classes[i] for i in set(val.labels)) == meta["splits"]["val"]["identities"]
        chosen.append(tuple(meta["splits"]["val"]["identities"]))
    assert chosen[0] == chosen[1] and len(set(chosen)) > 1
    assert write_shards(src, tmp_path / "n", val_identities=5, workers=1, progress=False)["splits"]["val"][
        "num_identities"] == 5
    with pytest.raises(ValueError, match="leaving none to train"):
        write_shards(src, tmp_path / "all", val_identities=12, workers=1, progress=False)


def test_named_val_identities_and_excluded_photos(tmp_path):
    """The same held-out people across versions of a data set (make_shards --val-identities FILE), and photos left
    out by name (--exclude: the doctor's suspects)."""
    from facesiam.commands.make_shards import main as make_shards

    src = make_folder(tmp_path / "src", 6, 3, size=(8, 8))
    names = sorted(p.name for p in src.iterdir())
    (tmp_path / "val.txt").write_text(f"{names[4]}\n{names[1]}\n")
    excluded = sorted(p.relative_to(src).as_posix() for p in (src / names[0]).iterdir())[:2]
    meta = write_shards(src, tmp_path / "s", val_identities=[names[4], names[1]], exclude=excluded, workers=1,
                        progress=False)
    assert meta["splits"]["val"]["identities"] == [names[1], names[4]]
    train = ShardDataset(tmp_path / "s")
    assert not set(excluded) & set(train.paths) and len(train) == 4 * 3 - 2 and meta["options"]["excluded"] == 2
    cli = make_shards([str(src), str(tmp_path / "c"), "--val-identities", str(tmp_path / "val.txt"), "--workers", "1",
                       "--no-progress"])
    assert cli["splits"]["val"]["identities"] == [names[1], names[4]]
    with pytest.raises(ValueError, match="'nobody' is not a folder"):
        write_shards(src, tmp_path / "x", val_identities=["nobody"], workers=1, progress=False)


def test_same_input_and_seed_give_identical_bytes(tmp_path):
    src = make_messy_folder(tmp_path / "src")
    write_shards(src, tmp_path / "a", val_identities=2, seed=3, workers=2, progress=False)
    write_shards(src, tmp_path / "b", val_identities=2, seed=3, workers=1, max_samples_per_shard=10_000,
                 progress=False)
    a, b = _tree(tmp_path / "a"), _tree(tmp_path / "b")
    assert a.keys() == b.keys() and "dataset.json" in a and "index/train.npz" in a
    for name in a:
        assert a[name] == b[name], name
    with tarfile.open(tmp_path / "a" / "train-000000.tar") as tar:
        assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in tar} == {(0, 0, 0, "", "")}


def test_file_changed_during_packing_is_packed_again(tmp_path, monkeypatch):
    src = make_folder(tmp_path / "src", 3, 2)
    write_shards(src, tmp_path / "a", workers=2, progress=False)
    # the writer re-reads kept-as-is files; if one no longer matches what a worker decoded, it is re-packed
    monkeypatch.setattr(writer_module, "_original_bytes", lambda path, signature: None)
    write_shards(src, tmp_path / "b", workers=2, progress=False)
    assert _tree(tmp_path / "a") == _tree(tmp_path / "b")


def test_resize_and_center_crop(tmp_path):
    src = make_folder(tmp_path / "src", 2, 2, size=(80, 60))
    write_shards(src, tmp_path / "out", resize=20, center_crop=0.5, workers=1, progress=False)
    ds = ShardDataset(tmp_path / "out")
    assert {ds[i][0].size for i in range(len(ds))} == {(20, 20)}  # 30x30 centre crop shrunk to 20
    write_shards(src, tmp_path / "big", resize=500, workers=1, progress=False)  # never enlarges
    assert ShardDataset(tmp_path / "big")[0][0].size == (80, 60)


# ----------------------------------------------------------------------------- safety

def test_refuses_non_empty_destination(tmp_path, small):
    src, _ = small
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        write_shards(src, dst, workers=1, progress=False)
    with pytest.raises(FileExistsError, match="not a shard folder"):
        write_shards(src, dst, overwrite=True, workers=1, progress=False)
    with pytest.raises(SystemExit, match="--overwrite"):
        main([str(src), str(dst), "--no-progress", "--workers", "1"])
    assert _tree(dst) == {"precious.txt": b"keep me"}
    with pytest.raises(ValueError, match="inside the source"):
        write_shards(src, src / "shards", workers=1, progress=False)
    assert not (src / "shards").exists()
    empty = tmp_path / "empty"  # an existing empty folder (a mount point, the cwd) is filled, not replaced
    empty.mkdir()
    inode = empty.stat().st_ino
    write_shards(src, empty, workers=1, progress=False)
    assert empty.stat().st_ino == inode and len(ShardDataset(empty)) == 30
    shutil.rmtree(empty)
    # an existing shard folder is replaced only with overwrite, and then completely
    write_shards(src, tmp_path / "shards", workers=1, progress=False)
    (tmp_path / "shards" / "train-000099.tar").write_bytes(b"stale")
    write_shards(src, tmp_path / "shards", max_samples_per_shard=10, workers=1, progress=False, overwrite=True)
    assert sorted(p.name for p in (tmp_path / "shards").glob("*.tar")) == [f"train-00000{i}.tar" for i in range(3)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst", "shards"]  # no temporary folders left


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_run_leaves_nothing_partial(tmp_path, small, monkeypatch, existing):
    src, _ = small
    dst = tmp_path / "shards"
    if existing:
        write_shards(src, dst, val_identities=1, workers=1, progress=False)
    before = _tree(dst) if existing else None
    calls = {"n": 0}
    original = writer_module.ustar_header

    def crash_mid_shard(name, size):
        calls["n"] += 1
        if calls["n"] == 40:  # three members a sample, 7 samples a shard: inside the second shard, mid-sample
            raise KeyboardInterrupt
        return original(name, size)

    monkeypatch.setattr(writer_module, "ustar_header", crash_mid_shard)
    with pytest.raises(KeyboardInterrupt):
        write_shards(src, dst, max_samples_per_shard=7, workers=2, overwrite=True, progress=False)
    assert calls["n"] == 40
    assert sorted(p.name for p in tmp_path.iterdir()) == (["shards"] if existing else [])
    if existing:
        assert _tree(dst) == before
        assert len(ShardDataset(dst)) == 25


# ----------------------------------------------------------------------------- reading

def test_index_is_rebuilt_when_missing_or_stale(small, tmp_path, capsys):
    src, _ = small
    dst = tmp_path / "shards"
    write_shards(src, dst, max_samples_per_shard=7, workers=1, progress=False)
    reference = ShardDataset(dst)
    fields = ("shard", "offset", "size", "label")
    (dst / "index" / "train.npz").unlink()
    rebuilt = ShardDataset(dst)
    assert "rebuilding" in capsys.readouterr().err
    for field in fields:
        np.testing.assert_array_equal(getattr(rebuilt._index, field), getattr(reference._index, field))
    assert rebuilt.paths == reference.paths and (dst / "index" / "train.npz").is_file()
    # offsets point at the image member, exactly as tarfile sees it
    with tarfile.open(dst / "train-000001.tar") as tar:
        first = next(iter(tar))
        assert (first.offset_data, first.size) == (int(rebuilt._index.offset[7]), int(rebuilt._index.size[7]))
    # a shard replaced behind the index's back is noticed
    shard = (dst / "train-000000.tar").read_bytes()
    (dst / "train-000000.tar").write_bytes(shard + b"\0" * 10240)
    ShardDataset(dst)
    assert "does not match" in capsys.readouterr().err
    ShardDataset(dst)
    assert capsys.readouterr().err == ""  # the rebuilt index was saved


def test_random_access_equals_streaming_order(small):
    _, dst = small
    for split in ("train", "val"):
        ds = ShardDataset(dst, split)
        streamed = list(build_stream(dst, split))
        assert len(streamed) == len(ds)
        for i, (img, label, path) in enumerate(streamed):
            ref_img, ref_label = ds[i]
            assert (label, path) == (ref_label, ds.paths[i])
            np.testing.assert_array_equal(np.asarray(img), np.asarray(ref_img))
    shuffled = [p for _, _, p in build_stream(dst, shuffle=10, seed=1)]
    assert shuffled != ShardDataset(dst).paths and sorted(shuffled) == sorted(ShardDataset(dst).paths)
    assert shuffled == [p for _, _, p in build_stream(dst, shuffle=10, seed=1)]


def test_stream_in_dataloader_workers(small):
    _, dst = small
    transform = build_eval_transform(16)
    loader = DataLoader(build_stream(dst, transform=transform), batch_size=None, num_workers=2, timeout=120)
    got = sorted((path, label, x.shape) for x, label, path in loader)
    ds = ShardDataset(dst)
    assert got == sorted((p, int(y), torch.Size([3, 16, 16])) for p, y in zip(ds.paths, ds.labels))


def test_dataloader_with_two_workers_and_seeded_keys(small):
    _, dst = small
    ds = ShardDataset(dst, transform=build_train_transform(16))
    ds[0]  # open a shard in this process: the dataset must still pickle and work in workers
    clone = pickle.loads(pickle.dumps(ds))
    assert len(clone) == len(ds) and clone._files == {}
    keys = [(i, 1000 + i) for i in range(len(ds))]
    loader = DataLoader(ds, batch_size=5, num_workers=2, sampler=keys, timeout=120)
    images = torch.cat([x for x, _ in loader])
    labels = torch.cat([y for _, y in loader])
    assert labels.tolist() == ds.labels.tolist()
    in_process = torch.stack([ds[k][0] for k in keys])
    torch.testing.assert_close(images, in_process, rtol=0, atol=0)  # augmentation depends only on the key


def test_seeded_access_is_reproducible_and_leaves_global_rng(small):
    _, dst = small
    ds = ShardDataset(dst, transform=build_train_transform(16))
    torch.manual_seed(5)
    expected_next = torch.rand(3)
    torch.manual_seed(5)
    a, b, c = ds[(3, 7)][0], ds[(3, 7)][0], ds[(3, 8)][0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.rand(3), expected_next)
    unseeded = [ds[3][0] for _ in range(3)]
    assert not all(torch.equal(unseeded[0], u) for u in unseeded[1:])  # plain ds[i] is random as usual
    assert ds[-1][1] == ds.labels[-1]
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_open_dataset_and_image_folder_dataset(small):
    src, dst = small
    shards = open_dataset(dst, "val")
    assert isinstance(shards, ShardDataset) and shards.split == "val"
    folder = open_dataset(src)
    assert isinstance(folder, ImageFolderDataset) and len(folder) == 30
    assert folder.classes == shards.classes and folder.labels.dtype == np.int64
    i = folder.paths.index(shards.paths[0])
    np.testing.assert_array_equal(np.asarray(folder[i][0]), np.asarray(shards[0][0]))
    assert folder[(i, 3)][1] == shards.labels[0]
    with pytest.raises(InputError, match="no split 'test'"):
        ShardDataset(dst, "test")
    with pytest.raises(FileNotFoundError, match="make_shards"):
        ShardDataset(src)


def test_cli(tmp_path, capsys):
    src = make_folder(tmp_path / "src", 5, 2, size=(8, 8))
    meta = main([str(src), str(tmp_path / "out"), "--val-identities", "0.4", "--max-bytes-per-shard", "2k",
                 "--workers", "1", "--seed", "1"])
    assert meta["splits"]["val"]["num_identities"] == 2 and meta["options"]["max_bytes_per_shard"] == 2048
    assert "5 identities, 10 images" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(src), str(tmp_path / "x"), "--val-identities", "1.5"])


def test_tool_script_runs(tmp_path):
    src = make_folder(tmp_path / "src", 2, 2, size=(8, 8))
    result = run_python([str(REPO / "tools" / "make_shards.py"), str(src), str(tmp_path / "out"), "--workers", "1"])
    assert "2 identities, 4 images" in result.stderr and (tmp_path / "out" / "dataset.json").is_file()


def test_ustar_header_is_what_tarfile_reads():
    for name, size in (("000001_0003.jpg", 12345), ("7.cls", 1), ("x" * 100, 0), ("k.json", 8**11 - 1)):
        info = tarfile.TarInfo.frombuf(ustar_header(name, size), "utf-8", "surrogateescape")  # checks the checksum
        assert (info.name, info.size, info.mtime, info.mode, info.type, info.uid) == (name, size, 0, 0o444,
                                                                                      tarfile.REGTYPE, 0)
    for name, size in (("x" * 101, 0), ("ok.jpg", 8**11), ("é.jpg", 1)):
        with pytest.raises(ValueError):
            ustar_header(name, size)


# ----------------------------------------------------------------------------- real faces (skip without ../shared)

def test_real_faces_orl_and_yale(tmp_path):
    for name, identities in (("orl", 40), ("yale", 15)):
        src = SHARED_DATA / name
        if not src.is_dir():
            pytest.skip(f"{src} not present (real face data lives in ../shared/data beside the repo)")
        files = sorted(p for p in src.rglob("*") if p.is_file())
        meta = write_shards(src, tmp_path / name, val_identities=3, workers=2, progress=False)
        assert meta["num_classes"] == identities and meta["num_samples"] == len(files) and not meta["skipped"]
        train, val = ShardDataset(tmp_path / name), ShardDataset(tmp_path / name, "val")
        assert len(train) + len(val) == len(files) and len(set(val.labels)) == 3
        for ds in (train, val):
            for i in range(0, len(ds), 7):
                img, label = ds[i]
                reference = load_rgb(src / ds.paths[i])
                np.testing.assert_array_equal(np.asarray(img), np.asarray(reference))
                assert ds.classes[label] == ds.paths[i].split("/")[0]
        # the stored formats are ones every WebDataset consumer selects
        sample = _read_tar_samples(tmp_path / name)[0]
        assert {"png", "cls", "json", "__key__"} == set(sample)


def test_unlabeled_photos_are_each_an_identity_of_their_own(tmp_path):
    """make_shards --unlabeled: any folder layout, every photo its own identity (distillation needs no labels)."""
    from PIL import Image

    from facesiam.commands.make_shards import main

    src = tmp_path / "photos"
    for rel in ("a.jpg", "trip/b.png", "trip/day2/c.jpg", "notes.txt"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".txt"):
            (src / rel).write_text("not a photo")
        else:
            Image.new("RGB", (20, 20), (len(rel) * 9, 40, 90)).save(src / rel)
    meta = main([str(src), str(tmp_path / "shards"), "--unlabeled", "--workers", "1", "--no-progress"])
    assert meta["classes"] == ["a.jpg", "trip/b.png", "trip/day2/c.jpg"] and meta["options"]["unlabeled"] is True
    assert meta["ignored_files"] == 1
    ds = ShardDataset(tmp_path / "shards", "train")
    assert sorted(ds.paths) == meta["classes"] and len(set(ds.labels.tolist())) == 3
    with pytest.raises(SystemExit):  # --val-identities has no identities to hold out: one line, exit 1
        main([str(src), str(tmp_path / "s2"), "--unlabeled", "--val-identities", "1", "--workers", "1"])
