"""Two network namespaces joined by a veth pair: a server host and a client host, with the kernel's own counters.

    with TwoHosts("loss") as net:
        net.nft(net.client, LOSS_RULES)                        # rules live in a namespace: deleted with it
        before = net.nstat(net.server)
        proc = net.popen(net.server, "iperf3", "-s", "-1")
        ...
        delta = net.nstat(net.server) - before                 # Counter of TcpRetransSegs, TcpOutRsts, ...

Addresses exist only inside the two namespaces this rig makes; nothing leaves them.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections import Counter

from tests.helpers import Rig

SERVER_ADDR = "10.231.0.2"
CLIENT_ADDR = "10.231.0.1"


def netns_inode(name: str) -> int:
    """The inode of a named network namespace, as the kernel's ns.inum reports it."""
    return os.stat(f"/run/netns/{name}").st_ino


class TwoHosts(Rig):
    """Namespaces kt-tcpnet-<hint>-{srv,cli}-<pid> with loopback up, joined by a veth (SERVER_ADDR, CLIENT_ADDR)."""

    def __init__(self, hint: str) -> None:
        self.server = f"kt-tcpnet-{hint}-srv-{os.getpid()}"
        self.client = f"kt-tcpnet-{hint}-cli-{os.getpid()}"
        self._made: list[str] = []
        self._procs: list[subprocess.Popen] = []

    def _start(self) -> None:
        for name in (self.server, self.client):
            subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
            self._made.append(name)
            subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        subprocess.run(["ip", "link", "add", "kt-tcpnet-s", "netns", self.server, "type", "veth", "peer", "name",
                        "kt-tcpnet-c", "netns", self.client], check=True)
        for name, dev, addr in ((self.server, "kt-tcpnet-s", SERVER_ADDR), (self.client, "kt-tcpnet-c", CLIENT_ADDR)):
            subprocess.run(["ip", "-n", name, "addr", "add", f"{addr}/24", "dev", dev], check=True)
            subprocess.run(["ip", "-n", name, "link", "set", dev, "up"], check=True)

    def close(self) -> None:
        for proc in self._procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for name in self._made:  # deleting a namespace deletes its end of the veth, its rules and addresses
            subprocess.run(["ip", "netns", "del", name], check=False)
        self._made = []

    def run(self, ns: str, *cmd: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True, timeout=timeout,
                              check=check)

    def popen(self, ns: str, *cmd: str, **kwargs: object) -> subprocess.Popen:
        """A process in ns (`ip netns exec` execs it: its pid is Popen.pid); killed on close if still running."""
        proc = subprocess.Popen(["ip", "netns", "exec", ns, *cmd], **kwargs)  # type: ignore[call-overload]
        self._procs.append(proc)
        return proc

    def nft(self, ns: str, rules: str) -> None:
        subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, text=True, check=True)

    def nstat(self, ns: str) -> Counter:
        """The namespace's SNMP and netstat counters now (absolute; nstat's history file is not touched)."""
        out = self.run(ns, "nstat", "--json", "-a", "-s", "-z").stdout
        doc = json.loads(out)
        return Counter(doc.get("kernel", doc))

    def inode(self, ns: str) -> int:
        return netns_inode(ns)
