"""Two "hosts" on one machine: two network namespaces joined by a veth pair (iproute2), for tests and benchmarks
that need a real network link between two nodes, one that can be cut.

    with TwoHosts() as hosts:
        server = hosts.popen(0, [sys.executable, "-m", "http.server", "--bind", hosts.addr[0]], ...)
        hosts.run(1, ["curl", f"http://{hosts.addr[0]}:8000/"], timeout=30)
        hosts.cut(); ...; hosts.restore()

Each namespace has its own network stack: lo (up) and one end of the veth, with a private address of a /30 that the
harness picks (10.213.x.1 and 10.213.x.2). Those two addresses and each namespace's loopback are the only targets:
nothing is routed out of the pair, and the host's own network is untouched. The namespaces and the veth are removed
when the context ends, at interpreter exit (atexit) if it never did, and on a failed set-up; a later TwoHosts also
removes the leftovers of a process that was killed before it could clean up (names carry the creator's pid).

Needs root and iproute2, and a kernel/container that allows `ip netns add` (CAP_SYS_ADMIN); otherwise entering the
context raises NetnsUnavailable with the reason, which tests turn into a skip.
"""

from __future__ import annotations

import atexit
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Optional, Sequence

PREFIX = "fsns"  # every namespace and veth this module makes starts with it (the sweep removes only those)
IP_TIMEOUT = 30  # seconds for one `ip` command
_counter = itertools.count()


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be made here (not root, no iproute2, or no CAP_SYS_ADMIN); str() says which."""


def unavailable_reason() -> Optional[str]:
    """Why TwoHosts cannot work on this machine, from the cheap checks (None: try it; creation may still fail)."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (`ip netns add`)"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT)
    if check and proc.returncode:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip() or f'exit status {proc.returncode}'}")
    return proc


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _sweep() -> None:
    """Remove namespaces left by processes that died without cleaning up (kill -9 of a test run)."""
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        match = re.match(rf"({PREFIX}(\d+)-\d+[ab])\b", line)
        if match and not _pid_alive(int(match[2])):
            _remove_namespace(match[1])


def _remove_namespace(name: str) -> None:
    """SIGKILL every process still in namespace NAME, then delete it (its veth end, and so the pair, goes with it)."""
    pids = _ip("netns", "pids", name, check=False).stdout.split()
    # A process that entered the namespace itself (enter()) is spared, and so is its multiprocessing resource
    # tracker, which it started there: killed, multiprocessing would restart it with tracebacks.
    tracker = getattr(getattr(sys.modules.get("multiprocessing.resource_tracker"), "_resource_tracker", None), "_pid",
                      None)
    for pid in map(int, pids):
        if pid not in (os.getpid(), tracker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    _ip("netns", "delete", name, check=False)


def enter_namespace(name: str) -> None:
    """setns(2) into network namespace NAME (/run/netns/NAME, as `ip netns add` makes it) for the calling thread.

    os.setns is Python 3.12+; on older Pythons libc's setns through ctypes (the same call, three lines)."""
    fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if hasattr(os, "setns"):
            os.setns(fd, os.CLONE_NEWNET)
            return
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
            raise OSError(ctypes.get_errno(), f"setns into network namespace {name}")
    finally:
        os.close(fd)


class TwoHosts:
    """Two network namespaces (hosts 0 and 1) joined by a veth pair; a context manager.

    ``names``: the namespaces; ``ifname``: each host's end of the veth (for GLOO_SOCKET_IFNAME); ``addr``: each host's
    address on the link. Commands run in a host with ``exec_args``/``popen``/``run``; ``cut``/``restore`` take the
    link down and up again."""

    def __init__(self) -> None:
        n = next(_counter)
        tag = f"{PREFIX}{os.getpid()}-{n}"  # pid-based: parallel test runs never collide
        self.names = (f"{tag}a", f"{tag}b")
        # Interface names have at most 15 characters; they live inside the namespaces, so they need not be unique.
        self.ifname = ("veth-a", "veth-b")
        # A /30 of 10.213.0.0/16 chosen from the pid (the addresses exist only inside the two namespaces anyway),
        # its last byte 101..250: host 0's address sorts first also as a string, as torchrun's c10d rendezvous
        # orders nodes (rank 0 on host 0).
        last = 100 + 4 * (n % 38)
        base = f"10.213.{os.getpid() % 256}."
        self.addr = (f"{base}{last + 1}", f"{base}{last + 2}")
        self._up = False

    # ------------------------------------------------------------------ set-up and removal

    def __enter__(self) -> "TwoHosts":
        reason = unavailable_reason()
        if reason:
            raise NetnsUnavailable(reason)
        _sweep()
        atexit.register(self.close)  # the context's exit normally runs first; this one then does nothing
        self._up = True
        try:
            for name in self.names:
                _ip("netns", "add", name)
            a, b = self.names
            # The veth is made inside host 0 with its peer inside host 1: it never exists in the host's namespace.
            _ip("-n", a, "link", "add", self.ifname[0], "type", "veth", "peer", "name", self.ifname[1], "netns", b)
            for host, name in enumerate(self.names):
                _ip("-n", name, "link", "set", "lo", "up")
                _ip("-n", name, "addr", "add", f"{self.addr[host]}/30", "dev", self.ifname[host])
                _ip("-n", name, "link", "set", self.ifname[host], "up")
            self._wait_link(up=True)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as err:
            self.close()
            raise NetnsUnavailable(f"could not make two network namespaces joined by a veth ({err})") from None
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Kill what still runs in the namespaces and remove them with the veth; safe to call twice."""
        if not self._up:
            return
        self._up = False
        for name in self.names:
            _remove_namespace(name)
        atexit.unregister(self.close)

    # ------------------------------------------------------------------ running commands

    def exec_args(self, host: int, argv: Sequence[str]) -> list[str]:
        """ARGV run in host ``host``'s network namespace (the rest of the machine, files and processes, is shared)."""
        return ["ip", "netns", "exec", self.names[host], *map(str, argv)]

    def popen(self, host: int, argv: Sequence[str], **kwargs) -> subprocess.Popen:
        """subprocess.Popen of ARGV in host ``host``."""
        return subprocess.Popen(self.exec_args(host, argv), **kwargs)

    def run(self, host: int, argv: Sequence[str], *, timeout: float, **kwargs) -> subprocess.CompletedProcess:
        """subprocess.run of ARGV in host ``host``, with a timeout (always: a cut link can hang a client)."""
        return subprocess.run(self.exec_args(host, argv), timeout=timeout, **kwargs)

    def pids(self, host: int) -> list[int]:
        """Processes running in host ``host``'s namespace."""
        return [int(p) for p in _ip("netns", "pids", self.names[host], check=False).stdout.split()]

    def kill(self, host: int) -> list[int]:
        """SIGKILL every process in host ``host`` (the node disappears at once); the pids killed."""
        pids = self.pids(host)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids

    def enter(self, host: int) -> None:
        """Move the calling thread, and every thread and process it starts from now on, into host ``host``'s
        network namespace (for a benchmark that is itself the client, or a server process started by
        multiprocessing). Call it before the thread opens any socket; there is no way back."""
        enter_namespace(self.names[host])

    # ------------------------------------------------------------------ the link

    def cut(self) -> None:
        """Take the link down (host 0's end; host 1's end loses its carrier): nothing passes until restore()."""
        _ip("-n", self.names[0], "link", "set", self.ifname[0], "down")
        self._wait_link(up=False)

    def restore(self) -> None:
        """Bring the link up again; the addresses and routes come back with it."""
        _ip("-n", self.names[0], "link", "set", self.ifname[0], "up")
        self._wait_link(up=True)
        for host, name in enumerate(self.names):  # ARP entries that failed during the cut would refuse a while
            _ip("-n", name, "neigh", "flush", "dev", self.ifname[host], check=False)

    def link_up(self) -> bool:
        """Whether both ends are up with a carrier."""
        return all(",UP," in f",{self._flags(host)}," and "NO-CARRIER" not in self._flags(host) for host in (0, 1))

    def _flags(self, host: int) -> str:
        out = _ip("-n", self.names[host], "-o", "link", "show", self.ifname[host]).stdout
        match = re.search(r"<([^>]*)>", out)
        return match[1] if match else ""

    def _wait_link(self, up: bool, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.link_up() != up:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the veth between {self.names[0]} and {self.names[1]} did not go "
                                   f"{'up' if up else 'down'} within {timeout:g}s")
            time.sleep(0.02)
