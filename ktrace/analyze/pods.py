"""The window per Kubernetes pod: events, TCP connections and their failures, top TCP remotes, UDP peers and DNS
servers, and the findings whose evidence is the pod's events.

A pod is known from the k8s block of an event's task (ktrace.enrich.identity.owner_pod): events of processes
outside kubelet's cgroups, and events whose task is only whoever was on the CPU, are not counted here.

Findings are made by the other analyses, per process or per endpoint; they are tied to pods afterwards through
their evidence lines: this analysis remembers which pod each line of events.jsonl belongs to (the first
MAX_MAPPED_LINES such lines, which is where the first examples of a finding are).
"""

from __future__ import annotations

from array import array
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass, field

from ktrace.analyze.common import capped, endpoint
from ktrace.analyze.dns import is_message
from ktrace.enrich.identity import owner_pod

MAX_PODS = 100  # rows in summary.json, most events first
MAX_TRACKED = 10_000  # pods followed during the window; events of later ones are counted apart
MAX_CONTAINERS = 20  # container ids listed per pod
MAX_MAPPED_LINES = 1_000_000  # line → pod pairs kept for findings (8 bytes each)
MAX_PEER_KEYS = 65_536  # (pod, TCP remote / UDP peer / DNS server) keys followed, all pods together
TOP = 10  # TCP remotes, UDP peers and DNS servers listed per pod
SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}


@dataclass
class _Pod:
    index: int
    qos: str
    namespace: str | None
    name: str | None
    events: int = 0
    connects: int = 0
    connects_failed: int = 0
    accepts: int = 0
    dns_timeouts: int = 0
    containers: Counter = field(default_factory=Counter)
    # the measures the per-process top lists have (ktrace.analyze.tcp, udp, dns), per peer of this pod
    tcp: dict[str, Counter] = field(default_factory=dict)  # remote endpoint → connects, established, ...
    udp: dict[str, Counter] = field(default_factory=dict)  # peer endpoint → bytes_out, bytes_in, ...
    dns: dict[tuple[str, str], Counter] = field(default_factory=dict)  # (role, server endpoint) → queries, ...


class PodAnalysis:
    def __init__(self) -> None:
        self.pods: dict[str, _Pod] = {}
        self.uids: list[str] = []  # pod index → uid
        self.untracked_events = 0
        # events.jsonl line → pod index of the pods' events, lines ascending (events are written in order)
        self.lines = array("I")
        self.line_pods = array("I")
        self.lines_not_mapped = 0
        self.peer_keys = 0
        self.peers_not_tracked = 0

    def add(self, event: dict, line: int | None) -> None:
        k8s = owner_pod(event)
        if not k8s:
            return
        uid = k8s["pod_uid"]
        pod = self.pods.get(uid)
        if pod is None:
            if len(self.pods) >= MAX_TRACKED:
                self.untracked_events += 1
                return
            pod = self.pods[uid] = _Pod(len(self.uids), k8s["qos"], k8s["namespace"], k8s["pod"])
            self.uids.append(uid)
        pod.events += 1
        # the runtime may name a pod only once its containers are known: keep the first names seen
        pod.namespace = pod.namespace or k8s["namespace"]
        pod.name = pod.name or k8s["pod"]
        if k8s["container_id"]:
            pod.containers[k8s["container_id"]] += 1
        if line is not None:
            self._map_line(line, pod.index)
        kind = event["type"]
        if kind == "tcp_state":
            self._tcp_state(pod, event)
        elif kind == "retransmit":
            self._count(pod.tcp, endpoint(event["daddr"], event["dport"]), retransmits=1)
        elif kind == "udp_flow":
            self._udp_flow(pod, event)
        elif kind in ("dns_query", "dns_reply", "dns_timeout"):
            self._dns(pod, event)

    def _map_line(self, line: int, index: int) -> None:
        if len(self.lines) >= MAX_MAPPED_LINES or (self.lines and line <= self.lines[-1]):
            self.lines_not_mapped += 1
            return
        self.lines.append(line)
        self.line_pods.append(index)

    def _count(self, table: dict, key: object, **counts: int) -> None:
        c = table.get(key)
        if c is None:
            if self.peer_keys >= MAX_PEER_KEYS:
                self.peers_not_tracked += 1
                return
            self.peer_keys += 1
            c = table[key] = Counter()
        c.update(counts)

    def _tcp_state(self, pod: _Pod, event: dict) -> None:
        # like ktrace.analyze.tcp: every connect passes SYN_SENT, and its failure is SYN_SENT → CLOSE with an error
        old, new = event["old_state"], event["new_state"]
        remote = endpoint(event["daddr"], event["dport"])
        if new == "SYN_SENT":
            pod.connects += 1
            self._count(pod.tcp, remote, connects=1)
        elif old == "LISTEN" and new == "SYN_RECV":
            pod.accepts += 1
        elif old == "SYN_SENT" and new == "ESTABLISHED":
            self._count(pod.tcp, remote, established=1)
        elif old == "SYN_SENT" and new == "CLOSE" and event.get("error"):
            pod.connects_failed += 1
            error = event["error"]
            self._count(pod.tcp, remote, refused=int(error == "ECONNREFUSED"), timed_out=int(error == "ETIMEDOUT"))

    def _udp_flow(self, pod: _Pod, event: dict) -> None:
        # a flow is keyed as its datagrams travel: the peer is the destination of what was sent, the source of
        # what was received
        if event["direction"] == "egress":
            way, peer = "out", endpoint(event["daddr"], event["dport"])
        else:
            way, peer = "in", endpoint(event["saddr"], event["sport"])
        self._count(pod.udp, peer, **{f"packets_{way}": event["packets"], f"bytes_{way}": event["bytes"]},
                    errors=event["errors"], flows=1)

    def _dns(self, pod: _Pod, event: dict) -> None:
        kind, role = event["type"], event["role"]
        if kind == "dns_timeout":
            pod.dns_timeouts += 1
        # like ktrace.analyze.dns: a client's server is the remote end, a local server's is its own endpoint
        server = endpoint(event["saddr"], event["sport"]) if role == "server" else endpoint(
            event["daddr"], event["dport"])
        if kind != "dns_timeout" and not is_message(event):
            return
        if kind == "dns_query":
            self._count(pod.dns, (role, server), queries=1, errors=int(bool(event.get("error"))))
        elif kind == "dns_reply":
            failed = bool(event.get("error"))
            self._count(pod.dns, (role, server), replies=int(not failed), errors=int(failed))
        elif event.get("window_end"):
            self._count(pod.dns, (role, server), unanswered_at_window_end=1)
        else:
            self._count(pod.dns, (role, server), timeouts=1)

    # --- results ---

    def pods_of(self, lines: list[int]) -> list[dict]:
        """The pods whose events are among these lines, with how many of the lines each has; most first."""
        found: Counter[int] = Counter()
        for line in lines:
            i = bisect_left(self.lines, line)
            if i < len(self.lines) and self.lines[i] == line:
                found[self.line_pods[i]] += 1
        rows = []
        for index, count in found.items():
            uid = self.uids[index]
            pod = self.pods[uid]
            rows.append({"pod_uid": uid, "namespace": pod.namespace, "pod": pod.name, "lines": count})
        rows.sort(key=lambda r: (-r["lines"], r["pod_uid"]))
        return rows

    def summary(self, findings: list[dict] | None = None) -> dict:
        """findings: summary.json's findings, each with its `pods` (pods_of its evidence lines) already set."""
        by_pod: dict[str, dict[str, dict]] = {}
        for f in findings or []:
            for p in f.get("pods", []):
                rules = by_pod.setdefault(p["pod_uid"], {})
                row = rules.setdefault(f["rule"], {"rule": f["rule"], "severity": f["severity"], "count": 0})
                row["count"] += 1
                if SEVERITY_ORDER.get(f["severity"], 3) < SEVERITY_ORDER.get(row["severity"], 3):
                    row["severity"] = f["severity"]
        rows = [{"pod_uid": uid, "qos": p.qos, "namespace": p.namespace, "pod": p.name, "events": p.events,
                 "tcp_connects": p.connects, "tcp_connects_failed": p.connects_failed, "tcp_accepts": p.accepts,
                 "dns_timeouts": p.dns_timeouts,
                 **capped("containers", [c for c, _ in p.containers.most_common()], MAX_CONTAINERS),
                 "findings": sorted(by_pod.get(uid, {}).values(),
                                    key=lambda r: (SEVERITY_ORDER.get(r["severity"], 3), -r["count"], r["rule"])),
                 **capped("tcp_remotes", _tcp_rows(p.tcp), TOP), **capped("udp_peers", _udp_rows(p.udp), TOP),
                 **capped("dns_servers", _dns_rows(p.dns), TOP)}
                for uid, p in self.pods.items()]
        rows.sort(key=lambda r: (-r["events"], r["pod_uid"]))
        return {"count": len(self.pods), "untracked_events": self.untracked_events,
                "lines_not_mapped": self.lines_not_mapped, "peers_not_tracked": self.peers_not_tracked,
                **capped("pods", rows, MAX_PODS)}


def _tcp_rows(table: dict[str, Counter]) -> list[dict]:
    """Remote endpoints by connects (as ktrace.analyze.tcp.top_talkers ranks processes), then retransmits."""
    rows = [{"remote": remote, "connects": c["connects"], "established": c["established"], "refused": c["refused"],
             "timed_out": c["timed_out"], "retransmits": c["retransmits"]} for remote, c in table.items()]
    rows.sort(key=lambda r: (-r["connects"], -r["retransmits"], r["remote"]))
    return rows


def _udp_rows(table: dict[str, Counter]) -> list[dict]:
    """Peers by bytes both ways (as ktrace.analyze.udp ranks processes)."""
    rows = [{"peer": peer, "bytes": c["bytes_out"] + c["bytes_in"], "bytes_out": c["bytes_out"],
             "bytes_in": c["bytes_in"], "packets_out": c["packets_out"], "packets_in": c["packets_in"],
             "errors": c["errors"], "flows": c["flows"]} for peer, c in table.items()]
    rows.sort(key=lambda r: (-r["bytes"], r["peer"]))
    return rows


def _dns_rows(table: dict[tuple[str, str], Counter]) -> list[dict]:
    """DNS servers by queries (as ktrace.analyze.dns ranks them)."""
    rows = [{"server": server, "role": role, "queries": c["queries"], "replies": c["replies"],
             "timeouts": c["timeouts"], "unanswered_at_window_end": c["unanswered_at_window_end"],
             "errors": c["errors"]} for (role, server), c in table.items()]
    rows.sort(key=lambda r: (-r["queries"], r["role"], r["server"]))
    return rows
