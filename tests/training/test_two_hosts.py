"""Two "nodes" that fail like real ones: one torchrun node in each of two network namespaces joined by a veth link
(facesiam/testing/netns.py), c10d rendezvous across the link on host 0's address, gloo over the veth.

(a) training across the two equals the single-host 2-process run bit for bit; (b) the link cut mid-run: a short cut
is ridden out (same weights), a cut longer than --collective-timeout stops both nodes within that timeout with a
one-line error naming the peer, long before the cut ends; (c) host 1's processes killed -9: the elastic job
(--nnodes 1:2) continues on host 0 from the last checkpoint and ends with the weights of a run resumed on one node
from that checkpoint.

They skip (saying why) without root, iproute2 or the right to make network namespaces. Every process has a deadline.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..conftest import REPO, load_tool

demo = load_tool("demo_elastic")
STEPS = 18  # 2 epochs of 9 steps (2 ranks x batch 8)
RDZV_PORT = 29400  # in host 0's own network namespace: nothing else listens there
TIMEOUT = 300  # seconds for one two-node run (~30-60 s on 2 shared cores): past it, a hang fails the test
CUT = 30  # seconds the link stays down in the long cut (the 30 s)
COLLECTIVE_TIMEOUT = 10  # --collective-timeout of the long cut's run: it must stop within this, not hang for the cut

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def start_node(hosts, host: int, args: list[str], log: Path, nnodes: str = "2", max_restarts: int = 0,
               store_timeout: int = 60) -> subprocess.Popen:
    """torchrun in host ``host``: one worker (launch/train.py ARGS), c10d rendezvous on host 0's address (its
    store in host 0's agent; each store operation of an agent gives up after ``store_timeout`` s), gloo over the
    veth; output to LOG."""
    conf = (f"is_host={'true' if host == 0 else 'false'},last_call_timeout=1,join_timeout=120,"
            f"read_timeout={store_timeout}")
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={nnodes}", "--nproc-per-node=1",
           f"--max-restarts={max_restarts}", "--rdzv-backend=c10d", f"--rdzv-endpoint={hosts.addr[0]}:{RDZV_PORT}",
           "--rdzv-id=two-hosts", f"--rdzv-conf={conf}", f"--local-addr={hosts.addr[host]}",
           "--monitor-interval=0.1", str(REPO / "launch" / "train.py"), *args]
    env = {**demo._env(), "GLOO_SOCKET_IFNAME": hosts.ifname[host]}
    with open(log, "w") as out:
        return hosts.popen(host, cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                           cwd=REPO)


def start_pair(hosts, args: list[str], run: Path, **kwargs) -> list[subprocess.Popen]:
    return [start_node(hosts, h, args, run.with_suffix(f".node{h}.log"), **kwargs) for h in (0, 1)]


def logs(run: Path) -> str:
    return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}"
                     for p in sorted(run.parent.glob(f"{run.name}.node*.log")))


@pytest.fixture(scope="module")
def single_host(synthetic_shards, tmp_path_factory) -> Path:
    """The reference: the same config as 2 processes on this machine's own network stack (as torchrun starts them)."""
    run = tmp_path_factory.mktemp("two_hosts") / "single-host"
    assert demo.uninterrupted(synthetic_shards, run, STEPS) == [0, 0], run
    return run


def test_training_across_two_hosts_equals_the_single_host_run(two_hosts, synthetic_shards, single_host, tmp_path):
    run = tmp_path / "two-hosts"
    nodes = start_pair(two_hosts, demo.train_args(synthetic_shards, run, STEPS), run)
    assert demo.wait(nodes, TIMEOUT) == [0, 0], logs(run)
    log = logs(run)
    assert demo.same_weights(run / "final", single_host / "final"), log
    assert demo.same_weights(run / f"checkpoints/step-{STEPS}", single_host / f"checkpoints/step-{STEPS}")


def test_a_short_link_cut_is_ridden_out(two_hosts, synthetic_shards, single_host, tmp_path):
    """Down for 3 s (well inside the default collective timeout): TCP retransmits, the run goes on, same weights."""
    run = tmp_path / "short-cut"
    nodes = start_pair(two_hosts, demo.train_args(synthetic_shards, run, STEPS), run)
    try:
        assert demo.wait_until(lambda: demo.logged_step(run) >= 3, nodes), logs(run)
        two_hosts.cut()
        cut_at = demo.logged_step(run)
        try:
            ended = [node.wait(timeout=3) for node in nodes]  # nothing ends while the link is down ...
        except subprocess.TimeoutExpired:
            ended = None
        two_hosts.restore()
        assert ended is None, logs(run)  # ... and after it, the run goes on
        assert demo.wait(nodes, TIMEOUT) == [0, 0], logs(run)
    finally:
        demo.stop(nodes)
    assert cut_at < STEPS, "the cut came after the run's end: make the run longer"
    assert demo.same_weights(run / "final", single_host / "final"), logs(run)


def training_processes(hosts) -> list[int]:
    """The training processes (torchrun's workers, not torchrun itself) still running in either host."""
    alive = []
    for pid in hosts.pids(0) + hosts.pids(1):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_text(errors="replace").split("\0")
            worker = "torch.distributed.run" not in argv and any(a.endswith("launch/train.py") for a in argv)
            if worker and \
                    Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                alive.append(pid)
        except OSError:
            pass
    return alive


def test_a_long_link_cut_stops_both_nodes_within_the_collective_timeout_naming_the_peer(
        two_hosts, synthetic_shards, tmp_path):
    """Down for CUT s with --collective-timeout 10: every training process must have ended, each with one line naming
    the peer, while the link is still down (the agents' store operations give up after 20 s: torchrun then exits)."""
    run = tmp_path / "long-cut"
    args = [*demo.train_args(synthetic_shards, run, 10 * STEPS), "--collective-timeout", str(COLLECTIVE_TIMEOUT)]
    nodes = start_pair(two_hosts, args, run, store_timeout=2 * COLLECTIVE_TIMEOUT)
    try:
        assert demo.wait_until(lambda: demo.logged_step(run) >= 3, nodes), logs(run)
        two_hosts.cut()
        cut_at, left = time.monotonic(), ["not looked yet"]
        while time.monotonic() - cut_at < CUT and left:  # no hang until the link comes back
            left = training_processes(two_hosts)
            time.sleep(0.2)
        two_hosts.restore()
        assert not left, f"training processes {left} still running {CUT} s into the cut (collective timeout " \
                         f"{COLLECTIVE_TIMEOUT} s)\n" + logs(run)
        codes = demo.wait(nodes, TIMEOUT)
    finally:
        demo.stop(nodes)
    assert all(code != 0 for code in codes), codes
    # Each worker says what happened in one line, naming the peer's address.
    for host, peer in ((0, 1), (1, 0)):
        text = run.with_suffix(f".node{host}.log").read_text(errors="replace")
        lines = re.findall(r"train: rank \d+ lost .*", text)
        assert lines, logs(run)
        assert f"train: rank {host} lost rank {peer} at {two_hosts.addr[peer]} " in lines[0], lines
        assert f"no answer within collective_timeout {COLLECTIVE_TIMEOUT} s" in lines[0], lines


def test_a_node_killed_leaves_the_survivor_to_finish_from_the_last_checkpoint(two_hosts, synthetic_shards, tmp_path):
    """kill -9 of everything in host 1 (agent and worker) once a checkpoint exists: host 0's worker fails its next
    collective, its agent re-forms the job without host 1 (--nnodes 1:2) and the worker resumes the newest checkpoint
    on one process; the result equals a plain one-process run resumed from that same checkpoint."""
    run = tmp_path / "elastic"
    every_3 = ["--checkpoint-every-steps", "3", "--keep-checkpoints", "100"]  # all kept: the reference needs one
    nodes = start_pair(two_hosts, [*demo.train_args(synthetic_shards, run, STEPS), *every_3], run, nnodes="1:2",
                       max_restarts=3)
    try:
        assert demo.wait_until(lambda: bool(demo.checkpoints(run)) and demo.logged_step(run) >= 4, nodes), logs(run)
        killed = two_hosts.kill(1)
        assert killed, "nothing ran in host 1"
        assert nodes[0].wait(timeout=TIMEOUT) == 0, logs(run)
    finally:
        demo.stop(nodes)
    text = run.with_suffix(".node0.log").read_text(errors="replace")
    resumed = [int(s) for s in re.findall(r"resumed from \S+ at step (\d+)", text)]
    assert len(resumed) == 1 and resumed[0] in demo.checkpoints(run), logs(run)
    assert (run / "summary.json").exists(), logs(run)

    # The reference: the checkpoint the survivor resumed from, resumed by one process without torchrun.
    reference = tmp_path / "resumed-on-one-node"
    (reference / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "config.yaml", reference / "config.yaml")
    shutil.copytree(run / "checkpoints" / f"step-{resumed[0]}", reference / "checkpoints" / f"step-{resumed[0]}")
    with open(reference.with_suffix(".log"), "w") as out:
        one = subprocess.Popen([sys.executable, str(REPO / "launch" / "train.py"),
                                *demo.train_args(synthetic_shards, reference, STEPS), *every_3], env=demo._env(),
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    assert demo.wait([one], TIMEOUT) == [0], reference.with_suffix(".log").read_text()[-4000:]
    assert demo.same_weights(run / "final", reference / "final"), logs(run)
