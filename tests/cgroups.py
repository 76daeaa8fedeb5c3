"""A v1 memory cgroup a test creates and removes, for tests that need processes in a cgroup of their own."""

from __future__ import annotations

import os
import time
from pathlib import Path

V1_MEMORY = Path("/sys/fs/cgroup/memory")


class MemoryCgroup:
    """/sys/fs/cgroup/memory/<label>-<pid>-<n>, optionally limited (memory and memory+swap), removed on exit."""

    def __init__(self, label: str, limit_bytes: int | None = None) -> None:
        self.path = V1_MEMORY / f"{label}-{os.getpid()}-{time.monotonic_ns()}"
        self.limit_bytes = limit_bytes
        self.id = 0

    def __enter__(self) -> MemoryCgroup:
        self.path.mkdir()
        # the kernfs id the kernel reports for the cgroup: its directory's inode number
        self.id = self.path.stat().st_ino
        if self.limit_bytes is not None:
            (self.path / "memory.limit_in_bytes").write_text(str(self.limit_bytes))
            memsw = self.path / "memory.memsw.limit_in_bytes"
            if memsw.exists():  # with swap a hog would swap instead of being killed
                memsw.write_text(str(self.limit_bytes))
        return self

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    @property
    def shown(self) -> str:
        """The path as /proc/<pid>/cgroup shows it."""
        return "/" + self.path.name

    def oom_kills(self) -> int:
        for line in (self.path / "memory.oom_control").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def __exit__(self, *exc: object) -> None:
        # a process that just exited may still hold the cgroup for a moment
        for _ in range(100):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.05)
        self.path.rmdir()
