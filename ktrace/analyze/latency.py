"""Run-queue and block I/O latency of a window: the kernel's histograms and the outliers it sent.

Fed with runq_histogram / bio_histogram lines (one per cgroup, or per disk and
kind of request, written when the window ends) and runq_latency / bio_latency
events (single waits over --sched-warn / --bio-warn). Percentiles come from the
log2 buckets: each is the upper bound of the bucket that holds it, capped at the
longest wait seen, so a p99 of 16.384 ms means "at most 16.384 ms".
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from ktrace.analyze.common import Examples, capped, finding

TOP = 10
WORST = 5  # worst outliers kept per cgroup or disk
MAX_ROWS = 100  # cgroups or disks listed, highest p99 first
DEFAULT_SCHED_WARN_MS = 10.0
DEFAULT_BIO_WARN_MS = 100.0


def bucket_percentile(buckets: list[dict], q: float, max_ms: float) -> float | None:
    """Nearest-rank percentile of a log2 histogram, in ms: the upper bound of the bucket holding it,
    capped at the longest wait (the last, open-ended bucket is the longest wait itself)."""
    total = sum(b["count"] for b in buckets)
    if not total:
        return None
    rank = max(math.ceil(q * total), 1)
    seen = 0
    for b in sorted(buckets, key=lambda b: b["from_us"]):
        seen += b["count"]
        if seen >= rank:
            if b["to_us"] is None:
                return max_ms
            return min(b["to_us"] / 1000, max_ms)
    return max_ms


@dataclass
class _Histogram:
    """Histogram lines of one subject, added together (a bundle has one per subject; merged ones add up)."""

    identity: dict
    slots: dict[tuple[int, int | None], int] = field(default_factory=dict)
    sum_ms: float = 0.0
    max_ms: float = 0.0
    bytes: int = 0
    lines: list[int] = field(default_factory=list)

    def add(self, event: dict, line: int | None) -> None:
        for b in event["buckets"]:
            key = (b["from_us"], b["to_us"])
            self.slots[key] = self.slots.get(key, 0) + b["count"]
        self.sum_ms += event["sum_ms"]
        self.max_ms = max(self.max_ms, event["max_ms"])
        self.bytes += event.get("bytes", 0)
        if line is not None:
            self.lines.append(line)

    @property
    def buckets(self) -> list[dict]:
        return [{"from_us": low, "to_us": high, "count": n} for (low, high), n in sorted(self.slots.items())]

    def stats(self) -> dict:
        buckets = self.buckets
        count = sum(b["count"] for b in buckets)
        return {"count": count, "p50_ms": bucket_percentile(buckets, 0.50, self.max_ms),
                "p99_ms": bucket_percentile(buckets, 0.99, self.max_ms), "max_ms": round(self.max_ms, 3),
                "mean_ms": round(self.sum_ms / count, 3) if count else None}


def _worst_of_all(name: str, outliers: list[tuple[float, dict]], total: int) -> dict:
    """The TOP worst outliers of every subject, and how many of the total outlier events are not listed."""
    worst = _worst(outliers, TOP)
    return {name: worst, f"{name}_omitted": total - len(worst)}


def _outlier_examples(outliers: Examples | None, row: dict) -> Examples:
    """The outlier events of a row, or, with none, its histogram line (the tables of outliers are defaultdicts:
    an empty entry is no outlier)."""
    if outliers is not None and outliers.count:
        return outliers
    return Examples(count=row["count"], lines=[row["line"]] if row["line"] else [])


def _worst(outliers: list[tuple[float, dict]], n: int) -> list[dict]:
    return [row for _, row in sorted(outliers, key=lambda item: -item[0])[:n]]


class LatencyAnalysis:
    def __init__(self) -> None:
        self.runq: dict[tuple[int, int], _Histogram] = {}
        self.runq_outliers: dict[tuple[int, int], list[tuple[float, dict]]] = defaultdict(list)
        self.runq_examples: dict[tuple[int, int], Examples] = defaultdict(Examples)
        self.bio: dict[tuple[str, str | None], _Histogram] = {}
        self.bio_outliers: dict[tuple[str, str | None], list[tuple[float, dict]]] = defaultdict(list)
        self.bio_examples: dict[tuple[str, str | None], Examples] = defaultdict(Examples)

    def add(self, event: dict, line: int | None) -> None:
        kind = event["type"]
        if kind == "runq_histogram":
            key = (event["cgroup_id"], event["memcg_id"])
            if key not in self.runq:
                self.runq[key] = _Histogram({k: event[k] for k in (
                    "cgroup_hierarchy", "cgroup", "cgroup_path", "cgroup_id", "memcg_id", "overflow")})
            self.runq[key].add(event, line)
        elif kind == "runq_latency":
            key = (event["cgroup_id"], event["memcg_id"])
            row = {"pid": event["pid"], "tid": event["tid"], "comm": event["comm"], "wait_ms": event["wait_ms"],
                   "cpu": event["cpu"], "prev_pid": event["prev_pid"], "prev_comm": event["prev_comm"],
                   "time": event["time"], "line": line}
            self.runq_outliers[key].append((event["wait_ms"], row))
            self.runq_examples[key].add(event, line)
            if len(self.runq_outliers[key]) > WORST * 8:
                self.runq_outliers[key] = sorted(self.runq_outliers[key], key=lambda i: -i[0])[:WORST * 2]
        elif kind == "bio_histogram":
            key = (event["dev"], event["op"])
            if key not in self.bio:
                self.bio[key] = _Histogram({k: event[k] for k in ("dev", "disk", "op", "overflow")})
            self.bio[key].add(event, line)
        elif kind == "bio_latency":
            key = (event["dev"], event["op"])
            row = {"pid": event["pid"], "tid": event["tid"], "comm": event["comm"],
                   "latency_ms": event["latency_ms"], "sector": event["sector"], "bytes": event["bytes"],
                   "error": event["error"], "time": event["time"], "line": line}
            self.bio_outliers[key].append((event["latency_ms"], row))
            self.bio_examples[key].add(event, line)
            if len(self.bio_outliers[key]) > WORST * 8:
                self.bio_outliers[key] = sorted(self.bio_outliers[key], key=lambda i: -i[0])[:WORST * 2]

    # --- sched ---

    def _runq_rows(self) -> list[dict]:
        rows = []
        for key, hist in self.runq.items():
            outliers = self.runq_examples[key].count
            worst = _worst(self.runq_outliers.get(key, []), WORST)
            rows.append({**hist.identity, **hist.stats(), "outliers": outliers,
                         "worst": worst, "worst_omitted": outliers - len(worst), "buckets": hist.buckets,
                         "line": hist.lines[0] if hist.lines else None})
        rows.sort(key=lambda r: (-(r["p99_ms"] or 0), -r["count"]))
        return rows

    def sched_summary(self, warn_ms: float | None, kernel_losses: dict | None = None) -> dict:
        rows = self._runq_rows()
        every = [item for items in self.runq_outliers.values() for item in items]
        return {
            "threshold_ms": warn_ms if warn_ms is not None else DEFAULT_SCHED_WARN_MS,
            "waits": sum(r["count"] for r in rows),
            "outliers": sum(e.count for e in self.runq_examples.values()),
            **capped("cgroups", rows, MAX_ROWS),
            **_worst_of_all("worst_waiters", every, sum(e.count for e in self.runq_examples.values())),
            "kernel_losses": kernel_losses,
        }

    def sched_findings(self, warn_ms: float | None) -> list[dict]:
        threshold = warn_ms if warn_ms is not None else DEFAULT_SCHED_WARN_MS
        out = []
        for row in self._runq_rows():
            if row["overflow"] or row["p99_ms"] is None or row["p99_ms"] <= threshold:
                continue
            key = (row["cgroup_id"], row["memcg_id"])
            examples = _outlier_examples(self.runq_examples.get(key), row)
            named = row["cgroup_path"] or f"id {row['cgroup']}"
            worst = row["worst"][0] if row["worst"] else None
            who = f"; worst {worst['comm']} (pid {worst['pid']}) {worst['wait_ms']} ms" if worst else ""
            out.append(finding(
                "runq_latency", "warning",
                f"run-queue latency in cgroup {named}: p99 ≤ {row['p99_ms']} ms over {threshold} ms "
                f"({row['count']} waits{who})",
                {"cgroup_hierarchy": row["cgroup_hierarchy"], "cgroup": row["cgroup"],
                 "cgroup_path": row["cgroup_path"], "p99_ms": row["p99_ms"], "max_ms": row["max_ms"]},
                examples,
                "Runnable tasks of this cgroup waited for a CPU: the node's CPUs are oversubscribed, or the cgroup "
                "is throttled by its CPU limit (cpu.cfs_quota_us / cpu.max). Look at prev_comm in the "
                "runq_latency events for who held the CPU."))
        return out

    # --- blockio ---

    def _bio_rows(self) -> list[dict]:
        rows = []
        for key, hist in self.bio.items():
            outliers = self.bio_examples[key].count
            worst = _worst(self.bio_outliers.get(key, []), WORST)
            rows.append({**hist.identity, **hist.stats(), "bytes": hist.bytes, "outliers": outliers,
                         "worst": worst, "worst_omitted": outliers - len(worst), "buckets": hist.buckets,
                         "line": hist.lines[0] if hist.lines else None})
        rows.sort(key=lambda r: (-(r["p99_ms"] or 0), -r["count"]))
        return rows

    def blockio_summary(self, warn_ms: float | None, kernel_losses: dict | None = None) -> dict:
        rows = self._bio_rows()
        every = [(ms, {**row, "dev": dev, "op": op}) for (dev, op), items in self.bio_outliers.items()
                 for ms, row in items]
        return {
            "threshold_ms": warn_ms if warn_ms is not None else DEFAULT_BIO_WARN_MS,
            "requests": sum(r["count"] for r in rows),
            "outliers": sum(e.count for e in self.bio_examples.values()),
            **capped("devices", rows, MAX_ROWS),
            **_worst_of_all("worst_requests", every, sum(e.count for e in self.bio_examples.values())),
            "kernel_losses": kernel_losses,
        }

    def blockio_findings(self, warn_ms: float | None) -> list[dict]:
        threshold = warn_ms if warn_ms is not None else DEFAULT_BIO_WARN_MS
        out = []
        for row in self._bio_rows():
            if row["overflow"] or row["p99_ms"] is None or row["p99_ms"] <= threshold:
                continue
            examples = _outlier_examples(self.bio_examples.get((row["dev"], row["op"])), row)
            disk = row["disk"] or row["dev"]
            out.append(finding(
                "slow_disk", "warning",
                f"slow {row['op']}s on {disk} ({row['dev']}): p99 ≤ {row['p99_ms']} ms over {threshold} ms "
                f"({row['count']} requests)",
                {"dev": row["dev"], "disk": row["disk"], "op": row["op"], "p99_ms": row["p99_ms"],
                 "max_ms": row["max_ms"]},
                examples,
                "Requests spent this long between issue to the driver and completion: the device (or what backs "
                "it: a network volume, a loop file) is saturated or failing. Check the device's own latency "
                "metrics and dmesg for I/O errors."))
        return out
