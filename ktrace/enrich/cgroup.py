"""cgroup id → path, by walking the mounted hierarchies (DESIGN §6).

The kernel names a cgroup by its kernfs node id, which on 64-bit kernels is the
inode number of the cgroup's directory. Events carry two: `cgroup_id` (the
cgroup2 hierarchy) and `memcg_id` (the memory controller's cgroup: v1 on hybrid
hosts, the cgroup2 one otherwise). A miss walks the hierarchy again, at most
every RESCAN_S per hierarchy; every directory seen on the way is cached, in a
bounded table. The cgroups family's cgroup_mkdir events add the cgroups created
during the window as they are born (`CgroupPaths.add`), so a cgroup created and
removed before it is looked up still resolves; one created before the window and
removed before it is looked up stays unresolved.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from ktrace import probes

MAX_ENTRIES = 65536  # cached (hierarchy, id) → path
MAX_WALK = 100_000  # directories visited by one walk
RESCAN_S = 0.2  # a miss rescans a hierarchy at most this often


def memory_root() -> Path | None:
    """The memory controller's hierarchy: the v1 mount with the memory option, else the cgroup2 root."""
    try:
        lines = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        lines = []
    for fields in map(str.split, lines):
        if len(fields) > 3 and fields[2] == "cgroup" and "memory" in fields[3].split(","):
            return Path(fields[1])
    return probes.cgroup2_root()


def hierarchy_names(proc_cgroup: str | None = None) -> dict[int, str]:
    """Hierarchy id (cgroup_mkdir's hierarchy_id) → the name CgroupPaths uses: "unified" for cgroup2 (id 0),
    "memory" for the v1 hierarchy with the memory controller, else its controllers ("cpu,cpuacct", "name=systemd").

    From /proc/self/cgroup, whose lines are "<hierarchy id>:<controllers>:<path>".
    """
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            proc_cgroup = ""
    names = {0: "unified"}
    for line in proc_cgroup.splitlines():
        ident, _, rest = line.partition(":")
        controllers = rest.partition(":")[0]
        if not ident.isdigit() or ident == "0":
            continue
        names[int(ident)] = "memory" if "memory" in controllers.split(",") else controllers
    return names


class CgroupPaths:
    """Paths of cgroups by id, per hierarchy ("memory", "unified"), as /proc/<pid>/cgroup shows them."""

    def __init__(self, roots: dict[str, Path | None] | None = None, max_entries: int = MAX_ENTRIES) -> None:
        self.roots = roots if roots is not None else {"memory": memory_root(), "unified": probes.cgroup2_root()}
        self.max_entries = max_entries
        self._paths: dict[tuple[str, int], str] = {}
        self._scanned: dict[str, float] = {}

    def path(self, hierarchy: str, cgroup_id: int) -> str | None:
        if not cgroup_id:
            return None
        key = (hierarchy, cgroup_id)
        if key not in self._paths:
            self._walk(hierarchy, cgroup_id)
        return self._paths.get(key)

    def prime(self) -> None:
        """Walk every hierarchy once (bounded): cgroups that exist now resolve later, even once removed."""
        for hierarchy in self.roots:
            self._walk(hierarchy, 0)

    def add(self, hierarchy: str, cgroup_id: int, path: str) -> None:
        """A cgroup seen being created (cgroup_mkdir): known without a walk, even after it is gone."""
        if len(self._paths) >= self.max_entries:
            self._paths.clear()
        self._paths[(hierarchy, cgroup_id)] = path or "/"

    def _walk(self, hierarchy: str, wanted: int) -> None:
        root = self.roots.get(hierarchy)
        if root is None or time.monotonic() - self._scanned.get(hierarchy, -RESCAN_S) < RESCAN_S:
            return
        pending, visited = [(root, "/")], 0
        while pending and visited < MAX_WALK:
            directory, shown = pending.pop()
            visited += 1
            try:
                ino = os.stat(directory).st_ino
                entries = [e for e in os.scandir(directory) if e.is_dir(follow_symlinks=False)]
            except OSError:  # removed while we walked
                continue
            if len(self._paths) >= self.max_entries:
                self._paths.clear()
            self._paths[(hierarchy, ino)] = shown
            if ino == wanted:
                return
            pending += [(Path(e.path), f"{shown.rstrip('/')}/{e.name}") for e in entries]
        # only a walk that missed is rate-limited: ids that appear later are found by the next one
        self._scanned[hierarchy] = time.monotonic()


def annotate_oom(event: dict, paths: CgroupPaths) -> dict:
    """Fill an oom_kill event's memcg_path and cgroup_path."""
    event["memcg_path"] = paths.path("memory", event["memcg_id"])
    event["cgroup_path"] = paths.path("unified", event["cgroup_id"])
    return event
