"""TwoHosts (facesiam/testing/netns.py): two network namespaces joined by a veth pair that talk to each other only,
whose link can be cut and restored, and that are always removed."""

from __future__ import annotations

import subprocess
import sys

import pytest

from facesiam.testing import netns
from facesiam.testing.netns import NetnsUnavailable, TwoHosts

# A one-shot TCP echo: host 0 listens on its address, host 1 connects (both with timeouts: a cut link must not hang).
SERVE = """import socket, sys
s = socket.create_server((sys.argv[1], 7000)); s.settimeout(20); print("listening", flush=True)
c, _ = s.accept(); c.settimeout(20); c.sendall(c.recv(100).upper())"""
CONNECT = """import socket, sys
c = socket.create_connection((sys.argv[1], 7000), timeout=float(sys.argv[2])); c.sendall(b"ping"); print(c.recv(100).decode())"""


def namespaces() -> list[str]:
    return [line.split()[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                                       timeout=30).stdout.splitlines() if line.strip()]


def echo(hosts: TwoHosts, target: str, host: int = 1, timeout: float = 20) -> subprocess.CompletedProcess:
    """Serve the echo in host 0 and connect from HOST (or from the machine itself: host None) to TARGET."""
    server = hosts.popen(0, [sys.executable, "-c", SERVE, hosts.addr[0]], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "listening"
        argv = [sys.executable, "-c", CONNECT, target, str(timeout)]
        if host is None:
            return subprocess.run(argv, capture_output=True, text=True, timeout=60)
        return hosts.run(host, argv, capture_output=True, text=True, timeout=60)
    finally:
        server.kill()
        server.wait(timeout=30)


def test_the_two_hosts_reach_each_other_and_nothing_else(two_hosts):
    assert echo(two_hosts, two_hosts.addr[0]).stdout.strip() == "PING"
    # The machine's own network stack has no route to the pair: the addresses exist only inside the namespaces.
    assert echo(two_hosts, two_hosts.addr[0], host=None, timeout=2).returncode != 0
    # Each host has its own loopback (up) and exactly one other interface: its end of the veth.
    for host in (0, 1):
        links = two_hosts.run(host, ["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=30).stdout
        assert sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines()) == sorted(
            ["lo", two_hosts.ifname[host]])


def test_a_process_can_move_itself_into_a_host(two_hosts):
    """enter(): a benchmark's client (or a server started by multiprocessing) joins a host after it started."""
    code = f"from facesiam.testing.netns import enter_namespace; enter_namespace({two_hosts.names[1]!r}); {CONNECT}"
    server = two_hosts.popen(0, [sys.executable, "-c", SERVE, two_hosts.addr[0]], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "listening"
        moved = subprocess.run([sys.executable, "-c", code, two_hosts.addr[0], "5"], capture_output=True, text=True,
                               timeout=60)
        assert moved.stdout.strip() == "PING", moved.stderr
    finally:
        server.kill()
        server.wait(timeout=30)


def test_a_cut_link_passes_nothing_until_it_is_restored(two_hosts):
    two_hosts.cut()
    assert not two_hosts.link_up()
    assert echo(two_hosts, two_hosts.addr[0], timeout=2).returncode != 0
    two_hosts.restore()
    assert two_hosts.link_up()
    after = echo(two_hosts, two_hosts.addr[0])
    assert after.stdout.strip() == "PING", after.stderr[-500:]


def test_namespaces_and_their_processes_are_removed_also_when_the_body_fails(two_hosts):
    with pytest.raises(ZeroDivisionError):
        with TwoHosts() as hosts:
            sleeper = hosts.popen(1, [sys.executable, "-c", "import time; time.sleep(600)"])
            assert set(hosts.names) <= set(namespaces())
            1 / 0
    assert sleeper.wait(timeout=30) == -9
    assert not set(hosts.names) & set(namespaces())


def test_leftovers_of_a_killed_run_are_swept(two_hosts):
    """A run killed with SIGKILL cannot clean up; the next TwoHosts removes namespaces whose creator is gone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=60)
    leftover = f"{netns.PREFIX}{dead.pid}-0a"
    subprocess.run(["ip", "netns", "add", leftover], check=True, timeout=30)
    with TwoHosts():
        assert leftover not in namespaces()


def test_without_root_or_iproute2_it_says_why(monkeypatch):
    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(netns.shutil, "which", lambda name: "/usr/sbin/ip")
    with pytest.raises(NetnsUnavailable, match="need root"):
        TwoHosts().__enter__()
    monkeypatch.setattr(netns.shutil, "which", lambda name: None)
    with pytest.raises(NetnsUnavailable, match="iproute2"):
        TwoHosts().__enter__()
