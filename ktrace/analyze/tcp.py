"""TCP view of a window: connections, failures, sockets left in CLOSE_WAIT, hot spots.

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
        self.slow: dict[tuple[int, str, str], Examples] = defaultdict(Examples)
        self.resets: dict[tuple[int, str, str, str], Examples] = defaultdict(Examples)
        self.retransmits: dict[tuple[int, str, str], Examples] = defaultdict(Examples)

    def add(self, event: dict, line: int | None) -> None:
        kind = event["type"]
        if kind == "tcp_state":
            self._state(event, line)
        elif kind == "retransmit":
            key = (*_proc(event), endpoint(event["daddr"], event["dport"]))
            self.retransmits[key].add(event, line)
            self.per_process[_proc(event)]["retransmits"] += 1
        elif kind == "reset":
            # a reset with no socket (a closed port) or an unknown owner belongs to no process
            known = event["attribution"] != "cpu"
            owner = _proc(event) if known else (0, "no socket" if event["sk"] == "0x0" else "")
            key = (*owner, event["direction"], event["reason"] or "")
            self.resets[key].add(event, line)

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
                 "reason": k[3] or None,
                 "count": e.count}
                for k, e in sorted(self.resets.items(), key=lambda kv: -kv[1].count)
            ],
            **capped("retransmits", [
                {"pid": k[0], "comm": k[1], "remote": k[2], "count": e.count}
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
        for (comm, remote), g in per_remote(self.timeouts):
            out.append(finding(
                "syn_timeout", "critical", f"{g.who(comm)}: {g.count} connect(s) to {remote} timed out",
                {**g.subject(), "comm": comm, "remote": remote}, g,
                "SYNs got no answer: a firewall/NetworkPolicy drop, a blackholed route or a dead peer.",
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
        resets = grouped((pid, e, (comm, direction, reason))
                         for (pid, comm, direction, reason), e in self.resets.items())
        for (comm, direction, reason), g in resets:
            owned = bool(g.pids) and next(iter(g.pids)) != 0
            who = g.who(comm) if owned else comm or "unknown process"
            subject = g.subject() if owned else {"pid": None, "processes": 0, "pids": [], "pids_omitted": 0}
            out.append(finding(
                "tcp_reset", "info" if g.count < 10 else "warning",
                f"{who}: {g.count} reset(s) {direction}" + (f", reason {reason}" if reason else ""),
                {**subject, "comm": comm if owned else None, "direction": direction, "reason": reason or None}, g,
                "NO_SOCKET: a connect to a closed port; TCP_STATE/ABORT_ON_*: an application aborted a connection.",
            ))
        for (comm, remote), g in per_remote(self.retransmits):
            if g.count < RETRANSMIT_HOTSPOT:
                continue
            out.append(finding(
                "retransmit_hotspot", "warning", f"{g.who(comm)}: {g.count} retransmits to {remote}",
                {**g.subject(), "comm": comm, "remote": remote}, g,
                "Packets to this peer are lost or delayed: congestion, a flaky link, or drops on the path.",
            ))
        return out
