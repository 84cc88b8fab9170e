"""Benchmark: the service's gallery (a database + an index in memory) against the folder format it replaced, and
the service's limits -- the goals of issue 30 (tools/bench_serve.py measures batching).

    python tools/bench_serve_gallery.py [--sizes 20000 200000 1000000] [--write-doc]

1. enrol latency (2 faces, 512-d) at each gallery size: GalleryStore.enroll on SQLite (and PostgreSQL at the
   sizes up to --pg-max), against the folder format (copy + add + save whole) measured in the same run up to
   --old-max entries; delete of one identity too.
2. search p99 through a real `facesiam serve` (8 clients, POST /search with an embedding) at --serve-size entries,
   alone and while another client enrols continuously.
3. two `serve` processes on one PostgreSQL: time from an enrolment's answer on one to a search finding it on the
   other.
4. the pixel budget: a 6300 x 6300 grey PNG (51 KB) searched through a model that detects faces (MTCNN), with the
   default --max-side 2048 and without shrinking: the request's time and the server's peak memory.
5. SIGTERM under load (issue 40; alone: --restart-only): a `serve` on a --serve-size SQLite gallery (flat index),
   start to /readyz 200; 8 searching clients and one enrolling, SIGTERM half-way: requests in flight that failed,
   new ones refused (503 or connection refused), the exit status; then serve restarted on the same gallery: restart
   to /readyz 200 and acknowledged enrolments missing. Writes its own section of docs/benchmarks.md.
6. writes under searches (issue 40; alone: --writes-only): a GalleryStore (SQLite, flat index) of --writes-size
   faces in this process, --clients threads searching, alone and with a thread enrolling and deleting: enrol and
   delete p99, search p99 with vs without writes; --baseline REV measures the index of that git revision in the
   same run. Writes its own section of docs/benchmarks.md.

PostgreSQL: --pg-url, else a throw-away server started as the tests start one (facesiam/testing/postgres.py), else
skipped. Embeddings are random unit vectors (the cost of a gallery does not depend on what they encode).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchdoc import REPO, free_port, process_cpu_seconds, wait_ready, write_section

sys.path.insert(0, str(REPO))
HEADING = "## Service gallery: a database and an index changed in place (issue 30)"
RESTART_HEADING = "## Service restarts: SIGTERM under load, restart to ready (issue 40)"
WRITES_HEADING = "## Service gallery: writes that never wait for searches (issue 40)"
EMPTY = {"median": float("nan"), "p99": float("nan"), "max": float("nan"), "n": 0}
TOKEN = "bench-token-0123456789abcdef"
DIM = 512


def unit(rng, n: int) -> np.ndarray:
    x = rng.standard_normal((n, DIM), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fill(db, n: int, rng, chunk: int = 50_000) -> None:
    """n faces of n/4 identities, written in bulk."""
    for start in range(0, n, chunk):
        m = min(chunk, n - start)
        db.add_many([f"p{(start + i) // 4}" for i in range(m)], unit(rng, m), ["import"] * m, "bench")


def stats(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"median": float(np.median(a)), "p99": float(np.percentile(a, 99)), "max": float(a.max()), "n": len(a)}


def enrol_latency(target: str, n: int, rng, repeats: int) -> dict:
    from facesiam.service.database import open_database
    from facesiam.service.store import GalleryStore

    db = open_database(target, DIM)
    t0 = time.perf_counter()
    fill(db, n, rng)
    fill_s = time.perf_counter() - t0
    db.close()
    t0 = time.perf_counter()
    store = GalleryStore(open_database(target, DIM), model="bench")
    load_s = time.perf_counter() - t0
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        store.enroll(f"new{i}", unit(rng, 2), ["upload", "upload"])
        times.append((time.perf_counter() - t) * 1000)
    t = time.perf_counter()
    store.delete("p7")
    delete_ms = (time.perf_counter() - t) * 1000
    store.close()
    return {**stats(times), "fill_s": fill_s, "load_s": load_s, "delete_ms": delete_ms}


def old_enrol_latency(folder: Path, n: int, rng, repeats: int) -> dict:
    """The folder format as the service used it before: copy the gallery, add, save it whole (staged + swapped)."""
    from facesiam.eval.gallery import Gallery

    gallery = Gallery.build(unit(rng, n), [f"p{i // 4}" for i in range(n)], ["import"] * n)
    gallery.save(folder)
    times = []
    for i in range(repeats):
        t = time.perf_counter()
        new = gallery.copy()
        new.add(unit(rng, 2), [f"new{i}"] * 2, ["upload"] * 2)
        new.save(folder)
        gallery = new
        times.append((time.perf_counter() - t) * 1000)
    return stats(times)


def start_server(args: list[str], port: int, log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "tools" / "serve.py"), "--port", str(port), *args],
                            env={**os.environ, "FACESIAM_TOKEN": TOKEN, "PYTHONPATH": str(REPO), **env},
                            stdout=open(log, "w"), stderr=subprocess.STDOUT)


async def search_load(url: str, clients: int, seconds: float, enrol: bool, rng) -> dict:
    import httpx

    auth = {"Authorization": f"Bearer {TOKEN}"}
    queries = unit(rng, 256).tolist()
    latencies: list[float] = []
    enrolled = 0
    stop = time.perf_counter() + seconds

    async def searcher(http, w):
        i = w
        while time.perf_counter() < stop:
            t = time.perf_counter()
            r = await http.post("/search", json={"embedding": queries[i % len(queries)], "k": 5}, headers=auth)
            assert r.status_code == 200, r.text
            latencies.append((time.perf_counter() - t) * 1000)
            i += clients

    async def enroller(http):
        nonlocal enrolled
        while time.perf_counter() < stop:
            r = await http.post("/enroll", json={"identity": f"e{enrolled}", "embeddings": unit(rng, 2).tolist()},
                                headers=auth)
            assert r.status_code == 200, r.text
            enrolled += 1

    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=clients + 1)) as http:
        tasks = [searcher(http, w) for w in range(clients)] + ([enroller(http)] if enrol else [])
        await asyncio.gather(*tasks)
    return {**stats(latencies), "searches": len(latencies), "enrols": enrolled}


def serve_under_enrolment(model: Path, target: str, n: int, clients: int, seconds: float, rng, tmp: Path) -> dict:
    from facesiam.service.database import open_database

    db = open_database(target, DIM)
    fill(db, n, rng)
    db.close()
    port = free_port()
    proc = start_server(["--checkpoint", str(model), "--gallery", str(Path(target).parent), "--threshold", "0.5",
                         "--device", "cpu"], port, tmp / "search.log", {"OMP_NUM_THREADS": "2"})
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, proc, timeout=600)
        asyncio.run(search_load(url, clients, 2, False, rng))  # warm-up
        alone, during = [], []
        for _ in range(2):  # interleaved, so a change of the machine's speed hits both
            alone.append(asyncio.run(search_load(url, clients, seconds, False, rng)))
            during.append(asyncio.run(search_load(url, clients, seconds, True, rng)))
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    best = lambda runs: min(runs, key=lambda r: r["p99"])  # noqa: E731
    return {"alone": best(alone), "during": best(during)}


def follow_latency(model: Path, url_db: str, trials: int, rng, tmp: Path) -> dict:
    import httpx

    ports = [free_port(), free_port()]
    procs = [start_server(["--checkpoint", str(model), "--db", url_db, "--threshold", "0.5", "--device", "cpu"], port,
                          tmp / f"follow{i}.log", {"OMP_NUM_THREADS": "1"}) for i, port in enumerate(ports)]
    a, b = (f"http://127.0.0.1:{p}" for p in ports)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    seen = []
    try:
        for url, proc in zip((a, b), procs):
            wait_ready(url, proc)
        with httpx.Client(timeout=60) as http:
            for i in range(trials):
                x = unit(rng, 1)
                r = http.post(a + "/enroll", json={"identity": f"f{i}", "embeddings": x.tolist()}, headers=auth)
                assert r.status_code == 200, r.text
                t = time.perf_counter()
                while http.post(b + "/search", json={"embedding": x[0].tolist(), "k": 1},
                                headers=auth).json()["identity"] != f"f{i}":
                    if time.perf_counter() - t > 30:
                        raise SystemExit("the second server never saw the enrolment")
                seen.append((time.perf_counter() - t) * 1000)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=60)
    return stats(seen)


def pixel_budget(tmp: Path) -> dict:
    """A 6300 x 6300 grey PNG through a server whose model detects faces: shrunk to --max-side or not."""
    import httpx
    import torch
    from PIL import Image

    from facesiam.config import ModelConfig
    from facesiam.faces.aligner import FaceAligner, alignment_info
    from facesiam.model import build_model, export_model

    torch.manual_seed(0)
    cfg = ModelConfig(backbone="test_efficientnet", embedding_dim=32, image_size=64)
    model = export_model(build_model(cfg), cfg, tmp / "aligned", alignment=alignment_info(FaceAligner()))
    png = tmp / "grey.png"
    Image.new("L", (6300, 6300), 128).save(png, optimize=True)
    raw = png.read_bytes()
    out = {"bytes": len(raw)}
    for name, side in (("--max-side 2048 (default)", 2048), ("not shrunk", 100_000)):
        port = free_port()
        proc = start_server(["--checkpoint", str(model), "--threshold", "0.5", "--device", "cpu", "--max-side",
                             str(side)], port, tmp / f"pixels{side}.log", {"OMP_NUM_THREADS": "2"})
        url = f"http://127.0.0.1:{port}"
        try:
            wait_ready(url, proc)
            before = peak_rss_mb(proc.pid)
            t = time.perf_counter()
            r = httpx.post(url + "/search", files={"image": ("grey.png", raw, "image/png")},
                           headers={"Authorization": f"Bearer {TOKEN}"}, timeout=300)
            seconds = time.perf_counter() - t
            out[name] = {"status": r.status_code, "seconds": seconds, "peak_growth_mb": peak_rss_mb(proc.pid) - before}
            print(f"pixel budget, {name}: {r.status_code} in {seconds:.2f} s, peak memory +"
                  f"{out[name]['peak_growth_mb']:.0f} MB", flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return out


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def postgres(args, tmp: Path):
    """(a server URL to create databases on, a stop function), or (None, None) when none can run."""
    if args.pg_url:
        return args.pg_url, lambda: None
    try:
        from facesiam.testing.postgres import start_postgres

        server = start_postgres(tmp / "pg")
    except Exception as err:  # no binaries, no psycopg: the PostgreSQL rows are left out
        print(f"PostgreSQL rows skipped: {err}", flush=True)
        return None, None
    return server.url(), server.stop


def new_pg_database(server_url: str) -> str:
    from facesiam.testing.postgres import create_database

    return create_database(server_url)


def until_ready(url: str, proc: subprocess.Popen, t0: float, timeout: float = 600) -> tuple[float, float]:
    """(seconds from ``t0``, the process's start, to GET /readyz answering 200; the CPU seconds the process used by
    then: on a busy machine the wall time grows with the load, its CPU time much less)."""
    wait_ready(url, proc, timeout, path="/readyz", poll=0.05)
    return time.perf_counter() - t0, process_cpu_seconds(proc.pid)


async def load_until_exit(url: str, proc: subprocess.Popen, clients: int, signal_after: float, rng) -> dict:
    """``clients`` searchers and one enroller until the server has exited; SIGTERM after ``signal_after`` seconds.
    Every request is (start, end, outcome) against the signal's time."""
    import signal

    import httpx

    auth = {"Authorization": f"Bearer {TOKEN}"}
    queries = unit(rng, 256).tolist()
    calls: list[tuple[float, float, str, object]] = []  # (start, end, kind, status code or error name)
    acknowledged: list[str] = []
    sent_at: list[float] = []

    async def client(http, kind: str, w: int):
        i = w
        while proc.poll() is None:
            t = time.perf_counter()
            try:
                if kind == "search":
                    r = await http.post("/search", json={"embedding": queries[i % len(queries)], "k": 5},
                                        headers=auth)
                else:
                    name = f"sig{i}"
                    r = await http.post("/enroll", json={"identity": name, "embeddings": unit(rng, 2).tolist()},
                                        headers=auth)
                    if r.status_code == 200:
                        acknowledged.append(name)
                outcome = r.status_code
            except httpx.TransportError as err:
                outcome = type(err).__name__
            calls.append((t, time.perf_counter(), kind, outcome))
            if not isinstance(outcome, int):
                await asyncio.sleep(0.01)  # refused: the socket is closed, the process about to end
            i += clients + 1

    async def terminate():
        await asyncio.sleep(signal_after)
        sent_at.append(time.perf_counter())
        proc.send_signal(signal.SIGTERM)

    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=clients + 1)) as http:
        await asyncio.gather(*[client(http, "search", w) for w in range(clients)], client(http, "enrol", clients),
                             terminate())
    t_sig = sent_at[0]
    before = [c for c in calls if c[0] < t_sig]
    after = [c for c in calls if c[0] >= t_sig]
    # sent before the signal: answered (200), refused because they reached the server after it (503), or failed
    return {"t_signal": t_sig, "acknowledged": acknowledged, "requests": len(calls),
            "in_flight": sum(1 for c in before if c[1] > t_sig),
            "before_503": sum(1 for c in before if c[3] == 503),
            "failed_before": sum(1 for c in before if c[3] not in (200, 503)),
            "after_ok": sum(1 for c in after if c[3] == 200), "after_503": sum(1 for c in after if c[3] == 503),
            "after_refused": sum(1 for c in after if not isinstance(c[3], int)),
            "after_other": sum(1 for c in after if isinstance(c[3], int) and c[3] not in (200, 503))}


def restart_under_load(model: Path, n: int, clients: int, seconds: float, rng, tmp: Path) -> dict:
    """Start, SIGTERM under load, restart on the same gallery (SQLite, flat index): the times to ready and what the
    clients saw."""
    import httpx

    from facesiam.service.database import open_database

    folder = tmp / "restart"
    db = open_database(str(folder / "gallery.sqlite"), DIM)
    fill(db, n, rng)
    db.close()
    args = ["--checkpoint", str(model), "--gallery", str(folder), "--threshold", "0.5", "--device", "cpu"]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    proc = start_server(args, port, tmp / "restart1.log", {"OMP_NUM_THREADS": "2"})
    try:
        first_ready, first_cpu = until_ready(url, proc, t0)
        seen = asyncio.run(load_until_exit(url, proc, clients, seconds, rng))
        status = proc.wait(timeout=120)
        stop_s = time.perf_counter() - seen["t_signal"]
    finally:
        if proc.poll() is None:
            proc.kill()
    t0 = time.perf_counter()
    proc = start_server(args, port, tmp / "restart2.log", {"OMP_NUM_THREADS": "2"})
    try:
        ready, ready_cpu = until_ready(url, proc, t0)
        r = httpx.get(url + "/identities", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=300)
        have = {i["name"]: i["images"] for i in r.json()["identities"]}
        lost = sum(1 for name in seen["acknowledged"] if have.get(name) != 2)
        proc.terminate()
        second_status = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return {**seen, "acknowledged": len(seen["acknowledged"]), "lost": lost, "exit_status": status,
            "second_exit_status": second_status, "first_ready_s": first_ready, "restart_ready_s": ready,
            "first_ready_cpu_s": first_cpu, "restart_ready_cpu_s": ready_cpu, "stop_s": stop_s, "faces": n,
            "load": os.getloadavg()[0]}


def bench_model(tmp: Path) -> Path:
    """The served model: tf_efficientnetv2_b0 at 112 px, random weights (its load is part of a start)."""
    import torch

    from facesiam.config import ModelConfig
    from facesiam.model import build_model, export_model

    torch.manual_seed(0)
    return export_model(build_model(ModelConfig(backbone="tf_efficientnetv2_b0", image_size=112)),
                        ModelConfig(backbone="tf_efficientnetv2_b0", image_size=112), tmp / "model")


def run_restart(args, rng, tmp: Path, model: Path) -> dict:
    r = restart_under_load(model, args.serve_size, args.clients, args.restart_after, rng, tmp)
    print(f"restart at {r['faces']:,} faces: start to ready {r['first_ready_s']:.1f} s ({r['first_ready_cpu_s']:.1f} "
          f"CPU s); SIGTERM with {r['in_flight']} request(s) sent before it unanswered: {r['failed_before']} failed, "
          f"{r['before_503']} answered 503; exit status {r['exit_status']}, stopped in {r['stop_s']:.1f} s; after it "
          f"{r['after_503']} answered 503, {r['after_refused']} refused, {r['after_ok']} answered 200; restart to "
          f"ready {r['restart_ready_s']:.1f} s ({r['restart_ready_cpu_s']:.1f} CPU s); {r['lost']} of "
          f"{r['acknowledged']} acknowledged enrolments lost (load average {r['load']:.1f})", flush=True)
    return r


def write_restart_doc(r: dict) -> None:
    rows = [("process start to `/readyz` 200 (first start): wall / CPU of the process",
             f"{r['first_ready_s']:.1f} s / {r['first_ready_cpu_s']:.1f} s"),
            ("**restart to `/readyz` 200** (goal: at most 15 s): wall / CPU of the process",
             f"**{r['restart_ready_s']:.1f} s** / {r['restart_ready_cpu_s']:.1f} s"),
            ("sent before SIGTERM, unanswered then / of them failed / answered 503 (reached the server after it)",
             f"{r['in_flight']} / **{r['failed_before']}** / {r['before_503']}"),
            ("sent after SIGTERM: 503 / connection refused / 200",
             f"{r['after_503']} / {r['after_refused']} / {r['after_ok']}"),
            ("exit status / SIGTERM to exit", f"{r['exit_status']} / {r['stop_s']:.1f} s"),
            ("acknowledged enrolments / missing after the restart", f"{r['acknowledged']} / **{r['lost']}**")]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    text = f"""{RESTART_HEADING}

`python tools/bench_serve_gallery.py --restart-only --write-doc` ({datetime.date.today().isoformat()},
{os.cpu_count()} cores): `facesiam serve` on a SQLite gallery of {r['faces']:,} random 512-d faces (flat index;
model tf_efficientnetv2_b0 from a checkpoint, on the CPU), 8 clients searching and one enrolling, SIGTERM after a
few seconds of load (service/lifecycle.py: new requests 503, those in flight finish, the database closed), then
`serve` started again on the same gallery:

| | |
|---|---|
{table}

The machine's load average was {r['load']:.1f} on {os.cpu_count()} cores (other work running): the wall times grow
with it, the process's CPU time much less. A start is importing torch and the service, loading the model, reading
every face from SQLite and building the index. Requests sent after the signal are answered 503 while those in
flight finish (a 200 there: sent in the same instant as the signal, before the server handled it), then refused
once the socket is closed.
"""
    write_section(RESTART_HEADING, text)
    print(f"wrote {RESTART_HEADING!r} in docs/benchmarks.md")


def index_class_from(rev: str):
    """The service's LiveIndex as it was at git revision ``rev`` (read with `git show`, nothing checked out): the
    baseline of a before/after comparison in one run."""
    import importlib.util

    source = subprocess.run(["git", "show", f"{rev}:facesiam/service/live_index.py"], cwd=REPO, check=True,
                            capture_output=True, text=True, timeout=60).stdout
    spec = importlib.util.spec_from_loader("facesiam.service._live_index_" + rev.replace("~", "_"), loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "facesiam.service"
    exec(compile(source, f"{rev}:facesiam/service/live_index.py", "exec"), module.__dict__)  # noqa: S102
    cls = module.LiveIndex
    if not hasattr(cls, "wait_merged"):  # what today's store calls on close
        cls.wait_merged = lambda self, timeout=None: None
    return cls


def store_load(store, clients: int, seconds: float, write: bool, rng, full: bool = False,
               write_rate: float = 0.0) -> dict:
    """``clients`` threads searching the store (top 5, one query each) for ``seconds``, with or without one more
    thread writing continuously (enrol 2 faces; every 4th write deletes one of the gallery's identities) and, for
    an index that merges, one merge half-way (far more often than its every 4,096 faces: the worst case; ``full``:
    a merge that folds the whole index, as the service does once per ~64k enrolments at 200k faces; ``write_rate``:
    writes a second, 0: one after the other as fast as they complete)."""
    import threading

    queries = unit(rng, 256)
    searches: list[float] = []
    enrols: list[float] = []
    deletes: list[float] = []
    stop = time.perf_counter() + seconds

    def searcher(w: int):
        i = w
        while time.perf_counter() < stop:
            t = time.perf_counter()
            store.search(queries[i % len(queries)][None], 5)
            searches.append((time.perf_counter() - t) * 1000)
            i += clients

    def writer():
        i = 0
        start = time.perf_counter()
        while time.perf_counter() < stop:
            if write_rate:  # paced: the i-th write starts at i / rate, whatever the earlier ones took
                time.sleep(max(0.0, start + i / write_rate - time.perf_counter()))
            t = time.perf_counter()
            if i % 4 == 1:
                store.delete(f"p{int(rng.integers(store.size // 4))}")
                deletes.append((time.perf_counter() - t) * 1000)
            else:
                store.enroll(f"w{time.monotonic_ns()}", unit(rng, 2), ["upload", "upload"])
                enrols.append((time.perf_counter() - t) * 1000)
            i += 1

    merged: list[float] = []

    def merge():  # one merge of the index's delta half-way: its cost lands on the searches
        lower = getattr(sys.modules.get(type(store._index).__module__), "_lower_priority", None)  # noqa: SLF001
        if lower:  # as the service's own merger thread runs (the baseline's module, not in sys.modules, had none)
            lower()
        time.sleep(seconds / 2)
        t = time.perf_counter()
        # the store merges on its own every 4,096 faces; here on purpose
        store._index.merge(full=True) if full else store._index.merge()  # noqa: SLF001  (baseline: no ``full``)
        merged.append(time.perf_counter() - t)

    threads = [threading.Thread(target=searcher, args=(w,)) for w in range(clients)]
    threads += [threading.Thread(target=writer)] if write else []
    threads += [threading.Thread(target=merge)] if write and hasattr(store._index, "merge") else []
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"search": stats(searches), "enrol": stats(enrols) if enrols else None,
            "delete": stats(deletes) if deletes else None, "merge_s": max(merged, default=float("nan"))}


FULL = "now, folding everything"


def writes_under_searches(target: str, n: int, clients: int, seconds: float, rng, baseline: str | None,
                          rounds: int = 2, write_rate: float = 0.0) -> dict:
    """Part 6 (issue 40): search p99 alone and with a writer, enrol / delete p99 under ``clients`` searching
    threads, in-process on a SQLite gallery of ``n`` faces (flat index); with ``baseline`` also for the index of
    that git revision, interleaved with today's (each on its own copy of the gallery)."""
    from facesiam.service import store as store_module
    from facesiam.service.database import open_database

    db = open_database(target, DIM)
    fill(db, n, rng)
    db.close()
    variants = {"now": store_module.LiveIndex, FULL: store_module.LiveIndex}
    if baseline:
        variants[baseline] = index_class_from(baseline)
    stores = {}
    for name, cls in variants.items():
        copy = Path(target).with_name(f"{name}.sqlite")
        shutil.copy(target, copy)
        store_module.LiveIndex, keep = cls, store_module.LiveIndex
        try:
            stores[name] = store_module.GalleryStore(open_database(str(copy), DIM), model="bench")
        finally:
            store_module.LiveIndex = keep
    runs: dict = {name: {"alone": [], "during": []} for name in stores}
    try:
        for name, store in stores.items():
            store_load(store, clients, 2, False, rng)  # warm-up
        for _ in range(rounds):  # interleaved, so a change of the machine's speed hits every variant alike
            for name, store in stores.items():
                runs[name]["alone"].append(store_load(store, clients, seconds, False, rng))
                runs[name]["during"].append(store_load(store, clients, seconds, True, rng, full=name == FULL,
                                                          write_rate=write_rate))
    finally:
        for store in stores.values():
            store.close()
    out = {}
    for name, r in runs.items():
        alone = min(r["alone"], key=lambda x: x["search"]["p99"])
        during = min(r["during"], key=lambda x: x["search"]["p99"])
        worst = {op: max((x[op] for x in r["during"] if x[op]), key=lambda x: x["p99"], default=EMPTY)
                 for op in ("enrol", "delete")}  # the worse of the two runs: a goal is a ceiling
        out[name] = {"alone": alone["search"], "during": during["search"], **worst,
                     "ratio": during["search"]["p99"] / alone["search"]["p99"],
                     "merge_s": max(x["merge_s"] for x in r["during"]),
                     "writes_per_s": float(np.mean([(x["enrol"]["n"] + x["delete"]["n"]) / seconds
                                                    for x in r["during"]]))}
        print(f"{name}: at {n:,} faces, {clients} searching threads: enrol p99 {out[name]['enrol']['p99']:.1f} ms "
              f"(median {out[name]['enrol']['median']:.1f}), delete p99 {out[name]['delete']['p99']:.1f} ms; search "
              f"p99 {alone['search']['p99']:.0f} ms alone, {during['search']['p99']:.0f} ms with writes: "
              f"{out[name]['ratio']:.2f}x; {out[name]['writes_per_s']:.0f} writes/s; a merge took "
              f"{out[name]['merge_s']:.1f} s", flush=True)
    if baseline:
        base, now = out[baseline], out["now"]
        print(f"vs {baseline}: enrol p99 {base['enrol']['p99'] / now['enrol']['p99']:.0f}x lower, delete p99 "
              f"{base['delete']['p99'] / now['delete']['p99']:.0f}x lower, search p99 alone "
              f"{now['alone']['p99'] / base['alone']['p99']:.2f}x the baseline's", flush=True)
    return {"n": n, "clients": clients, "seconds": seconds, "baseline": baseline, "rounds": rounds,
            "write_rate": write_rate, **out}


def write_writes_doc(r: dict) -> None:
    def row(name: str) -> str:
        x = r[name]
        label = name if name in ("now", FULL) else f"`{name}`"
        return (f"| {label} | {x['enrol']['median']:.1f} | **{x['enrol']['p99']:.1f}** | {x['delete']['p99']:.1f} | "
                f"{x['alone']['p99']:.0f} | {x['during']['p99']:.0f} | **{x['ratio']:.2f}x** |")

    names = ["now", FULL] + ([r["baseline"]] if r["baseline"] else [])
    table = "\n".join(row(name) for name in names)
    baseline = (f"; the baseline is the index of git revision `{r['baseline']}`, measured in the same run on its own "
                "copy of the gallery") if r["baseline"] else ""
    command_baseline = f" --baseline {r['baseline']}" if r["baseline"] else ""
    command_baseline += f" --write-rate {r['write_rate']:g}" if r["write_rate"] else ""
    rate = (f"{r['write_rate']:g} writes a second" if r["write_rate"] else
            f"each write as soon as the last completed: {r['now']['writes_per_s']:.0f} a second")
    text = f"""{WRITES_HEADING}

`python tools/bench_serve_gallery.py --writes-only --seconds {r['seconds']:g} --rounds {r['rounds']}{command_baseline}`
({datetime.date.today().isoformat()}, {os.cpu_count()} cores): a GalleryStore on SQLite with {r['n']:,} random
512-d faces (flat index), {r['clients']} threads searching (top 5) for {r['seconds']:g} s, alone and with one more
thread writing ({rate}; 2-face enrolments; every 4th write deletes an identity of 4 faces), interleaved, best
of {r['rounds']} by search p99 (writes: the worst of the {r['rounds']}){baseline}:

| index | enrol median ms | enrol p99 ms | delete p99 ms | search p99 alone ms | with writes ms | ratio |
|---|---|---|---|---|---|---|
{table}

Goals (issue 40): enrol p99 at most 20 ms under 8 searching clients at 200k faces; search p99 with writes within
1.2x of without. A write appends to the index's delta (or hides a face) under a lock held for microseconds, and
a merge, off the request path on a thread of lower CPU priority (service/live_index.py), turns the delta into a
small index of its own (a tail) beside the gallery's; each run with writes forces one half-way
({r['now']['merge_s']:.2f} s; the service merges once per 4,096 faces), so its cost is in the search p99 above.
Once the tails pass a quarter of the gallery (~64k enrolments at 200k faces) a merge copies everything into one
new index: the row "{FULL}" forces that one half-way instead ({r[FULL]['merge_s']:.1f} s). The baseline's every
merge was such a copy. No lock is involved: an enrolment's time is its SQLite transaction (~0.4 ms of work around an
fsync), the catch-up, and how soon its thread gets a core back after each time it sleeps, beside 8 threads busy in
FAISS (which runs without the GIL) on the cores.
"""
    write_section(WRITES_HEADING, text)
    print(f"wrote {WRITES_HEADING!r} in docs/benchmarks.md")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[20_000, 200_000, 1_000_000])
    p.add_argument("--old-max", type=int, default=200_000, help="largest size measured in the folder format")
    p.add_argument("--pg-max", type=int, default=200_000, help="largest size measured on PostgreSQL")
    p.add_argument("--repeats", type=int, default=100, help="enrolments measured per size (folder format: 5)")
    p.add_argument("--serve-size", type=int, default=200_000, help="gallery size of the search-under-enrolment run")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--seconds", type=float, default=15, help="length of each search run")
    p.add_argument("--trials", type=int, default=20, help="enrolments timed from one server to the other")
    p.add_argument("--pg-url", help="a PostgreSQL server URL to create databases on (default: start one)")
    p.add_argument("--restart-after", type=float, default=5, help="seconds of load before the SIGTERM (part 5)")
    p.add_argument("--restart-only", action="store_true", help="only part 5 (SIGTERM under load, restart to ready)")
    p.add_argument("--writes-only", action="store_true", help="only part 6 (writes under searches)")
    p.add_argument("--writes-size", type=int, default=200_000, help="gallery size of part 6")
    p.add_argument("--baseline", help="part 6: also measure the index of this git revision (e.g. HEAD)")
    p.add_argument("--rounds", type=int, default=2, help="part 6: interleaved rounds (best search p99 of them)")
    p.add_argument("--write-rate", type=float, default=0.0,
                   help="part 6: writes a second (default 0: each as soon as the last one completed)")
    p.add_argument("--write-doc", action="store_true")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-gallery-"))
    if args.writes_only:
        try:
            writes = writes_under_searches(str(tmp / "writes" / "gallery.sqlite"), args.writes_size, args.clients,
                                           args.seconds, rng, args.baseline, args.rounds, args.write_rate)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if args.write_doc:
            write_writes_doc(writes)
        return
    if args.restart_only:
        try:
            restart = run_restart(args, rng, tmp, bench_model(tmp))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if args.write_doc:
            write_restart_doc(restart)
        return
    os.chmod(tmp, 0o755)  # a throw-away PostgreSQL server runs as its own user below it
    pg_server, pg_stop = postgres(args, tmp)
    rows, old = [], {}
    try:
        for n in args.sizes:
            r = enrol_latency(str(tmp / f"s{n}" / "gallery.sqlite"), n, rng, args.repeats)
            shutil.rmtree(tmp / f"s{n}")
            rows.append(("SQLite", n, r))
            print(f"SQLite {n:,}: enrol median {r['median']:.2f} ms, p99 {r['p99']:.2f}, max {r['max']:.1f}; delete "
                  f"{r['delete_ms']:.0f} ms; filled in {r['fill_s']:.0f} s, loaded in {r['load_s']:.1f} s", flush=True)
            if pg_server and n <= args.pg_max:
                r = enrol_latency(new_pg_database(pg_server), n, rng, args.repeats)
                rows.append(("PostgreSQL", n, r))
                print(f"PostgreSQL {n:,}: enrol median {r['median']:.2f} ms, p99 {r['p99']:.2f}, max {r['max']:.1f}; "
                      f"delete {r['delete_ms']:.0f} ms; loaded in {r['load_s']:.1f} s", flush=True)
            if n <= args.old_max:
                old[n] = old_enrol_latency(tmp / f"old{n}", n, rng, 5)
                shutil.rmtree(tmp / f"old{n}")
                print(f"folder format {n:,}: enrol median {old[n]['median']:.0f} ms", flush=True)
        model = bench_model(tmp)
        serve = serve_under_enrolment(model, str(tmp / "served" / "gallery.sqlite"), args.serve_size, args.clients,
                                      args.seconds, rng, tmp)
        print(f"search p99 at {args.serve_size:,}: alone {serve['alone']['p99']:.0f} ms, during enrolment "
              f"{serve['during']['p99']:.0f} ms ({serve['during']['enrols']} enrolments)", flush=True)
        follow = follow_latency(model, new_pg_database(pg_server), args.trials, rng, tmp) if pg_server else None
        if follow:
            print(f"second server finds an enrolment after: median {follow['median']:.0f} ms, max "
                  f"{follow['max']:.0f} ms", flush=True)
        pixels = pixel_budget(tmp)
        restart = run_restart(args, rng, tmp, model)
        writes = writes_under_searches(str(tmp / "writes" / "gallery.sqlite"), args.writes_size, args.clients,
                                       args.seconds, rng, args.baseline)
    finally:
        if pg_stop:
            pg_stop()
        shutil.rmtree(tmp, ignore_errors=True)
    if args.write_doc:
        write_doc(args, rows, old, serve, follow, pixels)
        write_restart_doc(restart)
        write_writes_doc(writes)


def write_doc(args, rows, old, serve, follow, pixels) -> None:
    def row(kind: str, n: int, r: dict) -> str:
        before = old.get(n) if kind == "SQLite" else None
        then = f"{before['median']:.0f} | {before['median'] / r['median']:,.0f}x" if before else "- | -"
        return (f"| {kind} | {n:,} | {r['median']:.2f} | {r['p99']:.2f} | {r['max']:.1f} | {then} | "
                f"{r['delete_ms']:.0f} | {r['load_s']:.1f} |")

    table = "\n".join(row(*r) for r in rows)
    biggest = max(n for _, n, _ in rows)
    worst = max(r["p99"] for kind, n, r in rows if n == biggest)
    ratio = serve["during"]["p99"] / serve["alone"]["p99"]
    follow_text = (f"median **{follow['median']:.0f} ms**, max {follow['max']:.0f} ms over {follow['n']} enrolments "
                   f"(goal: within 1 s)" if follow else "not measured (no PostgreSQL here)")
    shrunk, whole = pixels["--max-side 2048 (default)"], pixels["not shrunk"]
    text = f"""{HEADING}

`python tools/bench_serve_gallery.py --write-doc` ({datetime.date.today().isoformat()}, {os.cpu_count()} cores; random
512-d unit embeddings, a quarter as many identities as faces).

**Enrol** (2 faces: one database transaction, then an in-place add to the index) against the folder format the
service used before (copy the gallery, add, save it whole), measured in the same run; delete = one identity's 4 faces;
load = reading the database and building the index at start:

| database | faces | enrol median ms | p99 ms | max ms | folder format ms | speed-up | delete ms | load s |
|---|---|---|---|---|---|---|---|---|
{table}

At {biggest:,} faces an enrol's p99 is **{worst:.1f} ms** (goal: at most 20 ms). The occasional max is the index's
SQLite's WAL checkpoint or the index growing its room (by a quarter, ahead of need: a copy of every vector once
per N/4 enrolments; FAISS's own doubling would put a 2 GB copy on one enrolment at a million). A delete on the
flat index compacts its array (O(N), in C++); IVF removes in place, HNSW hides removed faces until the next start.

**Search while enrolling**: `facesiam serve` with {args.serve_size:,} faces (SQLite, flat index), {args.clients}
clients sending `POST /search` with an embedding for {args.seconds:g} s, alone and while one more client enrols
continuously ({serve['during']['enrols']} enrolments), interleaved, best of 2:
p99 {serve['alone']['p99']:.0f} ms alone vs {serve['during']['p99']:.0f} ms during enrolment: **{ratio:.2f}x** (goal:
within 1.2x); medians {serve['alone']['median']:.0f} vs {serve['during']['median']:.0f} ms. The searches are CPU-bound
here (exact search, {args.clients} at a time on {os.cpu_count()} cores); an enrolment waits for the search holding the
index, never the other way round.

**Two `serve` processes on one PostgreSQL** (LISTEN/NOTIFY, then a catch-up by change number): from the answer to
an enrolment on one to a search on the other finding it: {follow_text}.

**Pixel budget**: a {pixels['bytes'] / 1000:.0f} KB 6300 x 6300 grey PNG sent to `/search` of a server whose model
detects faces (MTCNN): with the default `--max-side 2048` the photo is shrunk before detection:
{shrunk['seconds']:.1f} s and +{shrunk['peak_growth_mb']:.0f} MB peak memory (status {shrunk['status']}: no face);
not shrunk: {whole['seconds']:.1f} s and +{whole['peak_growth_mb']:.0f} MB (the attack report: 12 s and 1.9 GB).
Decoding runs in a worker thread, so `/healthz` and other requests go on meanwhile.
"""
    write_section(HEADING, text)
    print(f"wrote {HEADING!r} in docs/benchmarks.md")


if __name__ == "__main__":
    main()
