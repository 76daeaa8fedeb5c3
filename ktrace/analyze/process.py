"""Process lifecycle and OOM kills of a window: exec, fork and exit events, and oom_kill victims.

Fed with event dicts as they appear in events.jsonl, live or from a saved bundle,
like ktrace.analyze.tcp; other event types are ignored. Memory is bounded: the
tables of parents, executables, commands and pids beyond their caps are counted
as not tracked.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from ktrace.analyze.common import Examples, capped, finding, grouped, process_name

FORK_STORM_FORKS = 200  # new processes from one parent (or one process tree) ...
FORK_STORM_WINDOW_NS = 2_000_000_000  # ... within this long make a fork_storm
CRASH_LOOP_FAILURES = 5  # runs of one executable that failed (non-zero exit or a signal) make a crash_loop
MAX_PARENTS = 4096  # forking parents (and process trees) followed
MAX_PIDS = 65536  # pid → parent and pid → executable, oldest forgotten first
MAX_NAMES = 4096  # executables and commands with their own counts
MAX_QUEUE = 65536  # fork times kept per parent for the sliding window
MAX_VICTIMS = 100
MAX_DEPTH = 64  # ancestors walked up to a process tree's root
TOP = 10


@dataclass
class _Forks:
    """One parent's (or one tree's) forks: total, and the most within any FORK_STORM_WINDOW_NS."""

    pid: int
    comm: str
    total: int = 0
    peak: int = 0
    peak_first_ns: int = 0
    peak_last_ns: int = 0
    recent: deque = field(default_factory=deque)
    examples: Examples = field(default_factory=Examples)

    def add(self, ts_ns: int, event: dict, line: int | None) -> None:
        self.total += 1
        self.examples.add(event, line)
        recent = self.recent
        recent.append(ts_ns)
        while recent[0] <= ts_ns - FORK_STORM_WINDOW_NS or len(recent) > MAX_QUEUE:
            recent.popleft()
        if len(recent) > self.peak:
            self.peak, self.peak_first_ns, self.peak_last_ns = len(recent), recent[0], ts_ns

    @property
    def rate_per_s(self) -> float:
        """Forks per second over the busiest window (its span, at least 0.1 s)."""
        span = max(self.peak_last_ns - self.peak_first_ns, FORK_STORM_WINDOW_NS // 20)
        return round(self.peak / (span / 1e9), 1)


@dataclass
class _Failures:
    """Failed runs of one executable."""

    runs: int = 0
    examples: Examples = field(default_factory=Examples)
    reasons: Counter = field(default_factory=Counter)
    comms: Counter = field(default_factory=Counter)


def _bounded_put(table: dict, key: object, value: object, cap: int) -> None:
    table.pop(key, None)
    if len(table) >= cap:
        del table[next(iter(table))]  # the oldest
    table[key] = value


def exit_reason(event: dict) -> str | None:
    """'exit 3', 'SIGKILL' (+ ' (core dumped)'), or None for a clean exit."""
    if event["signal"]:
        return event["signal"] + (" (core dumped)" if event["core_dump"] else "")
    if event["exit_status"]:
        return f"exit {event['exit_status']}"
    return None


class ProcessAnalysis:
    def __init__(self) -> None:
        self.execs = self.forks = self.exits = 0
        self.parents: dict[int, _Forks] = {}
        self.trees: dict[int, _Forks] = {}
        self.parent_of: dict[int, int] = {}  # child pid → pid of the process that forked it
        self.comm_of: dict[int, str] = {}
        self.executable_of: dict[int, str] = {}  # pid → the file it exec'd last
        self.executables: Counter[str] = Counter()
        self.exits_by_comm: dict[str, Counter] = {}
        self.failures: dict[str, _Failures] = {}
        self.not_tracked: Counter[str] = Counter()

    def add(self, event: dict, line: int | None) -> None:
        kind = event["type"]
        if kind == "exec":
            self._exec(event)
        elif kind == "fork":
            self._fork(event, line)
        elif kind == "exit":
            self._exit(event, line)

    def _exec(self, event: dict) -> None:
        self.execs += 1
        name = event["filename"]
        if name in self.executables or len(self.executables) < MAX_NAMES:
            self.executables[name] += 1
        else:
            self.not_tracked["executables"] += 1
        _bounded_put(self.executable_of, event["pid"], name, MAX_PIDS)
        _bounded_put(self.comm_of, event["pid"], process_name(event), MAX_PIDS)

    def _root(self, pid: int) -> int:
        """The oldest ancestor of pid seen forking in this window."""
        for _ in range(MAX_DEPTH):
            parent = self.parent_of.get(pid)
            if parent is None or parent == pid:
                break
            pid = parent
        return pid

    def _count(self, table: dict[int, _Forks], pid: int, event: dict, line: int | None) -> None:
        forks = table.get(pid)
        if forks is None:
            if len(table) >= MAX_PARENTS:
                self.not_tracked["parents"] += 1
                return
            forks = table[pid] = _Forks(pid, self.comm_of.get(pid, process_name(event)))
        forks.add(event["ts_ns"], event, line)

    def _fork(self, event: dict, line: int | None) -> None:
        self.forks += 1
        pid = event["pid"]
        _bounded_put(self.comm_of, pid, process_name(event), MAX_PIDS)
        _bounded_put(self.parent_of, event["child_pid"], pid, MAX_PIDS)
        self._count(self.parents, pid, event, line)
        root = self._root(pid)
        if root != pid:
            self._count(self.trees, root, event, line)

    def _exit(self, event: dict, line: int | None) -> None:
        self.exits += 1
        reason = exit_reason(event)
        comm = process_name(event)
        by_comm = self.exits_by_comm.get(comm)
        if by_comm is None:
            if len(self.exits_by_comm) >= MAX_NAMES:
                self.not_tracked["comms"] += 1
                by_comm = Counter()
            else:
                by_comm = self.exits_by_comm[comm] = Counter()
        by_comm["exits"] += 1
        executable = self.executable_of.pop(event["pid"], None)
        if reason is None:
            return
        by_comm[reason] += 1
        if executable is None:
            return  # a crash loop is about an executable started in the window, again and again
        failures = self.failures.get(executable)
        if failures is None:
            if len(self.failures) >= MAX_NAMES:
                self.not_tracked["failing_executables"] += 1
                return
            failures = self.failures[executable] = _Failures()
        failures.runs += 1
        failures.examples.add(event, line)
        failures.reasons[reason] += 1
        failures.comms[comm] += 1

    # --- results ---

    def summary(self, kernel_counts: dict[str, int] | None = None) -> dict:
        """kernel_counts: what the kernel counted without events (new threads); None offline."""
        parents = sorted(self.parents.values(), key=lambda f: (-f.total, f.pid))
        failing = []
        for comm, c in self.exits_by_comm.items():
            failed = sum(n for r, n in c.items() if r != "exits")
            if failed:
                reasons = {r: n for r, n in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])) if r != "exits"}
                failing.append({"comm": comm, "exits": c["exits"], "failed": failed, "reasons": reasons})
        failing.sort(key=lambda r: (-r["failed"], r["comm"]))
        return {
            "execs": self.execs,
            "forks": self.forks,
            "exits": self.exits,
            "threads_created": (kernel_counts or {}).get("threads_created"),
            **capped("top_forking_parents", [
                {"pid": f.pid, "comm": f.comm, "forks": f.total, "max_in_window": f.peak,
                 "window_s": FORK_STORM_WINDOW_NS / 1e9} for f in parents], TOP),
            **capped("top_executables", [{"filename": n, "execs": c} for n, c in
                                         sorted(self.executables.items(), key=lambda kv: (-kv[1], kv[0]))], TOP),
            **capped("nonzero_exits_by_comm", failing, TOP),
            "not_tracked": {what: self.not_tracked[what]
                            for what in ("parents", "executables", "comms", "failing_executables")},
        }

    def findings(self) -> list[dict]:
        out = []
        storms = [("parent", f) for f in self.parents.values() if f.peak >= FORK_STORM_FORKS]
        # a tree whose descendants forked too (a shell script, a fork bomb), unless its root alone explains it
        storms += [("tree", f) for f in self.trees.values()
                   if f.peak >= FORK_STORM_FORKS and f.peak > getattr(self.parents.get(f.pid), "peak", 0)]
        for scope, f in sorted(storms, key=lambda sf: (-sf[1].peak, sf[1].pid, sf[0])):
            who = f"{f.comm} ({f.pid})" + (" and its descendants" if scope == "tree" else "")
            out.append(finding(
                "fork_storm", "warning",
                f"{who} created {f.peak} processes within {FORK_STORM_WINDOW_NS / 1e9:.0f} s "
                f"({f.rate_per_s:.0f}/s, {f.total} in the window)",
                {"pid": f.pid, "comm": f.comm, "scope": scope, "forks": f.total, "max_in_window": f.peak,
                 "window_s": FORK_STORM_WINDOW_NS / 1e9, "rate_per_s": f.rate_per_s},
                f.examples,
                "A process creating processes this fast is a crash-looping supervisor, a shell loop, a health "
                "check spawning a command per probe, or a fork bomb. The pid limit (pids.max of the cgroup, "
                "kernel.pid_max) and the run queue suffer first; exec and exit events show what it runs.",
            ))
        for name, fail in sorted(self.failures.items(), key=lambda kv: (-kv[1].runs, kv[0])):
            if fail.runs < CRASH_LOOP_FAILURES:
                continue
            reasons = dict(sorted(fail.reasons.items(), key=lambda kv: (-kv[1], kv[0])))
            shown = ", ".join(f"{r} x{n}" for r, n in reasons.items())
            comm = fail.comms.most_common(1)[0][0]
            # status 1 is also the everyday "no" of utilities (grep, test, readlink): only that is no alarm
            severity = "info" if set(reasons) == {"exit 1"} else "warning"
            out.append(finding(
                "crash_loop", severity,
                f"{name} was started and failed {fail.runs} times ({shown})",
                {"filename": name, "comm": comm, "failures": fail.runs, "execs": self.executables.get(name, 0),
                 "reasons": reasons},
                fail.examples,
                "The same program keeps starting and failing: a container in CrashLoopBackOff, a liveness or "
                "exec probe command that fails, or a supervisor restarting a service. Exit status 137/SIGKILL "
                "with an oom_kill finding means memory; other statuses are the program's own error.",
            ))
        return out


class OomAnalysis:
    def __init__(self) -> None:
        self.kills = 0
        self.victims: list[dict] = []  # the first MAX_VICTIMS
        # (comm, memory cgroup, pod) → its first MAX_VICTIMS kills and how many more: every kill is in a finding
        self.by_group: dict[tuple, list[tuple[int, Examples, dict]]] = {}
        self.more: Counter[tuple] = Counter()

    def add(self, event: dict, line: int | None) -> None:
        if event["type"] != "oom_kill":
            return
        self.kills += 1
        examples = Examples()
        examples.add(event, line)
        row = {k: event[k] for k in ("time", "pid", "uid", "total_vm_kb", "anon_rss_kb", "file_rss_kb",
                                     "shmem_rss_kb", "pgtables_kb", "oom_score_adj", "memcg_id", "memcg_path",
                                     "cgroup_id", "cgroup_path", "trigger_pid", "trigger_comm")}
        row["comm"] = process_name(event)
        row["line"] = line
        if len(self.victims) < MAX_VICTIMS:
            self.victims.append(row)
        key = (row["comm"], row["memcg_path"], row["memcg_id"], examples.pod)
        kills = self.by_group.setdefault(key, [])
        if len(kills) < MAX_VICTIMS:
            kills.append((row["pid"], examples, row))
        else:
            self.more[key] += 1

    def summary(self) -> dict:
        return {"kills": self.kills, "victims": self.victims, "victims_omitted": self.kills - len(self.victims)}

    def findings(self) -> list[dict]:
        out = []
        first: dict[tuple, dict] = {}
        items = []
        for key, kills in self.by_group.items():
            for pid, examples, row in kills:
                items.append((pid, examples, key))
                first.setdefault((key, examples.pod), row)
        for key, g in grouped(items, order=lambda kg: (-kg[1].count - self.more[kg[0]], str(kg[0]))):
            g.count += self.more[key]
            g.pids_not_tracked += self.more[key]
            row = first[(key, g.pod)]
            cgroup = row["memcg_path"] or (f"id {row['memcg_id']}" if row["memcg_id"] else "unknown")
            by = "" if row["trigger_pid"] == row["pid"] else f", while {row['trigger_comm']} ({row['trigger_pid']}) " \
                                                              "was allocating"
            examples = ", ".join(str(pid) for pid in list(g.pids)[:3])
            killed = g.who(row["comm"]) if g.count == 1 else f"{g.count} processes of {row['comm']} (e.g. {examples})"
            out.append(finding(
                "oom_kill", "critical",
                f"OOM killer killed {killed} in memory cgroup {cgroup}: anon-rss "
                f"{row['anon_rss_kb'] / 1024:.1f} MiB, total-vm {row['total_vm_kb'] / 1024:.1f} MiB{by}"
                + (" (the first)" if g.count > 1 else ""),
                {**g.subject(), "comm": row["comm"], "memcg_path": row["memcg_path"], "memcg_id": row["memcg_id"],
                 "cgroup_path": row["cgroup_path"], "trigger_pid": row["trigger_pid"],
                 "trigger_comm": row["trigger_comm"]},
                g,
                "The memory cgroup reached its limit (memory.limit_in_bytes, memory.max; a pod's memory limit) and "
                "the kernel killed its largest process. Raise the limit or find the growth; a cgroup at '/' means "
                "the whole node ran out of memory.",
            ))
        return out
