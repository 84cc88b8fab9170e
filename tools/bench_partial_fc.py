"""Benchmark: Partial FC (facesiam/partial_fc.py) against the data-parallel margin loss -- memory per rank and step
time at 100k and 1M identities, 512-d, on 1 and 2 CPU processes (gloo), and a memory model for 8 and 64 ranks.

    python tools/bench_partial_fc.py [--classes 100000 1000000] [--batch 128] [--rate 0.1] [--write-doc]

Each rank runs ArcFace (PML's, through facesiam.losses.Criterion) on a batch of random embeddings: forward, backward
and an AdamW step of the class centres (the trunk is the same in both and left out). Memory per rank is the peak
resident memory's growth over the process's size before the loss was built (weights, gradients, AdamW state and
temporaries, logits and theirs). The model, per rank:

    F + β D x centres on the rank + 4 L x logits of the rank
    data parallel: C centres, b C logits          Partial FC: ceil(C/W) centres, W b x rate ceil(C/W) logits

with b the per-rank batch; F, β and L (one for each method) are fitted by least squares on every measurement of
this run, which the table sets beside the model's value, before the model is used for W = 8 and 64.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from benchdoc import REPO, write_section

sys.path.insert(0, str(REPO))
HEADING = "## Partial FC: class centres sharded across ranks (issue 31)"
DIM = 512


def peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _worker(rank: int, world: int, init: str, classes: int, rate: float, batch: int, steps: int, device: str,
            out) -> None:
    import torch
    import torch.distributed as dist

    from facesiam.config import LossConfig
    from facesiam.losses import Criterion

    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    torch.manual_seed(rank)
    cuda = device == "cuda"
    base = torch.cuda.memory_allocated() / 2**20 if cuda else rss_mb()
    crit = Criterion(LossConfig(loss="arcface", margin=None, scale=None, partial_fc=rate), DIM, classes).to(device)
    opt = torch.optim.AdamW(crit.parameters(), lr=1e-3)
    times = []
    for step in range(steps + 1):  # the first step allocates the AdamW state: not timed
        emb = torch.randn(batch, DIM, device=device, requires_grad=True)
        labels = torch.randint(0, classes, (batch,), device=device)
        t = time.perf_counter()
        loss, _ = crit(emb, labels)
        loss.backward()
        if world > 1 and not rate:  # data parallel: every rank's centres get the all-reduced gradient (as DDP does)
            dist.all_reduce(crit.loss.W.grad)
            crit.loss.W.grad /= world
        opt.step()
        opt.zero_grad(set_to_none=False)
        if world > 1:
            dist.barrier()
        if cuda:
            torch.cuda.synchronize()
        if step:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb()
    out[rank] = {"memory_mb": peak - base, "step_s": sorted(times)[len(times) // 2],
                 "centres": int(crit.loss.weight.shape[1] if rate else crit.loss.W.shape[1])}
    if world > 1:
        dist.destroy_process_group()


def measure(classes: int, rate: float, world: int, batch: int, steps: int, device: str = "cpu") -> dict:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp, mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), classes, rate, batch, steps, device, out),
                 nprocs=world)
        ranks = [out[r] for r in range(world)]
    return {"memory_mb": max(r["memory_mb"] for r in ranks), "step_s": max(r["step_s"] for r in ranks),
            "centres": ranks[0]["centres"]}


def logits_per_rank(classes: int, world: int, batch: int, rate: float) -> float:
    """Logits a rank computes per step: its batch x every class (data parallel), or the global batch x its sampled
    share of its shard (Partial FC)."""
    return world * batch * rate * math.ceil(classes / world) if rate else batch * classes


def model_mb(classes: int, world: int, batch: int, rate: float, fit: dict) -> float:
    """Per-rank memory of the model (MB): fixed + bytes per centre float x the rank's centre floats + 4 x floats per
    logit x the rank's logits; rate 0 = data parallel."""
    centres = classes if not rate else math.ceil(classes / world)
    return fit["fixed"] + (fit["bytes_per_float"] * centres * DIM
                           + 4 * fit["per_logit"] * logits_per_rank(classes, world, batch, rate)) / 2**20


def fit_model(points: list[dict], batch: int) -> dict:
    """The model's three numbers by least squares over every measurement (both methods, 1 and 2 ranks)."""
    import numpy as np

    a = [[1.0, p["centres"] * DIM / 2**20, 4 * logits_per_rank(p["classes"], p["world"], batch, p["rate"]) / 2**20]
         for p in points]
    fixed, per_float, per_logit = np.linalg.lstsq(np.array(a), np.array([p["memory_mb"] for p in points]),
                                                  rcond=None)[0]
    return {"fixed": float(fixed), "bytes_per_float": float(per_float), "per_logit": float(per_logit)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--classes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--batch", type=int, default=64, help="images per rank per step")
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--full-max-2", type=int, default=100_000,
                   help="largest C run data-parallel on 2 ranks (2 x 8 GB of centres at 1M does not fit 24 GB)")
    p.add_argument("--device", default="cpu", help="cpu (gloo ranks; memory = peak RSS) or cuda (one GPU: --worlds 1; "
                   "memory = peak CUDA allocation)")
    p.add_argument("--worlds", type=int, nargs="+", default=[1, 2], help="numbers of processes to measure")
    p.add_argument("--rows", help="a JSON of measured rows: read it instead of measuring when it exists, else write "
                   "the measurements there (re-render the report without re-measuring)")
    p.add_argument("--write-doc", action="store_true")
    args = p.parse_args()
    rows = []
    if args.rows and Path(args.rows).is_file():
        rows = json.loads(Path(args.rows).read_text())
    for classes in args.classes if not rows else []:
        for world in args.worlds:
            for rate in (0.0, args.rate):
                if rate == 0.0 and world == 2 and classes > args.full_max_2:
                    continue
                r = measure(classes, rate, world, args.batch, args.steps, args.device)
                rows.append({"classes": classes, "world": world, "rate": rate, **r})
                print(f"C={classes:,} W={world} {'Partial FC ' + str(rate) if rate else 'data parallel'}: "
                      f"{r['memory_mb']:,.0f} MB per rank, {r['step_s'] * 1000:,.0f} ms per step, "
                      f"{r['centres']:,} centres per rank, {world * args.batch / r['step_s']:,.0f} samples/s", flush=True)
    if args.rows and not Path(args.rows).is_file():
        Path(args.rows).write_text(json.dumps(rows))
    # the model's numbers: fitted on every measurement; its error on each says how far it can be trusted
    fit = fit_model(rows, args.batch)
    for r in rows:
        r["model_mb"] = model_mb(r["classes"], r["world"], args.batch, r["rate"], fit)
        print(f"  model for C={r['classes']:,} W={r['world']} rate {r['rate']}: {r['model_mb']:,.0f} MB "
              f"(measured {r['memory_mb']:,.0f})")
    if args.write_doc and args.device == "cpu" and 2 in args.worlds:
        write_doc(args, rows, fit)


def write_doc(args, rows, fit) -> None:
    def find(c, w, rate):
        return next((r for r in rows if (r["classes"], r["world"], r["rate"]) == (c, w, rate)), None)

    table = "\n".join(
        f"| {r['classes']:,} | {r['world']} | {'Partial FC ' + format(r['rate'], 'g') if r['rate'] else 'data parallel'} | "
        f"{r['centres']:,} | {r['memory_mb']:,.0f} | {r['model_mb']:,.0f} | {r['step_s'] * 1000:,.0f} |" for r in rows)
    lines = []
    for c in args.classes:
        full = find(c, 2, 0.0) or find(c, 1, 0.0)  # data parallel holds every centre whatever W is
        full_mb = full["memory_mb"] if full["world"] == 2 else model_mb(c, 2, args.batch, 0.0, fit)
        pfc = find(c, 2, args.rate)
        lines.append(f"- C = {c:,}: Partial FC {args.rate:g} on 2 ranks holds **{pfc['memory_mb'] / full_mb:.2f}x** the "
                     f"data-parallel memory per rank ({pfc['memory_mb']:,.0f} vs {full_mb:,.0f} MB"
                     f"{'' if full['world'] == 2 else ', data parallel on 2 ranks from the model'}); modelled for "
                     f"W = 8: {model_mb(c, 8, args.batch, args.rate, fit) / model_mb(c, 8, args.batch, 0.0, fit):.3f}x, "
                     f"W = 64: {model_mb(c, 64, args.batch, args.rate, fit) / model_mb(c, 64, args.batch, 0.0, fit):.4f}x.")
    text = f"""{HEADING}

`python tools/bench_partial_fc.py --write-doc` ({datetime.date.today().isoformat()}, {os.cpu_count()} cores, CPU,
gloo): ArcFace over C identities, 512-d, {args.batch} random embeddings per rank per step, forward + backward + an
AdamW step of the centres (the trunk, the same in both, left out); memory = the peak resident memory's growth per
rank; step = the median of {args.steps} steps after the first.

| identities | ranks | loss | centres per rank | memory per rank MB | model MB | step ms |
|---|---|---|---|---|---|---|
{table}

The model (bytes per rank): `F + β D x (centres on the rank) + 4 L x (logits of the rank)`, where a rank holds all
C centres under data parallel and ceil(C/W) under Partial FC, and computes `b x C` logits under data parallel and
`W b x rate ceil(C/W)` under Partial FC; β counts the weight, its gradient, two AdamW moments and the optimizer's
temporaries, L the logits' temporaries (PML's and autograd's). Fitted by least squares on every row of the table:
F = {fit['fixed']:.0f} MB (the process's own: kernels, autograd, PML), β = {fit['bytes_per_float']:.1f} bytes,
L = {fit['per_logit']:.1f} floats; the "model MB" column is its value for each measured row. The ratios for W = 8
and 64 below include F, which does not shrink; the centres' part shrinks as 1/W exactly. The goal: Partial FC {args.rate:g} at most 0.55x the data-parallel memory per rank at 2 ranks, shrinking
as 1/W:

{chr(10).join(lines)}

Data parallel keeps every centre on every rank whatever the number of ranks; Partial FC's weights shrink as 1/W
and its logits stay `W b x rate C/W` = `b x rate C` per rank.
"""
    write_section(HEADING, text)
    print(f"wrote {HEADING!r} in docs/benchmarks.md")


if __name__ == "__main__":
    main()
