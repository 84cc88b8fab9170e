"""insightface / mxnet RecordIO face data (MS1MV2/MS1MV3, Glint360K, WebFace: ``train.rec`` + ``train.idx`` +
``property``), read and written in pure Python.

Written by hand because no maintained pure-Python library reads it and mxnet (its own reader) no longer installs;
the format is small. What is on disk (as mxnet's python/mxnet/recordio.py and dmlc-core's recordio write it):

* ``train.rec``: records one after the other, each ``uint32 magic 0xced7230a``, ``uint32 lrec`` (upper 3 bits
  ``cflag``, lower 29 the length), the data, zero padding to a multiple of 4 bytes. dmlc splits a record wherever
  its data holds the magic at a 4-byte aligned position (cflag 1 first part, 2 middle, 3 last; the magic itself is
  dropped and put back by the reader); cflag 0 is a whole record. Little-endian.
* a record's data is mxnet's ``recordio.pack``: ``IRHeader`` = struct ``IfQQ`` (flag, label, id, id2; 24 bytes),
  then ``flag`` float32 labels when flag > 0 (label 0 then), then the encoded image (JPEG in insightface's data).
  A multi-float label counts by its first float (as arcface_torch's MXFaceDataset reads it).
* ``train.idx``: one ``key<TAB>byte offset`` line per record (mxnet's MXIndexedRecordIO).
* ``property``: ``num_identities,height,width`` (e.g. ``85742,112,112``).
* insightface's "header 0": record 0 with flag 2, label ``(first_id_key, end_key)``; image records are keys
  ``1 .. first_id_key - 1`` and keys ``first_id_key .. end_key - 1`` are one record per identity, label
  ``(first image key, end image key)``: the identity table. Without it every key of the .idx is an image.
* facesiam's own addition, optional: ``identities.json`` (a JSON list of names in label order), written by
  tools/export_rec.py so identity names survive a trip through RecordIO; other readers ignore it.

API::

    write_rec(folder, samples, *, header0=True, num_classes=None, image_size=(112, 112), identities=None)
        # samples: Iterable[(encoded image bytes, label)], label an int (or a sequence of floats: flag > 0);
        # with header0 each identity's images must come together; returns {"images", "identities", "bytes", ...}
    rec = RecordFile(folder)            # or the .rec's path; .idx beside it
    rec.read(key) -> bytes              # the packed record (what mxnet's read_idx returns)
    rec.read_header(key) -> IRHeader    # only the header bytes are read
    rec.read_sample(key) -> (label, image bytes)   # one read (the .idx gives where the record ends)
    rec.read_images(keys) -> [image bytes]          # many at once: one read for records that lie together
    rec.image_keys, rec.labels          # every image's key and label, read without decoding any image
    rec.classes, rec.num_classes, rec.image_size, rec.header0
    pack(header, data) / unpack(record) # mxnet's recordio.pack / unpack

A bad file is a one-line InputError naming the file and the byte offset (wrong magic, truncated record, an index
pointing past the end, a label outside property's identity count).
"""

from __future__ import annotations

import json
import numbers
import os
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np
from tqdm import tqdm

from ..errors import InputError
from ..fileio import atomic_write, write_text

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
_FRAME = struct.Struct("<II")  # magic, lrec
_IR = struct.Struct("<IfQQ")  # mxnet's IRHeader: flag, label, id, id2 (native 'IfQQ' = this on little-endian)
_IR_FLAG_LABEL = struct.Struct("<If")  # the header's flag and label alone (a flag-0 record's label)
LENGTH_BITS = 29
MAX_LENGTH = (1 << LENGTH_BITS) - 1
REC_FILE, IDX_FILE, PROPERTY_FILE, IDENTITIES_FILE = "train.rec", "train.idx", "property", "identities.json"
EXACT_FLOAT32 = 1 << 24  # keys and labels are float32 in headers: exact below this
LABEL_CHUNK = 1 << 18  # records per vectorised header gather in the bulk label pass
READ_BLOCK = 8 * 2**20  # read_images reads a span of records at once when it wastes less than this
_HEAD = _FRAME.size + _IR.size + 4  # framing + IRHeader + the first extra float: all a label needs


@dataclass(frozen=True)
class IRHeader:
    """mxnet's IRHeader: ``label`` is a float when ``flag`` is 0, else a float32 array of ``flag`` values."""

    flag: int
    label: Union[float, np.ndarray]
    id: int = 0
    id2: int = 0


def pack(header: IRHeader, data: bytes) -> bytes:
    """mxnet's ``recordio.pack``: a number label gives flag 0; a sequence is stored as float32s after the header."""
    if isinstance(header.label, numbers.Number):
        return _IR.pack(0, float(header.label), header.id, header.id2) + data
    label = np.asarray(header.label, dtype="<f4").ravel()
    return _IR.pack(label.size, 0.0, header.id, header.id2) + label.tobytes() + data


def unpack(record: bytes) -> tuple[IRHeader, bytes]:
    """mxnet's ``recordio.unpack``: (header, the rest: the encoded image)."""
    if len(record) < _IR.size:
        raise ValueError(f"a record of {len(record)} bytes is shorter than its {_IR.size}-byte header")
    flag, label, id_, id2 = _IR.unpack_from(record)
    if flag > 0:
        end = _IR.size + 4 * flag
        if len(record) < end:
            raise ValueError(f"the header announces {flag} float labels but the record holds {len(record)} bytes")
        return IRHeader(flag, np.frombuffer(record, "<f4", flag, _IR.size).copy(), id_, id2), record[end:]
    return IRHeader(flag, label, id_, id2), record[_IR.size:]


def frame(data: bytes) -> bytes:
    """``data`` as dmlc's RecordIOWriter writes it: split at 4-byte aligned copies of the magic, padded to 4."""
    n = len(data)
    if n > MAX_LENGTH:
        raise InputError(f"a record of {n:,} bytes is over RecordIO's limit of {MAX_LENGTH:,}")
    cuts, pos, aligned_end = [], data.find(MAGIC_BYTES), n & ~3
    while pos != -1 and pos < aligned_end:
        if pos % 4 == 0:
            cuts.append(pos)
            pos = data.find(MAGIC_BYTES, pos + 4)
        else:
            pos = data.find(MAGIC_BYTES, pos + 1)
    parts, start = [], 0
    for k, cut in enumerate(cuts):
        parts += (_FRAME.pack(MAGIC, ((1 if k == 0 else 2) << LENGTH_BITS) | (cut - start)), data[start:cut])
        start = cut + 4
    parts += (_FRAME.pack(MAGIC, ((3 if cuts else 0) << LENGTH_BITS) | (n - start)), data[start:], b"\0" * (-n % 4))
    return b"".join(parts)


def is_record_folder(path: Union[str, os.PathLike]) -> bool:
    """Whether ``path`` is a RecordIO folder (train.rec + train.idx) or a .rec file with its .idx beside it."""
    path = Path(path)
    if path.is_dir():
        return (path / REC_FILE).is_file() and (path / IDX_FILE).is_file()
    return path.suffix == ".rec" and path.is_file() and path.with_suffix(".idx").is_file()


def _read_index(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(keys, offsets) of an .idx file: "key<TAB>offset" lines, parsed in one numpy call (millions of lines)."""
    text = path.read_bytes()
    try:
        numbers_ = np.array(text.split(), dtype=np.int64)
    except ValueError:
        raise InputError(f"{path}: not a RecordIO index (lines of 'key<TAB>byte offset' integers); "
                         "use the .idx written with the .rec") from None
    if numbers_.size % 2:
        raise InputError(f"{path}: an odd number of fields; each line must be 'key<TAB>byte offset' "
                         "(the file is truncated?)")
    pairs = numbers_.reshape(-1, 2)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


def _read_property(path: Path) -> tuple[Optional[int], Optional[tuple[int, int]]]:
    if not path.is_file():
        return None, None
    fields = path.read_text(encoding="utf-8").strip().split(",")
    try:
        values = [int(f.strip()) for f in fields]
    except ValueError:
        values = []
    if len(values) != 3 or min(values) < 1:
        raise InputError(f"{path}: expected 'identities,height,width' (e.g. 85742,112,112), got "
                         f"{','.join(fields)[:60]!r}")
    return values[0], (values[1], values[2])


class RecordFile:
    """Random access to an indexed RecordIO file by key, without mxnet; safe in DataLoader workers (the file is
    opened lazily in each process, and the object pickles without it)."""

    def __init__(self, path: Union[str, os.PathLike]):
        path = Path(path)
        self.folder = path if path.is_dir() else path.parent
        self.path = path / REC_FILE if path.is_dir() else path
        self.idx_path = self.path.with_suffix(".idx")
        for p in (self.path, self.idx_path):
            if not p.is_file():
                raise FileNotFoundError(f"{p} not found: a RecordIO folder holds train.rec and train.idx")
        self.size = self.path.stat().st_size
        self.keys, self.offsets = _read_index(self.idx_path)
        past = np.flatnonzero((self.offsets < 0) | (self.offsets + _FRAME.size > self.size))
        if past.size:
            k = past[0]
            raise InputError(f"{self.idx_path}: key {self.keys[k]} points at byte {self.offsets[k]}, past the end of "
                             f"{self.path} ({self.size:,} bytes): the .rec is truncated or the .idx is another file's")
        # key -> position in the index without a dict (millions of keys: ~100 bytes each as a dict, copied into
        # every loader worker); insightface's keys are 0..N-1, found by arithmetic
        self._dense = bool(len(self.keys)) and self.keys[0] == 0 and bool(np.all(np.diff(self.keys) == 1))
        self._order = None if self._dense else np.argsort(self.keys, kind="stable")
        starts = np.unique(self.offsets)  # where each record ends: the next record's start (or the file's end),
        self._ends = np.append(starts[1:], self.size)[np.searchsorted(starts, self.offsets)]  # so one read gets it
        self.num_classes_property, self.image_size = _read_property(self.folder / PROPERTY_FILE)
        self._fd: Optional[int] = None
        self._pid = os.getpid()
        self.header0: Optional[tuple[int, int]] = None
        if len(self.keys) and self.keys.min() == 0:  # header 0 holds labels and no image (an image record 0 with a multi-float
            head, rest = unpack(self.read(0))  # label is not one, which arcface_torch's flag > 0 test would take)
            if head.flag >= 2 and not rest:
                self.header0 = (int(head.label[0]), int(head.label[1]))
        self._images: Optional[tuple[np.ndarray, np.ndarray]] = None
        self._classes: Optional[list[str]] = None

    # ------------------------------------------------------------------ records

    def _positions(self, keys: np.ndarray) -> np.ndarray:
        """Where each key is in the index (InputError naming the first key it lacks)."""
        keys = np.asarray(keys, np.int64)
        if self._dense:
            found = (keys >= 0) & (keys < len(self.keys))
            positions = np.where(found, keys, 0)
        else:
            sorted_keys = self.keys[self._order]
            slots = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
            found = sorted_keys[slots] == keys if len(sorted_keys) else np.zeros(keys.shape, bool)
            positions = self._order[slots] if len(sorted_keys) else slots
        if not np.all(found):
            raise InputError(f"{self.idx_path}: no record with key {keys[~found].ravel()[0]}")
        return positions

    def _position(self, key: int) -> int:
        if self._dense and 0 <= key < len(self.keys):
            return int(key)
        return int(self._positions(np.asarray([key]))[0])

    def offset(self, key: int) -> int:
        """Byte offset of the record ``key`` in the .rec."""
        return int(self.offsets[self._position(key)])

    def read(self, key: int) -> bytes:
        """The record's data (IRHeader + labels + image), as mxnet's ``read_idx`` returns it."""
        position = self._position(key)
        return self._read_at(int(self.offsets[position]), int(self._ends[position]))

    def read_header(self, key: int) -> IRHeader:
        """The record's IRHeader, reading only its header bytes."""
        offset = self.offset(key)
        head = self._pread(_FRAME.size + _IR.size, offset)
        cflag, length = self._frame(head, offset)
        if cflag != 0 or length < _IR.size:  # a split record (or a short one): read it whole
            return unpack(self._read_at(offset))[0]
        flag = _IR.unpack_from(head, _FRAME.size)[0]
        if flag == 0:
            return unpack(head[_FRAME.size:])[0]
        need = _IR.size + 4 * flag
        if length < need:
            raise InputError(f"{self.path}: the record at byte {offset} announces {flag} float labels but holds "
                             f"{length} bytes: the file is damaged")
        return unpack(self._pread(need, offset + _FRAME.size))[0]

    def read_sample(self, key: int) -> tuple[int, bytes]:
        """(label, encoded image bytes) of the image record ``key``: one read of the record."""
        position = self._position(key)
        offset = int(self.offsets[position])
        data = self._read_at(offset, int(self._ends[position]))
        flag, label = _IR_FLAG_LABEL.unpack_from(data) if len(data) >= _IR.size else (0, 0.0)
        if flag == 0 and len(data) >= _IR.size:
            return self._check_label(label, offset), data[_IR.size:]
        header, image = unpack(data)
        return self._check_label(_first_label(header), offset), image

    def read_images(self, keys: np.ndarray, copy: bool = True) -> list[Union[bytes, memoryview]]:
        """The encoded images of the records ``keys``. Records that lie close together (a pass in file order) are
        read with one read for them all and cut apart with numpy; others one read each. ``copy`` False: images
        read together are memoryviews into that read (no copy; make_shards writes them straight out)."""
        keys = np.asarray(keys, np.int64)
        if not len(keys):
            return []
        positions = self._positions(keys)
        offsets, ends = self.offsets[positions], self._ends[positions]
        start, stop = int(offsets.min()), int(ends.max())
        if stop - start > 2 * int((ends - offsets).sum()) + READ_BLOCK:  # scattered: one read per record
            return [unpack(self._read_at(int(o), int(e)))[1] for o, e in zip(offsets, ends)]
        block = self._pread_some(stop - start, start)
        view = np.frombuffer(block, np.uint8)
        rel = offsets - start
        fields = view[np.minimum(rel[:, None] + np.arange(12), max(len(block) - 1, 0))].copy().view("<u4")
        magic, lrec, flag = fields[:, 0], fields[:, 1], fields[:, 2].astype(np.int64)
        length = (lrec & MAX_LENGTH).astype(np.int64)
        first = rel + _FRAME.size + _IR.size + 4 * flag  # where each image starts in the block
        last = rel + _FRAME.size + length
        whole = (magic == MAGIC) & ((lrec >> LENGTH_BITS) == 0) & (rel + 12 <= len(block)) & (first <= last) \
            & (last <= len(block))
        whole_block = block if copy else memoryview(block)
        images = [whole_block[a:b] for a, b in zip(first.tolist(), last.tolist())]
        for i in np.flatnonzero(~whole).tolist():  # split or damaged records: read alone (damage raises, naming it)
            images[i] = unpack(self._read_at(int(offsets[i]), int(ends[i])))[1]
        return images

    def _read_at(self, offset: int, end: Optional[int] = None) -> bytes:
        if end is not None and _FRAME.size <= end - offset <= MAX_LENGTH:  # the whole record in one read
            chunk = self._pread_some(end - offset, offset)
            if len(chunk) >= _FRAME.size:
                cflag, length = self._frame(chunk, offset)
                if cflag == 0 and _FRAME.size + length <= len(chunk):
                    return chunk[_FRAME.size:_FRAME.size + length]
        head = self._pread(_FRAME.size, offset)
        cflag, length = self._frame(head, offset)
        data = self._pread(length, offset + _FRAME.size)
        if cflag == 0:
            return data
        if cflag != 1:
            raise InputError(f"{self.path}: the index points at byte {offset}, the middle of a split record "
                             f"(continuation flag {cflag}); the .idx does not match the .rec")
        parts, pos = [data], offset + _FRAME.size + length + (-length % 4)
        while True:
            cflag, length = self._frame(self._pread(_FRAME.size, pos), pos)
            parts += (MAGIC_BYTES, self._pread(length, pos + _FRAME.size))
            if cflag == 3:
                return b"".join(parts)
            if cflag != 2:
                raise InputError(f"{self.path}: the split record starting at byte {offset} is cut by a record at "
                                 f"byte {pos} (flag {cflag}): the file is damaged")
            pos += _FRAME.size + length + (-length % 4)

    def _frame(self, head: bytes, offset: int) -> tuple[int, int]:
        magic, lrec = _FRAME.unpack_from(head)
        if magic != MAGIC:
            raise InputError(f"{self.path}: no RecordIO record at byte {offset} (magic {magic:#010x}, expected "
                             f"{MAGIC:#010x}): the .idx does not match the .rec, or the file is damaged")
        return lrec >> LENGTH_BITS, lrec & MAX_LENGTH

    def _pread(self, size: int, offset: int) -> bytes:
        if self._fd is None or self._pid != os.getpid():  # forked into a worker: open our own descriptor
            self._fd, self._pid = os.open(self.path, os.O_RDONLY | getattr(os, "O_BINARY", 0)), os.getpid()
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise InputError(f"{self.path}: truncated: the record at byte {offset} needs {size:,} bytes, the file "
                             f"ends at byte {self.size:,}; copy the .rec again")
        return data

    def _check_label(self, label: float, offset: int) -> int:
        limit = self.num_classes_property
        if not (label >= 0 and float(label).is_integer()) or (limit is not None and label >= limit):
            where = f"outside the {limit:,} identities of {self.folder / PROPERTY_FILE}" if limit is not None \
                else "not an identity number"
            raise InputError(f"{self.path}: the record at byte {offset} has label {label:g}, {where}")
        return int(label)

    # ------------------------------------------------------------------ the images and their labels

    @property
    def image_keys(self) -> np.ndarray:
        return self._image_labels()[0]

    @property
    def labels(self) -> np.ndarray:
        """Every image's label (int64), in image-key order, read from headers only."""
        return self._image_labels()[1]

    @property
    def num_classes(self) -> int:
        if self.num_classes_property is not None:
            return self.num_classes_property
        if self.header0 is not None:
            return self.header0[1] - self.header0[0]
        return int(self.labels.max()) + 1 if len(self.labels) else 0

    @property
    def classes(self) -> list[str]:
        """Identity names: identities.json when present (tools/export_rec.py), else zero-padded label numbers."""
        if self._classes is None:
            path = self.folder / IDENTITIES_FILE
            if path.is_file():
                names = json.loads(path.read_text(encoding="utf-8"))
                if not isinstance(names, list) or len(names) != self.num_classes:
                    raise InputError(f"{path}: expected a JSON list of {self.num_classes:,} identity names "
                                     f"(one per label); delete it to use label numbers")
                self._classes = [str(n) for n in names]
            else:
                width = max(6, len(str(max(self.num_classes - 1, 0))))
                self._classes = [f"{i:0{width}d}" for i in range(self.num_classes)]
        return self._classes

    def _image_labels(self) -> tuple[np.ndarray, np.ndarray]:
        if self._images is None:
            if self.header0 is not None:
                first, end = self.header0
                keys = np.arange(1, first, dtype=np.int64)  # arcface_torch's image keys
                missing = np.setdiff1d(keys, self.keys)
                if missing.size:
                    raise InputError(f"{self.idx_path}: header 0 announces image keys 1..{first - 1} but key "
                                     f"{missing[0]} is not in the index: the .idx is incomplete")
                self._positions(np.arange(first, end))  # the identity records are there too
                labels = self._labels_from_ranges(first, end)
                unranged = np.flatnonzero(labels < 0)
                if unranged.size:  # images no identity record covers: their own labels
                    labels[unranged] = self.read_labels(keys[unranged])
            else:
                keys = self.keys.copy()
                labels = self.read_labels(keys)
            self._images = (keys, labels)
        return self._images

    def _labels_from_ranges(self, first: int, end: int) -> np.ndarray:
        """Labels from the identity records (one small read per identity); checked against a sample of the
        images' own labels, which are what arcface_torch trains on: on any disagreement those are read instead."""
        labels = np.full(first - 1, -1, np.int64)
        for label, id_key in enumerate(range(first, end)):
            head = self.read_header(id_key)
            if head.flag < 2:
                raise InputError(f"{self.path}: identity record {id_key} (byte {self.offset(id_key)}) has no "
                                 f"(first, end) image range: header 0 says keys {first}..{end - 1} are identities")
            lo, hi = int(head.label[0]), int(head.label[1])
            if not 1 <= lo <= hi <= first:
                raise InputError(f"{self.path}: identity record {id_key} (byte {self.offset(id_key)}) covers images "
                                 f"{lo}..{hi - 1}, outside the image keys 1..{first - 1}")
            labels[lo - 1:hi - 1] = label
        ranged = np.flatnonzero(labels >= 0)
        if ranged.size:
            probe = ranged[np.linspace(0, ranged.size - 1, min(ranged.size, 256)).astype(np.int64)]
            if not np.array_equal(self.read_labels(probe + 1), labels[probe]):
                print(f"facesiam: {self.path}: the identity records disagree with the images' own labels; using "
                      "the images' labels (reading every image header once)", file=sys.stderr)
                return self.read_labels(np.arange(1, first, dtype=np.int64))
        return labels

    def read_labels(self, keys: np.ndarray, progress: bool = False) -> np.ndarray:
        """The labels (first float, as int64) of the records ``keys``, from their headers only: the headers of a
        chunk of records are gathered at once through a memory map (no Python work per record)."""
        keys = np.asarray(keys, np.int64)
        out = np.empty(len(keys), np.int64)
        if not len(keys):
            return out
        offsets = self.offset_array(keys)
        mm = np.memmap(self.path, np.uint8, "r")
        span = np.arange(_HEAD, dtype=np.int64)
        bar = tqdm(total=len(keys), unit="rec", desc="read labels", disable=not progress, leave=False)
        for start in range(0, len(keys), LABEL_CHUNK):
            off = offsets[start:start + LABEL_CHUNK]
            positions = np.minimum(off[:, None] + span, self.size - 1)  # a record shorter than _HEAD near the end
            head = np.ascontiguousarray(mm[positions])
            magic, lrec = head[:, 0:4].view("<u4")[:, 0], head[:, 4:8].view("<u4")[:, 0]
            flag = head[:, 8:12].view("<u4")[:, 0]
            label = np.where(flag > 0, head[:, 32:36].view("<f4")[:, 0], head[:, 12:16].view("<f4")[:, 0])
            length = lrec & MAX_LENGTH
            whole = ((lrec >> LENGTH_BITS) == 0) & (length >= np.where(flag > 0, _IR.size + 4, _IR.size)) \
                & (off + _HEAD <= self.size)
            bad = np.flatnonzero((magic != MAGIC) | ~whole)
            for i in bad.tolist():  # wrong magic, split or short records, the file's end: one at a time
                header = unpack(self._read_at(int(off[i])))[0]
                label[i] = _first_label(header)
            checked = label.astype(np.float64)
            limit = self.num_classes_property
            wrong = np.flatnonzero(~((checked >= 0) & (checked == np.floor(checked))
                                     & ((checked < limit) if limit is not None else True)))
            if wrong.size:
                self._check_label(float(checked[wrong[0]]), int(off[wrong[0]]))
            out[start:start + len(off)] = checked.astype(np.int64)
            bar.update(len(off))
        bar.close()
        del mm
        return out

    def offset_array(self, keys: np.ndarray) -> np.ndarray:
        """The byte offsets of the records ``keys`` (int64)."""
        keys = np.asarray(keys, np.int64)
        return self.offsets if np.array_equal(keys, self.keys) else self.offsets[self._positions(keys)]

    def _pread_some(self, size: int, offset: int) -> bytes:
        self._pread(0, offset)  # opens the file in this process
        return os.pread(self._fd, size, offset)

    # ------------------------------------------------------------------ process safety

    def close(self) -> None:
        if self._fd is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = None

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_fd"] = None
        return state

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass

    def __repr__(self) -> str:
        return f"RecordFile({str(self.path)!r}: {len(self.keys):,} records)"


def _first_label(header: IRHeader) -> float:
    return float(header.label) if header.flag == 0 else float(header.label[0])


# ---------------------------------------------------------------------------------------------- writing


class RecordWriter:
    """Appends records to an open .rec file and their ``key<TAB>offset`` lines to an .idx file (mxnet's
    MXIndexedRecordIO in 'w' mode)."""

    def __init__(self, rec, idx):
        self.rec, self.idx = rec, idx
        self.offset = rec.tell()

    def write(self, key: int, record: bytes) -> None:
        data = frame(record)
        self.rec.write(data)
        self.idx.write(f"{key}\t{self.offset}\n")
        self.offset += len(data)


def write_rec(folder: Union[str, os.PathLike], samples: Iterable[tuple[bytes, Union[int, float, Sequence[float]]]],
              *, header0: bool = True, num_classes: Optional[int] = None,
              image_size: tuple[int, int] = (112, 112), identities: Optional[Sequence[str]] = None,
              overwrite: bool = False, progress: bool = False, total: Optional[int] = None) -> dict:
    """Write ``folder/train.rec``, ``train.idx`` and ``property`` as insightface's data sets are; return counts.

    samples: (encoded image bytes, label): an int identity, or a sequence of floats (stored as flag > 0 labels;
        the first is the identity). Bytes are stored as given (no decoding).
    header0: write insightface's header record 0 and one identity record per label (the identity table); the
        images must then come grouped by identity (each label's images together, e.g. sorted by label).
        False: images are keys 0, 1, ... with no table (what mxnet's im2rec writes).
    num_classes: the identity count for ``property`` (default: the largest label + 1).
    image_size: (height, width) for ``property``.
    identities: names in label order, written as identities.json (facesiam's own; others ignore it).
    Files are written beside their final names and renamed when complete, the .idx last (memory stays flat: the
    index goes to disk as records are written); an existing train.rec is replaced only with ``overwrite``.
    """
    folder = Path(folder)
    rec_path, idx_path = folder / REC_FILE, folder / IDX_FILE
    if (rec_path.exists() or idx_path.exists()) and not overwrite:
        raise FileExistsError(f"{rec_path} exists; choose another folder or pass overwrite (--overwrite)")
    folder.mkdir(parents=True, exist_ok=True)
    runs: list[tuple[int, int, int]] = []  # (label, first key, end key) of each identity's images
    seen: set[int] = set()
    top = -1
    bar = tqdm(total=total, unit="img", desc="write_rec", disable=not progress)
    with atomic_write(idx_path, "w") as idx, atomic_write(rec_path, "wb") as rec:
        if header0:
            rec.write(frame(pack(IRHeader(2, [0.0, 0.0]), b"")))  # placeholder, same size: rewritten at the end
            idx.write("0\t0\n")
        writer = RecordWriter(rec, idx)
        key = 1 if header0 else 0
        for data, label in samples:
            number = label if isinstance(label, numbers.Number) else label[0]
            ident = int(number)
            if ident != number or ident < 0:
                raise InputError(f"sample {key}: label {number!r} is not an identity number (an integer >= 0)")
            if header0:
                if runs and runs[-1][0] == ident:
                    runs[-1] = (ident, runs[-1][1], key + 1)
                else:
                    if ident in seen:
                        raise InputError(f"sample {key}: identity {ident} appears again after other identities; "
                                         "header0 needs each identity's images together (sort the samples by "
                                         "label), or write without header0")
                    seen.add(ident)
                    runs.append((ident, key, key + 1))
            top = max(top, ident)
            record_label = float(ident) if isinstance(label, numbers.Number) else label
            writer.write(key, pack(IRHeader(0, record_label, key, 0), bytes(data)))
            key += 1
            bar.update()
        bar.close()
        count = key - (1 if header0 else 0)
        num_classes = top + 1 if num_classes is None else int(num_classes)
        if top >= num_classes:
            raise InputError(f"label {top} is outside num_classes={num_classes}")
        if identities is not None and len(identities) != num_classes:
            raise InputError(f"{len(identities)} identity names for {num_classes} identities")
        if header0:
            first, end = key, key + num_classes
            if end >= EXACT_FLOAT32:
                raise InputError(f"{count:,} images + {num_classes:,} identities: header 0's float32 keys are exact "
                                 f"only below {EXACT_FLOAT32:,}; write without header0")
            ranges = {ident: (lo, hi) for ident, lo, hi in runs}
            for ident in range(num_classes):
                lo, hi = ranges.get(ident, (first, first))  # an identity without images: an empty range
                writer.write(first + ident, pack(IRHeader(2, [float(lo), float(hi)], first + ident, 0), b""))
            rec.flush()
            rec.seek(0)
            rec.write(frame(pack(IRHeader(2, [float(first), float(end)]), b"")))
            rec.seek(0, os.SEEK_END)
        write_text(folder / PROPERTY_FILE, f"{num_classes},{image_size[0]},{image_size[1]}\n")
        names = folder / IDENTITIES_FILE
        if identities is not None:
            write_text(names, json.dumps(list(identities), ensure_ascii=False) + "\n")
        elif names.exists():  # a previous set's names would not match
            names.unlink()
        if idx_path.exists():  # the old index must never describe the new .rec (a crash before the rename below)
            idx_path.unlink()
    return {"images": count, "identities": num_classes, "header0": header0, "bytes": rec_path.stat().st_size}


# ---------------------------------------------------------------------------------------------- image signatures

_IMAGE_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG\r\n\x1a\n", "png"))


def image_ext(data: bytes) -> Optional[str]:
    """The shard member extension of encoded image bytes (jpg, png, webp) from their signature, None otherwise."""
    for magic, ext in _IMAGE_MAGIC:
        if data.startswith(magic):
            return ext
    return "webp" if data[:4] == b"RIFF" and data[8:12] == b"WEBP" else None

