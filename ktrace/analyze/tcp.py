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

from ktrace.analyze.common import MAX_LINES, Examples, endpoint, finding, percentile

MAX_SOCKETS = 262144  # sockets tracked at once (open ones; closed ones are dropped)
MAX_SAMPLES = 65536  # handshake times kept for percentiles

SLOW_HANDSHAKE_MS = 900.0  # a SYN was retransmitted (the first SYN RTO is 1 s)
RETRANSMIT_HOTSPOT = 5


def _proc(event: dict) -> tuple[int, str]:
    return event["pid"], event["comm"]


@dataclass
class _Socket:
    state: str
    pid: int
    comm: str
    local: str
    remote: str
    line: int | None


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
            owner = (event["pid"], event["comm"]) if known else (0, "no socket" if event["sk"] == "0x0" else "")
            key = (*owner, event["direction"], event["reason"] or "", event.get("netns_pkt", event["netns"]))
            self.resets[key].add(event, line)

    def _retransmit(self, event: dict, line: int | None) -> None:
        key = (event["pid"], event["comm"], endpoint(event["daddr"], event["dport"]))
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
            self.sockets[sk] = _Socket(new, proc[0], proc[1], endpoint(event["saddr"], event["sport"]),
                                       remote, line)
        else:
            self.sockets_overflow += 1

    # --- results ---

    def _unanswered(self) -> list[tuple[tuple[int, str, str], Examples]]:
        """Connects that got no answer per (pid, comm, remote): timed out and abandoned together, most first."""
        merged: dict[tuple[int, str, str], Examples] = {}
        for table in (self.timeouts, self.abandoned):
            for key, e in table.items():
                m = merged.setdefault(key, Examples())
                m.count += e.count
                m.lines = sorted(m.lines + e.lines)[:MAX_LINES]
                m.first = min(filter(None, (m.first, e.first)), default="")
                m.last = max(m.last, e.last)
        return sorted(merged.items(), key=lambda kv: -kv[1].count)

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
            "retransmits": [
                {"pid": k[0], "comm": k[1], "remote": k[2], "count": e.count,
                 "segments": self.retransmit_segments[k]}
                for k, e in sorted(self.retransmits.items(), key=lambda kv: -kv[1].count)[:20]
            ],
            "sockets_not_tracked": self.sockets_overflow,
        }

    def top_talkers(self, limit: int = 10) -> list[dict]:
        rows = []
        for (pid, comm), c in self.per_process.items():
            total = c["connects"] + c["accepts"]
            if total:
                rows.append({"pid": pid, "comm": comm, "connections": total, "outbound": c["connects"],
                             "inbound": c["accepts"], "refused": c["refused"], "timed_out": c["timeouts"],
                             "retransmits": c["retransmits"]})
        rows.sort(key=lambda r: (-r["connections"], r["pid"]))
        return rows[:limit]

    def findings(self) -> list[dict]:
        out = []
        for (pid, comm, remote), e in sorted(self.refused.items(), key=lambda kv: -kv[1].count):
            out.append(finding(
                "connect_refused", "warning", f"{comm} ({pid}): {e.count} connect(s) to {remote} refused",
                {"pid": pid, "comm": comm, "remote": remote}, e,
                "Nothing listens on that port (RST): check the Service/endpoint and that the server is up.",
            ))
        for (pid, comm, remote), e in self._unanswered():
            timed_out = self.timeouts[(pid, comm, remote)].count if (pid, comm, remote) in self.timeouts else 0
            abandoned = e.count - timed_out
            how = [f"{timed_out} timed out"] if timed_out else []
            how += [f"{abandoned} given up by the application after SYN retransmits"] if abandoned else []
            out.append(finding(
                "syn_timeout", "critical",
                f"{comm} ({pid}): {e.count} connect(s) to {remote} got no answer ({', '.join(how)})",
                {"pid": pid, "comm": comm, "remote": remote, "timed_out": timed_out, "abandoned": abandoned}, e,
                "SYNs got no answer: a firewall/NetworkPolicy drop, a blackholed route or a dead peer. "
                "abandoned: the application's own connect timeout closed the socket before the kernel's "
                "(about 127 s) did.",
            ))
        for (pid, comm, remote), e in sorted(self.slow.items(), key=lambda kv: -kv[1].count):
            out.append(finding(
                "slow_handshake", "warning",
                f"{comm} ({pid}): {e.count} handshake(s) with {remote} took >= {SLOW_HANDSHAKE_MS:.0f} ms",
                {"pid": pid, "comm": comm, "remote": remote}, e,
                "A SYN or SYN-ACK was lost and retransmitted after the 1 s RTO: look for packet loss.",
            ))
        for (pid, comm), socks in sorted(self.close_wait().items(), key=lambda kv: -len(kv[1])):
            e = Examples(count=len(socks), lines=[s.line for s in socks if s.line is not None][:MAX_LINES])
            out.append(finding(
                "close_wait", "warning" if len(socks) < 100 else "critical",
                f"{comm} ({pid}): {len(socks)} socket(s) left in CLOSE_WAIT",
                {"pid": pid, "comm": comm, "remotes": sorted({s.remote for s in socks})[:10]}, e,
                "The peer closed but the application never closed its end: a socket/fd leak in that process.",
            ))
        for (pid, comm, direction, reason, netns), e in sorted(self.resets.items(), key=lambda kv: -kv[1].count):
            who = f"{comm} ({pid})" if pid else comm or "unknown process"
            out.append(finding(
                "tcp_reset", "info" if e.count < 10 else "warning",
                f"{who}: {e.count} reset(s) {direction}" + (f", reason {reason}" if reason else "")
                + f" in netns {netns}",
                {"pid": pid or None, "comm": comm if pid else None, "direction": direction,
                 "reason": reason or None, "netns": netns}, e,
                "NO_SOCKET: a connect to a closed port; TCP_STATE/ABORT_ON_*: an application aborted a connection.",
            ))
        for (pid, comm, remote), e in sorted(self.retransmits.items(), key=lambda kv: -kv[1].count):
            if e.count < RETRANSMIT_HOTSPOT:
                continue
            out.append(finding(
                "retransmit_hotspot", "warning",
                f"{comm} ({pid}): {e.count} retransmits ({self.retransmit_segments[(pid, comm, remote)]} segments) "
                f"to {remote}",
                {"pid": pid, "comm": comm, "remote": remote}, e,
                "Packets to this peer are lost or delayed: congestion, a flaky link, or drops on the path.",
            ))
        return out
