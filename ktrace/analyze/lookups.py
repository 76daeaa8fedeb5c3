"""Name lookups of a window (dns_lookup events, --with-dns-names): how many, how slow, which names fail and for whom.

Fed with event dicts as they appear in events.jsonl, live or from a saved bundle,
like ktrace.analyze.tcp. Other event types are ignored. Memory is bounded: names,
processes and (process, name) pairs beyond their caps are counted in the totals
and reported as not tracked.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ktrace.analyze.common import Examples, capped, finding, grouped, percentile, process_name

MAX_NAMES = 4096  # distinct names with their own counts
MAX_PROCESSES = 4096  # distinct (pid, comm) with their own counts
MAX_PAIRS = 16384  # (process, name) pairs followed for findings
MAX_SAMPLES = 65536  # latencies kept for percentiles (the first ones of the window)
TOP = 20

FAILED_REPEATEDLY = 3  # failures of one name by one process that make a finding
CRITICAL_NO_ANSWER = 10  # ... a critical one when the servers did not answer this often
SLOW_LOOKUP_MS = 1000.0  # a lookup this slow waited for a resolver timeout (resolv.conf timeout >= 1 s)

# Results that mean the name could not be resolved: it does not exist, or no server answered.
NOT_FOUND = frozenset({"EAI_NONAME", "EAI_NODATA", "HOST_NOT_FOUND", "NO_DATA"})
NO_ANSWER = frozenset({"EAI_AGAIN", "EAI_FAIL", "TRY_AGAIN", "NO_RECOVERY"})
# Not a failed lookup: the caller's buffer was too small and it asks again with a bigger one.
RETRY = frozenset({"ERANGE"})


@dataclass
class _Stats:
    lookups: int = 0
    failed: int = 0
    max_ms: float = 0.0

    def add(self, failed: bool, ms: float) -> None:
        self.lookups += 1
        self.failed += failed
        self.max_ms = max(self.max_ms, ms)


@dataclass
class _Pair:
    """One process's lookups of one name."""

    function: str = ""
    failures: Examples = field(default_factory=Examples)
    results: Counter = field(default_factory=Counter)
    slow: Examples = field(default_factory=Examples)


def _failed(result: str) -> bool:
    return result != "ok" and result not in RETRY


class LookupAnalysis:
    def __init__(self) -> None:
        self.lookups = 0
        self.failed = 0
        self.max_ms: float | None = None
        self.samples: list[float] = []
        self.by_result: Counter[str] = Counter()
        self.by_function: Counter[str] = Counter()
        self.names: dict[str, _Stats] = {}
        self.processes: dict[tuple[int, str], _Stats] = {}
        self.pairs: dict[tuple[int, str, str], _Pair] = {}
        self.not_tracked = Counter()  # names, processes, pairs beyond their caps

    def add(self, event: dict, line: int | None) -> None:
        if event["type"] != "dns_lookup":
            return
        result, ms, name = event["result"], event["latency_ms"], event["name"]
        failed = _failed(result)
        self.lookups += 1
        self.failed += failed
        self.max_ms = ms if self.max_ms is None else max(self.max_ms, ms)
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(ms)
        self.by_result[result] += 1
        self.by_function[event["function"]] += 1
        proc = (event["pid"], process_name(event))
        for table, key, cap, what in ((self.names, name, MAX_NAMES, "names"),
                                      (self.processes, proc, MAX_PROCESSES, "processes")):
            stats = table.get(key)
            if stats is None:
                if len(table) >= cap:
                    self.not_tracked[what] += 1
                    continue
                stats = table[key] = _Stats()
            stats.add(failed, ms)
        if not failed and ms < SLOW_LOOKUP_MS:
            return  # only failures and slow lookups are followed per (process, name)
        key = (*proc, name)
        pair = self.pairs.get(key)
        if pair is None:
            if len(self.pairs) >= MAX_PAIRS:
                self.not_tracked["pairs"] += 1
                return
            pair = self.pairs[key] = _Pair()
        pair.function = event["function"]
        if failed:
            pair.failures.add(event, line)
            pair.results[result] += 1
        elif result == "ok":
            pair.slow.add(event, line)

    # --- results ---

    def summary(self) -> dict:
        ms = sorted(self.samples)
        names = sorted(self.names.items(), key=lambda kv: (-kv[1].lookups, kv[0]))
        failing = sorted(((n, s) for n, s in self.names.items() if s.failed), key=lambda kv: (-kv[1].failed, kv[0]))
        procs = sorted(self.processes.items(), key=lambda kv: (-kv[1].lookups, kv[0]))
        return {
            "lookups": self.lookups,
            "failed": self.failed,
            "latency_ms": {
                "count": len(ms),
                "p50": percentile(ms, 0.5),
                "p99": percentile(ms, 0.99),
                "max": self.max_ms,
            },
            "by_result": dict(sorted(self.by_result.items(), key=lambda kv: (-kv[1], kv[0]))),
            "by_function": dict(sorted(self.by_function.items(), key=lambda kv: (-kv[1], kv[0]))),
            **capped("top_names", [{"name": n, "lookups": s.lookups, "failed": s.failed, "max_ms": s.max_ms}
                                   for n, s in names], TOP),
            **capped("failing_names", [{"name": n, "lookups": s.lookups, "failed": s.failed} for n, s in failing],
                     TOP),
            **capped("top_processes", [{"pid": pid, "comm": comm, "lookups": s.lookups, "failed": s.failed,
                                        "max_ms": s.max_ms} for (pid, comm), s in procs], TOP),
            "not_tracked": {what: self.not_tracked[what] for what in ("names", "processes", "pairs")},
        }

    def findings(self) -> list[dict]:
        """Grouped per command, pod and name: many processes of one command make one finding."""
        out = []
        failing: dict[tuple, list] = {}  # (comm, name) → the pairs of its processes, to add their results up
        items = []
        for (pid, comm, name), pair in self.pairs.items():
            if pair.failures.count:
                items.append((pid, pair.failures, (comm, name)))
                failing.setdefault((comm, name, pair.failures.pod), []).append(pair)
        for (comm, name), g in grouped(items):
            pairs = failing[(comm, name, g.pod)]
            results: Counter[str] = Counter()
            for pair in pairs:
                results.update(pair.results)
            unresolved = sum(n for r, n in results.items() if r in NOT_FOUND or r in NO_ANSWER)
            if unresolved < FAILED_REPEATEDLY:
                continue
            no_answer = sum(n for r, n in results.items() if r in NO_ANSWER)
            results = Counter(dict(sorted(results.items(), key=lambda kv: (-kv[1], kv[0]))))
            if no_answer >= unresolved - no_answer:
                hint = ("No DNS server answered in time, or they failed (EAI_AGAIN/TRY_AGAIN): check that the "
                        "nameservers in the process's resolv.conf (CoreDNS/kube-dns) are reachable and not "
                        "overloaded; dns_timeout events show the queries left unanswered.")
            else:
                hint = ("The name does not exist (NXDOMAIN under every search domain): a typo, a deleted Service, "
                        "or a name missing its namespace (svc.namespace).")
            shown = ", ".join(f"{r} x{n}" for r, n in results.items())
            out.append(finding(
                "dns_lookup_failed", "critical" if no_answer >= CRITICAL_NO_ANSWER else "warning",
                f"{g.who(comm)}: {g.count} lookup(s) of {name} failed ({shown})",
                {**g.subject(), "comm": comm, "name": name, "function": pairs[0].function, "results": dict(results)},
                g, hint,
            ))
        functions = {(comm, name): p.function for (_pid, comm, name), p in self.pairs.items() if p.slow.count}
        slow = grouped((pid, p.slow, (comm, name)) for (pid, comm, name), p in self.pairs.items() if p.slow.count)
        for (comm, name), g in slow:
            out.append(finding(
                "dns_lookup_slow", "warning",
                f"{g.who(comm)}: {g.count} lookup(s) of {name} took >= {SLOW_LOOKUP_MS:.0f} ms",
                {**g.subject(), "comm": comm, "name": name, "function": functions[(comm, name)]}, g,
                "The answer came only after a resolver timeout and a retry: a DNS server dropped queries "
                "(conntrack races on UDP, an overloaded CoreDNS) or the first nameserver is down.",
            ))
        return out
