"""summary.json's pods section and the pods of findings (ktrace.analyze.pods), replayed from the recorded bundle.

In the fixture window (tests/fixtures/record.py) kt-client runs in one pod (besteffort) and kt-server in
another (burstable): their cgroups are named like kubelet's, so every event of theirs carries k8s. Each pod
has one process, so what the pods section says per pod must be what the per-process sections say of it.
"""

from __future__ import annotations

import pytest

from ktrace.analyze import pods as pods_module
from ktrace.analyze.pods import PodAnalysis
from tests.unit.test_tcp_analysis import CLIENT_PID, EVENTS, SERVER_PID, _build, _replay

POD = {"pod_uid": "8f3b2c1a-4d5e-4f60-9a7b-0c1d2e3f4a5b", "qos": "burstable", "container_id": "c" * 64,
       "runtime": "containerd", "namespace": None, "pod": None, "container": None}


def _pod_of(pid: int) -> dict:
    (k8s,) = {e["k8s"]["pod_uid"]: e["k8s"] for e in EVENTS if e.get("pid") == pid and e.get("k8s")}.values()
    return k8s


CLIENT_POD, SERVER_POD = _pod_of(CLIENT_PID), _pod_of(SERVER_PID)
DOC = _build(_replay(EVENTS))
ROWS = {row["pod_uid"]: row for row in DOC["pods"]["pods"]}


def _subject_pid(finding: dict) -> int | None:
    return finding["subject"].get("pid")


def test_fixture_has_the_client_and_the_server_in_pods_of_their_own():
    assert CLIENT_POD["pod_uid"] != SERVER_POD["pod_uid"]
    assert (CLIENT_POD["qos"], SERVER_POD["qos"]) == ("besteffort", "burstable")
    assert set(ROWS) == {CLIENT_POD["pod_uid"], SERVER_POD["pod_uid"]} and DOC["pods"]["count"] == 2


def test_events_attributed_to_whoever_was_on_the_cpu_are_not_the_pods():
    # the RSTs sent for SYNs to a closed port carry the client's task block only because it was on the CPU
    cpu = [e for e in EVENTS if e.get("attribution") == "cpu" and e.get("k8s") == CLIENT_POD]
    assert any(e["type"] == "reset" and e["sk"] == "0x0" for e in cpu)
    carried = [e for e in EVENTS if e.get("k8s") == CLIENT_POD]
    assert ROWS[CLIENT_POD["pod_uid"]]["events"] == len(carried) - len(cpu)


# --- findings by pod ---


def test_findings_about_a_process_in_a_pod_name_that_pod_for_every_evidence_line():
    checked = 0
    for finding in DOC["findings"]:
        pod = {CLIENT_PID: CLIENT_POD, SERVER_PID: SERVER_POD}.get(_subject_pid(finding))
        if pod is None or not finding["evidence"]["lines"]:
            continue
        assert finding["pods"] == [{"pod_uid": pod["pod_uid"], "namespace": None, "pod": None,
                                    "lines": len(finding["evidence"]["lines"])}], finding["rule"]
        checked += 1
    assert checked >= 5  # dns_timeout, dns_server_dropped, connect_refused, close_wait, tcp_reset received


def test_a_finding_whose_evidence_is_cpu_attributed_names_no_pod():
    (sent,) = [f for f in DOC["findings"] if f["rule"] == "tcp_reset" and f["subject"]["direction"] == "sent"]
    assert sent["evidence"]["lines"] and sent["pods"] == []


def test_each_pod_lists_the_rules_of_the_findings_about_its_process():
    for pid, pod in ((CLIENT_PID, CLIENT_POD), (SERVER_PID, SERVER_POD)):
        expected: dict[str, int] = {}
        for f in DOC["findings"]:
            if _subject_pid(f) == pid and f["evidence"]["lines"]:
                expected[f["rule"]] = expected.get(f["rule"], 0) + 1
        listed = ROWS[pod["pod_uid"]]["findings"]
        assert {r["rule"]: r["count"] for r in listed} == expected
    assert {r["rule"] for r in ROWS[CLIENT_POD["pod_uid"]]["findings"]} >= {"connect_refused", "dns_timeout"}
    assert {r["rule"] for r in ROWS[SERVER_POD["pod_uid"]]["findings"]} >= {"close_wait", "dns_server_dropped"}


def test_a_pods_rules_carry_the_most_severe_finding_and_sort_by_severity():
    analysis = PodAnalysis()
    analysis.add({"type": "exec", "k8s": POD}, 1)
    findings = [{"rule": "dns_timeout", "severity": "warning"}, {"rule": "dns_timeout", "severity": "critical"},
                {"rule": "tcp_reset", "severity": "info"}, {"rule": "syn_timeout", "severity": "critical"}]
    for f in findings:
        f["pods"] = analysis.pods_of([1])
    (row,) = analysis.summary(findings)["pods"]
    assert row["findings"] == [{"rule": "dns_timeout", "severity": "critical", "count": 2},
                               {"rule": "syn_timeout", "severity": "critical", "count": 1},
                               {"rule": "tcp_reset", "severity": "info", "count": 1}]


def test_lines_past_the_map_bound_are_counted_and_name_no_pod(monkeypatch):
    monkeypatch.setattr(pods_module, "MAX_MAPPED_LINES", 50)
    doc = _build(_replay(EVENTS))
    mapped = [n for n, e in enumerate(EVENTS, 1) if e.get("k8s") and e.get("attribution") != "cpu"]
    assert doc["pods"]["lines_not_mapped"] == len(mapped) - 50
    last = mapped[49]
    for finding in doc["findings"]:
        lines = finding["evidence"]["lines"]
        assert sum(p["lines"] for p in finding["pods"]) == sum(1 for n in lines if n in mapped and n <= last)
    # the client's refused connects come after the first 50 pod lines: their finding lost its pod
    (refused,) = [f for f in doc["findings"] if f["rule"] == "connect_refused"]
    assert min(refused["evidence"]["lines"]) > last and refused["pods"] == []


def test_pod_names_from_the_runtime_reach_findings_and_rows():
    named = {**POD, "namespace": "shop", "pod": "cart-7d9f", "container": "cart"}
    analysis = PodAnalysis()
    analysis.add({"type": "exec", "k8s": POD}, 3)  # before the runtime knew the container
    analysis.add({"type": "exec", "k8s": named}, 4)
    assert analysis.pods_of([3, 4, 5]) == [{"pod_uid": POD["pod_uid"], "namespace": "shop", "pod": "cart-7d9f",
                                            "lines": 2}]
    (row,) = analysis.summary()["pods"]
    assert (row["namespace"], row["pod"], row["events"]) == ("shop", "cart-7d9f", 2)


# --- top talkers by pod: the per-process measures, per pod ---


def _process_row(rows: list[dict], pid: int) -> dict:
    (row,) = [r for r in rows if r["pid"] == pid]
    return row


def test_tcp_remotes_of_a_pod_add_up_to_its_process_top_talker_row():
    talker = _process_row(DOC["top_talkers"], CLIENT_PID)
    remotes = ROWS[CLIENT_POD["pod_uid"]]["tcp_remotes"]
    assert sum(r["connects"] for r in remotes) == talker["outbound"] == ROWS[CLIENT_POD["pod_uid"]]["tcp_connects"]
    assert sum(r["refused"] for r in remotes) == talker["refused"]
    assert sum(r["timed_out"] for r in remotes) == talker["timed_out"]
    assert sum(r["established"] for r in remotes) == talker["outbound"] - talker["refused"] - talker["timed_out"]
    assert [r["connects"] for r in remotes] == sorted((r["connects"] for r in remotes), reverse=True)
    (refused,) = [f for f in DOC["findings"] if f["rule"] == "connect_refused"]
    (closed_port,) = [r for r in remotes if r["remote"] == refused["subject"]["remote"]]
    assert closed_port["refused"] == closed_port["connects"] == refused["evidence"]["count"]


def test_a_listening_pod_counts_its_accepts_and_has_no_remotes():
    row = ROWS[SERVER_POD["pod_uid"]]
    assert row["tcp_accepts"] == _process_row(DOC["top_talkers"], SERVER_PID)["inbound"] > 0
    assert row["tcp_remotes"] == []


@pytest.mark.parametrize("pid", [CLIENT_PID, SERVER_PID], ids=["client", "server"])
def test_udp_peers_of_a_pod_add_up_to_its_process_udp_row(pid):
    talker = _process_row(DOC["udp"]["top_talkers"], pid)
    peers = ROWS[_pod_of(pid)["pod_uid"]]["udp_peers"]
    for measure in ("bytes", "bytes_out", "bytes_in", "packets_out", "packets_in", "errors", "flows"):
        assert sum(p[measure] for p in peers) == talker[measure], measure
    assert [p["bytes"] for p in peers] == sorted((p["bytes"] for p in peers), reverse=True)


def test_the_clients_udp_peers_are_the_servers_ports():
    echo = next(e for e in EVENTS if e["type"] == "udp_flow" and e["pid"] == CLIENT_PID and e["direction"] == "egress"
                and e["bytes"] == 1600)
    (peer,) = [p for p in ROWS[CLIENT_POD["pod_uid"]]["udp_peers"] if p["peer"] == f"{echo['daddr']}:{echo['dport']}"]
    assert (peer["bytes_out"], peer["bytes_in"], peer["packets_out"], peer["packets_in"]) == (1600, 1600, 50, 50)


def test_dns_servers_of_a_pod_are_its_process_dns_rows():
    client = _process_row(DOC["dns"]["by_process"], CLIENT_PID)
    asked = ROWS[CLIENT_POD["pod_uid"]]["dns_servers"]
    assert {s["role"] for s in asked} == {"client"}
    for measure in ("queries", "replies", "timeouts", "unanswered_at_window_end", "errors"):
        assert sum(s[measure] for s in asked) == client[measure], measure
    served = ROWS[SERVER_POD["pod_uid"]]["dns_servers"]
    assert [(s["server"], s["queries"], s["replies"], s["timeouts"]) for s in served] == [
        (r["server"], r["queries"], r["replies"], r["timeouts"]) for r in DOC["dns"]["served"]]
    assert {s["role"] for s in served} == {"server"}


def test_peers_past_the_key_bound_are_counted_not_listed(monkeypatch):
    monkeypatch.setattr(pods_module, "MAX_PEER_KEYS", 3)
    section = _build(_replay(EVENTS))["pods"]
    listed = sum(len(row[table]) for row in section["pods"] for table in ("tcp_remotes", "udp_peers", "dns_servers"))
    assert listed == 3 and section["peers_not_tracked"] > 0


# --- the counts of a pod row ---


def _tcp(old: str, new: str, error: str | None = None, k8s: dict | None = POD) -> dict:
    return {"type": "tcp_state", "old_state": old, "new_state": new, "error": error, "k8s": k8s,
            "daddr": "10.0.0.1", "dport": 443}


def test_events_connects_failures_and_dns_timeouts_are_counted_per_pod() -> None:
    pods = PodAnalysis()
    timeout = {"type": "dns_timeout", "k8s": POD, "role": "client", "saddr": "10.1.0.5", "sport": 40000,
               "daddr": "10.96.0.10", "dport": 53, "window_end": False}
    for event in (_tcp("CLOSE", "SYN_SENT"), _tcp("SYN_SENT", "ESTABLISHED"), _tcp("CLOSE", "SYN_SENT"),
                  _tcp("SYN_SENT", "CLOSE", "ECONNREFUSED"), timeout,
                  {"type": "exec", "k8s": None}, _tcp("CLOSE", "SYN_SENT", k8s=None)):
        pods.add(event, None)
    summary = pods.summary()
    assert summary["count"] == 1
    (row,) = summary["pods"]
    assert {k: row[k] for k in ("pod_uid", "qos", "events", "tcp_connects", "tcp_connects_failed", "dns_timeouts",
                                "containers")} == {
        "pod_uid": POD["pod_uid"], "qos": "burstable", "events": 5, "tcp_connects": 2, "tcp_connects_failed": 1,
        "dns_timeouts": 1, "containers": ["c" * 64]}
    assert row["tcp_remotes"] == [{"remote": "10.0.0.1:443", "connects": 2, "established": 1, "refused": 1,
                                   "timed_out": 0, "retransmits": 0}]
    assert row["dns_servers"] == [{"server": "10.96.0.10:53", "role": "client", "queries": 0, "replies": 0,
                                   "timeouts": 1, "unanswered_at_window_end": 0, "errors": 0}]


def test_busiest_pods_come_first() -> None:
    pods = PodAnalysis()
    quiet, busy = {**POD, "pod_uid": "a"}, {**POD, "pod_uid": "b"}
    for event in ({"type": "exec", "k8s": quiet}, *({"type": "exec", "k8s": busy} for _ in range(3))):
        pods.add(event, None)
    assert [p["pod_uid"] for p in pods.summary()["pods"]] == ["b", "a"]
