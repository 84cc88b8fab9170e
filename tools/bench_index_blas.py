"""Probe (issue 40): does numpy's BLAS threading slow the service's searches while faces are enrolled?

    python tools/bench_index_blas.py [--size 200000] [--seconds 10] [--rounds 3]

One process: --searchers threads search a flat LiveIndex (service/live_index.py) of --size random unit faces while
one thread enrols 2 faces --rate times a second, so every search also scores the growing delta with numpy's product.
Each round runs it twice, interleaved: numpy's BLAS as it comes (all cores), then limited to one thread
(threadpoolctl). Prints searches done and p99 per run and the ratio of searches (one thread / all). docs/benchmarks.md
("Writes under searches") has what it gave.
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from facesiam.service.live_index import LiveIndex


def run(faces: np.ndarray, seconds: float, searchers: int, rate: float) -> tuple[int, float]:
    """(searches done, their p99 ms) in ``seconds`` of ``searchers`` threads beside one enrolling thread."""
    index = LiveIndex(faces.shape[1], "flat", vectors=faces, ids=np.arange(len(faces)))
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    def search(first: int) -> None:
        i = first
        while time.perf_counter() < stop:
            t = time.perf_counter()
            index.search(faces[i % 256][None], 5)
            latencies.append(time.perf_counter() - t)
            i += searchers

    def enrol() -> None:
        start, i = time.perf_counter(), 0
        while time.perf_counter() < stop:
            time.sleep(max(0.0, start + i / rate - time.perf_counter()))
            index.add(np.arange(10**9 + 2 * i, 10**9 + 2 * i + 2), faces[2 * i % 5000:2 * i % 5000 + 2])
            i += 1

    threads = [threading.Thread(target=search, args=(w,)) for w in range(searchers)]
    threads.append(threading.Thread(target=enrol))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    index.wait_merged()
    return len(latencies), float(np.percentile(latencies, 99) * 1000)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=200_000)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--searchers", type=int, default=8)
    p.add_argument("--rate", type=float, default=50.0, help="enrolments (2 faces each) per second")
    args = p.parse_args()
    faces = np.random.default_rng(0).normal(size=(args.size, 512)).astype(np.float32)
    faces /= np.linalg.norm(faces, axis=1, keepdims=True)
    blas = [f"{i['internal_api']} ({i['num_threads']} threads)" for i in threadpool_info() if i["user_api"] == "blas"]
    print(f"numpy's BLAS: {', '.join(blas) or 'none found'}; {args.size:,} faces, {args.searchers} searchers, "
          f"{args.rate:g} enrolments/s")
    done: dict[str, list[int]] = {"all": [], "one": []}
    for _ in range(args.rounds):
        for name in done:
            with threadpool_limits(1, user_api="blas") if name == "one" else contextlib.nullcontext():
                searches, p99 = run(faces, args.seconds, args.searchers, args.rate)
            done[name].append(searches)
            print(f"BLAS threads {name}: {searches} searches, p99 {p99:.0f} ms", flush=True)
    print(f"searches with one BLAS thread / all: {sum(done['one']) / max(1, sum(done['all'])):.2f}x")


if __name__ == "__main__":
    main()
