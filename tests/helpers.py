"""Shared helpers for tests that load real BPF objects and drive real traffic."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import orjson
import pytest

TRAFFIC = str(Path(__file__).resolve().parent / "kernel" / "traffic.py")
REQUIRE_KERNEL = os.environ.get("KTRACE_REQUIRE_KERNEL") == "1"


def kernel_unavailable() -> str | None:
    """Why real BPF cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root to load BPF"
    if not Path("/sys/kernel/btf/vmlinux").exists():
        return "the kernel exposes no BTF"
    from ktrace import libbpf
    from ktrace.errors import LibbpfMissing

    try:
        libbpf.library()
    except LibbpfMissing as exc:
        return str(exc)
    return None


def _require(what: str, reason: str | None) -> None:
    """Skip when the machine cannot run the test, or fail when KTRACE_REQUIRE_KERNEL=1 says it must."""
    if reason:
        if REQUIRE_KERNEL:
            pytest.fail(f"{what} test cannot run: {reason} (KTRACE_REQUIRE_KERNEL=1)")
        pytest.skip(reason)


def require_kernel() -> None:
    _require("kernel", kernel_unavailable())


def require_containerd() -> None:
    """For tests that run real pods with tests/crikit.py."""
    from tests import crikit

    _require("containerd", crikit.unavailable())


RigT = TypeVar("RigT", bound="Rig")


class Rig:
    """Something a test sets up with _start() and undoes with close(): close() also runs when _start() fails
    halfway, so it must undo only what was made."""

    def __enter__(self: RigT) -> RigT:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def wait_for(path: Path, proc: subprocess.Popen | None = None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process exited with {proc.returncode} before {path.name}: {err.decode()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {path}")
        time.sleep(0.02)


@dataclass
class Bundle:
    events: list[dict]
    summary: dict
    node: dict
    paths: dict[str, Path]

    def of_type(self, kind: str) -> list[dict]:
        return [e for e in self.events if e["type"] == kind]


def read_bundle(out_dir: Path) -> Bundle:
    paths = {}
    for kind in ("events.jsonl", "summary.json", "node.json", "bundle.tgz"):
        found = sorted(out_dir.glob(f"ktrace.*.{kind}"))
        assert len(found) == 1, f"expected one {kind} in {out_dir}, found {found}"
        paths[kind] = found[0]
    events = [orjson.loads(line) for line in paths["events.jsonl"].read_bytes().splitlines()]
    return Bundle(events, orjson.loads(paths["summary.json"].read_bytes()),
                  orjson.loads(paths["node.json"].read_bytes()), paths)


def kept_by_ports(port_a: int, port_b: int, every: int) -> bool:
    """--sample's decision for a flow (bpf/common.bpf.h kt_sample_ports, as documented in the README): murmur3's
    finalizer over the two ports in order, kept when it is 0 modulo every."""
    lo, hi = sorted((port_a, port_b))
    h = lo << 16 | hi
    h ^= h >> 16
    h = h * 0x85EBCA6B & 0xFFFFFFFF
    h ^= h >> 13
    h = h * 0xC2B2AE35 & 0xFFFFFFFF
    h ^= h >> 16
    return h % every == 0


class Ktrace:
    """`ktrace` run as a user runs it, in a subprocess; started() returns once the probes are attached."""

    def __init__(self, tmp_path: Path, *args: str, duration: str = "5s", out_dir: Path | None = None) -> None:
        self.out_dir = out_dir or tmp_path / "out"
        self.ready = tmp_path / "ktrace.ready"
        self.cmd = [sys.executable, "-m", "ktrace", f"--duration={duration}", f"--out-dir={self.out_dir}",
                    f"--ready-file={self.ready}", *args]
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stdout = self.stderr = ""

    def started(self) -> Ktrace:
        wait_for(self.ready, self.proc)
        return self

    def signal(self, signum: int = signal.SIGINT) -> None:
        self.proc.send_signal(signum)

    def finish(self, timeout: float = 60.0) -> int:
        out, err = self.proc.communicate(timeout=timeout)
        self.stdout, self.stderr = out.decode(), err.decode()
        return self.proc.returncode

    def bundle(self) -> Bundle:
        return read_bundle(self.out_dir)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def record_during(tmp_path: Path, work: Callable[[], object], *args: str, duration: str = "120s") -> Bundle:
    """Run ktrace, do the work once its probes are attached, end the window with SIGINT: the bundle."""
    ktrace = Ktrace(tmp_path, *args, duration=duration).started()
    try:
        work()
    finally:
        ktrace.signal(signal.SIGINT)
    assert ktrace.finish() in (0, 3), ktrace.stderr
    return ktrace.bundle()


class Server:
    """tests/kernel/traffic.py server: a loopback TCP server with comm kt-server."""

    def __init__(self, tmp_path: Path, netns: str | None = None) -> None:
        port_file = tmp_path / f"server.port.{time.monotonic_ns()}"
        prefix = ["ip", "netns", "exec", netns] if netns else []
        self.proc = subprocess.Popen([*prefix, sys.executable, TRAFFIC, "server", str(port_file)])
        wait_for(port_file, self.proc)
        self.port = int(port_file.read_text())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def start_client(port: int, ok: int, refused: int, hold: int, closed_port: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, TRAFFIC, "client", str(port), str(ok), str(refused), str(hold),
                             str(closed_port)])


def closed_port() -> int:
    """A loopback port nothing listens on."""
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
