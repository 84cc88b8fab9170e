"""Benchmark: facesiam serve under load on localhost -- N concurrent clients send a fixed number of POST /verify
requests (two photos each); requests/s, p50/p99 latency and errors, with micro-batching on and off.

    python tools/bench_serve.py [--clients 16] [--requests 320] [--image-size 112] [--write-doc]

Both servers run the same randomly initialised model (throughput does not depend on the weights) at the same
time on the same cores, and the two configurations are measured interleaved (best of --repeats), so the ratio is
measured in one run. Photos: LFW JPEGs from ../shared/data when present (credited in the report), else synthetic
faces. --write-doc replaces this benchmark's section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np

from benchdoc import LFW, REPO, free_port, wait_ready, write_section

HEADING = "## Service: facesiam serve under load (micro-batching on vs off)"
TOKEN = "bench-token-0123456789abcdef"


def photos(n: int, tmp: Path) -> list[bytes]:
    if LFW.is_dir():
        files = sorted(LFW.rglob("*.jpg"))[:n]
    else:
        from facesiam.synthetic import make_synthetic_faces

        folder = make_synthetic_faces(tmp / "faces", max(1, n // 4), 4, size=112, seed=0, workers=1, progress=False)
        files = sorted(folder.rglob("*.png"))[:n]
    return [f.read_bytes() for f in files]


def start(model: Path, port: int, max_batch: int, wait_ms: float, threads: int, device: str,
          log: Path) -> subprocess.Popen:
    env = {**os.environ, "FACESIAM_TOKEN": TOKEN, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(REPO / "tools" / "serve.py"), "--checkpoint", str(model),
                             "--threshold", "0.5", "--port", str(port), "--max-batch", str(max_batch),
                             "--batch-wait-ms", str(wait_ms), "--device", device], env=env, stdout=open(log, "w"),
                            stderr=subprocess.STDOUT)


async def load(url: str, images: list[bytes], clients: int, requests: int) -> dict:
    """``clients`` connections, each sending requests back to back until ``requests`` have been sent."""
    import httpx

    latencies: list[float] = []
    errors = 0
    sent = 0

    async def client(http: httpx.AsyncClient, worker: int) -> None:
        nonlocal errors, sent
        while sent < requests:
            i = sent
            sent += 1
            files = {"image1": ("a.jpg", images[i % len(images)], "image/jpeg"),
                     "image2": ("b.jpg", images[(i * 7 + 1) % len(images)], "image/jpeg")}
            t0 = time.perf_counter()
            try:
                r = await http.post("/verify", files=files, headers={"Authorization": f"Bearer {TOKEN}"})
                ok = r.status_code == 200
            except httpx.HTTPError:
                ok = False
            latencies.append(time.perf_counter() - t0)
            errors += not ok

    auth = {"Authorization": f"Bearer {TOKEN}"}
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=clients)) as http:
        before = (await http.get("/status", headers=auth)).json()["batching"]
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http, w) for w in range(clients)))
        wall = time.perf_counter() - t0
        after = (await http.get("/status", headers=auth)).json()["batching"]
    lat = np.array(latencies) * 1000
    batches = after["batches"] - before["batches"]
    return {"wall": wall, "rps": requests / wall, "p50": float(np.percentile(lat, 50)),
            "p99": float(np.percentile(lat, 99)), "errors": errors,
            "mean_batch": (after["images"] - before["images"]) / batches if batches else 0.0}


def race_servers(servers: dict[str, tuple[str, subprocess.Popen]], images: list[bytes], clients: int, requests: int,
                 repeats: int, line: Callable[[str, dict], str]) -> dict[str, dict]:
    """Load each started server in turn, ``repeats`` times after a warm-up (shared cores drift: each sees the same
    drift); the best run of each by requests/s, printed with ``line``. The servers are stopped at the end."""
    try:
        for url, proc in servers.values():
            wait_ready(url, proc)
        for url, _ in servers.values():  # warm-up: first passes allocate
            asyncio.run(load(url, images, clients, clients * 2))
        best: dict[str, dict] = {}
        for _ in range(repeats):
            for name, (url, _) in servers.items():
                r = asyncio.run(load(url, images, clients, requests))
                print(line(name, r), flush=True)
                if name not in best or r["rps"] > best[name]["rps"]:
                    best[name] = r
        return best
    finally:
        for _, proc in servers.values():
            proc.terminate()
            proc.wait(timeout=30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="tf_efficientnetv2_b0")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=320, help="requests per measured run")
    p.add_argument("--repeats", type=int, default=2, help="best of this many interleaved runs")
    p.add_argument("--threads", type=int, default=2, help="torch threads of each server")
    p.add_argument("--max-batch", type=int, default=32, help="the batching server's --max-batch")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="the batching server's --batch-wait-ms")
    p.add_argument("--device", default="cpu", help="the servers' --device (cpu or cuda)")
    p.add_argument("--write-doc", action="store_true")
    args = p.parse_args()

    import torch

    from facesiam.config import ModelConfig
    from facesiam.model import build_model, export_model

    torch.manual_seed(0)
    cfg = ModelConfig(backbone=args.backbone, image_size=args.image_size)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = export_model(build_model(cfg), cfg, tmp / "best")
        images = photos(64, tmp)
        configs = {"batching on": args.max_batch, "batching off": 1}
        servers = {}
        for name, max_batch in configs.items():
            port = free_port()
            servers[name] = (f"http://127.0.0.1:{port}",
                             start(model, port, max_batch, args.batch_wait_ms, args.threads, args.device, tmp / f"{max_batch}.log"))
        best = race_servers(servers, images, args.clients, args.requests, args.repeats,
                            lambda name, r: f"{name}: {r['rps']:.1f} req/s, p50 {r['p50']:.0f} ms, p99 "
                                            f"{r['p99']:.0f} ms, errors {r['errors']}, mean batch {r['mean_batch']:.1f}")
    on, off = best["batching on"], best["batching off"]
    ratio = on["rps"] / off["rps"]
    print(f"batching on / off: {ratio:.2f}x requests/s")
    errors = sum(r["errors"] for r in best.values())
    if not args.write_doc:
        return
    source = ("LFW JPEGs (250x250; Labeled Faces in the Wild, Huang et al., UMass TR 07-49, 2007)" if LFW.is_dir()
              else "synthetic faces (112x112 PNG)")
    rows = "\n".join(f"| {name} | {configs[name]} | {r['rps']:.1f} | {2 * r['rps']:.1f} | {r['p50']:.0f} | "
                     f"{r['p99']:.0f} | {r['mean_batch']:.1f} | {r['errors']} |" for name, r in best.items())
    text = f"""{HEADING}

`python tools/bench_serve.py --clients {args.clients} --requests {args.requests} --write-doc`
({datetime.date.today().isoformat()}, {os.cpu_count()} cores): {args.clients} concurrent clients send
{args.requests} `POST /verify` requests (two photos each, {source}) to `facesiam serve` on localhost;
{args.backbone} at {args.image_size} px on {args.device}, random weights, {args.threads} torch threads, no alignment (an unaligned
model); both servers run at once and are measured interleaved, best of {args.repeats}.

| server | --max-batch | requests/s | images/s | p50 ms | p99 ms | mean batch | errors |
|---|---|---|---|---|---|---|---|
{rows}

**Batching on: {ratio:.2f}x the requests/s of batching off**, {errors} errors. Requests that arrive together share
one network pass (a queue with a {args.batch_wait_ms:g} ms budget, `--batch-wait-ms`), and the model runs on one worker thread
outside the event loop, so decoding and HTTP go on while it computes.
"""
    write_section(HEADING, text)
    print(f"wrote {HEADING!r} in docs/benchmarks.md")


if __name__ == "__main__":
    main()
