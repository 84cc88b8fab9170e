"""Benchmark the evaluator against baselines measured in the same run; prints ratios (results: docs/benchmarks.md).

(a) the whole evaluator, what `evaluate --embeddings` computes (verification histograms + 1:N identification +
    MAP@R, no plots; facesiam.eval.pipeline.evaluate), on N x 512 embeddings against the bare blocked matmul of
    the same blocks, the FLOP floor no exact method can beat (the faster of: one multi-threaded matmul per block,
    or our one-thread-per-worker layout). Goal <= 1.3x and peak memory <= 2 GB, on two data sets: identities of
    5 images, and the same with one identity of 2,000 images (MAP@R's R and the genuine pairs grow with it).
    verification_metrics alone and the previous evaluator (2026-11: three passes - histograms, MAP@R with a
    running top-k of the largest R, the 1:N top-k search) are timed too. Each contender runs in its own process
    so its peak RSS (data and interpreter included) is its own.
(b) the seed article's evaluation, reimplemented faithfully (a Python loop over all pairs, one cosine and one
    .item() per pair, then scikit-learn's roc_curve/roc_auc_score) against ours on 3,000 embeddings. The loop is
    timed on a subset of the embeddings and extrapolated per pair (said in the output); sklearn's part is timed
    on the full 4.5M scores. Expected >= 1000x.
(c) 1:N search, 10,000 probes against a 1,000,000-entry gallery: exact top-k (torch matmul + topk, the path
    facesiam uses) against NumPy matmul + argpartition with the same blocking (goal <= 1.2x), FAISS IndexFlatIP
    for reference, and FAISS IVF / HNSW: the smallest nprobe / efSearch with recall@1 >= 0.99 against exact, and
    its speed-up over exact search (goal >= 10x). HNSW is built on a smaller gallery (--hnsw-gallery; its build
    takes ~0.2-1 ms per entry on 2 cores) and compared with exact search on that same gallery. The NumPy and
    FAISS-flat baselines are timed on 2,000 probes and scaled (their cost per probe does not depend on the count).

Data: clustered embeddings shaped like real face embeddings: identities are clusters (5 images each) whose centres
vary mostly in a 32-d subspace, each image with its own noise level: genuine cosine ~0.55 (0.2-0.85), impostor
~0 +- 0.1, TAR@FAR=1e-6 ~0.8; probes are new images of enrolled identities. Recall@1 is the share of probes whose
top-1 identity is that of exact search (what a gallery search returns); the share with the same top-1 entry
among the identity's 5 near-equal images is printed too. On isotropic random vectors no
approximate index keeps its recall, so they would say nothing about face galleries.

    python tools/bench_eval.py --write-doc            # full sizes (~30 min on 2 shared cores)
    python tools/bench_eval.py --quick                # smaller sizes, a minute or two
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from benchdoc import write_section  # tools/ is on sys.path when a tool runs as a script

REPO = Path(__file__).resolve().parents[1]
HEADING = "## Evaluator"
DATE = "2026-12-03"

# -----------------------------------------------------------------------------
# defaults (full run); --quick divides the big sizes
DIM = 512
VERIFY_N = 100_000
SEED_N = 3_000
SEED_LOOP_SUBSET = 1_000          # the pair loop runs on this many embeddings; its time is extrapolated
GALLERY_N = 1_000_000
PROBES = 10_000
HNSW_GALLERY_N = 200_000
IMAGES_PER_IDENTITY = 5
LATENT_DIM = 32                   # identity centres vary mostly in a subspace of this dimension ...
LATENT_SHARE = 0.9                # ... which holds this share of their variance
NOISE = (0.6, 1.2)                # per-image noise level (uniform range), relative to the identity centre
TOPK = 10
BASELINE_PROBES = 2_000           # NumPy and FAISS-flat baselines are timed on this many probes and scaled
TARGET_RECALL = 0.99
# -----------------------------------------------------------------------------


def clustered(n: int, dim: int, *, seed: int = 0, per_identity: int = IMAGES_PER_IDENTITY,
              noise: tuple[float, float] = NOISE, identities: np.ndarray | None = None,
              centres_seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit embeddings of identities-as-clusters: row i belongs to identity i // per_identity (or `identities`).

    Identity centres vary mostly in a LATENT_DIM-dimensional subspace (face embeddings have a low intrinsic
    dimension: impostor cosines spread ~0 +- 0.1, not the +- 0.045 of isotropic 512-d vectors); each image adds
    isotropic noise of its own level (easy and hard images), so the genuine scores' low tail meets the
    impostors' high tail as with real face models.
    """
    n_ids = (n + per_identity - 1) // per_identity if identities is None else int(identities.max()) + 1
    labels = np.arange(n) // per_identity if identities is None else identities
    g = np.random.default_rng(centres_seed)
    basis = g.standard_normal((LATENT_DIM, dim), dtype=np.float32) / np.sqrt(LATENT_DIM)
    centres = np.empty((n_ids, dim), np.float32)
    for s in range(0, n_ids, 65536):
        m = min(65536, n_ids - s)
        centres[s:s + m] = (np.sqrt(LATENT_SHARE) * (g.standard_normal((m, LATENT_DIM), dtype=np.float32) @ basis)
                            + np.sqrt(1 - LATENT_SHARE) * g.standard_normal((m, dim), dtype=np.float32))
    rng = np.random.default_rng(seed + 1)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, 65536):  # in chunks: no full-size temporaries
        rows = labels[s:s + 65536]
        sigma = rng.uniform(*noise, size=(len(rows), 1)).astype(np.float32)
        x = centres[rows] + sigma * rng.standard_normal((len(rows), dim), dtype=np.float32)
        out[s:s + 65536] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out, labels.astype(np.int64)


def timed(fn, repeats: int = 1):
    """(result, best wall seconds, process CPU seconds of that run)."""
    best = None
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        result = fn()
        w, c = time.perf_counter() - w, time.process_time() - c
        if best is None or w < best[1]:
            best = (result, w, c)
    return best


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------------------------------- (a) verification

def bare_blocked_matmul(emb: torch.Tensor, block: int, layout: str) -> None:
    """The same block matmuls as facesiam.eval.score_pass (pair_histograms), and nothing else."""
    from concurrent.futures import ThreadPoolExecutor

    n = emb.shape[0]
    tasks = [(i, j) for i in range(0, n, block) for j in range(i, n, block)]
    if layout == "sequential" or emb.is_cuda:
        out = torch.empty(block * block, device=emb.device)
        for i, j in tasks:
            a, b = emb[i:i + block], emb[j:j + block]
            torch.mm(a, b.T, out=out[:len(a) * len(b)].view(len(a), len(b)))
        if emb.is_cuda:
            torch.cuda.synchronize()
        return
    workers = torch.get_num_threads()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)

    def run(w):
        torch.set_num_threads(1)
        out = torch.empty(block * block)
        for i, j in tasks[w::workers]:
            a, b = emb[i:i + block], emb[j:j + block]
            torch.mm(a, b.T, out=out[:len(a) * len(b)].view(len(a), len(b)))

    try:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, range(workers)))
    finally:
        torch.set_num_threads(previous)


def previous_map_at_r(emb: np.ndarray, labels: np.ndarray) -> float:
    """MAP@R as facesiam computed it before the one-pass evaluator (2026-11): a second blocked pass, queries
    chunked by R, each chunk a top-k of its largest R over all images (kept here as the baseline)."""
    from facesiam.eval.gallery import topk_cosine

    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    r = counts[inverse] - 1
    queries = np.flatnonzero(r >= 1)
    queries = queries[np.argsort(r[queries], kind="stable")]
    e = torch.from_numpy(emb)
    total = 0.0
    for q0 in range(0, len(queries), 8192):
        qi = queries[q0:q0 + 8192]
        k = int(r[qi].max())
        _, idx = topk_cosine(e[torch.as_tensor(qi)], e, k, exclude=qi, device="cpu", normalized=True)
        rel = (labels[idx] == labels[qi][:, None]) & (np.arange(1, k + 1)[None, :] <= r[qi][:, None])
        precision = np.cumsum(rel, axis=1) / np.arange(1, k + 1)[None, :]
        total += float(np.sum(np.sum(precision * rel, axis=1) / r[qi]))
    return total / len(queries)


def previous_evaluator(emb: np.ndarray, labels: np.ndarray) -> dict:
    """The 2026-11 evaluator: three passes over the score matrix (histograms, MAP@R, 1:N top-k search)."""
    from facesiam.eval.gallery import topk_cosine
    from facesiam.eval.identification import identification_split
    from facesiam.eval.metrics import verification_metrics

    v = verification_metrics(emb, labels)
    map_r = previous_map_at_r(emb, labels)
    gallery, mated, _, _ = identification_split(labels)
    _, idx = topk_cosine(emb[mated], emb[gallery], 20, device="cpu", normalized=True)
    hits = labels[gallery][idx] == labels[mated][:, None]
    rank1 = float(np.mean(hits[:, 0]))
    return {"auc": v["auc"], "map_at_r": map_r, "rank1": rank1}


def eval_data(n: int, dim: int, large: int) -> tuple[np.ndarray, np.ndarray]:
    """Clustered embeddings; ``large`` > 0: the first identity has that many images (the rest 5 each)."""
    if not large:
        return clustered(n, dim)
    labels = np.r_[np.zeros(large, np.int64), 1 + np.arange(n - large) // IMAGES_PER_IDENTITY]
    return clustered(n, dim, identities=labels)


def child_verification(kind: str, n: int, dim: int, large: int, device: str) -> dict:
    """Runs in its own process: time one contender of (a) and report its peak RSS (and GPU memory)."""
    from facesiam.eval.metrics import verification_metrics
    from facesiam.eval.score_pass import verification_block
    from facesiam.eval.pipeline import evaluate

    emb, labels = eval_data(n, dim, large)
    dev = torch.device(device)
    block = verification_block(n, dev, torch.get_num_threads())
    before = peak_rss_mb()
    extra: dict = {}
    if kind == "evaluate":  # what `evaluate --embeddings` computes: verification + 1:N + MAP@R (no plots)
        m, wall, cpu = timed(lambda: evaluate({"embeddings": emb, "labels": labels, "paths": None}, device=device))
        v, i = m["verification"], m["identification"]
        extra = {"auc": v["auc"], "eer": v["eer"], "tar_at_far_1e-06": v["tar_at_far"]["1e-06"],
                 "n_pairs": v["n_genuine"] + v["n_impostor"], "map_at_r": i["map_at_r"], "rank1": i["rank1"]}
    elif kind == "verification":
        m, wall, cpu = timed(lambda: verification_metrics(emb, labels, device=device))
        extra = {"auc": m["auc"]}
    elif kind == "previous":
        extra, wall, cpu = timed(lambda: previous_evaluator(emb, labels))
    else:
        t = torch.from_numpy(emb).to(dev)
        _, wall, cpu = timed(lambda: bare_blocked_matmul(t, block, kind))
    if dev.type == "cuda":
        extra["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return {"wall": wall, "cpu": cpu, "peak_rss_mb": peak_rss_mb(), "rss_before_mb": before, "block": block,
            **extra}


def run_child(*args: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


EVAL_KINDS = ("sequential", "workers", "verification", "evaluate")


def bench_verification(n: int, dim: int, repeats: int, large: int, previous: bool, device: str = "cpu") -> dict:
    what = f"one identity of {large:,} images, the rest {IMAGES_PER_IDENTITY}" if large else \
        f"identities of {IMAGES_PER_IDENTITY}"
    print(f"(a) the whole evaluator, {n:,} x {dim} ({n * (n - 1) // 2:,} pairs; {what})", flush=True)
    res: dict = {"large": large, "device": device}
    kinds = EVAL_KINDS if device == "cpu" else ("sequential", "verification", "evaluate")  # one layout on a GPU
    kinds = kinds * max(1, min(repeats, 2)) + (("previous",) if previous else ())
    for kind in kinds:  # interleaved: a slow minute of the shared cores hits every contender alike
        r = run_child("verification", kind, str(n), str(dim), str(large), device)
        if kind not in res or r["wall"] < res[kind]["wall"]:
            res[kind] = r
        print(f"    {kind:<12} {r['wall']:8.2f} s wall  {r['cpu']:8.2f} s CPU  peak RSS {r['peak_rss_mb']:7.0f} MB",
              flush=True)
    layouts = [res[k] for k in ("sequential", "workers") if k in res]
    floor = min(layouts, key=lambda r: r["wall"])
    res["floor"] = floor
    for kind in ("verification", "evaluate", "previous"):
        if kind in res:
            res[kind]["ratio_wall"] = res[kind]["wall"] / floor["wall"]
            res[kind]["ratio_cpu"] = res[kind]["cpu"] / min(r["cpu"] for r in layouts)
    e = res["evaluate"]
    gpu = f", GPU peak {e['gpu_peak_mb']:.0f} MB" if "gpu_peak_mb" in e else ""
    print(f"    evaluate / floor: {e['ratio_wall']:.2f}x wall, {e['ratio_cpu']:.2f}x CPU; peak RSS "
          f"{e['peak_rss_mb']:.0f} MB{gpu} (on {device})", flush=True)
    return res


# ------------------------------------------------------------------------------------------- (b) seed loop

def seed_pair_loop(embeddings: torch.Tensor, labels: np.ndarray):
    """The seed article's evaluation: every pair in a Python loop, one cosine and one .item() each."""
    scores, same = [], []
    for i in range(len(embeddings)):
        for j in range(i + 1, len(embeddings)):
            sim = F.cosine_similarity(embeddings[i].unsqueeze(0), embeddings[j].unsqueeze(0)).item()
            scores.append(sim)
            same.append(1 if labels[i] == labels[j] else 0)
    return scores, same


def bench_seed(n: int, subset: int, dim: int) -> dict:
    from sklearn.metrics import roc_auc_score, roc_curve

    from facesiam.eval.metrics import verification_metrics

    print(f"(b) the seed's pair loop vs ours, {n:,} x {dim}", flush=True)
    emb, labels = clustered(n, dim, seed=3)
    t = torch.from_numpy(emb)
    m = min(subset, n)
    (_, _), loop_wall, loop_cpu = timed(lambda: seed_pair_loop(t[:m], labels[:m]))
    pairs_sub, pairs = m * (m - 1) // 2, n * (n - 1) // 2
    iu = np.triu_indices(n, 1)
    scores = (emb @ emb.T)[iu]
    same = labels[iu[0]] == labels[iu[1]]
    del iu

    def sk():
        roc_curve(same, scores)
        return roc_auc_score(same, scores)

    auc_sklearn, sk_wall, sk_cpu = timed(sk)
    seed_wall = loop_wall * pairs / pairs_sub + sk_wall
    seed_cpu = loop_cpu * pairs / pairs_sub + sk_cpu
    ours, wall, cpu = timed(lambda: verification_metrics(emb, labels), repeats=3)
    res = {"n": n, "subset": m, "loop_wall_subset": loop_wall, "per_pair_us": loop_wall / pairs_sub * 1e6,
           "sklearn_wall": sk_wall, "seed_wall": seed_wall, "seed_cpu": seed_cpu, "ours_wall": wall, "ours_cpu": cpu,
           "speedup_wall": seed_wall / wall, "speedup_cpu": seed_cpu / cpu, "auc_seed": auc_sklearn,
           "auc_ours": ours["auc"]}
    print(f"    seed loop: {res['per_pair_us']:.2f} us/pair on {m:,} embeddings -> {seed_wall:.1f} s for {pairs:,} "
          f"pairs (incl. sklearn {sk_wall:.2f} s); ours {wall * 1e3:.1f} ms: {res['speedup_wall']:,.0f}x "
          f"(AUC {auc_sklearn:.6f} vs {ours['auc']:.6f})", flush=True)
    return res


# ------------------------------------------------------------------------------------------- (c) 1:N search

def numpy_topk(q: np.ndarray, g: np.ndarray, k: int, qb: int, rb: int) -> tuple[np.ndarray, np.ndarray]:
    """Baseline exact search: NumPy matmul + argpartition, the same blocking as facesiam.eval.gallery.topk_cosine."""
    out_s = np.empty((len(q), k), np.float32)
    out_i = np.empty((len(q), k), np.int64)
    for q0 in range(0, len(q), qb):
        qq = q[q0:q0 + qb]
        best_s = best_i = None
        for c0 in range(0, len(g), rb):
            s = qq @ g[c0:c0 + rb].T
            idx = np.argpartition(-s, k - 1, axis=1)[:, :k]
            vals = np.take_along_axis(s, idx, 1)
            idx += c0
            if best_s is not None:
                vals, idx = np.concatenate([best_s, vals], 1), np.concatenate([best_i, idx], 1)
                pick = np.argpartition(-vals, k - 1, axis=1)[:, :k]
                vals, idx = np.take_along_axis(vals, pick, 1), np.take_along_axis(idx, pick, 1)
            best_s, best_i = vals, idx
        order = np.argsort(-best_s, axis=1)
        out_s[q0:q0 + qb] = np.take_along_axis(best_s, order, 1)
        out_i[q0:q0 + qb] = np.take_along_axis(best_i, order, 1)
    return out_s, out_i


def sweep(index, probes: np.ndarray, exact_top1: np.ndarray, gallery_labels: np.ndarray, set_knob, values,
          k: int) -> list[dict]:
    """Search time and recall@1 (same top-1 identity as exact search; and same top-1 entry) for each setting."""
    rows = []
    for v in values:
        set_knob(v)
        (_, idx), wall, cpu = timed(lambda: index.search(probes, k))
        recall = float(np.mean(gallery_labels[idx[:, 0]] == gallery_labels[exact_top1]))
        entry = float(np.mean(idx[:, 0] == exact_top1))
        rows.append({"value": v, "wall": wall, "cpu": cpu, "recall_at_1": recall, "entry_recall_at_1": entry})
        print(f"      {v:>5}: recall@1 {recall:.4f} (same entry {entry:.4f})  {wall:7.3f} s", flush=True)
        if recall >= 0.999:
            break
    return rows


def pick(rows: list[dict], exact_wall: float) -> dict:
    good = [r for r in rows if r["recall_at_1"] >= TARGET_RECALL]
    best = good[0] if good else rows[-1]
    return {**best, "speedup": exact_wall / best["wall"], "rows": rows}


def bench_search(n: int, n_probes: int, n_hnsw: int, dim: int) -> dict:
    import faiss

    from facesiam.eval.gallery import topk_cosine

    print(f"(c) 1:N search, {n_probes:,} probes x {n:,}-entry gallery, top-{TOPK}", flush=True)
    gallery, labels = clustered(n, dim)
    n_ids = int(labels.max()) + 1
    probe_ids = np.random.default_rng(11).integers(0, n_ids, n_probes)
    probes, _ = clustered(n_probes, dim, seed=5, identities=probe_ids)
    res: dict = {"n": n, "probes": n_probes, "threads": torch.get_num_threads()}

    (ours_s, ours_i), w, c = timed(lambda: topk_cosine(probes, gallery, TOPK, device="cpu", normalized=True))
    res["ours"] = {"wall": w, "cpu": c}
    print(f"    ours (torch matmul + topk): {w:.2f} s", flush=True)
    # The baselines cost the same per probe whatever the number of probes: time them on a subset and scale.
    sub = min(n_probes, BASELINE_PROBES)
    (np_s, np_i), w, c = timed(lambda: numpy_topk(probes[:sub], gallery, TOPK, 2048, 2**26 // 2048))
    res["numpy"] = {"wall": w * n_probes / sub, "cpu": c * n_probes / sub, "probes_timed": sub,
                    "agree_top1": float(np.mean(np_i[:, 0] == ours_i[:sub, 0]))}
    res["ratio_wall"] = res["ours"]["wall"] / res["numpy"]["wall"]
    res["ratio_cpu"] = res["ours"]["cpu"] / res["numpy"]["cpu"]
    print(f"    numpy matmul + argpartition: {res['numpy']['wall']:.2f} s (timed on {sub:,} probes) -> ours "
          f"{res['ratio_wall']:.2f}x its time", flush=True)
    flat = faiss.IndexFlatIP(dim)
    flat.add(gallery)
    _, w, c = timed(lambda: flat.search(probes[:sub], TOPK))
    res["faiss_flat"] = {"wall": w * n_probes / sub, "cpu": c * n_probes / sub, "probes_timed": sub}
    print(f"    faiss IndexFlatIP: {res['faiss_flat']['wall']:.2f} s (timed on {sub:,} probes)", flush=True)
    flat = None  # free 2 GB
    exact_top1 = ours_i[:, 0]

    nlist = int(2 ** round(np.log2(4 * np.sqrt(n))))
    quantizer = faiss.IndexFlatIP(dim)
    ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    ivf.cp.niter = 10  # k-means iterations: the coarse cells need not be optimal, only reasonable
    train = gallery[np.random.default_rng(0).choice(n, min(n, 40 * nlist), replace=False)]
    _, train_s, _ = timed(lambda: ivf.train(train))
    _, add_s, _ = timed(lambda: ivf.add(gallery))
    print(f"    IVF{nlist},Flat: train {train_s:.1f} s, add {add_s:.1f} s; nprobe sweep:", flush=True)
    rows = sweep(ivf, probes, exact_top1, labels, lambda v: setattr(ivf, "nprobe", v),
                 [1, 2, 4, 8, 16, 32, 64, 128, 256], TOPK)
    res["ivf"] = {"nlist": nlist, "train_s": train_s, "add_s": add_s, **pick(rows, res["ours"]["wall"])}
    ivf = None

    m = min(n_hnsw, n)
    hn_ids = m // IMAGES_PER_IDENTITY
    hp_ids = np.random.default_rng(12).integers(0, hn_ids, n_probes)
    hprobes, _ = clustered(n_probes, dim, seed=6, identities=hp_ids)
    hgallery = gallery[:m]
    (_, h_exact), hw, hc = timed(lambda: topk_cosine(hprobes, hgallery, TOPK, device="cpu", normalized=True))
    hnsw = faiss.IndexHNSWFlat(dim, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 40
    _, build_s, _ = timed(lambda: hnsw.add(hgallery))
    print(f"    HNSW32 (efConstruction 40) on {m:,} entries: build {build_s:.1f} s; exact search there {hw:.2f} s; "
          "efSearch sweep:", flush=True)
    rows = sweep(hnsw, hprobes, h_exact[:, 0], labels[:m], lambda v: setattr(hnsw.hnsw, "efSearch", v),
                 [16, 32, 64, 128, 256, 512], TOPK)
    res["hnsw"] = {"n": m, "build_s": build_s, "exact_wall": hw, **pick(rows, hw)}
    return res


# ------------------------------------------------------------------------------------------- report

def report(res: dict, args) -> str:
    cmd = "python tools/bench_eval.py" + (" --quick" if args.quick else "") + " --write-doc"
    lines = [HEADING, "",
             f"{DATE}, `{cmd}` on {platform.machine()} with {os.cpu_count()} cores shared with other jobs "
             f"(timings are noisy; the ratios, measured in the same run, are what matter), torch "
             f"{torch.__version__.split('+')[0]}, {torch.get_num_threads()} threads. Clustered embeddings "
             f"(identities of {IMAGES_PER_IDENTITY} images, centres mostly in a {LATENT_DIM}-d subspace, per-image "
             f"noise: genuine cosine ~0.55, impostor ~0 ± 0.1).", ""]
    if "verification" in res:
        for v in res["verification"]:
            e = v["evaluate"]
            what = (f"one identity of {v['large']:,} images, the rest {IMAGES_PER_IDENTITY} each" if v["large"]
                    else f"identities of {IMAGES_PER_IDENTITY} images")
            lines += [f"**(a) The whole evaluator** (`evaluate --embeddings`: verification + 1:N identification + "
                      f"MAP@R, no plots) on {v['device']}, {args.verify_n:,} x {DIM} embeddings, {what}: "
                      f"{e['n_pairs']:,} pairs, "
                      f"blocks of {e['block']}. Floor: the same block matmuls and nothing else (the faster of "
                      f"multi-threaded sequential and one-thread-per-worker layouts).", "",
                      "| | wall s | CPU s | vs floor | peak RSS MB (whole process) |", "|---|---:|---:|---:|---:|"]
            rows = (("sequential", "bare matmul, sequential (MKL threads)"),
                    ("workers", "bare matmul, one thread per worker"),
                    ("verification", "verification_metrics alone (one pass, histograms only)"),
                    ("evaluate", "**evaluate: every metric, one pass**"),
                    ("previous", "previous evaluator (2026-11, three passes)"))
            for kind, label in rows:
                if kind in v:
                    r = v[kind]
                    ratio = f"{r['wall'] / v['floor']['wall']:.2f}x"
                    lines.append(f"| {label} | {r['wall']:.2f} | {r['cpu']:.2f} | {ratio} | "
                                 f"{r['peak_rss_mb']:.0f} |")
            lines += ["", f"evaluate / floor: **{e['ratio_wall']:.2f}x** wall, {e['ratio_cpu']:.2f}x CPU (goal <= "
                      f"1.3x); peak RSS **{e['peak_rss_mb']:.0f} MB** (goal <= 2 GB; embeddings "
                      f"{args.verify_n * DIM * 4 / 2**20:.0f} MB and the interpreter with torch included). "
                      f"AUC {e['auc']:.6f}, TAR@FAR=1e-6 {e['tar_at_far_1e-06']}, MAP@R {e['map_at_r']:.6f}, "
                      f"rank-1 {e['rank1']:.6f}"
                      + (f"; the previous evaluator: MAP@R {v['previous']['map_at_r']:.6f}, rank-1 "
                         f"{v['previous']['rank1']:.6f}" if "previous" in v else "") + ".", ""]
    if "seed" in res:
        s = res["seed"]
        lines += [f"**(b) The seed article's evaluation vs ours**, {s['n']:,} embeddings "
                  f"({s['n'] * (s['n'] - 1) // 2:,} pairs). The seed's Python pair loop (one cosine and one "
                  f".item() per pair) was timed on the first {s['subset']:,} embeddings "
                  f"({s['per_pair_us']:.2f} µs per pair) and extrapolated per pair; its scikit-learn "
                  f"roc_curve + roc_auc_score was timed on all the scores ({s['sklearn_wall']:.2f} s).", "",
                  "| | seconds | speed-up |", "|---|---:|---:|",
                  f"| seed: pair loop + sklearn ROC (extrapolated) | {s['seed_wall']:.1f} | 1x |",
                  f"| ours: verification_metrics | {s['ours_wall']:.4f} | **{s['speedup_wall']:,.0f}x** "
                  f"(CPU {s['speedup_cpu']:,.0f}x) |", "",
                  f"AUC: sklearn on every pair {s['auc_seed']:.6f}, ours {s['auc_ours']:.6f}.", ""]
    if "search" in res:
        c = res["search"]
        ivf, hn = c["ivf"], c["hnsw"]
        lines += [f"**(c) 1:N search**, {c['probes']:,} probes (new images of enrolled identities), "
                  f"{c['n']:,}-entry gallery, top-{TOPK}.", "",
                  "| exact search | wall s | CPU s | vs NumPy |", "|---|---:|---:|---:|",
                  f"| NumPy matmul + argpartition (baseline, same blocking; timed on "
                  f"{c['numpy']['probes_timed']:,} probes, scaled) | {c['numpy']['wall']:.2f} | "
                  f"{c['numpy']['cpu']:.2f} | 1.00x |",
                  f"| **facesiam: torch matmul + topk** | {c['ours']['wall']:.2f} | {c['ours']['cpu']:.2f} | "
                  f"**{c['ratio_wall']:.2f}x** (goal <= 1.2x) |",
                  f"| FAISS IndexFlatIP (timed on {c['faiss_flat']['probes_timed']:,} probes, scaled) | "
                  f"{c['faiss_flat']['wall']:.2f} | {c['faiss_flat']['cpu']:.2f} | "
                  f"{c['faiss_flat']['wall'] / c['numpy']['wall']:.2f}x |", "",
                  "| approximate | gallery | build s | setting | recall@1 (identity) | same entry | search s | "
                  "speed-up vs exact |", "|---|---:|---:|---|---:|---:|---:|---:|",
                  f"| IVF{ivf['nlist']},Flat | {c['n']:,} | {ivf['train_s'] + ivf['add_s']:.1f} | nprobe "
                  f"{ivf['value']} | **{ivf['recall_at_1']:.4f}** | {ivf['entry_recall_at_1']:.4f} | "
                  f"{ivf['wall']:.2f} | **{ivf['speedup']:.1f}x** |",
                  f"| HNSW32, efConstruction 40 | {hn['n']:,} | {hn['build_s']:.1f} | efSearch {hn['value']} | "
                  f"**{hn['recall_at_1']:.4f}** | {hn['entry_recall_at_1']:.4f} | {hn['wall']:.2f} | "
                  f"**{hn['speedup']:.1f}x** (exact there: {hn['exact_wall']:.2f} s) |", "",
                  "The setting is the smallest that reaches recall@1 >= 0.99 (sweeps: "
                  + ", ".join(f"nprobe {r['value']}: {r['recall_at_1']:.3f}" for r in ivf["rows"]) + "; "
                  + ", ".join(f"efSearch {r['value']}: {r['recall_at_1']:.3f}" for r in hn["rows"]) + ").", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes (20k verification, 100k gallery)")
    p.add_argument("--only", nargs="+", choices=("verification", "seed", "search"), default=None)
    p.add_argument("--verify-n", type=int, default=None)
    p.add_argument("--gallery", type=int, default=None)
    p.add_argument("--probes", type=int, default=None)
    p.add_argument("--hnsw-gallery", type=int, default=None)
    p.add_argument("--repeats", type=int, default=1, help="(a): runs of each contender, best kept (max 2)")
    p.add_argument("--large", type=int, default=2_000,
                   help="(a): the second data set has one identity of this many images (0: skip it)")
    p.add_argument("--no-previous", action="store_true", help="(a): do not time the previous evaluator")
    p.add_argument("--device", default="cpu", help="(a): score on this device (cuda: the same code on the GPU)")
    p.add_argument("--write-doc", action="store_true", help=f"update '{HEADING}' in docs/benchmarks.md")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        _, name, n, dim, large, device = args.child
        print(json.dumps(child_verification(name, int(n), int(dim), int(large), device)))
        return
    args.verify_n = args.verify_n or (20_000 if args.quick else VERIFY_N)
    args.gallery = args.gallery or (100_000 if args.quick else GALLERY_N)
    args.probes = args.probes or (2_000 if args.quick else PROBES)
    args.hnsw_gallery = args.hnsw_gallery or (50_000 if args.quick else HNSW_GALLERY_N)
    only = args.only or ["verification", "seed", "search"]
    res = {}
    if "verification" in only:
        res["verification"] = [bench_verification(args.verify_n, DIM, args.repeats, large, not args.no_previous,
                                                  args.device) for large in dict.fromkeys((0, args.large))]
    if "seed" in only:
        res["seed"] = bench_seed(SEED_N, 300 if args.quick else SEED_LOOP_SUBSET, DIM)
    if "search" in only:
        res["search"] = bench_search(args.gallery, args.probes, args.hnsw_gallery, DIM)
    text = report(res, args)
    print("\n" + text)
    if args.write_doc:
        write_section(HEADING, text)


if __name__ == "__main__":
    main()
