"""Real DNS servers from Debian (unbound, dnsmasq) and the fake one, in a server namespace that a client
namespace reaches over a veth pair.

    with NetnsPair("kt10dns") as net, Unbound(net, tmp_path) as server:
        answers = net.dig("+tcp", "www.kt.test")        # dig run in the client namespace
        server.tcp_queries()                            # unbound-control's own count

Every server is started by the test, stopped by PID on exit, and its namespace deleted.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.dnsnet import FAKEDNS
from tests.helpers import Rig

SERVER_ADDR = "10.231.0.1"
CLIENT_ADDR = "10.231.0.2"
ZONE = "kt.test"
ANSWER = "10.231.0.9"  # what every server answers for www.kt.test and any name under it
READY_TIMEOUT_S = 15.0


class NetnsPair(Rig):
    """<hint>-s-<pid> (SERVER_ADDR) and <hint>-c-<pid> (CLIENT_ADDR), joined by a veth pair."""

    def __init__(self, hint: str) -> None:
        self.server_ns = f"{hint}-s-{os.getpid()}"
        self.client_ns = f"{hint}-c-{os.getpid()}"
        self._veth = f"{hint[:6]}{os.getpid() % 100000}"
        self._made: list[str] = []

    def _start(self) -> None:
        for ns in (self.server_ns, self.client_ns):
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        _ip("link", "add", f"{self._veth}a", "netns", self.server_ns, "type", "veth", "peer", "name",
            f"{self._veth}b", "netns", self.client_ns)
        for ns, dev, addr in ((self.server_ns, f"{self._veth}a", SERVER_ADDR),
                              (self.client_ns, f"{self._veth}b", CLIENT_ADDR)):
            _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _ip("-n", ns, "link", "set", dev, "up")

    def close(self) -> None:
        for ns in reversed(self._made):  # deleting a namespace deletes its end of the veth, and so the pair
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        self._made.clear()

    def inode(self, ns: str) -> int:
        """The namespace's inode number: the netns and netns_sk of its events."""
        return os.stat(f"/run/netns/{ns}").st_ino

    def in_server(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.server_ns, *argv]

    def in_client(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.client_ns, *argv]

    def dig(self, *args: str, timeout_s: int = 2) -> list[str]:
        """dig in the client namespace against the server, one try: the answer lines it printed."""
        result = subprocess.run(self.in_client("dig", f"@{SERVER_ADDR}", "+tries=1", f"+timeout={timeout_s}",
                                               "+noall", "+answer", *args),
                                capture_output=True, text=True, timeout=120)
        return [line for line in result.stdout.splitlines() if line.strip() and not line.startswith(";")]


class _Daemon(Rig):
    """A server process in the server namespace, run in the foreground of its own process and stopped by PID."""

    def __init__(self, net: NetnsPair, tmp_path: Path, name: str) -> None:
        self.net = net
        self.dir = Path(tmp_path) / name
        self.log = self.dir / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def _spawn(self, argv: list[str]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as log:
            # close_fds: a lock the caller holds (flock) must not live on in the server
            self.proc = subprocess.Popen(self.net.in_server(*argv), stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, close_fds=True)
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.net.dig(f"www.{ZONE}", timeout_s=1):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{argv[0]} exited with {self.proc.returncode}: {self.log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} not answering after {READY_TIMEOUT_S}s: {self.log.read_text()}")
            time.sleep(0.1)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def close(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=5)


class Unbound(_Daemon):
    """unbound serving the local zone kt.test on SERVER_ADDR:53, UDP and TCP, no forwarding, one thread."""

    def __init__(self, net: NetnsPair, tmp_path: Path) -> None:
        super().__init__(net, tmp_path, "unbound")
        self.conf = self.dir / "unbound.conf"

    def _start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(f"""server:
    interface: {SERVER_ADDR}
    port: 53
    do-tcp: yes
    do-udp: yes
    do-ip6: no
    chroot: ""
    username: ""
    use-syslog: no
    logfile: ""
    pidfile: "{self.dir}/unbound.pid"
    directory: "{self.dir}"
    access-control: 0.0.0.0/0 allow
    num-threads: 1
    module-config: "iterator"
    extended-statistics: yes
    local-zone: "{ZONE}." redirect
    local-data: "{ZONE}. 60 IN A {ANSWER}"
remote-control:
    control-enable: yes
    control-use-cert: no
    control-interface: {self.dir}/unbound.ctl
""")
        self._spawn(["unbound", "-d", "-c", str(self.conf)])

    def stats(self) -> dict[str, float]:
        """unbound-control stats_noreset: unbound's own counters since it started."""
        out = subprocess.run(self.net.in_server("unbound-control", "-c", str(self.conf), "stats_noreset"),
                             capture_output=True, text=True, check=True, timeout=30).stdout
        return {k: float(v) for k, v in (line.split("=", 1) for line in out.splitlines() if "=" in line)}


class Dnsmasq(_Daemon):
    """dnsmasq answering kt.test and every name under it on SERVER_ADDR:53, no upstream; every query it gets is
    a `query[A] NAME from ADDR` line of its log. It reads a TCP query's length one byte at a time."""

    def __init__(self, net: NetnsPair, tmp_path: Path) -> None:
        super().__init__(net, tmp_path, "dnsmasq")

    def _start(self) -> None:
        self._spawn(["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                     f"--address=/{ZONE}/{ANSWER}", "--port=53", f"--listen-address={SERVER_ADDR}",
                     "--bind-interfaces", "--user=root", f"--pid-file={self.dir}/dnsmasq.pid", "--log-queries",
                     "--log-facility=-"])

    def queries_logged(self, name: str) -> int:
        return sum(1 for line in self.log.read_text().splitlines() if f"query[A] {name} from" in line)


class FakeDns(_Daemon):
    """tests/kernel/fakedns.py on SERVER_ADDR:53 (UDP and TCP): every query is a line of queries()."""

    def __init__(self, net: NetnsPair, tmp_path: Path) -> None:
        super().__init__(net, tmp_path, "fakedns")
        self.control = self.dir / "control"

    def _start(self) -> None:
        self._spawn([sys.executable, FAKEDNS, "--ready-file", str(self.dir / "ready"), "--control-dir",
                     str(self.control), "--listen", SERVER_ADDR])

    def queries(self) -> list[dict]:
        import json

        path = self.control / "queries.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)
