"""A network namespace with a fake DNS server on its loopback, and clients run inside it.

    with DnsNetns(tmp_path, "dns") as ns:
        ns.drop(["slow.test"])
        result = ns.run_json("getaddrinfo", "web.test")        # {"ok": True, "addresses": ["127.0.0.5", "::5"], ...}

The namespace's resolv.conf lives in /etc/netns/<ns>/resolv.conf, which `ip netns exec` bind-mounts over
/etc/resolv.conf for the commands it runs; the host's /etc/resolv.conf is never touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

from tests.helpers import Rig

KERNEL_DIR = Path(__file__).resolve().parent / "kernel"
FAKEDNS = str(KERNEL_DIR / "fakedns.py")
RESOLVER = str(KERNEL_DIR / "resolver.py")
ETC_NETNS = Path("/etc/netns")
RESOLV_CONF = "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n"


class DnsNetns(Rig):
    """A netns named kt-<hint>-<pid> whose loopback is up and whose 127.0.0.1:53 and [::1]:53 (UDP and TCP)
    answer from fakedns.py (comm "kt-dns"). Everything is undone on exit, even when the body raises."""

    def __init__(self, tmp_path: Path, name_hint: str, *, port: int = 53,
                 listen: Iterable[str] = ("127.0.0.1", "::1"), resolv_conf: str = RESOLV_CONF,
                 ready_timeout: float = 15.0) -> None:
        self.name = f"kt-{name_hint}-{os.getpid()}"
        self.port = port
        self.listen = list(listen)
        self.resolv_conf_text = resolv_conf
        self.ready_timeout = ready_timeout
        self.dir = Path(tmp_path) / f"dnsnet-{name_hint}"
        self.control_dir = self.dir / "control"
        self.ready_file = self.dir / "ready"
        self.server_log = self.dir / "fakedns.log"
        self.etc_dir = ETC_NETNS / self.name
        self.resolv_conf = self.etc_dir / "resolv.conf"
        self.server: subprocess.Popen | None = None
        self.server_pid: int | None = None
        self._created_netns = False
        self._created_etc_netns = False
        self._clients: list[subprocess.Popen] = []

    # lifecycle

    def _start(self) -> None:
        self.control_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True, text=True)
        self._created_netns = True
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True, capture_output=True)
        if not ETC_NETNS.exists():
            ETC_NETNS.mkdir(mode=0o755)
            self._created_etc_netns = True
        self.etc_dir.mkdir(mode=0o755, exist_ok=True)
        self.resolv_conf.write_text(self.resolv_conf_text)
        cmd = ["--ready-file", str(self.ready_file), "--control-dir", str(self.control_dir), "--port", str(self.port)]
        for addr in self.listen:
            cmd += ["--listen", addr]
        with open(self.server_log, "wb") as log:
            self.server = subprocess.Popen(["ip", "netns", "exec", self.name, sys.executable, FAKEDNS, *cmd],
                                           stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        # `ip netns exec` sets the namespace up and then execs the command, so Popen.pid is the server itself
        self.server_pid = self.server.pid
        self._wait_ready()
        ready = json.loads(self.ready_file.read_text())
        if ready["pid"] != self.server_pid:
            raise RuntimeError(f"fakedns reports pid {ready['pid']}, expected {self.server_pid}")

    def _wait_ready(self) -> None:
        assert self.server is not None
        deadline = time.monotonic() + self.ready_timeout
        while not self.ready_file.exists():
            if self.server.poll() is not None:
                raise RuntimeError(f"fakedns exited with {self.server.returncode}: {self.server_log.read_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"fakedns not ready after {self.ready_timeout}s: {self.server_log.read_text()}")
            time.sleep(0.02)

    def close(self) -> None:
        """Stop our clients and the server (by PID, SIGTERM then SIGKILL), delete the netns and /etc/netns/<ns>."""
        for proc in self._clients:
            if proc.poll() is None:
                _stop(proc, grace=1.0)
                for pipe in (proc.stdin, proc.stdout, proc.stderr):
                    if pipe is not None:
                        pipe.close()
        self._clients.clear()
        if self.server is not None:
            _stop(self.server, grace=5.0)
            self.server = None
        if self._created_netns:
            subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)
            self._created_netns = False
        shutil.rmtree(self.etc_dir, ignore_errors=True)
        if self._created_etc_netns:
            try:
                ETC_NETNS.rmdir()  # only if empty: another namespace may have put its files there meanwhile
            except OSError:
                pass
            self._created_etc_netns = False

    # behaviour of the server, read afresh on every query

    def drop(self, names: Iterable[str] | str) -> None:
        """Queries for these names get no reply (replaces the previous list; drop([]) clears it)."""
        if isinstance(names, str):
            names = [names]
        _write(self.control_dir / "drop", "".join(f"{n}\n" for n in names))

    def silence(self, on: bool = True) -> None:
        """No query at all gets a reply while on."""
        path = self.control_dir / "silent"
        if on:
            path.touch()
        else:
            path.unlink(missing_ok=True)

    def delay(self, ms: int) -> None:
        """Wait ms milliseconds before every reply (0: no delay)."""
        _write(self.control_dir / "delay_ms", f"{int(ms)}\n")

    def queries(self) -> list[dict]:
        """What the server has seen so far: {"proto", "peer", "name", "qtype", "id", "action", "delay_ms"}."""
        path = self.control_dir / "queries.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    # clients inside the namespace

    def command(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def exec(self, *argv: str, timeout: float = 60.0, check: bool = False) -> subprocess.CompletedProcess:
        """Any command inside the namespace, e.g. ns.exec("getent", "hosts", "web.test")."""
        return subprocess.run(self.command(*argv), capture_output=True, text=True, timeout=timeout, check=check)

    def run(self, *role_args: str, timeout: float = 60.0, check: bool = False) -> subprocess.CompletedProcess:
        """resolver.py ROLE ARGS... inside the namespace, to completion."""
        return self.exec(sys.executable, RESOLVER, *role_args, timeout=timeout, check=check)

    def run_json(self, *role_args: str, timeout: float = 60.0) -> dict:
        """run(), checked, and the JSON line it printed."""
        result = self.run(*role_args, timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(f"resolver.py {' '.join(role_args)} exited {result.returncode}: {result.stderr}")
        return json.loads(result.stdout.strip().splitlines()[-1])

    def popen(self, *role_args: str, **kwargs: object) -> subprocess.Popen:
        """resolver.py ROLE ARGS... inside the namespace, in the background; its .pid is the resolver itself.
        Stopped (SIGTERM, then SIGKILL) on exit if still running, and its pipes closed."""
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.PIPE)
        kwargs.setdefault("text", True)
        proc = subprocess.Popen(self.command(sys.executable, RESOLVER, *role_args), **kwargs)  # type: ignore[call-overload]
        self._clients.append(proc)
        return proc


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.rename(tmp, path)


def _stop(proc: subprocess.Popen, grace: float) -> None:
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)
