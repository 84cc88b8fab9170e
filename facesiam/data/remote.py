"""Shards anywhere: shard folders at URLs (``s3://bucket/shards``, ``gs://...``, ``https://...``) through fsspec.

``pip install -e ".[remote]"`` (S3 and HTTP; ``".[gcs]"`` adds Google Cloud Storage). Every reader of shards
(ShardDataset, open_dataset, so training's ``--data``, embed, evaluate, the teacher pass, doctor and cluster) and
make_shards' DST accept such a URL.

Reading (``RemoteFolder``):

* Metadata: dataset.json and index/<split>.npz are fetched once and cached locally in
  ``$FACESIAM_CACHE`` (default ``$XDG_CACHE_HOME/facesiam`` or ``~/.cache/facesiam``) ``/shards/<hash of the
  URL>/``, keyed by the remote file's size and ETag (or generation, MD5, Last-Modified): a changed remote file is
  fetched again; a server that sends none of these is asked for the file at every open. The index's shard sizes
  are checked against the remote tars (one listing, or one HEAD per shard over HTTP) so a stale index is an error,
  not wrong pixels.
* Samples: the tars are never downloaded whole. ``ds[i]`` is one HTTP range request (``fs.cat_file(path, start,
  end)``, no block cache) for the image member's bytes found in the offset index.
* Batches: torch's DataLoader calls ``ShardDataset.__getitems__(keys)`` with a whole batch (batch samplers, or
  ``batch_size``); its byte ranges are all requested at once in each loader worker (at most ``CONCURRENCY`` in
  flight), as coroutines on the file system's own event loop (fsspec's IO thread: s3fs, gcsfs and HTTP are
  asynchronous; a synchronous file system gets a thread pool instead), and each image is decoded as soon as its
  bytes arrive, so the network waits overlap decoding. Ranges of one shard that lie within ``MERGE_GAP`` bytes of each other are read as one
  request: the per-class sampler takes m images of an identity, which the writer stores side by side.
* S3 without botocore per range: each worker signs one URL per shard (botocore's presigner, s3fs's ``url``; valid
  ``PRESIGN_EXPIRES`` seconds, signed again after ``PRESIGN_RENEW``) and reads its ranges as plain HTTP GETs with a
  Range header on a pooled aiohttp session (fsspec's HTTP file system), which costs a fraction of botocore's CPU per
  request. A GET that the server answers with an error status (an expired signature, access refused, a missing
  object) is asked again through botocore, so the errors and messages are s3fs's; options a plain GET cannot carry
  (``requester_pays``, ``s3_additional_kwargs`` such as SSE-C keys, proxies in ``config_kwargs``; ``PRESIGN``
  False) keep every range on botocore; TLS follows botocore's settings (``client_kwargs`` verify, $AWS_CA_BUNDLE).
  A signed URL is a credential: it is never logged or put in an error message.
* Retries: a transient failure (dropped connection, timeout, server error, short body) is retried ``RETRIES``
  times with exponential backoff from ``BACKOFF`` seconds, and the same byte range is asked for again, so the
  bytes are the same. A URL, bucket or object that does not exist, or access refused, is one ``InputError`` line
  naming the URL and the fix.

Writing (``RemoteFolder.check_destination`` and ``upload``, through ``writer.remote_destination``): make_shards
checks the URL first (bucket exists, no other data there, ``--overwrite`` for an earlier set), writes into a local
temporary folder (``$TMPDIR``: it needs the room of the whole shard set), then uploads the tars, the index and
dataset.json last, so a partial upload is never a valid shard set; with ``--overwrite`` the old dataset.json is
deleted first and the old set's other tars and indexes after the new dataset.json is in place. HTTP(S) URLs are
read-only.

Processes: each process (each DataLoader worker) opens its own file system and thread pool; the dataset pickles
without them. fsspec's instance cache is not used (see ``_FILESYSTEMS``), so a forked worker never closes its
parent's connections.

Options and credentials come from fsspec's configuration, nothing of facesiam's: environment variables
``FSSPEC_<PROTOCOL>_<OPTION>`` (e.g. ``FSSPEC_S3_ENDPOINT_URL=http://127.0.0.1:9000`` for MinIO or moto,
``FSSPEC_S3_ANON=true``), ``FSSPEC_<PROTOCOL>='{"json": "options"}'`` or JSON files in ``~/.config/fsspec/``;
credentials the usual way (``AWS_ACCESS_KEY_ID``/``~/.aws``, ``GOOGLE_APPLICATION_CREDENTIALS``). Library callers
may pass ``storage_options`` instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import posixpath
import random
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from ..errors import FacesiamError, InputError
from ..fileio import atomic_write

RETRIES = 5  # tries of one range read (the first included)
BACKOFF = 0.1  # seconds before the first retry; doubled at every next one (with jitter)
CONCURRENCY = 16  # range requests in flight per process (per DataLoader worker)
# Read two ranges of one shard as one request when at most MERGE_GAP bytes lie between them, up to MAX_MERGED bytes a
# request. A request costs ~2-3 ms of client CPU through botocore (S3) whatever its size, and tens of ms of latency
# on object storage. On LFW (~13 kB JPEGs) with per-class batches of 32 (m=4), 256 kB takes 0.31 requests per image
# for 1.4x the image bytes (no merging: 0.52 for 0.52x, images drawn twice fetched once; 1 MB: 0.25 for 5.5x).
MERGE_GAP = 256 * 2**10
MAX_MERGED = 4 * 2**20
# S3 ranges as plain GETs on presigned URLs (one signature per shard and worker, not per request): a third of
# botocore's client CPU per request (1.8 vs 5.8 ms for 40 kB ranges from moto, 2 loaded cores, 2026-12-07).
# PRESIGN = False keeps every range on botocore.
PRESIGN = True
PRESIGN_EXPIRES = 3600  # seconds a signed URL is valid (S3 caps it at the credentials' own lifetime)
PRESIGN_RENEW = 600  # seconds after which a worker signs again: well inside the expiry and rotating credentials
PRESIGN_GIVE_UP = 3  # 4xx answers in a row after which a process stops presigning (a server that takes no
# presigned URLs): each such range was read again through botocore
INSTALL = 'pip install -e ".[remote]" (s3://, http(s)://) or ".[gcs]" (gs://)'
READ_ONLY = ("http", "https")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
_TAGS = ("ETag", "etag", "generation", "md5Hash", "Content-MD5", "Last-Modified", "LastModified", "updated", "mtime")
_NOT_TRANSIENT = (FileNotFoundError, PermissionError, NotImplementedError, FacesiamError, TypeError, AttributeError,
                  NameError, ImportError)


def is_remote(path: Any) -> bool:
    """Whether ``path`` is a URL that fsspec reads (``s3://``, ``gs://``, ``https://``...), not a local path."""
    if not isinstance(path, str):
        return False
    match = _URL.match(path)
    return bool(match) and match.group(1).lower() != "file"


# File systems and thread pools by process. fsspec's own instance cache is not used: a forked DataLoader worker
# clears it, and the parent's instances it drops are finalised there, closing the parent's connections through the
# event-loop selector that parent and child share (epoll), which leaves the parent's next request waiting forever.
# Kept here, the parent's instances stay alive (and unused) in every child; each process makes its own.
_FILESYSTEMS: dict[tuple, tuple[Any, str]] = {}
_POOLS: dict[int, ThreadPoolExecutor] = {}
_SLOTS: dict[tuple[int, int], Any] = {}  # (process, event loop) -> asyncio.Semaphore(CONCURRENCY)
_SIGNED_HTTP: dict[tuple, Any] = {}  # (process, TLS settings) -> HTTPFileSystem of presigned S3 GETs (as _FILESYSTEMS)
_SIGNED_QUERY = re.compile(r"\?[^\s'\"]*(X-Amz-|Signature=)[^\s'\"]*", re.IGNORECASE)


def _filesystem(url: str, protocol: str, storage_options: dict) -> tuple[Any, str]:
    """(fsspec file system, its path for ``url``) of this process, one per protocol and options."""
    try:
        import fsspec
        from fsspec.core import url_to_fs
    except ImportError:
        raise InputError(f"{url}: reading or writing shards at a URL needs fsspec; {INSTALL}") from None
    config = json.dumps([fsspec.config.conf.get(protocol), storage_options], sort_keys=True, default=str)
    key = (os.getpid(), protocol, config)
    if key not in _FILESYSTEMS:
        try:
            fsspec.get_filesystem_class(protocol)
            _FILESYSTEMS[key] = url_to_fs(url, skip_instance_cache=True, **storage_options)
        except (ImportError, ValueError) as err:
            raise InputError(f"{url}: no fsspec support for {protocol}:// here ({_reason(err)}); {INSTALL}") from None
    fs = _FILESYSTEMS[key][0]
    return fs, fs._strip_protocol(url).rstrip("/")


def hide_signature(text: str) -> str:
    """``text`` with the query of any presigned URL in it cut off (a signature, and a session token, are secrets)."""
    return _SIGNED_QUERY.sub("?<signature hidden>", text)


def _can_presign(fs: Any) -> bool:
    """Whether ranges of ``fs`` (an s3fs file system) may be read as plain GETs on presigned URLs: no option that
    a plain GET would drop (requester pays, SSE-C keys and other per-request parameters, proxies in the options)."""
    return bool(PRESIGN and hasattr(fs, "_url") and not getattr(fs, "req_kw", None)
                and not getattr(fs, "s3_additional_kwargs", None)
                and not (getattr(fs, "config_kwargs", None) or {}).get("proxies"))


def _tls(fs: Any) -> tuple[bool, Optional[str]]:
    """(verify certificates, CA bundle) as botocore takes them: the client's ``verify`` option, else $AWS_CA_BUNDLE."""
    verify = (getattr(fs, "client_kwargs", None) or {}).get("verify")
    if verify is False:
        return False, None
    return True, verify if isinstance(verify, str) else os.environ.get("AWS_CA_BUNDLE") or None


async def _signed_client(*, verify: bool, cafile: Optional[str], **kwargs: Any) -> Any:
    """The aiohttp session of presigned GETs (fsspec's ``get_client``): botocore's TLS settings, proxies from the
    environment as botocore takes them."""
    import ssl

    import aiohttp

    context: Any = ssl.create_default_context(cafile=cafile) if verify and cafile else verify
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context), trust_env=True, **kwargs)


def _signed_http(fs: Any) -> Any:
    """This process's HTTP file system for presigned GETs of ``fs``'s objects: URLs sent as signed (``encoded``: no
    requoting), none of the user's HTTP options (an Authorization header would break the signature)."""
    verify, cafile = _tls(fs)
    key = (os.getpid(), verify, cafile)
    http = _SIGNED_HTTP.get(key)
    if http is None:
        from fsspec.implementations.http import HTTPFileSystem

        http = _SIGNED_HTTP[key] = HTTPFileSystem(skip_instance_cache=True, encoded=True, loop=fs.loop,
                                                  get_client=_signed_client,
                                                  client_kwargs={"verify": verify, "cafile": cafile})
    return http


def plan_requests(requests: Sequence[tuple[Any, int, int]]) -> list[tuple[Any, int, int, list[int]]]:
    """The range requests that fetch (file, offset, size) ``requests``: (file, start, end, positions served),
    ranges of one file merged when at most MERGE_GAP bytes lie between them (and the request stays <= MAX_MERGED)."""
    groups: list[tuple[Any, int, int, list[int]]] = []
    for k in sorted(range(len(requests)), key=lambda k: (requests[k][0], requests[k][1])):
        name, offset, size = requests[k]
        if groups and groups[-1][0] == name and offset - groups[-1][2] <= MERGE_GAP \
                and max(groups[-1][2], offset + size) - groups[-1][1] <= MAX_MERGED:
            _, start, end, members = groups[-1]
            groups[-1] = (name, start, max(end, offset + size), members + [k])
        else:
            groups.append((name, offset, offset + size, [k]))
    return groups


def _backoff(what: str, attempt: int, err: BaseException) -> float:
    """Seconds to wait before try ``attempt`` + 2 after ``err``; the one-line OSError when no try is left."""
    if attempt + 1 >= RETRIES:
        raise OSError(f"{what}: failed {RETRIES} times, last: {type(err).__name__}: {_reason(err)}; check the network "
                      f"and the server") from err
    return BACKOFF * 2**attempt * (0.5 + random.random())


def cache_root() -> Path:
    """Where remote metadata is cached: $FACESIAM_CACHE, else $XDG_CACHE_HOME/facesiam, else ~/.cache/facesiam."""
    if os.environ.get("FACESIAM_CACHE"):
        return Path(os.environ["FACESIAM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "facesiam"


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class RemoteFolder:
    """A folder at a URL: cached small files, sizes, parallel retried range reads, uploads. Pickles without its
    connection (each DataLoader worker opens its own), so it is safe in worker processes."""

    def __init__(self, url: str, storage_options: Optional[dict] = None):
        self.url = url.rstrip("/")
        self.protocol = _URL.match(self.url).group(1).lower()
        self.storage_options = dict(storage_options or {})
        self._fs, self._root, self._pid = None, None, None
        self._signed: dict[str, tuple[str, float]] = {}  # shard name -> (presigned URL, monotonic time signed)
        self._presign: Optional[bool] = None  # this process may read S3 ranges as presigned GETs (None: not decided)
        self._refused = 0  # presigned GETs answered with a 4xx status in a row

    # ------------------------------------------------------------------ connection (per process)
    @property
    def fs(self):
        if self._fs is None or self._pid != os.getpid():
            self._fs, self._root = _filesystem(self.url, self.protocol, self.storage_options)
            self._pid = os.getpid()
            self._signed, self._presign, self._refused = {}, None, 0  # signed in the process that uses them
        return self._fs

    def path(self, name: str) -> str:
        """The fsspec path of ``name`` (relative to the folder)."""
        self.fs  # noqa: B018  sets _root
        return f"{self._root}/{name}"

    def url_of(self, name: str) -> str:
        return f"{self.url}/{name}"

    def _executor(self) -> ThreadPoolExecutor:
        pool = _POOLS.get(os.getpid())
        if pool is None:  # one per process: a forked loader worker makes its own
            pool = _POOLS[os.getpid()] = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="facesiam-range")
        return pool

    def __getstate__(self):
        return {**self.__dict__, "_fs": None, "_root": None, "_pid": None, "_signed": {}, "_presign": None,
                "_refused": 0}

    # ------------------------------------------------------------------ errors and retries
    def fail(self, name: str, err: BaseException, fix: str) -> InputError:
        """One line for a file that cannot be had: not found, access refused, or unreachable."""
        where = self.url_of(name) if name else self.url
        if isinstance(err, FileNotFoundError):
            bucket = self._root.split("/", 1)[0] if self._root else ""
            if self.protocol not in READ_ONLY and bucket and not self._exists(bucket):
                return InputError(f"{where}: the bucket {self.protocol}://{bucket} does not exist (or these "
                                  f"credentials cannot see it); fix the URL or create the bucket")
            return InputError(f"{where} not found; {fix}")
        if isinstance(err, PermissionError):
            return InputError(f"{where}: access refused ({_reason(err)}); check the credentials (AWS_ACCESS_KEY_ID, "
                              f"GOOGLE_APPLICATION_CREDENTIALS, ~/.aws) and the bucket's permissions")
        return InputError(f"{where}: cannot read it ({type(err).__name__}: {_reason(err)}); check the URL, the "
                          f"network and the storage options (FSSPEC_S3_ENDPOINT_URL, ...)")

    def one_line(self, name: str, fix: str, fn: Callable[[], Any]) -> Any:
        """``fn()`` retried (``retried``); what still fails is ``fail``'s one line."""
        try:
            return self.retried(self.url_of(name) if name else self.url, fn)
        except (FileNotFoundError, PermissionError) as err:
            raise self.fail(name, err, fix) from None
        except OSError as err:  # still failing after the retries: say what the last try said
            raise self.fail(name, err.__cause__ if isinstance(err.__cause__, Exception) else err, fix) from None

    def _exists(self, path: str) -> bool:
        try:
            return bool(self.fs.exists(path))
        except Exception:  # cannot tell: let the caller's message stand
            return True

    def retried(self, what: str, fn: Callable[[], Any], check: Optional[Callable[[Any], Optional[str]]] = None):
        """``fn()`` retried on transient errors (bounded, exponential backoff with jitter). ``check(result)``
        returns a reason to retry (a short body) or None."""
        for attempt in range(RETRIES):
            try:
                result = fn()
                problem = check(result) if check else None
                if problem is None:
                    return result
                err: BaseException = OSError(problem)
            except _NOT_TRANSIENT:
                raise
            except Exception as e:  # dropped connections, timeouts, 5xx: aiohttp, botocore and OSError alike
                err = e
            time.sleep(_backoff(what, attempt, err))

    # ------------------------------------------------------------------ small files (metadata, index)
    def info(self, name: str) -> dict:
        return self.retried(self.url_of(name), lambda: self._fresh_info(name))

    def _fresh_info(self, name: str) -> dict:
        """fs.info of ``name`` asked of the server, not of a listing cached earlier in this process (s3fs, gcsfs)."""
        self.fs.invalidate_cache(self.path(name))
        return self.fs.info(self.path(name))

    def cached(self, name: str, fix: str) -> Path:
        """A local copy of the small file ``name``, fetched again only when the remote one changed."""
        info = self.one_line(name, fix, lambda: self._fresh_info(name))
        tag = next((str(info[k]) for k in _TAGS if info.get(k) not in (None, "")), None)
        key = {"url": self.url_of(name), "size": info.get("size"), "tag": tag}
        folder = cache_root() / "shards" / hashlib.sha256(self.url.encode("utf-8")).hexdigest()[:16]
        local, key_file = folder / name, folder / (name + ".key.json")
        if tag is not None and local.is_file() and key_file.is_file():
            try:
                if json.loads(key_file.read_text(encoding="utf-8")) == key and local.stat().st_size == key["size"]:
                    return local
            except (OSError, ValueError):
                pass  # a damaged key: fetch again
        data = self.one_line(name, fix, lambda: self.fs.cat_file(self.path(name)))
        with atomic_write(local, "wb") as f:
            f.write(data)
        with atomic_write(key_file) as f:
            json.dump(key, f)
        return local

    def sizes(self, names: Sequence[str]) -> dict[str, Optional[int]]:
        """Byte size of each file ``name`` (None where it is missing): one listing, or HEADs in parallel (HTTP)."""
        if self.protocol not in READ_ONLY:  # object stores list a prefix in one call (per 1000 names)
            try:
                self.fs.invalidate_cache(self._root)  # ask the server, not a listing cached earlier
                listing = self.retried(self.url, lambda: self.fs.ls(self._root, detail=True))
                found = {posixpath.basename(e["name"].rstrip("/")): e.get("size") for e in listing}
                return {n: found.get(n) for n in names}
            except OSError:
                pass
        return self._heads(names)

    def _heads(self, names: Sequence[str]) -> dict[str, Optional[int]]:
        def size(name):
            try:
                return self.info(name).get("size")
            except FileNotFoundError:
                return None
        return dict(zip(names, self._executor().map(size, names)))

    # ------------------------------------------------------------------ samples
    def read(self, name: str, offset: int, size: int) -> bytes:
        """``size`` bytes of file ``name`` from ``offset`` (one range request, retried)."""
        return next(iter(self.read_many([(name, offset, size)])))[1]

    def read_many(self, requests: Sequence[tuple[str, int, int]]) -> Iterator[tuple[int, bytes]]:
        """(position, bytes) of each (name, offset, size) request as soon as it arrives: nearby ranges of one file
        merged, the requests in flight in parallel, each retried."""
        groups = plan_requests(requests)
        futures = {self._submit(name, start, end): (name, start, members) for name, start, end, members in groups}
        try:
            for future in as_completed(futures):
                name, start, members = futures[future]
                try:
                    data = future.result()
                except (FileNotFoundError, PermissionError) as err:
                    raise self.fail(name, err, "the shard set changed or was deleted; check the URL or make the "
                                               "shards again with make_shards") from None
                for k in members:
                    yield k, data[requests[k][1] - start:requests[k][1] - start + requests[k][2]]
        finally:
            for future in futures:
                future.cancel()

    def _submit(self, name: str, start: int, end: int) -> Future:
        """Fetch bytes [start, end) of ``name`` in the background: on the file system's own event loop when it is
        asynchronous (s3fs, gcsfs, HTTP: no thread per request), else on this process's thread pool."""
        fs = self.fs
        if getattr(fs, "async_impl", False) and getattr(fs, "loop", None) is not None:
            return asyncio.run_coroutine_threadsafe(self._range_async(name, start, end), fs.loop)
        return self._executor().submit(self._range, name, start, end)

    def _check_range(self, name: str, start: int, end: int, data: bytes) -> Optional[str]:
        if len(data) > end - start:
            raise InputError(f"{self.url_of(name)}: the server sent {len(data)} bytes for a {end - start}-byte range "
                             f"request: it ignores HTTP Range headers; serve the shards from a server that supports "
                             f"them (nginx, Apache, object storage)")
        return None if len(data) == end - start else f"short read: {len(data)} of {end - start} bytes at byte {start}"

    def _range(self, name: str, start: int, end: int) -> bytes:
        return self.retried(f"{self.url_of(name)} bytes {start}-{end - 1}",
                            lambda: self.fs.cat_file(self.path(name), start=start, end=end),
                            lambda data: self._check_range(name, start, end, data))

    async def _range_async(self, name: str, start: int, end: int) -> bytes:
        """``_range`` as a coroutine on the file system's loop: the same checks, retries and errors."""
        what, path = f"{self.url_of(name)} bytes {start}-{end - 1}", self.path(name)
        loop = asyncio.get_running_loop()
        slots = _SLOTS.get((os.getpid(), id(loop)))
        if slots is None:
            slots = _SLOTS[(os.getpid(), id(loop))] = asyncio.Semaphore(CONCURRENCY)
        for attempt in range(RETRIES):
            try:
                async with slots:
                    data = await self._get_range(name, path, start, end)
                problem = self._check_range(name, start, end, data)
                if problem is None:
                    return data
                err: BaseException = OSError(problem)
            except _NOT_TRANSIENT:
                raise
            except Exception as e:  # as in retried
                err = e
            await asyncio.sleep(_backoff(what, attempt, err))
        raise AssertionError("unreachable")

    async def _get_range(self, name: str, path: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of ``path``: a plain GET on the shard's presigned URL (S3), else the file system's own
        range read. A presigned GET answered with an error status is asked again through the file system, whose
        errors say what is wrong (refused, missing) and which signs afresh."""
        fs = self.fs
        if self._presign is None:
            self._presign = self.protocol in ("s3", "s3a") and _can_presign(fs)
        if not self._presign:
            return await fs._cat_file(path, start=start, end=end)
        import aiohttp

        signed = self._signed.get(name)
        if signed is None or time.monotonic() - signed[1] > PRESIGN_RENEW:
            try:
                signed = self._signed[name] = (await fs._url(path, expires=PRESIGN_EXPIRES), time.monotonic())
            except Exception:  # no credentials to sign with, ...: botocore's own read says what is wrong
                self._presign = False
                return await fs._cat_file(path, start=start, end=end)
        try:
            data = await _signed_http(fs)._cat_file(signed[0], start=start, end=end)
        except (aiohttp.ClientResponseError, FileNotFoundError) as err:  # expired, refused, missing, a server error
            self._signed.pop(name, None)
            if 400 <= getattr(err, "status", 404) < 500:  # 5xx: the server's trouble, not the signature's
                self._refused += 1
                if self._refused >= PRESIGN_GIVE_UP:
                    self._presign = False  # a server that takes no presigned GETs: botocore for every range from now
            return await fs._cat_file(path, start=start, end=end)
        except Exception as err:  # a dropped connection or a timeout: retried by the caller; its text without the URL
            text = hide_signature(str(err))
            if text == str(err):
                raise
            raise OSError(f"{type(err).__name__}: {text}") from None
        self._refused = 0
        return data

    # ------------------------------------------------------------------ writing
    def check_destination(self, overwrite: bool, *, marker: str, own: Callable[[str], bool], what: str) -> None:
        """Refuse a URL that cannot be written or that holds something other than ``what`` (files for which
        ``own(relative name)`` is true, e.g. a partial upload); without ``overwrite`` refuse any earlier ``what``."""
        if self.protocol in READ_ONLY:
            raise InputError(f"{self.url}: {self.protocol}:// is read-only; write the shards to s3:// or gs:// (or a "
                             f"local folder, then serve it over HTTP)")
        bucket = self.path("").split("/", 1)[0]

        def listing() -> list[str]:
            if not self.fs.exists(bucket):
                raise FileNotFoundError(bucket)
            return self.listing()
        names = self.one_line("", "fix the URL", listing)
        if not names:
            return
        if marker not in names and not all(own(n) for n in names):
            raise FileExistsError(f"{self.url} holds files and no {marker}, so it is not {what}; refusing to write "
                                  f"there even with --overwrite; choose a new prefix")
        if not overwrite:
            state = what if marker in names else f"a partial {what} (no {marker}: an upload that did not finish?)"
            raise FileExistsError(f"{self.url} already holds {state}; choose a new prefix, or pass --overwrite to "
                                  f"replace it")

    def listing(self) -> list[str]:
        """Names of every file below the folder, relative to it (asked of the server, not of a cached listing)."""
        try:
            self.fs.invalidate_cache(self._root)
            found = self.fs.find(self._root)
        except FileNotFoundError:
            return []
        prefix = self._root.rstrip("/") + "/"
        return sorted(p[len(prefix):] for p in found if p.startswith(prefix))

    def upload(self, local: Path, *, last: str, overwrite: bool, own: Callable[[str], bool],
               progress: bool = True) -> int:
        """Upload every file of ``local`` with ``last`` after all others; with ``overwrite`` delete the old
        ``last`` first and the old files that ``own`` claims and the new set lacks at the end. Returns bytes sent."""
        from tqdm import tqdm

        files = sorted(str(p.relative_to(local).as_posix()) for p in local.rglob("*") if p.is_file())
        files = [f for f in files if f != last] + [last]
        old = self.listing() if overwrite else []
        total = sum((local / f).stat().st_size for f in files)
        if last in old:  # while the upload runs, the prefix is no valid data set
            self.retried(self.url_of(last), lambda: self.fs.rm_file(self.path(last)))
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"upload to {self.url}", disable=not progress) as bar:
            for name in files:
                self.retried(self.url_of(name), lambda: self.fs.put_file(str(local / name), self.path(name)))
                bar.update((local / name).stat().st_size)
        stale = [n for n in old if own(n) and n not in files]
        if stale:
            self.retried(self.url, lambda: self.fs.rm([self.path(n) for n in stale]))
        return total
