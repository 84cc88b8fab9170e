"""training/peers.py: a collective that fails on the network becomes one line naming the peer rank and address."""

from __future__ import annotations

import datetime
import time
from types import SimpleNamespace

import pytest

from facesiam.training import peers

from ..conftest import run_distributed


def _late_peer(rank: int, world: int) -> dict:
    """Rank 1 joins the all-reduce 5 s late; rank 0 waits at most 1 s (a node gone quiet, as gloo reports it)."""
    import torch
    import torch.distributed as dist

    peers.record(SimpleNamespace(num_processes=world, process_index=rank))
    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=1))
    if rank == 1:
        time.sleep(5)
    try:
        dist.all_reduce(torch.ones(4), group=group)
    except RuntimeError as err:
        return {"message": peers.describe(err, 1.0), "gloo": str(err)}
    return {"message": None, "gloo": ""}


def test_a_collective_timeout_names_the_silent_peer():
    late = run_distributed(_late_peer, 2, timeout=120)
    message = late[0]["message"]
    assert message is not None, late[0]["gloo"]
    assert "\n" not in message
    assert message.startswith("rank 0 lost rank 1 at 127.0.0.1 (host ")
    assert "no answer within collective_timeout 1 s" in message
    assert ".cc:" not in message, "gloo's source location is dropped"


@pytest.fixture
def four_ranks(monkeypatch):
    hosts = ["10.0.0.1 (host a)", "10.0.0.2 (host b)", "10.0.0.3 (host c)", "10.0.0.4 (host d)"]
    monkeypatch.setattr(peers, "_peers", hosts)
    monkeypatch.setattr(peers, "_rank", 2)
    return hosts


def test_a_closed_connection_names_the_peer_gloo_names(four_ranks):
    err = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer "
                       "[10.0.0.4]:61234")
    assert peers.describe(err, 60).startswith("rank 2 lost rank 3 at 10.0.0.4 (host d) during a collective: the "
                                              "connection was closed")


def test_a_timeout_among_several_peers_lists_them(four_ranks):
    err = RuntimeError("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 60000ms for "
                       "recv operation to complete")
    message = peers.describe(err, 60)
    assert message.startswith("rank 2 lost one of rank 0 at 10.0.0.1 (host a), rank 1 at 10.0.0.2 (host b), rank 3 "
                              "at 10.0.0.4 (host d) during a collective: no answer within collective_timeout 60 s")


def test_a_pair_closed_by_an_earlier_timeout_counts_as_one(four_ranks, monkeypatch):
    monkeypatch.setattr(peers, "_peers", four_ranks[:2])
    monkeypatch.setattr(peers, "_rank", 1)
    message = peers.describe(RuntimeError("Application timeout caused pair closure"), 10)
    assert message.startswith("rank 1 lost rank 0 at 10.0.0.1 (host a) during a collective: no answer within "
                              "collective_timeout 10 s")


def test_other_errors_pass_through(four_ranks, monkeypatch):
    with pytest.raises(ValueError):
        with peers.named_on_failure(60):
            raise ValueError("Connection closed by peer")  # not a RuntimeError: not from a collective
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        with peers.named_on_failure(60):
            raise RuntimeError("CUDA out of memory")
    with pytest.raises(peers.PeerLost, match="lost rank 0 at 10.0.0.1"):
        with peers.named_on_failure(60):
            raise RuntimeError("Connection reset by peer [10.0.0.1]:1")
    monkeypatch.setattr(peers, "_peers", [])  # one process: nothing to name
    with pytest.raises(RuntimeError, match="Timed out"):
        with peers.named_on_failure(60):
            raise RuntimeError("gloo/transport Timed out waiting 1ms")
