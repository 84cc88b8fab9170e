"""insightface RecordIO without mxnet (facesiam/data/recordio.py): the format against a reference written here from
mxnet's recordio.py / dmlc-core's description, bad files, make_shards from a .rec, export_rec, direct training."""

from __future__ import annotations

import io
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from facesiam.commands.export_rec import main as export_rec
from facesiam.commands.make_shards import main as make_shards
from facesiam.data import DistributedPerClassSampler, RecordDataset, ShardDataset, open_dataset
from facesiam.data import recordio
from facesiam.data.recordio import IRHeader, RecordFile, write_rec
from facesiam.errors import InputError

from ..conftest import REPO, accelerate_launch, shared_dataset

# ----------------------------------------------------------------------------- the reference (mxnet's logic)
REF_MAGIC = 0xCED7230A


def ref_pack(flag_label, data: bytes, id_: int = 0) -> bytes:
    """mxnet.recordio.pack: a number label -> flag 0; a list -> flag = its length, floats after the header."""
    if isinstance(flag_label, (int, float)):
        return struct.pack("IfQQ", 0, float(flag_label), id_, 0) + data
    floats = np.asarray(flag_label, np.float32)
    return struct.pack("IfQQ", floats.size, 0.0, id_, 0) + floats.tobytes() + data


def ref_record(buf: bytes) -> bytes:
    """dmlc::RecordIOWriter::WriteRecord, statement by statement."""
    magic = struct.pack("I", REF_MAGIC)
    n = len(buf)
    lower, upper = (n >> 2) << 2, ((n + 3) >> 2) << 2
    out, dptr = b"", 0
    for i in range(0, lower, 4):
        if buf[i:i + 4] == magic:
            out += magic + struct.pack("I", ((1 if dptr == 0 else 2) << 29) | (i - dptr)) + buf[dptr:i]
            dptr = i + 4
    out += magic + struct.pack("I", ((3 if dptr != 0 else 0) << 29) | (n - dptr)) + buf[dptr:]
    return out + b"\0" * (upper - n)


def ref_write(folder: Path, records: list[tuple[int, bytes]], property_text: str) -> None:
    """MXIndexedRecordIO 'w': write_idx(key, buf) appends the record and a "key\\toffset" line."""
    folder.mkdir(parents=True, exist_ok=True)
    rec, idx = b"", ""
    for key, payload in records:
        idx += f"{key}\t{len(rec)}\n"
        rec += ref_record(payload)
    (folder / "train.rec").write_bytes(rec)
    (folder / "train.idx").write_text(idx)
    (folder / "property").write_text(property_text)


def ref_read_all(folder: Path) -> dict[int, bytes]:
    """Every record by key, read sequentially as dmlc::RecordIOReader::NextRecord does (not through the .idx's
    offsets beyond mapping them to keys)."""
    data = (folder / "train.rec").read_bytes()
    by_offset, pos = {}, 0
    while pos < len(data):
        start, out = pos, b""
        while True:
            magic, lrec = struct.unpack_from("II", data, pos)
            assert magic == REF_MAGIC
            cflag, length = lrec >> 29, lrec & ((1 << 29) - 1)
            out += data[pos + 8:pos + 8 + length]
            pos += 8 + ((length + 3) >> 2 << 2)
            if cflag in (0, 3):
                break
            out += struct.pack("I", REF_MAGIC)
        by_offset[start] = out
    keys = {}
    for line in (folder / "train.idx").read_text().splitlines():
        key, offset = line.split("\t")
        keys[int(key)] = by_offset[int(offset)]
    return keys


def ref_unpack(record: bytes):
    flag, label, _, _ = struct.unpack_from("IfQQ", record)
    if flag > 0:
        return np.frombuffer(record, np.float32, flag, 24), record[24 + 4 * flag:]
    return label, record[24:]


def insightface_records(images: list[tuple[bytes, int]], num_classes: int) -> list[tuple[int, bytes]]:
    """What insightface's face2rec writes: header 0, images 1..N grouped by identity, one record per identity."""
    n = len(images)
    records = [(0, ref_pack([n + 1, n + 1 + num_classes], b""))]
    records += [(k + 1, ref_pack(label, data, k + 1)) for k, (data, label) in enumerate(images)]
    for c in range(num_classes):
        keys = [k + 1 for k, (_, label) in enumerate(images) if label == c]
        lo, hi = (keys[0], keys[-1] + 1) if keys else (n + 1, n + 1)
        records.append((n + 1 + c, ref_pack([lo, hi], b"", n + 1 + c)))
    return records


# ----------------------------------------------------------------------------- tiny data

def jpeg(seed: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def tricky_payload() -> bytes:
    """Image-like bytes holding the magic at 4-byte aligned places of the packed record (the 24-byte header keeps
    the alignment): dmlc splits such a record into parts."""
    m = struct.pack("I", REF_MAGIC)
    return b"\xff\xd8\xff\xe0" + m + b"abcd" + m + m + b"tail!"


@pytest.fixture(scope="module")
def images() -> list[tuple[bytes, int]]:
    """5 identities x 3 JPEGs, grouped by identity; one holds the magic (a split record)."""
    out = [(jpeg(10 * c + j), c) for c in range(5) for j in range(3)]
    out[4] = (tricky_payload(), 1)
    return out


# ----------------------------------------------------------------------------- format

def test_a_record_holding_the_magic_is_split_as_dmlc_splits_it():
    payload = ref_pack(3, tricky_payload())
    framed = recordio.frame(payload)
    assert framed == ref_record(payload)
    flags = []
    pos = 0
    while pos < len(framed):
        lrec = struct.unpack_from("I", framed, pos + 4)[0]
        flags.append(lrec >> 29)
        pos += 8 + (((lrec & (2**29 - 1)) + 3) >> 2 << 2)
    assert flags == [1, 2, 2, 3]


@pytest.mark.parametrize("header0", [True, False])
def test_the_writer_writes_what_mxnet_writes(tmp_path, images, header0):
    write_rec(tmp_path / "ours", images, header0=header0, num_classes=6, image_size=(32, 32))
    if header0:
        records = insightface_records(images, 6)
    else:  # im2rec's layout: keys from 0, no table
        records = [(k, ref_pack(label, data, k)) for k, (data, label) in enumerate(images)]
    ref_write(tmp_path / "ref", records, "6,32,32\n")
    for name in ("train.rec", "train.idx", "property"):
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


def test_the_reader_reads_insightface_data_with_header0(tmp_path, images):
    ref_write(tmp_path, insightface_records(images, 6), "6,32,32")
    rec = RecordFile(tmp_path)
    assert rec.header0 == (16, 22) and rec.num_classes == 6 and rec.image_size == (32, 32)
    assert rec.image_keys.tolist() == list(range(1, 16))
    assert rec.labels.tolist() == [label for _, label in images]
    reference = ref_read_all(tmp_path)
    for key in range(22):
        assert rec.read(key) == reference[key]
    for key, (data, label) in zip(rec.image_keys.tolist(), images):
        assert rec.read_sample(key) == (label, data)
    assert rec.read_images(rec.image_keys) == [data for data, _ in images]  # one read, cut apart
    assert rec.read_images(rec.image_keys[::-3]) == [data for data, _ in images[::-3]]
    table = rec.read_header(16 + 1)
    assert table.flag == 2 and table.label.tolist() == [4, 7]  # identity 1: image keys 4, 5, 6


def test_per_record_and_multi_float_labels_without_header0(tmp_path, images):
    """No header 0: every key is an image; a multi-float label (flag > 0) counts by its first float."""
    shuffled = [images[k] for k in np.random.default_rng(0).permutation(len(images))]
    records = [(k, ref_pack([float(label), 0.25, -3.0] if k % 2 else label, data, k))
               for k, (data, label) in enumerate(shuffled)]
    ref_write(tmp_path, records, "5,32,32")
    rec = RecordFile(tmp_path)
    assert rec.header0 is None
    assert rec.image_keys.tolist() == list(range(len(shuffled)))
    assert rec.labels.tolist() == [label for _, label in shuffled]
    assert [rec.read_sample(k) for k in rec.image_keys.tolist()] == [(label, data) for data, label in shuffled]
    head = rec.read_header(1)
    assert head.flag == 3 and head.label.tolist() == [shuffled[1][1], 0.25, -3.0]


def test_any_integer_keys_in_any_order(tmp_path, images):
    """im2rec-style data need not number its records 0..N-1: keys are looked up, not counted."""
    keys = [int(k) for k in np.random.default_rng(1).permutation(1000)[:len(images)] * 3 + 7]
    ref_write(tmp_path, [(k, ref_pack(label, data, k)) for k, (data, label) in zip(keys, images)], "5,32,32")
    rec = RecordFile(tmp_path)
    assert rec.header0 is None and rec.image_keys.tolist() == keys
    assert rec.labels.tolist() == [label for _, label in images]
    assert [rec.read_sample(k) for k in reversed(keys)] == [(label, data) for data, label in reversed(images)]
    with pytest.raises(InputError, match="no record with key 8"):
        rec.read(8)


def test_written_multi_float_labels_round_trip(tmp_path, images):
    write_rec(tmp_path, [(d, [float(c), 0.5]) for d, c in images], header0=False)
    reference = ref_read_all(tmp_path)
    for key, (data, label) in enumerate(images):
        floats, rest = ref_unpack(reference[key])
        assert floats.tolist() == [label, 0.5] and rest == data
    assert RecordFile(tmp_path).labels.tolist() == [c for _, c in images]


def test_labels_are_read_without_decoding_images(tmp_path, images, monkeypatch):
    write_rec(tmp_path, images)
    import facesiam.data.images as image_module

    def no(*args, **kwargs):
        raise AssertionError("an image was decoded")

    for name in ("decode_rgb", "decode_rgb_array", "load_rgb"):
        monkeypatch.setattr(image_module, name, no)
    monkeypatch.setattr(Image, "open", no)
    ds = RecordDataset(tmp_path)
    assert ds.labels.tolist() == [c for _, c in images] and ds.num_classes == 5


def test_header0_writer_needs_identities_together(tmp_path):
    with pytest.raises(InputError, match="together"):
        write_rec(tmp_path, [(b"a", 0), (b"b", 1), (b"c", 0)])


# ----------------------------------------------------------------------------- bad files: one line, file and offset

def _damaged(tmp_path: Path, images, how: str) -> Path:
    folder = tmp_path / how
    write_rec(folder, images, num_classes=5, header0=how != "truncated")
    rec, idx = folder / "train.rec", folder / "train.idx"
    lines = idx.read_text().splitlines()
    if how == "magic":  # key 3 points 4 bytes into its record
        key, off = lines[3].split("\t")
        lines[3] = f"{key}\t{int(off) + 4}"
        idx.write_text("\n".join(lines) + "\n")
    elif how == "truncated":  # the last record's data cut short (a copy that stopped early)
        rec.write_bytes(rec.read_bytes()[:int(lines[-1].split("\t")[1]) + 40])
    elif how == "past_end":
        key, off = lines[2].split("\t")
        lines[2] = f"{key}\t{rec.stat().st_size + 100}"
        idx.write_text("\n".join(lines) + "\n")
    elif how == "label":  # property promises fewer identities than the labels use
        (folder / "property").write_text("3,32,32\n")
    return folder


@pytest.mark.parametrize("how, words", [("magic", "magic"), ("truncated", "truncated"), ("past_end", "past the end"),
                                        ("label", "outside the 3 identities")])
def test_bad_records_are_one_line_errors_naming_the_file_and_offset(tmp_path, images, how, words):
    folder = _damaged(tmp_path, images, how)
    with pytest.raises(InputError) as err:
        rec = RecordFile(folder)
        rec.labels  # noqa: B018 -- the bulk pass
        rec.read_images(rec.image_keys)
        for key in rec.image_keys.tolist():
            rec.read_sample(key)
    text = str(err.value)
    assert words in text and "\n" not in text
    assert str(folder / ("train.idx" if how == "past_end" else "train.rec")) in text
    assert "byte" in text


def test_a_damaged_rec_stops_make_shards_with_one_line(tmp_path, images):
    folder = _damaged(tmp_path, images, "magic")
    with pytest.raises(SystemExit, match=r"^make_shards: .*train\.rec: no RecordIO record at byte \d+"):
        make_shards([str(folder), str(tmp_path / "shards"), "--no-progress"])
    assert not (tmp_path / "shards").exists()


# ----------------------------------------------------------------------------- make_shards and export_rec

def test_make_shards_from_a_rec_copies_bytes_labels_identities_and_records_the_alignment(tmp_path, images):
    ref_write(tmp_path / "rec", insightface_records(images, 6), "6,112,112")
    meta = make_shards([str(tmp_path / "rec"), str(tmp_path / "shards"), "--val-identities", "2", "--seed", "3",
                        "--no-progress"])
    assert meta["num_classes"] == 6 and meta["classes"] == [f"{i:06d}" for i in range(6)]
    assert meta["identities_without_images"] == ["000005"]
    val_names = meta["splits"]["val"]["identities"]
    assert len(val_names) == 2 and "000005" not in val_names
    by_label: dict[int, list[bytes]] = {}
    for data, label in images:
        by_label.setdefault(label, []).append(data)
    seen = []
    for split in ("train", "val"):
        ds = ShardDataset(tmp_path / "shards", split)
        for i in range(len(ds)):
            label = int(ds.labels[i])
            assert (meta["classes"][label] in val_names) == (split == "val")
            seen.append((label, ds.read_bytes(i)))
    assert sorted(seen) == sorted((label, data) for data, label in images)  # every image, bytes as stored
    info = meta["alignment"]["info"]
    from facesiam.faces.aligner import prealigned_info
    from facesiam.faces.template import template_info

    assert info == prealigned_info("arcface112") and info["size"] == 112 and info["template"] == template_info(112)
    assert info["detector"]["name"] == "MTCNN" and meta["alignment"]["counts"]["aligned"] == len(images)
    from facesiam.faces.record import recorded_alignment

    assert recorded_alignment(tmp_path / "rec") == info  # embed/evaluate on the .rec itself: crops, not photos
    (tmp_path / "rec" / "property").write_text("6,112,96\n")  # not square: no ArcFace template to record
    assert recorded_alignment(tmp_path / "rec") is None
    with pytest.raises(SystemExit, match="--aligned arcface112"):
        make_shards([str(tmp_path / "rec"), str(tmp_path / "s2"), "--aligned", "arcface112", "--no-progress"])


@pytest.mark.parametrize("max_samples, max_bytes", [(10**9, 2**40), (7, 2**40), (10**9, 30000), (3, 100)])
def test_batched_shard_writing_is_byte_identical_to_one_at_a_time(tmp_path, max_samples, max_bytes):
    """_SplitWriter.add_many (the .rec path) writes exactly what add does: shards, boundaries and index."""
    from facesiam.data.writer import _SplitWriter, ustar_header, ustar_headers

    names, sizes = ["a.jpg", "000001_0001.cls", "x" * 100], np.array([0, 5000, 8**11 - 1])
    assert ustar_headers(names, sizes) == b"".join(ustar_header(n, int(z)) for n, z in zip(names, sizes))
    rng = np.random.default_rng(0)
    sizes = [512 * (i % 3) if i % 4 == 0 else int(rng.integers(0, 9000)) for i in range(120)]  # some unpadded
    samples = [(f"{i // 7:06d}_{i % 7:04d}", rng.bytes(sizes[i]), "jpg", i // 7,
                f"train.rec#{i}é", f"Zoë \"{i // 7}\"" + "x" * 600 * (i == 40)) for i in range(120)]  # a long .json
    one, many = (_SplitWriter(tmp_path / d, "train", max_samples, max_bytes) for d in ("one", "many"))
    for d in ("one", "many"):
        (tmp_path / d).mkdir()
    for sample in samples:
        one.add(*sample)
    cuts = [0, 1, 34, 67, 100, 101, 120]  # batches of 33 and of one sample
    for lo, hi in zip(cuts, cuts[1:]):
        many.add_many(*[list(column) for column in zip(*samples[lo:hi])])
    many.add_many(*[[] for _ in range(6)])  # an empty batch writes nothing
    a, b = one.finish(), many.finish()
    assert one.shards == many.shards and one.shard_samples == many.shard_samples
    for name in one.shards:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "many" / name).read_bytes()
    for field in ("shard", "offset", "size", "label"):
        assert np.array_equal(getattr(a, field), getattr(b, field))
    assert a.paths() == b.paths()


def test_an_interrupted_make_shards_leaves_no_shard_folder(tmp_path, images, monkeypatch):
    from facesiam.data import writer

    write_rec(tmp_path / "rec", images)
    calls = []

    def interrupted(self, *columns):
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(writer._SplitWriter, "add_many", interrupted)
    with pytest.raises(KeyboardInterrupt):
        make_shards([str(tmp_path / "rec"), str(tmp_path / "shards"), "--no-progress"])
    assert calls and not (tmp_path / "shards").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".shards")]


def test_prealigned_record_has_every_field_align_records(tmp_path):
    """--aligned arcface112 records what --align records (alignment_info), so inference aligns the same way."""
    pytest.importorskip("facenet_pytorch")
    from facesiam.faces.aligner import FaceAligner, alignment_info, prealigned_info

    recorded = alignment_info(FaceAligner(112))
    assert prealigned_info("arcface112") == {**recorded, "prealigned": "arcface112"}


def test_make_shards_aligned_arcface112_on_an_image_folder(tmp_path):
    for c in range(2):
        (tmp_path / "crops" / f"person{c}").mkdir(parents=True)
        for j in range(2):
            (tmp_path / "crops" / f"person{c}" / f"{j}.jpg").write_bytes(jpeg(c * 5 + j, 112))
    meta = make_shards([str(tmp_path / "crops"), str(tmp_path / "shards"), "--aligned", "arcface112",
                        "--no-progress", "--workers", "1"])
    from facesiam.faces.aligner import prealigned_info
    from facesiam.faces.record import recorded_alignment

    assert meta["alignment"]["info"] == prealigned_info("arcface112")
    assert recorded_alignment(tmp_path / "shards") == prealigned_info("arcface112")
    plain = make_shards([str(tmp_path / "crops"), str(tmp_path / "plain"), "--no-progress", "--workers", "1"])
    assert "alignment" not in plain


def test_export_rec_round_trip(tmp_path, images):
    ref_write(tmp_path / "rec", insightface_records(images, 6), "6,32,32")
    make_shards([str(tmp_path / "rec"), str(tmp_path / "shards"), "--val-identities", "1", "--no-progress"])
    counts = export_rec([str(tmp_path / "shards"), str(tmp_path / "out"), "--splits", "train,val", "--no-progress"])
    assert counts["images"] == len(images) and counts["identities"] == 6
    out = ref_read_all(tmp_path / "out")  # readable as mxnet reads it: header 0, images, the identity table
    first, end = (int(v) for v in ref_unpack(out[0])[0])
    assert (first, end) == (len(images) + 1, len(images) + 7)
    got = [(int(ref_unpack(out[k])[0]), ref_unpack(out[k])[1]) for k in range(1, first)]
    assert sorted(got) == sorted((label, data) for data, label in images)
    for c in range(6):
        lo, hi = (int(v) for v in ref_unpack(out[first + c])[0])
        assert [label for label, _ in got[lo - 1:hi - 1]] == [c] * (hi - lo)
    assert (tmp_path / "out" / "property").read_text() == "6,32,32\n"  # the size the alignment record holds
    # and back: the same shards (names from identities.json)
    again = make_shards([str(tmp_path / "out"), str(tmp_path / "again"), "--no-progress"])
    original = json.loads((tmp_path / "shards" / "dataset.json").read_text())
    assert again["classes"] == original["classes"]
    ds = ShardDataset(tmp_path / "again")
    assert sorted((int(ds.labels[i]), ds.read_bytes(i)) for i in range(len(ds))) == sorted(got)


def test_export_rec_keeps_folder_identity_names(tmp_path):
    for name in ("Ann", "Bob"):
        (tmp_path / "faces" / name).mkdir(parents=True)
        (tmp_path / "faces" / name / "a.jpg").write_bytes(jpeg(len(name) + ord(name[0]), 40))
    make_shards([str(tmp_path / "faces"), str(tmp_path / "shards"), "--no-progress", "--workers", "1"])
    export_rec([str(tmp_path / "shards"), str(tmp_path / "rec"), "--no-progress"])
    ds = open_dataset(tmp_path / "rec")
    assert isinstance(ds, RecordDataset) and ds.classes == ["Ann", "Bob"]
    assert (tmp_path / "rec" / "property").read_text() == "2,40,40\n"
    with pytest.raises(FileExistsError):
        write_rec(tmp_path / "rec", [(b"x", 0)])


def test_real_lfw_photos_through_a_rec(tmp_path):
    lfw = shared_dataset("lfw-devtrain")
    people = sorted(p for p in lfw.iterdir() if p.is_dir() and len(list(p.iterdir())) >= 3)[:20]
    images = [(f.read_bytes(), c) for c, person in enumerate(people) for f in sorted(person.iterdir())]
    write_rec(tmp_path / "rec", images, image_size=(250, 250), identities=[p.name for p in people])
    meta = make_shards([str(tmp_path / "rec"), str(tmp_path / "shards"), "--val-identities", "4", "--no-progress"])
    assert meta["classes"] == [p.name for p in people] and meta["num_samples"] == len(images)
    # no 112 px ArcFace crops: the recorded template is at property's size
    assert meta["alignment"]["info"]["size"] == 250
    rec = RecordDataset(tmp_path / "rec")
    assert rec.labels.tolist() == [c for _, c in images]
    img, label = rec[len(images) - 1]
    assert img.size == Image.open(io.BytesIO(images[-1][0])).size and label == images[-1][1]
    shards = [ShardDataset(tmp_path / "shards", s) for s in ("train", "val")]
    stored = sorted((int(ds.labels[i]), ds.read_bytes(i)) for ds in shards for i in range(len(ds)))
    assert stored == sorted((c, d) for d, c in images)


# ----------------------------------------------------------------------------- training straight from a .rec

def test_record_dataset_feeds_the_per_class_sampler_and_pickles(tmp_path, images):
    import pickle

    write_rec(tmp_path, images)
    ds = RecordDataset(tmp_path)
    sampler = DistributedPerClassSampler(ds.labels, 4, 2, num_replicas=2, rank=0, seed=0)
    batches = list(sampler)
    assert batches
    for batch in batches:  # keys are (index, augmentation seed)
        assert [ds[key][1] for key in batch] == [images[index][1] for index, _ in batch]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.read_bytes(2) == images[2][0]
    assert clone.paths[0] == "train.rec#1"
    with pytest.raises(InputError, match="one split"):
        RecordDataset(tmp_path, "val")


@pytest.mark.slow
def test_two_ranks_train_straight_from_a_rec(tmp_path):
    """2 gloo processes, --data at a RecordIO folder: the per-class sampler from the header labels, images read
    through the .idx; the exported model records the ArcFace alignment so inference aligns raw photos."""
    from facesiam.synthetic import make_synthetic_faces

    faces = make_synthetic_faces(tmp_path / "faces", 16, 8, size=48, seed=0, workers=1, progress=False)
    people = sorted(p for p in Path(faces).iterdir() if p.is_dir())
    samples = [(f.read_bytes(), c) for c, p in enumerate(people) for f in sorted(p.iterdir())]
    write_rec(tmp_path / "rec", samples, image_size=(112, 112))
    run = tmp_path / "run"
    accelerate_launch(REPO / "launch" / "train.py", [
        "--data", str(tmp_path / "rec"), "--output", str(run), "--backbone", "test_efficientnet",
        "--embedding-dim", "32", "--image-size", "32", "--batch-size", "16", "--m-per-class", "4",
        "--num-workers", "1", "--wandb", "off", "--log-every-steps", "1", "--epochs", "1", "--lr", "1e-3"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs_completed"] == 1 and summary["steps"] > 0
    config = json.loads((run / "final" / "config.json").read_text())
    from facesiam.faces.aligner import prealigned_info

    assert config["alignment"] == prealigned_info("arcface112")
