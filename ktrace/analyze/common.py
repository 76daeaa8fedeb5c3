"""Pieces every analysis shares: finding records, example events, endpoints, percentiles."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_LINES = 5  # line numbers of example events per finding


@dataclass
class Examples:
    count: int = 0
    lines: list[int] = field(default_factory=list)
    first: str = ""
    last: str = ""

    def add(self, event: dict, line: int | None) -> None:
        self.count += 1
        if line is not None and len(self.lines) < MAX_LINES:
            self.lines.append(line)
        self.first = self.first or event["time"]
        self.last = event["time"]


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


def finding(rule: str, severity: str, title: str, subject: dict, e: Examples, hint: str) -> dict:
    evidence: dict = {"count": e.count, "lines": e.lines}
    if e.first:
        evidence["first"] = e.first
        evidence["last"] = e.last
    return {"rule": rule, "severity": severity, "title": title, "subject": subject, "evidence": evidence,
            "hint": hint}
