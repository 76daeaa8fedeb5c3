"""Pieces every analysis shares: finding records, example events, grouping per command, endpoints, percentiles."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field

from ktrace.enrich.identity import owner_pod

MAX_LINES = 5  # line numbers of example events per finding
MAX_PIDS = 5  # example processes named per grouped finding
MAX_GROUP_PIDS = 4096  # processes counted apart per grouped finding; more are counted together


@dataclass
class Examples:
    count: int = 0
    lines: list[int] = field(default_factory=list)
    first: str = ""
    last: str = ""
    pod: str | None = None  # uid of the pod of the first event, None outside pods

    def add(self, event: dict, line: int | None) -> None:
        if not self.count:
            k8s = owner_pod(event)
            self.pod = k8s["pod_uid"] if k8s else None
        self.count += 1
        if line is not None and len(self.lines) < MAX_LINES:
            self.lines.append(line)
        self.first = self.first or event["time"]
        self.last = event["time"]


@dataclass
class Group(Examples):
    """The examples of one finding made by many processes of one command (40 short-lived jobs refused by one
    port are one finding, not 40): the events added up, and how many each process made."""

    pids: Counter = field(default_factory=Counter)  # pid → its events, the first MAX_GROUP_PIDS processes
    pids_not_tracked: int = 0  # events of processes beyond those

    def merge(self, pid: int, e: Examples) -> None:
        self.count += e.count
        self.lines = sorted(self.lines + e.lines)[:MAX_LINES]  # the earliest lines of the window
        self.first = min(filter(None, (self.first, e.first)), default="")
        self.last = max(self.last, e.last)
        if pid in self.pids or len(self.pids) < MAX_GROUP_PIDS:
            self.pids[pid] += e.count
        else:
            self.pids_not_tracked += e.count

    @property
    def processes(self) -> int:
        return len(self.pids) + (1 if self.pids_not_tracked else 0)

    def who(self, comm: str) -> str:
        """comm (pid), or comm (N processes, e.g. 1, 2, 3) for a group."""
        if len(self.pids) == 1 and not self.pids_not_tracked:
            return f"{comm} ({next(iter(self.pids))})"
        shown = ", ".join(str(pid) for pid in list(self.pids)[:3])
        more = "+" if self.pids_not_tracked else ""
        return f"{comm} ({len(self.pids)}{more} processes, e.g. {shown})"

    def subject(self) -> dict:
        """pid: the first process's (the only one when processes is 1); pids: the processes with the most events."""
        top = sorted(self.pids.items(), key=lambda kv: (-kv[1], kv[0]))
        return {"pid": next(iter(self.pids), None), "processes": self.processes,
                **capped("pids", [{"pid": pid, "count": n} for pid, n in top], MAX_PIDS)}


def grouped(items: Iterable[tuple[int, Examples, Hashable]],
            order: Callable[[tuple[Hashable, Group]], object] | None = None) -> list[tuple[Hashable, Group]]:
    """(pid, examples, key without the pid) → one Group per (key, pod), the most events first."""
    groups: dict[tuple, Group] = {}
    for pid, e, key in items:
        group = groups.get((key, e.pod))
        if group is None:
            group = groups[(key, e.pod)] = Group(pod=e.pod)
        group.merge(pid, e)
    return sorted(((key, g) for (key, _pod), g in groups.items()),
                  key=order or (lambda kg: (-kg[1].count, str(kg[0]))))


def capped(name: str, rows: list, limit: int) -> dict:
    """A list summary.json caps, as {name: its first limit rows, name_omitted: how many it left out}: no list is
    cut silently."""
    return {name: rows[:limit], f"{name}_omitted": max(len(rows) - limit, 0)}


def process_name(event: dict) -> str:
    """The name rows keyed by process show: the thread group leader's comm, not the thread's (dig's resolver thread
    is isc-net-0000). Bundles of events schema 4 and older have only the thread's."""
    return event.get("process") or event["comm"]


def endpoint(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile: the smallest value with at least q of the values at or below it."""
    if not sorted_values:
        return None
    rank = math.ceil(q * len(sorted_values))
    return sorted_values[min(max(rank, 1), len(sorted_values)) - 1]


def finding(rule: str, severity: str, title: str, subject: dict, e: Examples, hint: str,
            summary: str | None = None) -> dict:
    """summary: for a finding that no event of events.jsonl shows (a conntrack table's counters, events lost in
    transit), the JSON pointer of what it rests on in summary.json; every other finding has lines."""
    evidence: dict = {"count": e.count, "lines": e.lines}
    if summary is not None:
        evidence["summary"] = summary
    if e.first:
        evidence["first"] = e.first
        evidence["last"] = e.last
    return {"rule": rule, "severity": severity, "title": title, "subject": subject, "evidence": evidence,
            "hint": hint}
