"""Pack an ImageFolder into WebDataset tar shards with a byte-offset index (``write_shards``).

The layout written is described in facesiam/data/format.py.

* Image bytes are stored untouched when any reader handles them; see facesiam/data/images.py for what is
  converted and why. Every image is decoded once here, so broken files are skipped (and listed) now.
* Reproducible: same input and options give byte-identical output (fixed tar metadata, input order kept).
* Crash-safe: everything is built in a hidden folder beside DST and moved into place only when complete
  (dataset.json last), so DST never shows a partial shard, and a good old dataset is replaced (overwrite)
  only by a complete new one.

``dst`` may be a URL (``s3://bucket/shards``, ``gs://...``): the folder is written locally in a temporary folder
(``$TMPDIR``: room for the whole set) and uploaded with dataset.json last (``remote_destination``; see
facesiam/data/remote.py), so a partial upload is never a valid shard set.

Samples stay in ImageFolder order (identity by identity), so index i of a split is stable and readable by
streaming too; training draws batches through ShardDataset and a sampler, so nothing needs pre-shuffling.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import itertools
import multiprocessing
import os
import random
import re
import sys
import tempfile
import time
from contextlib import contextmanager
from json.encoder import encode_basestring as _json_string  # a JSON string, non-ASCII kept (ensure_ascii=False)
from pathlib import Path
from typing import Collection, Iterator, Optional, Sequence, Union

import numpy as np
from tqdm import tqdm

from ..errors import InputError, and_more
from ..fileio import staged_directory, write_json
from .folder import FolderListing, available_cpus, check_destination, list_image_folder, printable_name
from .format import SHARD_FORMAT, SHARD_FORMAT_VERSION, INDEX_DIR, METADATA_FILE, ShardIndex, IndexBuilder, index_path
from . import recordio
from .images import BadImage, pack_image
from .remote import RemoteFolder, is_remote

MAX_SAMPLES_PER_SHARD = 10_000
MAX_BYTES_PER_SHARD = 256 * 2**20  # WebDataset advice: shards of 100 MB - 1 GB; face crops are ~10-30 kB
TAR_MTIME = 0  # fixed tar metadata: byte-identical shards from the same input
TAR_MODE = 0o444
WRITE_BUFFER = 4 * 2**20  # few large writes rather than three small ones per member
SKIPPED_SHOWN = 20  # skipped files printed on stderr (all of them are in dataset.json)



# Tar members are written by hand: tarfile builds each header through generic Python code (~25 us a member,
# three members an image), which on 2 cores made the main process half of make_shards' time. The format is
# POSIX ustar, fixed apart from name, size and checksum; tarfile and webdataset read it (tests check both).
BLOCK = 512
RECORD = 20 * BLOCK  # archives end padded to whole records, as tar and Python's tarfile do
_HEADER_MIDDLE = (b"%07o\0" % TAR_MODE) + b"0000000\0" * 2  # mode, uid 0, gid 0
_HEADER_TAIL = ((b"%011o\0" % TAR_MTIME) + b" " * 8 + b"0" + b"\0" * 100  # mtime, checksum (spaces), regular file, link
                + b"ustar\x0000" + b"\0" * (32 + 32 + 8 + 8 + 155 + 12))  # magic+version, uname, gname, dev, prefix
_HEADER_FIXED_SUM = sum(_HEADER_MIDDLE) + sum(_HEADER_TAIL)


def ustar_header(name: str, size: int) -> bytes:
    """512-byte POSIX ustar header of a regular file (short ASCII name; fixed mode, owner and time)."""
    encoded = name.encode("ascii")
    if len(encoded) > 100 or size >= 8**11:
        raise ValueError(f"tar member {name!r} of {size} bytes does not fit a ustar header")
    size_field = b"%011o\0" % size
    checksum = _HEADER_FIXED_SUM + sum(encoded) + sum(size_field)
    tail = _HEADER_TAIL[:12] + (b"%06o\0 " % checksum) + _HEADER_TAIL[20:]
    return encoded.ljust(100, b"\0") + _HEADER_MIDDLE + size_field + tail


_HEADER_BLANK = np.frombuffer(b"\0" * 100 + _HEADER_MIDDLE + b"\0" * 12 + _HEADER_TAIL, np.uint8)  # name, size: 0
_ZEROS = [b"\0" * k for k in range(BLOCK)]


def _octal(values: np.ndarray, digits: int) -> np.ndarray:
    """Zero-padded octal ASCII digits of each value, one row each (uint8)."""
    shifts = 3 * np.arange(digits - 1, -1, -1, dtype=np.int64)
    return ((values.astype(np.int64)[:, None] >> shifts) & 7).astype(np.uint8) + ord("0")


def ustar_headers(names: Sequence[str], sizes: np.ndarray) -> bytes:
    """``b"".join(ustar_header(n, s) for n, s in zip(names, sizes))`` built as one array: the same bytes at a
    fraction of the cost per member."""
    return _ustar_array(names, sizes).tobytes()


def _ustar_array(names: Sequence[str], sizes: np.ndarray) -> np.ndarray:
    """The headers of ``ustar_headers`` as a (members, 512) uint8 array."""
    if len(names) and (max(map(len, names)) > 100 or int(sizes.max()) >= 8**11):
        raise ValueError("a tar member name or size does not fit a ustar header")
    padded = "".join([name.ljust(100, "\0") for name in names]).encode("ascii")  # one encode (ASCII: as long)
    name_field = np.frombuffer(padded, np.uint8).reshape(-1, 100)
    size_field = _octal(sizes, 11)
    headers = np.tile(_HEADER_BLANK, (len(names), 1))
    headers[:, :100] = name_field
    headers[:, 124:135] = size_field
    checksum = _HEADER_FIXED_SUM + name_field.sum(axis=1, dtype=np.int64) + size_field.sum(axis=1, dtype=np.int64)
    headers[:, 148:154] = _octal(checksum, 6)
    headers[:, 154] = 0
    return headers


def _blocks(items: Sequence[bytes]) -> np.ndarray:
    """Items of at most BLOCK bytes, each zero-padded to one block: a (len, BLOCK) uint8 array."""
    return np.frombuffer(b"".join(item.ljust(BLOCK, b"\0") for item in items), np.uint8).reshape(-1, BLOCK)


def _libc_sync_file_range():
    """Linux's sync_file_range from the C library (Python's os module lacks it), or None where there is none."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _libc_sync_file_range() if sys.platform.startswith("linux") else None
_SYNC_FILE_RANGE_WRITE = 2  # <fcntl.h>: start writing the dirty pages out, without waiting


def _start_writeback(fd: int) -> None:
    """Start writing ``fd``'s dirty pages to disk now, without waiting, so the disk works while the next chunk is
    built and the shard's fsync waits only for the last ones (.rec conversion spent a third of its time in fsync,
    the dirty pages of a whole shard written only then); a no-op where unavailable."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)  # 0, 0: the whole file; a failure only loses the head start


def _write_pieces(file, pieces: list) -> None:
    """Write the buffers ``pieces`` in order with os.writev (no joined copy of them in memory), then start their
    writeback."""
    file.flush()
    fd = file.fileno()
    limit = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024  # buffers one writev takes (Linux 1024)
    for k in range(0, len(pieces), limit):
        batch = pieces[k:k + limit]
        written, total = os.writev(fd, batch), sum(map(len, batch))
        if written < total:  # a short write (rare on a regular file): the rest in plain writes
            rest = memoryview(b"".join(batch))[written:]
            while rest:
                rest = rest[os.write(fd, rest):]
    _start_writeback(fd)


class _SplitWriter:
    """Writes one split's samples into size-limited tar shards and records each image member's byte offset."""

    def __init__(self, folder: Path, split: str, max_samples: int, max_bytes: int):
        self.folder, self.split = folder, split
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.shards: list[str] = []
        self.shard_samples: list[int] = []
        self.shard_bytes: list[int] = []
        self.index = IndexBuilder()
        self._file = None
        self._offset = 0
        self._io: Optional[concurrent.futures.ThreadPoolExecutor] = None  # add_many's writes, in order
        self._pending: collections.deque = collections.deque()
        self._sync: Optional[concurrent.futures.ThreadPoolExecutor] = None  # add_many's shard fsyncs, in order
        self._syncing: list[concurrent.futures.Future] = []

    def _run(self, fn, *args) -> None:
        """``fn(*args)`` (a file operation): here, or after add_many's start on its I/O thread, in order, while
        the caller builds the next chunk (write and fsync release the GIL); at most two chunks wait."""
        if self._io is None:
            fn(*args)
            return
        self._pending.append(self._io.submit(fn, *args))
        while len(self._pending) > 2:
            self._pending.popleft().result()  # an I/O error (disk full) surfaces here

    def _drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):06d}.tar"
        self.shards.append(name)
        self.shard_samples.append(0)
        self._file = open(self.folder / (name + ".tmp"), "wb", buffering=WRITE_BUFFER)
        self._offset = 0

    def _close(self) -> None:
        end = self._offset + 2 * BLOCK  # two zero blocks end the archive
        self._run(self._finish_file, self._file, end - self._offset + (-end % RECORD), self.shards[-1])
        self._file = None

    def _finish_file(self, file, padding: int, name: str) -> None:
        file.write(b"\0" * padding)
        file.flush()
        self.shard_bytes.append(file.tell())
        if self._sync is None:
            self._sync_file(file, name)
        else:  # add_many: the next shard is written while this one's last pages reach the disk
            self._syncing.append(self._sync.submit(self._sync_file, file, name))

    def _sync_file(self, file, name: str) -> None:
        os.fsync(file.fileno())  # the rename below must never expose an incomplete shard after a crash
        file.close()
        os.replace(self.folder / (name + ".tmp"), self.folder / name)

    def add(self, key: str, image: bytes, ext: str, label: int, path: str, identity: str) -> None:
        """Append one sample as three members: KEY.<ext> (image), KEY.cls, KEY.json."""
        self._drain()
        # json.dumps({"path": .., "identity": .., "label": ..}, ensure_ascii=False), byte for byte, at a tenth of
        # its cost (it builds an encoder per call): millions of samples from a .rec spend their time here
        meta = (f'{{"path": {_json_string(path)}, "identity": {_json_string(identity)}, '
                f'"label": {int(label)}}}').encode("utf-8")
        members = ((f"{key}.{ext}", image), (f"{key}.cls", str(label).encode("ascii")), (f"{key}.json", meta))
        parts = []
        for name, data in members:
            parts += (ustar_header(name, len(data)), data, b"\0" * (-len(data) % BLOCK))
        blob = b"".join(parts)
        if self._file is not None and self.shard_samples[-1] > 0 and (
                self.shard_samples[-1] >= self.max_samples or self._offset + len(blob) > self.max_bytes):
            self._close()
        if self._file is None:
            self._open()
        self._file.write(blob)
        self.index.add(len(self.shards) - 1, self._offset + BLOCK, len(image), label, path)  # image data offset
        self._offset += len(blob)
        self.shard_samples[-1] += 1

    def add_many(self, keys: Sequence[str], images: Sequence[bytes], exts: Sequence[str], labels: Sequence[int],
                 paths: Sequence[str], identities: Sequence[str]) -> None:
        """``add`` for each sample in turn, byte for byte, with the tar headers of all of them built at once
        (ustar_headers): a .rec's millions of small images otherwise spend most of their time on headers."""
        n = len(keys)
        metas = [f'{{"path": {_json_string(p)}, "identity": {_json_string(i)}, "label": {int(label)}}}'.encode("utf-8")
                 for p, i, label in zip(paths, identities, labels)]
        classes = [b"%d" % label for label in labels]
        names = [name for key, ext in zip(keys, exts) for name in (f"{key}.{ext}", f"{key}.cls", f"{key}.json")]
        sizes = np.stack([np.fromiter(map(len, column), np.int64, n) for column in (images, classes, metas)],
                         axis=1).reshape(-1)  # member sizes in file order: image, .cls, .json of each sample
        headers = _ustar_array(names, sizes)
        image_headers = memoryview(headers[0::3].tobytes())
        pads = -sizes[0::3] % BLOCK
        # Written as: image header 0, then for each sample its image and a "glue" buffer: the image's padding, its
        # .cls and .json members, and the next sample's image header (left off where a write stops): two buffers a
        # sample for os.writev rather than four, all the glue of a chunk built in numpy
        if n and int(sizes.reshape(n, 3)[:, 1:].max()) <= BLOCK:  # the usual case: a 4-block tail, built at once
            width = (BLOCK - 1) + 4 * BLOCK + BLOCK  # room for the padding, the tail, the next image header
            rows = np.zeros((n, width), np.uint8)
            rows[:, BLOCK - 1:2 * BLOCK - 1] = headers[1::3]
            rows[:, 2 * BLOCK - 1:3 * BLOCK - 1] = _blocks(classes)
            rows[:, 3 * BLOCK - 1:4 * BLOCK - 1] = headers[2::3]
            rows[:, 4 * BLOCK - 1:5 * BLOCK - 1] = _blocks(metas)
            rows[:-1, 5 * BLOCK - 1:] = headers[3::3]
            flat = memoryview(rows.reshape(-1))
            row_starts = np.arange(n, dtype=np.int64) * width
            glue = [flat[a:b] for a, b in zip((row_starts + (BLOCK - 1) - pads).tolist(),
                                              (row_starts + width).tolist())]
            glue[-1] = glue[-1][:-BLOCK]  # no next sample in this chunk
        else:
            glue = [b"".join((_ZEROS[pad], headers[3 * i + 1].tobytes(), c, _ZEROS[-len(c) % BLOCK],
                              headers[3 * i + 2].tobytes(), m, _ZEROS[-len(m) % BLOCK],
                              headers[3 * i + 3].tobytes() if i + 1 < n else b""))
                    for i, (pad, c, m) in enumerate(zip(pads.tolist(), classes, metas))]
        blocks = (BLOCK + sizes + (-sizes % BLOCK)).reshape(n, 3).sum(axis=1)
        start = 0
        while start < n:
            if self._file is None:
                self._open()
            room = self.max_samples - self.shard_samples[-1]
            ends = self._offset + np.cumsum(blocks[start:start + room])  # where each sample would end
            count = int(np.searchsorted(ends, self.max_bytes, side="right"))  # those within max_bytes
            if count == 0 and self.shard_samples[-1] > 0:  # full: the next sample starts a new shard, as in add
                self._close()
                continue
            count = max(count, 1)  # an empty shard takes one sample whatever its size
            stop = start + count
            if self._io is None:
                self._io = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="shard-io")
                self._sync = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="shard-fsync")
            pieces = [image_headers[start * BLOCK:(start + 1) * BLOCK],
                      *itertools.chain.from_iterable(zip(images[start:stop], glue[start:stop]))]
            if stop < n:  # the next sample's header goes to the next write (perhaps another shard)
                pieces[-1] = pieces[-1][:-BLOCK]
            self._run(_write_pieces, self._file, pieces)
            starts = self._offset + np.r_[0, np.cumsum(blocks[start:stop - 1])]
            self.index.extend(len(self.shards) - 1, starts + BLOCK, sizes[3 * start:3 * stop:3], labels[start:stop],
                              paths[start:stop])
            self._offset += int(blocks[start:stop].sum())
            self.shard_samples[-1] += count
            start = stop

    def finish(self) -> ShardIndex:
        if self._file is not None:
            self._close()
        self._drain()
        self._stop_io()
        return self.index.build(self.shards, self.shard_bytes)

    def abort(self) -> None:
        for future in self._pending:
            future.cancel()
        self._stop_io(errors=False)  # waits for a write under way; the error being handled is the one to see
        self._pending.clear()
        if self._file is not None:
            self._file.close()

    def _stop_io(self, errors: bool = True) -> None:
        if self._io is not None:
            self._io.shutdown(wait=True)
            self._io = None
        if self._sync is not None:  # after the writes: they may hand it a last shard
            self._sync.shutdown(wait=True)
            self._sync = None
        syncing, self._syncing = self._syncing, []
        for future in syncing if errors else ():
            future.result()  # an fsync error surfaces here


Packed = Union[tuple[Optional[bytes], str, Optional[str], Optional[tuple[int, int, int]]], str]


def _pack_file(task: tuple[str, Optional[int], Optional[float], bool]) -> Packed:
    """Read and decode one file: (bytes, extension, why converted, file signature) or why it is unusable (str).

    With ``send_original`` False (worker processes), an image kept byte for byte comes back as (None, ext,
    None, (size, mtime_ns, inode)) and the writer re-reads the file, still in the page cache: sending every
    image's bytes back through the pool's pipe added ~25 % to the CPU time of decoding them (LFW, 2 workers).
    """
    path, resize, center_crop, send_original = task
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            raw = f.read()
    except OSError as e:
        return f"cannot read: {e.strerror or e}"
    try:
        packed = pack_image(raw, resize=resize, center_crop=center_crop)
    except BadImage as e:
        return str(e)
    except Exception as e:  # anything else PIL trips over must not stop a long run either
        return f"cannot convert: {type(e).__name__}: {e}"
    if packed.converted is None and not send_original:
        return None, packed.ext, None, (stat.st_size, stat.st_mtime_ns, stat.st_ino)
    return packed.data, packed.ext, packed.converted, None


def _original_bytes(path: str, signature: tuple[int, int, int]) -> Optional[bytes]:
    """The file's bytes if it is still the file a worker checked (same size, mtime and inode), else None."""
    try:
        with open(path, "rb") as f:
            stat = os.fstat(f.fileno())
            if (stat.st_size, stat.st_mtime_ns, stat.st_ino) != signature:
                return None
            data = f.read()
    except OSError:
        return None
    return data if len(data) == signature[0] else None


def _choose_val_identities(candidates: list[int], val_identities: Union[int, float, None], seed: int) -> list[int]:
    """Seeded choice of whole identities (labels) for the val split, among identities that have images."""
    if val_identities is None or val_identities == 0:
        return []
    if isinstance(val_identities, float) and not float(val_identities).is_integer():
        if not 0 < val_identities < 1:
            raise InputError(f"val_identities as a fraction must be in (0, 1), got {val_identities}")
        count = max(1, round(val_identities * len(candidates)))
    else:
        count = int(val_identities)
        if count < 0:
            raise InputError(f"val_identities must be >= 0, got {val_identities}")
    if count >= len(candidates):
        raise InputError(f"val_identities={val_identities} would hold out {count} of the {len(candidates)} "
                         f"identities that have images, leaving none to train on; ask for fewer")
    return sorted(random.Random(seed).sample(candidates, count))



def _human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} TB"


_SHARD_SET_FILE = re.compile(r"[^/]+\.tar|index/[^/]+\.npz|" + re.escape(METADATA_FILE))


def is_shard_set_file(name: str) -> bool:
    """Whether ``name`` (relative to a shard folder) is a file that write_shards writes."""
    return bool(_SHARD_SET_FILE.fullmatch(name))


@contextmanager
def remote_destination(url: str, overwrite: bool = False, progress: bool = True) -> Iterator[Path]:
    """``with remote_destination("s3://b/shards") as local: write a shard folder into local`` -- checked before
    (writable, not something else, --overwrite), uploaded after with dataset.json last; never on failure."""
    folder = RemoteFolder(url)
    folder.check_destination(overwrite, marker=METADATA_FILE, own=is_shard_set_file, what="a shard folder")
    with tempfile.TemporaryDirectory(prefix="facesiam-shards-") as tmp:
        local = Path(tmp) / "shards"
        yield local
        start = time.perf_counter()
        sent = folder.upload(local, last=METADATA_FILE, overwrite=overwrite, own=is_shard_set_file, progress=progress)
        if progress:
            print(f"make_shards: uploaded {_human_bytes(sent)} in {time.perf_counter() - start:.1f} s -> {folder.url}",
                  file=sys.stderr)


def write_shards(src: str | os.PathLike, dst: str | os.PathLike, *,
                 val_identities: Union[int, float, Sequence[str], None] = None,
                 max_samples_per_shard: int = MAX_SAMPLES_PER_SHARD, max_bytes_per_shard: int = MAX_BYTES_PER_SHARD,
                 workers: Optional[int] = None, seed: int = 0, resize: Optional[int] = None,
                 center_crop: Optional[float] = None, overwrite: bool = False, progress: bool = True,
                 source: Optional[str] = None, alignment: Optional[dict] = None, unlabeled: bool = False,
                 exclude: Optional[Collection[str]] = None, shown_as: Optional[str] = None) -> dict:
    """Pack the ImageFolder ``src`` into WebDataset shards in ``dst``; return the dataset.json contents. A RecordIO
    folder ``src`` (train.rec + train.idx) is packed by write_record_shards.

    ``alignment``: the alignment record of an ``src`` made by align_faces (its alignment.json, read with
    facesiam.faces.record.read_alignment), stored in dataset.json under "alignment": "info" (detector, template,
    size: what training exports for inference), "source" (the raw photos), "counts" and "images" (every source
    image: kept or skipped with the reason, box, landmarks). The shard layer does not read it itself: faces/
    builds on data/, never the other way round.

    val_identities: hold out this many (int) or this fraction (float in (0, 1)) of the identities as a ``val``
        split (chosen with ``seed``), or the identities named in a list (the same held-out people across versions
        of a data set, e.g. before and after facesiam doctor); None or 0: no val split.
    max_samples_per_shard, max_bytes_per_shard: a new shard starts when either would be exceeded.
    workers: decoding processes (default: all usable CPUs; <= 1 decodes in this process).
    resize: shrink images so the shorter side is at most this many pixels (re-encodes them); None keeps them.
    center_crop: keep the central square of this fraction of the shorter side (before resize); None keeps all.
    overwrite: replace a non-empty dst that holds a previous shard set (never anything else).
    progress: show a progress bar and a summary on stderr (skipped files are always reported).
    source: what dataset.json names as the source (default: ``src``), e.g. the raw photos behind a temporary
        aligned folder.
    unlabeled: ``src`` holds photos without identities (any folder layout): each photo is an identity of its own
        (data/folder.list_image_folder); for distillation, which needs no labels. No val split can be held out.
    exclude: paths relative to ``src`` to leave out (make_shards --exclude: the doctor's suspects); dataset.json
        counts them under options.excluded.
    shown_as: what the messages call ``dst`` (default: ``dst``), e.g. the URL a local folder is uploaded to.
    ``dst`` may be a URL (s3://, gs://): written locally, then uploaded (``remote_destination``).
    """
    if is_remote(dst):
        with remote_destination(str(dst), overwrite, progress) as local:
            return write_shards(src, local, val_identities=val_identities, max_samples_per_shard=max_samples_per_shard,
                                max_bytes_per_shard=max_bytes_per_shard, workers=workers, seed=seed, resize=resize,
                                center_crop=center_crop, progress=progress, source=source or str(Path(src).resolve()),
                                alignment=alignment, unlabeled=unlabeled, exclude=exclude, shown_as=str(dst))
    if recordio.is_record_folder(src):  # insightface RecordIO (train.rec + train.idx): images copied as stored
        return write_record_shards(src, dst, val_identities=val_identities,
                                   max_samples_per_shard=max_samples_per_shard, max_bytes_per_shard=max_bytes_per_shard, seed=seed, overwrite=overwrite,
                                   progress=progress, source=source, alignment=alignment, shown_as=shown_as,
                                   workers=workers, resize=resize, center_crop=center_crop, unlabeled=unlabeled,
                                   exclude=exclude)
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    if max_samples_per_shard < 1 or max_bytes_per_shard < 1:
        raise InputError("max_samples_per_shard and max_bytes_per_shard must be >= 1")
    if resize is not None and resize < 1:
        raise InputError(f"resize must be >= 1 pixel, got {resize}")
    if center_crop is not None and not 0 < center_crop <= 1:
        raise InputError(f"center_crop must be a fraction in (0, 1], got {center_crop}")
    if not src.is_dir():
        raise FileNotFoundError(f"source {src} is not a folder; expected an ImageFolder (one sub-folder per identity)")
    check_destination(src, dst, overwrite, marker=METADATA_FILE, what="a shard folder")
    workers = available_cpus() if workers is None else workers

    if unlabeled and val_identities:
        raise InputError("--val-identities needs identities, and unlabelled photos have none: validate on labelled "
                         "shards (distillation's --val-split, or make them separately) or drop --val-identities")
    listing = list_image_folder(src, unlabeled=unlabeled, exclude=exclude)
    if not listing.classes:
        raise InputError(f"source {src} has no image files" if unlabeled else
                         f"source {src} has no identity sub-folders; expected SRC/<identity>/<image> "
                         "(photos without identities: --unlabeled)")
    classes = [printable_name(c) for c in listing.classes]
    split_of, val_labels = _assign_splits(listing, len(classes), val_identities, seed)
    split_names = ["train", "val"] if val_labels else ["train"]
    jobs = _plan_jobs(listing, split_of, len(split_names))

    target = dst.resolve()  # a name to build beside, even for "." or "out/"
    with staged_directory(target, last=METADATA_FILE) as staging:
        writers = {name: _SplitWriter(staging, name, max_samples_per_shard, max_bytes_per_shard)
                   for name in split_names}
        try:
            packed = _pack_all(src, jobs, writers, split_names, split_of, classes, resize=resize,
                               center_crop=center_crop, workers=workers, progress=progress)
        except BaseException:
            for writer in writers.values():
                writer.abort()
            raise
        skipped = [{"path": p, "reason": "file name is not valid UTF-8; rename the file"} for p in listing.bad_names]
        skipped += packed["skipped"]
        options = {"val_identities": val_identities, "seed": seed, "max_samples_per_shard": max_samples_per_shard,
                   "max_bytes_per_shard": max_bytes_per_shard, "resize": resize, "center_crop": center_crop,
                   "unlabeled": unlabeled, "excluded": listing.excluded}
        meta = _finish(staging, source or str(src.resolve()), writers, classes, val_labels, packed["kept_per_label"],
                       listing, options, packed["converted"], skipped, alignment)

    _report(meta, shown_as or dst, time.perf_counter() - start, len(jobs), progress)
    return meta


def _assign_splits(listing: FolderListing, n_classes: int, val_identities: Union[int, float, Sequence[str], None],
                   seed: int) -> tuple[np.ndarray, list[int]]:
    """Split number (0 train, 1 val) of every label, and the held-out labels."""
    if isinstance(val_identities, (list, tuple, set, frozenset)):  # these identities, by name
        label_of = {name: i for i, name in enumerate(listing.classes)}
        unknown = sorted(set(val_identities) - set(label_of))
        if unknown:
            raise InputError(f"val identity {unknown[0]!r} is not a folder of {listing.root}{and_more(unknown)}; "
                             "list identity folder names")
        val_labels = sorted(label_of[name] for name in set(val_identities))
    else:
        candidates_per_label = np.bincount(np.asarray([label for _, label in listing.samples], np.int64),
                                           minlength=n_classes)
        val_labels = _choose_val_identities([i for i, n in enumerate(candidates_per_label) if n > 0],
                                            val_identities, seed)
    split_of = np.zeros(n_classes, np.int8)
    split_of[val_labels] = 1
    return split_of, val_labels


def _plan_jobs(listing: FolderListing, split_of: np.ndarray, n_splits: int) -> list[tuple[str, str, int]]:
    """(key, relative path, label) of every file: train samples first, then val, each in ImageFolder order.

    The key is <label>_<position among the identity's files>, stable whatever else is skipped (an identity's
    files are contiguous in the listing).
    """
    jobs = []
    for split in range(n_splits):
        position, previous = 0, -1
        for rel, label in listing.samples:
            if split_of[label] != split:
                continue
            position = position + 1 if label == previous else 0
            previous = label
            jobs.append((f"{label:06d}_{position:04d}", rel, label))
    return jobs


def _pack_all(src: Path, jobs: list[tuple[str, str, int]], writers: dict, split_names: list[str],
              split_of: np.ndarray, classes: list[str], *, resize: Optional[int], center_crop: Optional[float],
              workers: int, progress: bool) -> dict:
    """Decode every file (in a process pool) and append the usable ones to their split's writer, in order."""
    in_process = workers <= 1 or len(jobs) <= 1
    tasks = ((str(src / rel), resize, center_crop, in_process) for _, rel, _ in jobs)  # consumed lazily
    skipped, converted = [], {}
    kept_per_label = np.zeros(len(classes), np.int64)
    pool = None
    try:
        if not in_process:
            pool = multiprocessing.get_context().Pool(workers)
            chunksize = max(1, min(64, len(jobs) // (workers * 16)))
            results = pool.imap(_pack_file, tasks, chunksize=chunksize)  # ordered: output is reproducible
        else:
            results = map(_pack_file, tasks)
        bar = tqdm(total=len(jobs), unit="img", desc="make_shards", disable=not progress, smoothing=0.1)
        for (key, rel, label), result in zip(jobs, results):
            bar.update()
            data, ext, why, signature = (None, None, None, None) if isinstance(result, str) else result
            if signature is not None:  # kept byte for byte: read it here rather than through the pipe
                data = _original_bytes(str(src / rel), signature)
                if data is None:  # changed since the worker looked: pack it again, here
                    result = _pack_file((str(src / rel), resize, center_crop, True))
                    data, ext, why, _ = (None, None, None, None) if isinstance(result, str) else result
            if isinstance(result, str):
                skipped.append({"path": rel, "reason": result})
                continue
            if why:
                converted[why] = converted.get(why, 0) + 1
            writers[split_names[split_of[label]]].add(key, data, ext, label, rel, classes[label])
            kept_per_label[label] += 1
        bar.close()
        if pool is not None:
            pool.close()
            pool.join()
    except BaseException:
        if pool is not None:
            pool.terminate()
        raise
    return {"skipped": skipped, "converted": converted, "kept_per_label": kept_per_label}


def _finish(staging: Path, source: str, writers: dict, classes: list[str], val_labels: list[int],
            kept_per_label: np.ndarray, listing: FolderListing, options: dict, converted: dict,
            skipped: list[dict], alignment: Optional[dict]) -> dict:
    """Close the shards, write the indexes and dataset.json (last: its presence marks a complete folder)."""
    (staging / INDEX_DIR).mkdir()
    splits = {}
    for name, writer in writers.items():
        index = writer.finish()
        index.save(index_path(staging, name))
        labels_here = np.unique(index.label)
        splits[name] = {"shards": writer.shards, "shard_samples": writer.shard_samples,
                        "num_samples": len(index), "num_identities": int(len(labels_here)),
                        "index": f"{INDEX_DIR}/{name}.npz"}
        if name == "val":
            splits[name]["identities"] = [classes[i] for i in val_labels]
    meta = {
        "format": SHARD_FORMAT,
        "version": SHARD_FORMAT_VERSION,
        "source": source,
        "options": options,
        "num_classes": len(classes),
        "num_samples": int(kept_per_label.sum()),
        "bytes": int(sum(sum(w.shard_bytes) for w in writers.values())),
        "classes": classes,
        "images_per_identity": kept_per_label.tolist(),
        "identities_without_images": [classes[i] for i in np.flatnonzero(kept_per_label == 0)],
        "splits": splits,
        "converted": dict(sorted(converted.items())),
        "ignored_files": listing.ignored_files,
        "loose_images": listing.loose_images,
        "skipped": skipped,
    }
    if alignment is not None:
        meta["alignment"] = {"info": alignment["alignment"], "source": alignment["source"],
                             "counts": alignment["counts"], "images": alignment["images"]}
    write_json(staging / METADATA_FILE, meta, indent=1, ensure_ascii=False)
    return meta


def _report(meta: dict, dst: Union[Path, str], seconds: float, files: int, progress: bool) -> None:
    """Problems always go to stderr (nothing bad is silent); the summary only with progress."""
    out = sys.stderr
    skipped = meta["skipped"]
    if skipped:
        print(f"make_shards: skipped {len(skipped)} unusable file(s) (all listed under \"skipped\" in "
              f"{dst}/{METADATA_FILE}):", file=out)
        for item in skipped[:SKIPPED_SHOWN]:
            print(f"  {item['path']}: {item['reason']}", file=out)
        if len(skipped) > SKIPPED_SHOWN:
            print(f"  ... and {len(skipped) - SKIPPED_SHOWN} more", file=out)
    if meta["identities_without_images"]:
        names = meta["identities_without_images"]
        shown = ", ".join(names[:SKIPPED_SHOWN]) + (f", ... ({len(names)} in all)" if len(names) > SKIPPED_SHOWN else "")
        print(f"make_shards: {len(names)} identity folder(s) have no usable image (kept in the label space, "
              f"0 samples): {shown}", file=out)
    if meta["loose_images"]:
        print(f"make_shards: ignored {len(meta['loose_images'])} image(s) directly in the source folder (not in "
              f"an identity folder): {', '.join(meta['loose_images'][:5])}", file=out)
    if not progress:
        return
    splits = ", ".join(f"{name} {s['num_samples']:,} images / {s['num_identities']:,} identities in "
                       f"{len(s['shards'])} shard(s)" for name, s in meta["splits"].items())
    conv = sum(meta["converted"].values())
    print(f"make_shards: {meta['num_classes']:,} identities, {meta['num_samples']:,} images ({splits}); "
          f"{len(skipped)} skipped, {conv} converted, {meta['ignored_files']} non-image file(s) ignored; "
          f"{_human_bytes(meta['bytes'])} in {seconds:.1f} s ({files / max(seconds, 1e-9):,.0f} images/s) -> {dst}",
          file=out)


def write_record_shards(src: Union[str, os.PathLike], dst: Union[str, os.PathLike], *,
                        val_identities: Union[int, float, Sequence[str], None] = None,
                        max_samples_per_shard: Optional[int] = None, max_bytes_per_shard: Optional[int] = None,
                        seed: int = 0, overwrite: bool = False, progress: bool = True, source: Optional[str] = None,
                        alignment: Optional[dict] = None, shown_as: Optional[str] = None, **unsupported) -> dict:
    """``write_shards`` for a RecordIO folder: every image record's bytes go into the shards as stored (no decoding,
    no re-encoding), labels and the identity table come from the records (header 0's identity ranges when present),
    ``val_identities`` holds out whole identities as for an ImageFolder. Built in a hidden folder and moved into
    place complete (kill -9 leaves ``dst`` as it was). A record whose bytes are no JPEG, PNG or WebP is skipped and
    listed. Returns dataset.json's contents."""
    given = sorted(k for k, v in unsupported.items() if v not in (None, False, 0, ()))
    given = [k for k in given if k != "workers"]  # nothing to decode: no worker processes
    if given:
        raise InputError(f"{', '.join(given)}: not available for RecordIO data, whose images are copied as stored "
                         f"(no decoding); unpack it or make the shards without them")
    start = time.perf_counter()
    src, dst = Path(src), Path(dst)
    max_samples = max_samples_per_shard or MAX_SAMPLES_PER_SHARD
    max_bytes = max_bytes_per_shard or MAX_BYTES_PER_SHARD
    check_destination(src, dst, overwrite, marker=METADATA_FILE, what="a shard folder")
    rec = recordio.RecordFile(src)
    keys, labels, classes = rec.image_keys, rec.labels, rec.classes
    if not len(keys):
        raise InputError(f"{rec.path} holds no image records")
    if isinstance(val_identities, (list, tuple, set, frozenset)):
        label_of = {name: i for i, name in enumerate(classes)}
        unknown = sorted(set(val_identities) - set(label_of))
        if unknown:
            raise InputError(f"val identity {unknown[0]!r} is not an identity of {rec.path} (names: "
                             f"{classes[0]}, {classes[1] if len(classes) > 1 else ''} ...)")
        val_labels = sorted(label_of[n] for n in set(val_identities))
    else:
        val_labels = _choose_val_identities(np.unique(labels).tolist(), val_identities, seed)
    split_of = np.zeros(len(classes), np.int8)
    split_of[val_labels] = 1
    split_names = ["train", "val"] if val_labels else ["train"]
    # train first, then val; identity by identity (keys <label>_<position>), records in file order within one
    order = np.lexsort((rec.offset_array(keys), labels, split_of[labels]))
    kept = np.zeros(len(classes), np.int64)
    skipped: list[dict] = []
    with staged_directory(dst.resolve(), last=METADATA_FILE) as staging:
        writers = {name: _SplitWriter(staging, name, max_samples, max_bytes) for name in split_names}
        try:
            _pack_records(rec, keys[order], labels[order], writers, [split_names[k] for k in split_of], classes,
                          kept, skipped, progress)
        except BaseException:
            for split_writer in writers.values():
                split_writer.abort()
            raise
        options = {"val_identities": val_identities, "seed": seed, "max_samples_per_shard": max_samples,
                   "max_bytes_per_shard": max_bytes, "resize": None, "center_crop": None, "unlabeled": False,
                   "excluded": 0, "recordio": {"images": int(len(keys)), "header0": rec.header0 is not None,
                                               "property": rec.num_classes_property is not None}}
        meta = _finish(staging, source or str(src.resolve()), writers, classes, val_labels, kept,
                       FolderListing(src, classes, []), options, {}, skipped, alignment)
    _report(meta, shown_as or dst, time.perf_counter() - start, len(keys), progress)
    return meta


def _pack_records(rec, keys: np.ndarray, labels: np.ndarray, writers: dict, split_of_label: list[str],
                  classes: list[str], kept: np.ndarray, skipped: list[dict], progress: bool, chunk: int = 1024) -> None:
    """Append the image records ``keys`` (grouped by identity, train before val) to their split's writer, bytes as
    stored, ``chunk`` samples at a time (_SplitWriter.add_many; a .rec holds millions of small images, so the work
    per record is a few list comprehensions). Sample keys are <label>_<position among the identity's records>."""
    jpeg, prefix = b"\xff\xd8\xff", f"{rec.path.name}#"
    n = len(keys)
    firsts = np.r_[0, np.flatnonzero(np.diff(labels)) + 1]
    positions = (np.arange(n) - np.repeat(firsts, np.diff(np.r_[firsts, n]))).tolist()
    split_names = [split_of_label[label] for label in labels[firsts].tolist()]
    cuts = sorted({0, n, *range(0, n, chunk), *(int(f) for f, a, b in zip(firsts[1:], split_names, split_names[1:])
                                                 if a != b)})
    key_list, label_list = keys.tolist(), labels.tolist()
    bar = tqdm(total=n, unit="img", desc="make_shards", disable=not progress, smoothing=0.1)
    for lo, hi in zip(cuts, cuts[1:]):
        images = rec.read_images(keys[lo:hi], copy=False)  # views into one read, written out by os.writev
        exts = ["jpg" if image[:3] == jpeg else recordio.image_ext(bytes(image[:12])) for image in images]
        ks, ls = key_list[lo:hi], label_list[lo:hi]
        columns = [[f"{label:06d}_{p:04d}" for label, p in zip(ls, positions[lo:hi])], images, exts, ls,
                   [f"{prefix}{k}" for k in ks], [classes[label] for label in ls]]
        if None in exts:  # not an image format the shards hold: skipped and listed
            bad = [i for i, ext in enumerate(exts) if ext is None]
            skipped += [{"path": columns[4][i], "reason": "not a JPEG, PNG or WebP image (unknown signature "
                                                          f"{images[i][:4].hex() or 'empty'})"} for i in bad]
            columns = [[v for i, v in enumerate(column) if exts[i] is not None] for column in columns]
        writers[split_of_label[ls[0]]].add_many(*columns)
        np.add.at(kept, np.asarray(columns[3], np.int64), 1)
        bar.update(hi - lo)
    bar.close()
