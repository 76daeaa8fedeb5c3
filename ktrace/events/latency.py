"""The latency histograms counted in the kernel (sched, blockio), as lines of events.jsonl.

The kernel keeps one log2 histogram of microseconds per cgroup (run-queue waits)
and per disk and kind of request (block I/O), in per-CPU hashes read once when
the window ends. Each histogram becomes one `runq_histogram` or `bio_histogram`
line, so that summary.json can be rebuilt from events.jsonl alone; the line names
its cgroup or disk as the node showed it at the end of the window.

Bucket i of a histogram holds waits of [2^(i-1), 2^i) us (bucket 0: under 1 us;
the last bucket: everything longer), as bpf/latency.h defines it.
"""

from __future__ import annotations

from pathlib import Path

from ktrace import probes
from ktrace.enrich.cgroup import CgroupPaths
from ktrace.events import generated

SLOTS = next(v for v, name in generated.LATENCY_SIZES.items() if name == "hist_slots")
SLOT_FIELDS = tuple(f"slots[{i}]" for i in range(SLOTS))
V1_MEMORY = Path("/sys/fs/cgroup/memory")
SYS_DEV_BLOCK = Path("/sys/dev/block")
ROOT_CGROUP_ID = 1
MAX_CGROUP_DIRS = 100_000  # directories walked to name cgroups, at most


def slot_bounds(slot: int) -> tuple[int, int | None]:
    """[from, to) microseconds of a bucket; to is None for the last one."""
    low = 0 if slot == 0 else 1 << (slot - 1)
    return low, (None if slot == SLOTS - 1 else 1 << slot)


def buckets(slots: list[int]) -> list[dict]:
    """The non-empty buckets, shortest waits first."""
    out = []
    for slot, count in enumerate(slots):
        if count:
            low, high = slot_bounds(slot)
            out.append({"from_us": low, "to_us": high, "count": count})
    return out


def sum_percpu(layout: generated.Layout, values: list[bytes]) -> dict[str, int]:
    """One per-CPU map value, added up over the CPUs (max_ns: the largest)."""
    total: dict[str, int] = dict.fromkeys(layout.names, 0)
    for raw in values:
        for name, value in zip(layout.names, layout.unpack(raw)):
            if name.endswith("max_ns"):
                total[name] = max(total[name], value)
            else:
                total[name] += value
    return total


# --- naming cgroups and disks ---


def dev_name(dev: int) -> tuple[int, int, str | None]:
    """(major, minor, disk name) of a dev_t in the kernel's encoding (major << 20 | minor)."""
    major, minor = dev >> 20, dev & 0xFFFFF
    try:
        for line in (SYS_DEV_BLOCK / f"{major}:{minor}" / "uevent").read_text().splitlines():
            if line.startswith("DEVNAME="):
                return major, minor, line.split("=", 1)[1]
    except OSError:
        pass
    return major, minor, None


class CgroupNames:
    """Which id names a task's cgroup in the histograms, and its path (ktrace.enrich.cgroup walks the hierarchies)."""

    def __init__(self, v2_root: Path | None = None, v1_memory: Path | None = V1_MEMORY) -> None:
        self.roots = {"cgroup2": v2_root if v2_root is not None else probes.cgroup2_root(), "memory": v1_memory}
        self.paths = CgroupPaths({"unified": self.roots["cgroup2"], "memory": v1_memory}, max_entries=MAX_CGROUP_DIRS)

    def name(self, cgroup_id: int, memcg_id: int) -> dict:
        """Which id names a task's cgroup, and its path.

        The cgroup2 id where it is not the root (a v2 or hybrid host that places
        tasks in the unified hierarchy); otherwise the v1 memory cgroup (hybrid
        hosts that place them by controller, like Kubernetes on cgroup v1). An id
        of a cgroup that is gone by the end of the window has no path.
        """
        if cgroup_id not in (0, ROOT_CGROUP_ID) or not memcg_id or self.roots["memory"] is None \
                or not self.roots["memory"].is_dir():
            hierarchy, ident = "cgroup2", cgroup_id
        else:
            hierarchy, ident = "memory", memcg_id
        path = self.paths.path("unified" if hierarchy == "cgroup2" else "memory", ident)
        return {"cgroup_hierarchy": hierarchy, "cgroup": ident, "cgroup_path": path}


# --- histogram lines ---


def _hist_fields(total: dict[str, int], prefix: str = "") -> dict:
    slots = [total[prefix + name] for name in SLOT_FIELDS]
    return {"count": sum(slots), "sum_ms": round(total[prefix + "sum_ns"] / 1e6, 3),
            "max_ms": round(total[prefix + "max_ns"] / 1e6, 3), "buckets": buckets(slots)}


def runq_histogram_lines(raw: list[tuple[bytes, list[bytes]]], when: str, ts_ns: int,
                         names: CgroupNames | None = None) -> list[dict]:
    """runq_histogram events from the (key, per-CPU values) of the kernel's runq_hist map."""
    names = names or CgroupNames()
    out = []
    for key, values in raw:
        k = generated.RUNQ_KEY.as_dict(key)
        total = sum_percpu(generated.HIST, values)
        fields = _hist_fields(total)
        if not fields["count"]:
            continue
        overflow = k["cgroup_id"] == 0 and k["memcg_id"] == 0
        who = ({"cgroup_hierarchy": None, "cgroup": None, "cgroup_path": None} if overflow
               else names.name(k["cgroup_id"], k["memcg_id"]))
        out.append({"type": "runq_histogram", "time": when, "ts_ns": ts_ns, "cgroup_id": k["cgroup_id"],
                    "memcg_id": k["memcg_id"], **who, "overflow": overflow, **fields})
    out.sort(key=lambda e: (e["cgroup_hierarchy"] or "", e["cgroup"] or 0))
    return out


def bio_histogram_lines(raw: list[tuple[bytes, list[bytes]]], when: str, ts_ns: int) -> list[dict]:
    """bio_histogram events from the (key, per-CPU values) of the kernel's bio_hist map."""
    out = []
    for key, values in raw:
        k = generated.BIO_KEY.as_dict(key)
        total = sum_percpu(generated.BIO_HIST, values)
        fields = _hist_fields(total, "lat.")
        if not fields["count"]:
            continue
        overflow = k["dev"] == 0 and k["op"] == 0
        major, minor, disk = dev_name(k["dev"])
        out.append({"type": "bio_histogram", "time": when, "ts_ns": ts_ns, "dev": f"{major}:{minor}",
                    "disk": disk, "op": None if overflow else generated.BIO_OP.get(k["op"], str(k["op"])),
                    "overflow": overflow, **fields, "bytes": total["bytes"]})
    out.sort(key=lambda e: (e["dev"], e["op"] or ""))
    return out
