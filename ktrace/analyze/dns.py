"""DNS view of a window: queries, replies, RTTs per server and per process, and queries nobody answered.

Fed with the dns_query, dns_reply and dns_timeout events of events.jsonl (live
during a snapshot, or read back from a saved bundle). The client side (a local
process asking a server) drives the findings; the server side (a local DNS
server such as CoreDNS answering) gets its own table.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from ktrace.analyze.common import (
    MAX_LINES,
    Examples,
    Group,
    capped,
    endpoint,
    finding,
    grouped,
    percentile,
    process_name,
)
from ktrace.enrich.identity import owner_pod

MAX_KEYS = 4096  # servers, processes and (process, server) pairs tracked
MAX_RTTS = 4096  # RTT samples kept per key for percentiles
SLOW_DNS_MS = 500.0  # a p99 above this is slow DNS
MIN_SLOW_REPLIES = 5  # replies needed before a p99 means anything
UNRESPONSIVE_QUERIES = 3  # queries with no reply at all before a server is called unresponsive
TOP = 20


@dataclass
class _Stats:
    queries: int = 0
    replies: int = 0
    late: int = 0
    late_max_ms: float | None = None  # the slowest late reply
    timeouts: int = 0
    unanswered_at_end: int = 0
    errors: int = 0
    rtts: list[float] = field(default_factory=list)
    first: str = ""
    last: str = ""
    lines: list[int] = field(default_factory=list)  # example lines of queries that got no reply
    slow_lines: list[int] = field(default_factory=list)  # example lines of replies slower than SLOW_DNS_MS
    identity: dict = field(default_factory=dict)
    pod: str | None = None  # uid of the pod of its first event

    def examples(self, count: int, lines: list[int]) -> Examples:
        return Examples(count=count, lines=lines, first=self.first, last=self.last, pod=self.pod)

    def rtt(self) -> dict:
        values = sorted(self.rtts)
        return {"count": len(values), "p50": percentile(values, 0.5), "p99": percentile(values, 0.99),
                "max": values[-1] if values else None}

    def seen(self, event: dict) -> None:
        if not self.first:
            k8s = owner_pod(event)
            self.pod = k8s["pod_uid"] if k8s else None
        self.first = self.first or event["time"]
        self.last = event["time"]

    def counts(self) -> dict:
        return {"queries": self.queries, "replies": self.replies, "late_replies": self.late,
                "timeouts": self.timeouts, "unanswered_at_window_end": self.unanswered_at_end,
                "errors": self.errors, "rtt_ms": self.rtt()}


def is_message(event: dict) -> bool:
    """A dns_query or dns_reply line that is a DNS message, not a TCP length prefix or the rest of a reply."""
    return not (event.get("length_prefix") or event.get("continuation"))


def _identity(event: dict) -> dict:
    return {"pid": event["pid"], "comm": process_name(event), "cgroup_id": event["cgroup_id"],
            "memcg_id": event["memcg_id"], "netns": event["netns"]}


class DnsAnalysis:
    def __init__(self) -> None:
        self.total = _Stats()
        self.by_server: dict[str, _Stats] = {}
        self.by_process: dict[tuple[int, str], _Stats] = {}
        self.by_pair: dict[tuple[int, str, str], _Stats] = {}  # (pid, comm, server)
        self.served: dict[tuple[int, str, str], _Stats] = {}  # local servers: (pid, comm, local endpoint)
        self.errors: dict[tuple[int, str, str, str], Examples] = defaultdict(Examples)
        self.keys_overflow = 0

    def _stats(self, table: dict, key: object) -> _Stats | None:
        stats = table.get(key)
        if stats is None:
            if len(table) >= MAX_KEYS:
                self.keys_overflow += 1
                return None
            stats = table[key] = _Stats()
        return stats

    def add(self, event: dict, line: int | None) -> None:
        kind = event["type"]
        if kind not in ("dns_query", "dns_reply", "dns_timeout"):
            return
        if event["role"] == "server":
            local = endpoint(event["saddr"], event["sport"])
            stats = self._stats(self.served, (event["pid"], process_name(event), local))
            if stats is not None:
                stats.identity = stats.identity or _identity(event)
                self._count(stats, event, line)
            return
        server = endpoint(event["daddr"], event["dport"])
        proc = (event["pid"], process_name(event))
        tables = [self.total, self._stats(self.by_server, server), self._stats(self.by_process, proc),
                  self._stats(self.by_pair, (*proc, server))]
        for stats in tables:
            if stats is not None:
                self._count(stats, event, line)
        pair = tables[3]
        if pair is not None and not pair.identity:
            pair.identity = _identity(event)
        process = tables[2]
        if process is not None and not process.identity:
            process.identity = _identity(event)
        if event.get("error"):
            self.errors[(*proc, server, event["error"])].add(event, line)

    @staticmethod
    def _count(stats: _Stats, event: dict, line: int | None) -> None:
        kind = event["type"]
        if kind != "dns_timeout" and not is_message(event):
            return
        stats.seen(event)
        if kind == "dns_query":
            stats.queries += 1
            if event.get("error"):
                stats.errors += 1
        elif kind == "dns_reply":
            if event.get("error"):
                stats.errors += 1
                return
            stats.replies += 1
            rtt = event.get("rtt_ms")
            if event.get("late"):
                stats.late += 1
                if rtt is not None:
                    stats.late_max_ms = max(stats.late_max_ms or 0.0, rtt)
            # a late reply is a slow one: it counts in the percentiles like any other
            if rtt is not None and len(stats.rtts) < MAX_RTTS:
                stats.rtts.append(rtt)
            if rtt is not None and rtt >= SLOW_DNS_MS and line is not None and len(stats.slow_lines) < MAX_LINES:
                stats.slow_lines.append(line)
        else:
            if event.get("window_end"):
                stats.unanswered_at_end += 1
            else:
                stats.timeouts += 1
            if line is not None and len(stats.lines) < MAX_LINES:
                stats.lines.append(line)

    # --- results ---

    def summary(self) -> dict:
        def rows(table: dict, name: str) -> dict:
            ordered = sorted(table.items(), key=lambda kv: (-kv[1].queries, str(kv[0])))
            out = []
            for key, stats in ordered:
                row = {"server": key} if name == "server" else {**stats.identity}
                if name == "served":
                    row["server"] = key[2]
                out.append({**row, **stats.counts()})
            return capped(f"by_{name}" if name != "served" else name, out, TOP)

        return {
            **self.total.counts(),
            **rows(self.by_server, "server"),
            **rows(self.by_process, "process"),
            **rows(self.served, "served"),
            "keys_not_tracked": self.keys_overflow,
        }

    def suspects(self) -> list[dict]:
        """(process, server) pairs with queries that got no reply: the first place to look when DNS is broken."""
        out = []
        for (_pid, _comm, server), s in self.by_pair.items():
            if not (s.timeouts or s.unanswered_at_end):
                continue
            out.append({**s.identity, "server": server, "queries": s.queries, "replies": s.replies,
                        "timeouts": s.timeouts, "unanswered_at_window_end": s.unanswered_at_end,
                        "first": s.first, "last": s.last, "lines": s.lines})
        out.sort(key=lambda r: (-r["timeouts"], -r["unanswered_at_window_end"], r["pid"]))
        return out

    def findings(self, timeout_s: float | None = None) -> list[dict]:
        """Per process findings are grouped per command, pod and server."""
        within = f" within {timeout_s:g} s" if timeout_s else ""
        out = []
        pairs = [(pid, s, (comm, server)) for (pid, comm, server), s in self.by_pair.items() if s.timeouts]
        for (comm, server), g, s in _grouped_stats(pairs, lambda s: s.timeouts, lambda s: s.lines):
            # late replies answer timed-out queries: those were slow, not lost
            never = max(s.timeouts - s.late, 0)
            on_time = s.replies - s.late
            severity = "critical" if never and (on_time == 0 or never >= 10) else "warning"
            title = f"{g.who(comm)}: {s.timeouts} of {s.queries} DNS queries to {server} got no reply{within}"
            if s.late:
                title += (f"; {s.late} of them were answered late (the slowest after {s.late_max_ms or 0:.0f} ms), "
                          f"{never} never")
            hint = ("The query or its reply was lost: check the DNS server's health and load, conntrack/NAT on the "
                    "path (a full conntrack table drops UDP), and NetworkPolicies to the DNS service.")
            if s.late:
                hint = ("Replies came after the timeout: the DNS server or its upstream is slow (see slow_dns), and "
                        "a client with a shorter timeout than ktrace's has already retried or failed. " + hint)
            out.append(finding("dns_timeout", severity, title,
                               {**s.identity, **g.subject(), "comm": comm, "server": server}, g, hint))
        for server, s in sorted(self.by_server.items(), key=lambda kv: -kv[1].queries):
            if s.replies or s.queries < UNRESPONSIVE_QUERIES or not (s.timeouts or s.unanswered_at_end):
                continue
            out.append(finding(
                "dns_server_unresponsive", "critical",
                f"DNS server {server} answered none of {s.queries} queries",
                {"server": server}, s.examples(s.queries, s.lines),
                "Nothing answers there: the DNS pods or the upstream resolver are down, or traffic to them is dropped.",
            ))
        for server, s in sorted(self.by_server.items()):
            rtt = s.rtt()
            if rtt["count"] < MIN_SLOW_REPLIES or rtt["p99"] is None or rtt["p99"] < SLOW_DNS_MS:
                continue
            out.append(finding(
                "slow_dns", "warning",
                f"DNS server {server}: p99 reply time {rtt['p99']:.0f} ms over {rtt['count']} replies",
                {"server": server, "rtt_ms": rtt}, s.examples(rtt["count"], s.slow_lines),
                "Replies come, but slowly: an overloaded DNS server, a slow upstream, or retries after lost packets.",
            ))
        errors = grouped((pid, e, (comm, server, error)) for (pid, comm, server, error), e in self.errors.items())
        for (comm, server, error), g in errors:
            out.append(finding(
                "dns_error", "warning",
                f"{g.who(comm)}: {g.count} DNS send/receive(s) to {server} failed with {error}",
                {**g.subject(), "comm": comm, "server": server, "error": error}, g,
                "ECONNREFUSED: nothing listens on the server's DNS port (ICMP port unreachable); ENETUNREACH or "
                "EHOSTUNREACH: no route to the server.",
            ))
        # a query answered late was slow, not dropped
        served = [(pid, s, (comm, local)) for (pid, comm, local), s in self.served.items() if s.timeouts > s.late]
        for (comm, local), g, s in _grouped_stats(served, lambda s: s.timeouts - s.late, lambda s: s.lines):
            never = s.timeouts - s.late
            late = f" ({s.late} more were answered late)" if s.late else ""
            out.append(finding(
                "dns_server_dropped", "warning",
                f"{g.who(comm)} serving {local}: {never} of {s.queries} queries received were not answered"
                f"{within}{late}",
                {**s.identity, **g.subject(), "comm": comm, "server": local}, g,
                "The local DNS server read the queries and never replied: overload, a stuck upstream, or a crash loop.",
            ))
        return out


def _grouped_stats(items: list[tuple[int, _Stats, tuple]], count: Callable[[_Stats], int],
                   lines: Callable[[_Stats], list[int]]) -> list[tuple[tuple, Group, _Stats]]:
    """Per process stats grouped per command, pod and server: the group, and the stats added up (the identity
    of its first process)."""
    totals: dict[tuple, _Stats] = {}
    for _pid, s, key in items:
        total = totals.setdefault((key, s.pod), _Stats(identity=s.identity, pod=s.pod))
        total.queries += s.queries
        total.replies += s.replies
        total.timeouts += s.timeouts
        total.late += s.late
        if s.late_max_ms is not None:
            total.late_max_ms = max(total.late_max_ms or 0.0, s.late_max_ms)
    groups = grouped((pid, s.examples(count(s), lines(s)), key) for pid, s, key in items)
    return [(key, g, totals[(key, g.pod)]) for key, g in groups]
