"""Preemption and elastic restarts on tiny data, compared bit for bit with an uninterrupted run.

    python tools/demo_elastic.py [--out DIR] [--steps 27] [--seed 0]

One 2-process training (gloo on the CPU, tiny synthetic faces; about a minute on 2 cores), run twice:

  uninterrupted  the reference
  interrupted    1. SIGTERM to ONE rank a few steps into the first epoch: both ranks stop after the same step,
                    checkpoint it and exit with status 143
                 2. relaunched with --resume latest under `torchrun --nnodes=1:2 --nproc-per-node=2
                    --max-restarts=1`, which kill -9 hits in one worker at a random moment after the next
                    checkpoint: torchrun restarts both workers and they continue from the newest checkpoint

then prints whether the interrupted run ends with exactly the uninterrupted run's weights. The ranks of step 1 are
started the way torchrun starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), so each one's exit status can
be read. tests/training/test_preemption.py runs these same functions.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # facesiam from a checkout that is not installed
from facesiam.testing import free_port  # noqa: E402

TIMEOUT = 180  # seconds for one launch (~10 s here): a hang (ranks that disagree) fails instead
WORLD = 2
# 2 ranks x batch 8: epochs of 9 steps, so a stop a few steps in is mid-epoch. Checkpoints only at epoch ends and
# at the end (--checkpoint-every-steps 0): a checkpoint in the middle of an epoch can only come from a preemption.
TINY = ["--backbone", "test_efficientnet", "--embedding-dim", "32", "--image-size", "32", "--batch-size", "8",
        "--m-per-class", "4", "--num-workers", "0", "--wandb", "off", "--tensorboard", "false", "--lr", "1e-3",
        "--scheduler", "cosine", "--head", "face", "--dropout", "0.2", "--log-every-steps", "1",
        "--checkpoint-every-steps", "0", "--keep-checkpoints", "3", "--epochs", "10"]


def train_args(data: Path, run: Path, steps: int) -> list[str]:
    return ["--data", str(data), "--output", str(run), "--max-steps", str(steps), *TINY, "--resume", "latest"]


def _env() -> dict[str, str]:
    # torch >= 2.5 shares torchrun's own store with the workers, and restarted workers then read the addresses
    # their predecessors published ("Gloo connectFullMesh failed ... Connection refused", pytorch/pytorch#135712):
    # TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives every restart a store of its own.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def start_ranks(args: list[str], log: Path) -> list[subprocess.Popen]:
    """WORLD `python launch/train.py ARGS` processes with the environment torchrun gives its workers."""
    port, procs = free_port(), []
    for rank in range(WORLD):
        env = {**_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD),
               "LOCAL_WORLD_SIZE": str(WORLD), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        with open(f"{log}.rank{rank}", "w") as out:
            procs.append(subprocess.Popen([sys.executable, str(REPO / "launch" / "train.py"), *args], env=env,
                                          stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
    return procs


def start_torchrun(args: list[str], log: Path, max_restarts: int = 1) -> subprocess.Popen:
    """torchrun, elastic (c10d rendezvous, 1 to 2 nodes), restarting a failed worker group up to ``max_restarts``
    times; last_call_timeout=1: this one node waits 1 s, not 30, for a second one to join."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1:2", f"--nproc-per-node={WORLD}",
           f"--max-restarts={max_restarts}", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
           "--rdzv-conf=last_call_timeout=1", "--monitor-interval=0.1", str(REPO / "launch" / "train.py"), *args]
    with open(log, "w") as out:
        return subprocess.Popen(cmd, env=_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def wait(procs: list[subprocess.Popen], timeout: Optional[float] = None) -> list[int]:
    """Exit statuses (negative: killed by that signal); at the deadline every process still running is killed."""
    timeout = TIMEOUT if timeout is None else timeout
    deadline = time.monotonic() + timeout
    try:
        return [p.wait(timeout=max(0.0, deadline - time.monotonic())) for p in procs]
    except subprocess.TimeoutExpired:
        stop(procs)
        raise TimeoutError(f"{' '.join(map(str, procs[0].args[:4]))} ... still running after {timeout:g}s; "
                           "killed") from None


def stop(procs: list[subprocess.Popen]) -> None:
    """SIGKILL each process still running, with everything in its process group."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=60)


def wait_until(ready: Callable[[], bool], procs: list[subprocess.Popen]) -> bool:
    """Poll ready() every 5 ms; False when a process ended first, or after TIMEOUT seconds."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline and all(p.poll() is None for p in procs):
        if ready():
            return True
        time.sleep(0.005)
    return False


def logged_step(run: Path) -> int:
    """The last optimizer step in RUN/metrics.jsonl (0 before the first)."""
    try:
        text = (run / "metrics.jsonl").read_text()
    except FileNotFoundError:
        return 0
    return max((int(s) for s in re.findall(r'"step": (\d+)', text)), default=0)


def checkpoints(run: Path) -> list[int]:
    """Steps of the run's complete checkpoints, oldest first."""
    return sorted(int(p.name[5:]) for p in (run / "checkpoints").glob("step-*") if p.name[5:].isdigit())


def train_state(run: Path, step: int) -> dict:
    """The loop's position saved in checkpoint step-N (its train_state.json)."""
    from dataclasses import asdict

    from facesiam.training.checkpoint import read_train_state

    return asdict(read_train_state(run / "checkpoints" / f"step-{step}"))


def same_weights(a: Path, b: Path) -> bool:
    """model.safetensors of two exports (or checkpoints) hold the same tensors, bit for bit."""
    import numpy as np
    from safetensors.numpy import load_file

    x, y = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


# ------------------------------------------------------------------------------------------ the scenario

def uninterrupted(data: Path, run: Path, steps: int) -> list[int]:
    """The reference run; returns the ranks' exit statuses."""
    return wait(start_ranks(train_args(data, run, steps), run.with_suffix(".log")))


def sigterm_one_rank(data: Path, run: Path, steps: int, after_step: int = 2, rank: int = 1) -> dict:
    """SIGTERM to rank ``rank`` alone once step ``after_step`` is logged; both ranks' exit statuses and the newest
    checkpoint's position."""
    log = run.with_suffix(".log")
    procs = start_ranks(train_args(data, run, steps), log)
    try:
        if not wait_until(lambda: logged_step(run) >= after_step, procs):
            raise RuntimeError(f"the run ended before step {after_step}; see {log}.rank*")
        os.kill(procs[rank].pid, signal.SIGTERM)
        codes = wait(procs)
    finally:
        stop(procs)
    saved = checkpoints(run)
    state = train_state(run, saved[-1]) if saved else {}
    return {"exit_codes": codes, "checkpoints": saved, "finished": (run / "summary.json").exists(),
            "step": state.get("step"), "epoch": state.get("epoch"), "batch_in_epoch": state.get("batches_in_epoch")}


def torchrun_kill_9(data: Path, run: Path, steps: int, rng: random.Random, max_delay: float = 0.3) -> dict:
    """(Re)launch under torchrun with --resume latest; kill -9 one worker (chosen by ``rng``) at a random moment
    after the run's next checkpoint; torchrun restarts the group. Returns torchrun's exit status, the step logged at
    the kill and the steps each start of the group resumed from."""
    import psutil

    log = run.with_suffix(".torchrun.log")
    before = checkpoints(run)
    agent = start_torchrun(train_args(data, run, steps), log)
    try:
        if not wait_until(lambda: checkpoints(run)[-1:] != before[-1:], [agent]):
            raise RuntimeError(f"torchrun ended before a new checkpoint; see {log}")
        time.sleep(rng.uniform(0.0, max_delay))
        workers = [c for c in psutil.Process(agent.pid).children() if "train.py" in " ".join(c.cmdline())]
        killed_at, finished = logged_step(run), (run / "summary.json").exists()
        if len(workers) != WORLD or finished:
            raise RuntimeError(f"the run finished before the kill (at step {killed_at}); see {log}")
        victim = rng.choice(workers)
        rank = int(victim.environ().get("RANK", -1))
        victim.kill()
        code = wait([agent])[0]
    finally:
        stop([agent])
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", log.read_text(errors="replace"))]
    return {"exit_code": code, "killed_rank": rank, "killed_at": killed_at, "resumed_at": resumed, "log": log}


def make_data(out: Path) -> Path:
    """24 synthetic identities x 8 images (6 held out for validation): the tests' tiny shards."""
    from facesiam.data import write_shards
    from facesiam.synthetic import make_synthetic_faces

    shards = out / "shards"
    if not (shards / "dataset.json").is_file():
        faces = make_synthetic_faces(out / "faces", 24, 8, size=48, seed=0, workers=1, progress=False)
        write_shards(faces, shards, val_identities=6, seed=0, workers=1, progress=False)
    return shards


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=None, help="data, runs and logs (default: a new temporary folder)")
    p.add_argument("--steps", type=int, default=27, help="optimizer steps of the run (9 per epoch)")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moment and of the worker killed")
    a = p.parse_args(argv)
    out = a.out or Path(tempfile.mkdtemp(prefix="demo_elastic_"))
    data, start = make_data(out), time.monotonic()
    ref, run = out / "uninterrupted", out / "interrupted"
    for old in (ref, run):  # --resume latest would continue an earlier demo's runs
        shutil.rmtree(old, ignore_errors=True)
    print(f"uninterrupted: {a.steps} steps, ranks exited {uninterrupted(data, ref, a.steps)}", flush=True)
    term = sigterm_one_rank(data, run, a.steps)
    print(f"interrupted:   SIGTERM to rank 1 -> ranks exited {term['exit_codes']} after step {term['step']} "
          f"(epoch {term['epoch']}, {term['batch_in_epoch']} batches in), checkpoints {term['checkpoints']}",
          flush=True)
    kill = torchrun_kill_9(data, run, a.steps, random.Random(a.seed))
    print(f"               relaunched under torchrun --max-restarts=1 --resume latest; kill -9 of rank "
          f"{kill['killed_rank']} after step {kill['killed_at']}; torchrun restarted the group; it resumed at steps "
          f"{kill['resumed_at']} (relaunch, restart); torchrun exited {kill['exit_code']}", flush=True)
    same = same_weights(run / "final", ref / "final")
    print(f"\nfinal weights after {logged_step(run)} steps: "
          f"{'identical to the uninterrupted run, bit for bit' if same else 'DIFFERENT from the uninterrupted run'}"
          f"\n({time.monotonic() - start:.0f} s; runs and logs in {out})")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
