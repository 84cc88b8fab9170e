"""Which peer a failed collective lost, in one line.

A node that drops off the network makes gloo's next collective wait (up to ``collective_timeout``, set on the process
group by setup.build_accelerator) and then fail with "Timed out waiting 10000ms for recv operation to complete"; a
peer whose processes die gives "Connection closed by peer [10.0.0.2]:41235". Neither says which rank, and the first
names no host at all. Each rank's address is therefore gathered once at the start, while the network works
(``record``), and ``named_on_failure`` turns such an error into ``PeerLost``: one line naming the rank(s) and their
addresses (the command prints it as ``train: ...`` and exits 1; torchrun then restarts or stops the job).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from typing import Iterator, Optional

from ..errors import FacesiamError

_peers: list[str] = []  # "ADDRESS (host NAME)" of each rank, in rank order, once record() ran with several ranks
_rank = 0

# gloo's transport errors (ProcessGroupGloo raises them as RuntimeError/DistBackendError from any collective)
_TRANSPORT = re.compile(r"gloo/transport|Connection (closed|reset|refused)|Timed out waiting|Broken pipe|Socket Timeout|"
                        r"Application timeout caused pair closure", re.I)  # the last: a pair an earlier timeout closed
_PEER_ADDRESS = re.compile(r"\[([0-9a-fA-F.:]+)\]:\d+")
_SOURCE = re.compile(r"\[[^\]]*\.(cc|cpp|h):\d+\]\s*")  # gloo's "[/path/to/pair.cc:534] " prefix


class PeerLost(FacesiamError, RuntimeError):
    """A collective failed because a peer stopped answering or went away (its node, or the network to it)."""


def _own_address() -> str:
    """The address this process reaches rank 0 from (the route to MASTER_ADDR; a UDP connect sends nothing)."""
    master = os.environ.get("MASTER_ADDR", "127.0.0.1")
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((master, int(os.environ.get("MASTER_PORT", "29500"))))
            return s.getsockname()[0]
    except OSError:
        return master


def record(accelerator) -> None:
    """Gather every rank's address and host name (one small collective at the start; nothing with one process)."""
    global _peers, _rank
    if accelerator.num_processes < 2:
        return
    import torch.distributed as dist

    mine = f"{_own_address()} (host {socket.gethostname()})"
    everyone: list[Optional[str]] = [None] * accelerator.num_processes
    dist.all_gather_object(everyone, mine)
    _peers, _rank = [str(p) for p in everyone], accelerator.process_index


def describe(err: BaseException, timeout: float) -> Optional[str]:
    """The one-line message for a collective's transport error, None for any other error (or one process)."""
    text = " ".join(str(err).split())
    if not _peers or not _TRANSPORT.search(text):
        return None
    others = [r for r in range(len(_peers)) if r != _rank]
    address = _PEER_ADDRESS.search(text)
    if address:  # the peer gloo names
        named = [r for r in others if _peers[r].split()[0] == address[1]] or others
    else:
        named = others
    who = ", ".join(f"rank {r} at {_peers[r]}" for r in named)
    if len(named) > 1:
        who = f"one of {who}"
    detail = _SOURCE.sub("", text)
    if re.search(r"Timed out|Timeout", text, re.I):
        why = f"no answer within collective_timeout {timeout:g} s"
    elif re.search(r"closed|reset|Broken pipe", text, re.I):
        why = "the connection was closed (its processes ended, or the node went away)"
    else:
        why = "the connection failed"
    return (f"rank {_rank} lost {who} during a collective: {why} ({detail}); check that node and the network between "
            f"the nodes (raise --collective-timeout to wait longer)")


@contextlib.contextmanager
def named_on_failure(timeout: float) -> Iterator[None]:
    """Re-raise a collective's transport error as PeerLost with the one-line message of ``describe``."""
    try:
        yield
    except RuntimeError as err:
        message = describe(err, timeout)
        if message is None:
            raise
        raise PeerLost(message) from None
