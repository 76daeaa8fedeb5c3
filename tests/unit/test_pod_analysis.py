"""summary.json's pods section (ktrace.analyze.pods)."""

from __future__ import annotations

from ktrace.analyze.pods import PodAnalysis

POD = {"pod_uid": "8f3b2c1a-4d5e-4f60-9a7b-0c1d2e3f4a5b", "qos": "burstable", "container_id": "c" * 64,
       "runtime": "containerd", "namespace": None, "pod": None, "container": None}


def _tcp(old: str, new: str, error: str | None = None, k8s: dict | None = POD) -> dict:
    return {"type": "tcp_state", "old_state": old, "new_state": new, "error": error, "k8s": k8s}


def test_events_connects_failures_and_dns_timeouts_are_counted_per_pod() -> None:
    pods = PodAnalysis()
    for event in (_tcp("CLOSE", "SYN_SENT"), _tcp("SYN_SENT", "ESTABLISHED"), _tcp("CLOSE", "SYN_SENT"),
                  _tcp("SYN_SENT", "CLOSE", "ECONNREFUSED"), {"type": "dns_timeout", "k8s": POD},
                  {"type": "exec", "k8s": None}, _tcp("CLOSE", "SYN_SENT", k8s=None)):
        pods.add(event, None)
    summary = pods.summary()
    assert summary["count"] == 1
    assert summary["pods"] == [{"pod_uid": POD["pod_uid"], "qos": "burstable", "namespace": None, "pod": None,
                                "events": 5, "tcp_connects": 2, "tcp_connects_failed": 1, "dns_timeouts": 1,
                                "containers": ["c" * 64]}]


def test_busiest_pods_come_first() -> None:
    pods = PodAnalysis()
    quiet, busy = {**POD, "pod_uid": "a"}, {**POD, "pod_uid": "b"}
    for event in ({"type": "exec", "k8s": quiet}, *({"type": "exec", "k8s": busy} for _ in range(3))):
        pods.add(event, None)
    assert [p["pod_uid"] for p in pods.summary()["pods"]] == ["b", "a"]
