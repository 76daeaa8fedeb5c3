"""Real process activity for the process and oom tests and fixtures: an OOM kill in a v1 memory cgroup the
kit creates, and a bounded fork storm. Run as root; everything made is removed, only processes started here
are signalled."""

from __future__ import annotations

import json
import re
import subprocess
import sys

from tests import cgroups

LIMIT = 64 << 20
CHUNK = 4 << 20
MAX_ALLOC = 256 << 20

# Blocks on fd 0 until released, then allocates (and touches) 4 MB chunks up to 256 MB under comm kt-hog.
HOG = f"""
import ctypes, os, sys
ctypes.CDLL(None).prctl(15, b"kt-hog", 0, 0, 0)
os.read(0, 1)
chunks = []
while len(chunks) * {CHUNK} < {MAX_ALLOC}:
    chunks.append(b"\\1" * {CHUNK})
sys.exit(0)
"""

# Starts n children as fast as posix_spawn allows under comm kt-forker: each one exec's /bin/true, every
# tenth `/bin/sh -c 'exit 3'`. Prints the children's pids once all are reaped.
FORKER = """
import ctypes, json, os, sys
ctypes.CDLL(None).prctl(15, b"kt-forker", 0, 0, 0)
n = int(sys.argv[1])
pids = []
for i in range(n):
    if i % 10 == 9:
        pids.append(os.posix_spawn("/bin/sh", ["sh", "-c", "exit 3"], os.environ))
    else:
        pids.append(os.posix_spawn("/bin/true", ["true"], os.environ))
codes = {pid: os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids}
print(json.dumps({"pid": os.getpid(), "children": codes}))
"""


class MemoryCgroup(cgroups.MemoryCgroup):
    """a v1 memory cgroup limited to 64 MB (and 64 MB with swap), removed on exit."""

    def __init__(self) -> None:
        super().__init__("kt-oom", limit_bytes=LIMIT)


def oom_hog(cgroup: MemoryCgroup) -> tuple[int, int]:
    """Start the hog, move it (and only it) into the cgroup, release it; it is OOM-killed: (pid, returncode)."""
    hog = subprocess.Popen([sys.executable, "-c", HOG], stdin=subprocess.PIPE)
    try:
        (cgroup.path / "cgroup.procs").write_text(str(hog.pid))
        hog.stdin.write(b"x")
        hog.stdin.close()
        return hog.pid, hog.wait(timeout=120)
    finally:
        if hog.poll() is None:
            hog.kill()
            hog.wait()


_KILLED = re.compile(r"Killed process (\d+) \((.*?)\) total-vm:(\d+)kB, anon-rss:(\d+)kB, file-rss:(\d+)kB, "
                     r"shmem-rss:(\d+)kB, UID:(\d+) pgtables:(\d+)kB oom_score_adj:(-?\d+)")


def killed_line(pid: int) -> dict | None:
    """The kernel's "Killed process <pid>" line from dmesg, as numbers; None if dmesg is not readable."""
    try:
        text = subprocess.run(["dmesg"], capture_output=True, text=True, check=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for m in _KILLED.finditer(text):
        if int(m.group(1)) == pid:
            keys = ("pid", "comm", "total_vm_kb", "anon_rss_kb", "file_rss_kb", "shmem_rss_kb", "uid",
                    "pgtables_kb", "oom_score_adj")
            return {k: v if k == "comm" else int(v) for k, v in zip(keys, m.groups())}
    return None


def fork_storm(n: int = 500) -> dict:
    """Run the forker: {"pid": its pid, "children": {child pid: exit code}}."""
    out = subprocess.run([sys.executable, "-c", FORKER, str(n)], capture_output=True, text=True, check=True,
                         timeout=300)
    result = json.loads(out.stdout)
    result["children"] = {int(pid): code for pid, code in result["children"].items()}
    return result
