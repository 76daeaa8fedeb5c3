"""Real contention for the latency families: CPU hogs in a v1 memory cgroup, direct I/O on a loop device.

Used by tests/kernel/test_latency.py and tests/fixtures/record_latency.py. Everything
made here is removed on exit: processes (by PID), the cgroup, the loop device and its file.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests import cgroups

# A process that names itself, pins itself to one CPU, moves itself into a cgroup, then spins or
# alternates spinning with short sleeps (so it is both woken and preempted).
LOAD = """
import ctypes, os, sys, time
procs, cpu, name, mode, seconds = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], float(sys.argv[5])
ctypes.CDLL(None).prctl(15, name.encode(), 0, 0, 0)
os.sched_setaffinity(0, {cpu})
with open(procs, "w") as f:  # last: every wait the cgroup has is under the name, on the CPU
    f.write(str(os.getpid()))
end = time.monotonic() + seconds
while time.monotonic() < end:
    if mode == "victim":
        spin = time.monotonic() + 0.02
        while time.monotonic() < spin:
            pass
        time.sleep(0.001)
print("done", flush=True)
"""


class MemoryCgroup(cgroups.MemoryCgroup):
    """a v1 memory cgroup for run-queue tests, removed on exit."""

    def __init__(self) -> None:
        super().__init__("kt-runq")


def start_load(cgroup: MemoryCgroup, cpu: int, name: str, mode: str, seconds: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", LOAD, str(cgroup.procs), str(cpu), name, mode, str(seconds)],
                            stdout=subprocess.PIPE, text=True)


def contend(cgroup: MemoryCgroup, hogs: int, seconds: float = 1.5, cpu: int = 0) -> int:
    """hogs busy loops and one victim (comm kt-victim), all on one CPU, all in the cgroup: the victim's pid."""
    procs = [start_load(cgroup, cpu, "kt-hog", "hog", seconds) for _ in range(hogs)]
    victim = start_load(cgroup, cpu, "kt-victim", "victim", seconds)
    procs.append(victim)
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=seconds + 120)
            assert proc.returncode == 0 and out.strip() == "done", (proc.returncode, out)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return victim.pid


class LoopDevice:
    """A loop device over a file in a directory the caller owns; detached and the file removed on exit."""

    def __init__(self, directory: Path, size_mb: int = 32) -> None:
        self.file = directory / "kt-loop.img"
        self.size = size_mb << 20
        self.device = ""

    def __enter__(self) -> LoopDevice:
        with open(self.file, "wb") as f:
            f.truncate(self.size)
        try:
            self.device = subprocess.run(["losetup", "--find", "--show", str(self.file)], capture_output=True,
                                         text=True, check=True).stdout.strip()
        except BaseException:
            self.file.unlink()
            raise
        return self

    @property
    def dev(self) -> str:
        """major:minor, as the kernel and ktrace name the disk."""
        st = os.stat(self.device)
        return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"

    @property
    def name(self) -> str:
        return Path(self.device).name

    def direct_io(self, writes: int, write_bs: int, reads: int, read_bs: int) -> None:
        """dd with O_DIRECT: each block is one request to the device (no page cache, no merging)."""
        subprocess.run(["dd", "if=/dev/zero", f"of={self.device}", f"bs={write_bs}", f"count={writes}",
                        "oflag=direct", "status=none"], check=True)
        subprocess.run(["dd", f"if={self.device}", "of=/dev/null", f"bs={read_bs}", f"count={reads}",
                        "iflag=direct", "status=none"], check=True)

    def __exit__(self, *exc: object) -> None:
        try:
            if self.device:
                subprocess.run(["losetup", "--detach", self.device], check=True)
        finally:
            self.file.unlink()
