"""TCP view of a window: connections, failures, sockets left in CLOSE_WAIT, hot spots.

A connect that fails without an answer ends SYN_SENT -> CLOSE in one of two ways: the
kernel gives up after its SYN retries (sk_err ETIMEDOUT, about 127 s with the default
tcp_syn_retries) or, far more often, the application does (its own connect timeout
closes the socket: no error, after one or more SYN retransmits). Both are counted in
the syn_timeout family, per remote endpoint: timed_out and abandoned.

Fed with event dicts as they appear in events.jsonl (live during a snapshot, or
read back from a saved bundle), so the same rules run online and offline.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass

from ktrace.analyze.common import MAX_LINES, Examples, capped, endpoint, finding, grouped, percentile, process_name
from ktrace.enrich.identity import owner_pod

MAX_SOCKETS = 262144  # sockets tracked at once (open ones; closed ones are dropped)
MAX_SAMPLES = 65536  # handshake times kept for percentiles

SLOW_HANDSHAKE_MS = 900.0  # a SYN was retransmitted (the first SYN RTO is 1 s)
RETRANSMIT_HOTSPOT = 5


def _proc(event: dict) -> tuple[int, str]:
    return event["pid"], process_name(event)


@dataclass
class _Socket:
    state: str
    pid: int
    comm: str
    local: str
    remote: str
    line: int | None
    pod: str | None


class TcpAnalysis:
    def __init__(self) -> None:
        self.sockets: dict[str, _Socket] = {}
        self.sockets_overflow = 0
        self.handshakes: list[float] = []
        self.per_process: dict[tuple[int, str], Counter] = defaultdict(Counter)
        self.refused: dict[tuple[int, str, str], Examples] = defaultdict(Examples)
        self.timeouts: dict[tuple[int, str, str], Examples] = defaultdict(Examples)
        self.abandoned: dict[tuple[int, str, str], Examples] = defaultdict(Examples)
        self.slow: dict[tuple[int, str, str], Examples] = defaultdict(Examples)
        self.resets: dict[tuple[int, str, str, str, int], Examples] = defaultdict(Examples)
        self.retransmits: dict[tuple[int, str, str], Examples] = defaultdict(Examples)
        self.retransmit_segments: Counter[tuple[int, str, str]] = Counter()
        # every retransmit event: skbs (kind data), the segments the kernel counted in TcpRetransSegs,
        # SYN-ACKs (kind synack), and data retransmits that failed to go out (err != 0)
        self.retransmitted = {"skbs": 0, "segments": 0, "synacks": 0, "failed": 0}

    def add(self, event: dict, line: int | None) -> None:
        kind = event["type"]
        if kind == "tcp_state":
            self._state(event, line)
        elif kind == "retransmit":
            self._retransmit(event, line)
        elif kind == "reset":
            # a reset with no socket (a closed port) or an unknown owner belongs to no process; it belongs to the
            # namespace of its socket or packet (netns_pkt), not to that of whoever was on the CPU
            known = event["attribution"] != "cpu"
            owner = _proc(event) if known else (0, "no socket" if event["sk"] == "0x0" else "")
            key = (*owner, event["direction"], event["reason"] or "", event.get("netns_pkt", event["netns"]))
            self.resets[key].add(event, line)

    def _retransmit(self, event: dict, line: int | None) -> None:
        key = (*_proc(event), endpoint(event["daddr"], event["dport"]))
        self.retransmits[key].add(event, line)
        self.per_process[_proc(event)]["retransmits"] += 1
        # bundles before events_schema 5 have neither: one segment per event
        segments = event.get("segments", 1)
        if event.get("kind", "data") == "synack":
            self.retransmitted["synacks"] += 1
            self.retransmitted["segments"] += 1
        else:
            self.retransmitted["skbs"] += 1
            if event["err"] == 0:  # the kernel counts TcpRetransSegs only for what went out
                self.retransmitted["segments"] += segments
            else:
                self.retransmitted["failed"] += 1
        self.retransmit_segments[key] += segments

    def _state(self, event: dict, line: int | None) -> None:
        sk, old, new = event["sk"], event["old_state"], event["new_state"]
        proc = _proc(event)
        remote = endpoint(event["daddr"], event["dport"])
        if new == "SYN_SENT":
            self.per_process[proc]["connects"] += 1
        elif old == "LISTEN" and new == "SYN_RECV":
            self.per_process[proc]["accepts"] += 1
        if old == "SYN_SENT":
            handshake = event.get("handshake_ms")
            if new == "ESTABLISHED":
                # only completed handshakes: a refusal (microseconds) or a timeout (seconds) is no handshake time
                if handshake is not None and len(self.handshakes) < MAX_SAMPLES:
                    self.handshakes.append(handshake)
                self.per_process[proc]["established"] += 1
                if handshake is not None and handshake >= SLOW_HANDSHAKE_MS:
                    self.slow[(proc[0], proc[1], remote)].add(event, line)
            elif new == "CLOSE":
                error = event.get("error")
                key = (proc[0], proc[1], remote)
                # counted from the state change, which every connect has (blocking or not),
                # rather than from connect() errnos, which non-blocking callers never see
                if error == "ECONNREFUSED":
                    self.refused[key].add(event, line)
                    self.per_process[proc]["refused"] += 1
                elif error == "ETIMEDOUT":
                    self.timeouts[key].add(event, line)
                    self.per_process[proc]["timeouts"] += 1
                elif error is None and event.get("syn_retransmits", 0) > 0:
                    # closed by the application while its SYNs went unanswered: its own connect timeout
                    self.abandoned[key].add(event, line)
                    self.per_process[proc]["abandoned"] += 1
        if new == "CLOSE":
            self.sockets.pop(sk, None)
            return
        if sk in self.sockets or len(self.sockets) < MAX_SOCKETS:
            k8s = owner_pod(event)
            self.sockets[sk] = _Socket(new, proc[0], proc[1], endpoint(event["saddr"], event["sport"]),
                                       remote, line, k8s["pod_uid"] if k8s else None)
        else:
            self.sockets_overflow += 1

    # --- results ---

    def _unanswered(self) -> dict[tuple[int, str, str], Examples]:
        """Connects that got no answer per (pid, comm, remote): timed out and abandoned together."""
        merged: dict[tuple[int, str, str], Examples] = {}
        for table in (self.timeouts, self.abandoned):
            for key, e in table.items():
                m = merged.setdefault(key, Examples())
                m.count += e.count
                m.lines = sorted(m.lines + e.lines)[:MAX_LINES]
                m.first = min(filter(None, (m.first, e.first)), default="")
                m.last = max(m.last, e.last)
                m.pod = m.pod or e.pod
        return merged

    def close_wait(self) -> dict[tuple[int, str], list[_Socket]]:
        out: dict[tuple[int, str], list[_Socket]] = defaultdict(list)
        for s in self.sockets.values():
            if s.state == "CLOSE_WAIT":
                out[(s.pid, s.comm)].append(s)
        return out

    def summary(self) -> dict:
        hs = sorted(self.handshakes)
        close_wait = self.close_wait()
        states = Counter(s.state for s in self.sockets.values())
        return {
            "connections": {
                "attempted": sum(c["connects"] for c in self.per_process.values()),
                "established": sum(c["established"] for c in self.per_process.values()),
                "accepted": sum(c["accepts"] for c in self.per_process.values()),
                "refused": sum(e.count for e in self.refused.values()),
                "timed_out": sum(e.count for e in self.timeouts.values()),
                "abandoned": sum(e.count for e in self.abandoned.values()),
            },
            "handshake_ms": {
                "count": len(hs),
                "p50": percentile(hs, 0.5),
                "p99": percentile(hs, 0.99),
                "max": hs[-1] if hs else None,
            },
            "open_sockets_by_state": dict(sorted(states.items())),
            "close_wait": [
                {"pid": pid, "comm": comm, "sockets": len(socks)}
                for (pid, comm), socks in sorted(close_wait.items(), key=lambda kv: -len(kv[1]))
            ],
            "resets": [
                {"pid": k[0] or None, "comm": (k[1] or None) if k[0] else None, "direction": k[2],
                 "reason": k[3] or None, "netns": k[4],
                 "count": e.count}
                for k, e in sorted(self.resets.items(), key=lambda kv: -kv[1].count)
            ],
            "retransmitted": dict(self.retransmitted),
            **capped("retransmits", [
                {"pid": k[0], "comm": k[1], "remote": k[2], "count": e.count,
                 "segments": self.retransmit_segments[k]}
                for k, e in sorted(self.retransmits.items(), key=lambda kv: -kv[1].count)], 20),
            "sockets_not_tracked": self.sockets_overflow,
        }

    def top_talkers(self) -> list[dict]:
        """Every process that connected or accepted, the most connections first (summary.json lists TOP)."""
        rows = []
        for (pid, comm), c in self.per_process.items():
            total = c["connects"] + c["accepts"]
            if total:
                rows.append({"pid": pid, "comm": comm, "connections": total, "outbound": c["connects"],
                             "inbound": c["accepts"], "refused": c["refused"], "timed_out": c["timeouts"],
                             "retransmits": c["retransmits"]})
        rows.sort(key=lambda r: (-r["connections"], r["pid"]))
        return rows

    def findings(self) -> list[dict]:
        """Grouped per command, pod and remote endpoint: many processes of one command make one finding."""
        out = []

        def per_remote(table: dict[tuple[int, str, str], Examples]) -> list:
            return grouped((pid, e, (comm, remote)) for (pid, comm, remote), e in table.items())

        for (comm, remote), g in per_remote(self.refused):
            out.append(finding(
                "connect_refused", "warning", f"{g.who(comm)}: {g.count} connect(s) to {remote} refused",
                {**g.subject(), "comm": comm, "remote": remote}, g,
                "Nothing listens on that port (RST): check the Service/endpoint and that the server is up.",
            ))
        timed_out: Counter[tuple] = Counter()
        for (_pid, comm, remote), e in self.timeouts.items():
            timed_out[(comm, remote, e.pod)] += e.count
        for (comm, remote), g in per_remote(self._unanswered()):
            kernel = timed_out[(comm, remote, g.pod)]
            abandoned = g.count - kernel
            how = [f"{kernel} timed out"] if kernel else []
            how += [f"{abandoned} given up by the application after SYN retransmits"] if abandoned else []
            out.append(finding(
                "syn_timeout", "critical",
                f"{g.who(comm)}: {g.count} connect(s) to {remote} got no answer ({', '.join(how)})",
                {**g.subject(), "comm": comm, "remote": remote, "timed_out": kernel, "abandoned": abandoned}, g,
                "SYNs got no answer: a firewall/NetworkPolicy drop, a blackholed route or a dead peer. "
                "abandoned: the application's own connect timeout closed the socket before the kernel's "
                "(about 127 s) did.",
            ))
        for (comm, remote), g in per_remote(self.slow):
            out.append(finding(
                "slow_handshake", "warning",
                f"{g.who(comm)}: {g.count} handshake(s) with {remote} took >= {SLOW_HANDSHAKE_MS:.0f} ms",
                {**g.subject(), "comm": comm, "remote": remote}, g,
                "A SYN or SYN-ACK was lost and retransmitted after the 1 s RTO: look for packet loss.",
            ))
        waiting = []
        remotes_of: dict[str, set[str]] = defaultdict(set)
        for (pid, comm), socks in self.close_wait().items():
            e = Examples(count=len(socks), lines=[s.line for s in socks if s.line is not None][:MAX_LINES],
                         pod=socks[0].pod)
            waiting.append((pid, e, comm))
            remotes_of[comm].update(s.remote for s in socks)
        for comm, g in grouped(waiting):
            out.append(finding(
                "close_wait", "warning" if g.count < 100 else "critical",
                f"{g.who(comm)}: {g.count} socket(s) left in CLOSE_WAIT",
                {**g.subject(), "comm": comm, **capped("remotes", sorted(remotes_of[comm]), 10)}, g,
                "The peer closed but the application never closed its end: a socket/fd leak in that process.",
            ))
        resets = grouped((pid, e, (comm, direction, reason, netns))
                         for (pid, comm, direction, reason, netns), e in self.resets.items())
        for (comm, direction, reason, netns), g in resets:
            owned = bool(g.pids) and next(iter(g.pids)) != 0
            who = g.who(comm) if owned else comm or "unknown process"
            subject = g.subject() if owned else {"pid": None, "processes": 0, "pids": [], "pids_omitted": 0}
            out.append(finding(
                "tcp_reset", "info" if g.count < 10 else "warning",
                f"{who}: {g.count} reset(s) {direction}" + (f", reason {reason}" if reason else "")
                + f" in netns {netns}",
                {**subject, "comm": comm if owned else None, "direction": direction, "reason": reason or None,
                 "netns": netns}, g,
                "NO_SOCKET: a connect to a closed port; TCP_STATE/ABORT_ON_*: an application aborted a connection.",
            ))
        segments: Counter[tuple] = Counter()
        for (_pid, comm, remote), e in self.retransmits.items():
            segments[(comm, remote, e.pod)] += self.retransmit_segments[(_pid, comm, remote)]
        for (comm, remote), g in per_remote(self.retransmits):
            if g.count < RETRANSMIT_HOTSPOT:
                continue
            out.append(finding(
                "retransmit_hotspot", "warning",
                f"{g.who(comm)}: {g.count} retransmits ({segments[(comm, remote, g.pod)]} segments) to {remote}",
                {**g.subject(), "comm": comm, "remote": remote}, g,
                "Packets to this peer are lost or delayed: congestion, a flaky link, or drops on the path.",
            ))
        return out
