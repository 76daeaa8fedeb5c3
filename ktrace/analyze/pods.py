"""The window per Kubernetes pod: events, outbound TCP connections and their failures, DNS timeouts.

A pod is known from the k8s block of an event's task (ktrace.enrich.identity): events of processes
outside kubelet's cgroups are not counted here.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

MAX_PODS = 100  # rows in summary.json, most events first
MAX_TRACKED = 10_000  # pods followed during the window; events of later ones are counted apart
MAX_CONTAINERS = 20  # container ids listed per pod


@dataclass
class _Pod:
    qos: str
    namespace: str | None
    name: str | None
    events: int = 0
    connects: int = 0
    connects_failed: int = 0
    dns_timeouts: int = 0
    containers: Counter = field(default_factory=Counter)


class PodAnalysis:
    def __init__(self) -> None:
        self.pods: dict[str, _Pod] = {}
        self.untracked_events = 0

    def add(self, event: dict, line: int | None) -> None:
        k8s = event.get("k8s")
        if not k8s:
            return
        uid = k8s["pod_uid"]
        pod = self.pods.get(uid)
        if pod is None:
            if len(self.pods) >= MAX_TRACKED:
                self.untracked_events += 1
                return
            pod = self.pods[uid] = _Pod(k8s["qos"], k8s["namespace"], k8s["pod"])
        pod.events += 1
        if k8s["container_id"]:
            pod.containers[k8s["container_id"]] += 1
        kind = event["type"]
        if kind == "tcp_state":
            # like the TCP analysis: every connect passes SYN_SENT, and its failure is SYN_SENT → CLOSE with an error
            if event["new_state"] == "SYN_SENT":
                pod.connects += 1
            elif event["old_state"] == "SYN_SENT" and event["new_state"] == "CLOSE" and event.get("error"):
                pod.connects_failed += 1
        elif kind == "dns_timeout":
            pod.dns_timeouts += 1

    def summary(self) -> dict:
        rows = [{"pod_uid": uid, "qos": p.qos, "namespace": p.namespace, "pod": p.name, "events": p.events,
                 "tcp_connects": p.connects, "tcp_connects_failed": p.connects_failed, "dns_timeouts": p.dns_timeouts,
                 "containers": [c for c, _ in p.containers.most_common(MAX_CONTAINERS)]}
                for uid, p in self.pods.items()]
        rows.sort(key=lambda r: (-r["events"], r["pod_uid"]))
        return {"count": len(self.pods), "untracked_events": self.untracked_events, "pods": rows[:MAX_PODS]}
