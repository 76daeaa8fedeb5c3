"""Findings across every rule: evidence lines, grouping per command, ranking, the console's view, and capped lists
that say how many rows they left out. Events are recorded ones (tests/fixtures) with fields changed."""

from __future__ import annotations

import copy

import pytest

from ktrace import schemas
from ktrace.analyze import summary as summary_mod
from ktrace.analyze.process import MAX_VICTIMS
from ktrace.analyze.summary import Summary
from tests.unit.conftest import fixture_events, fixture_summary, load_record

EVENTS = fixture_events()
FIRST = {}
for _e in EVENTS:
    FIRST.setdefault(_e["type"], _e)


def like(template: dict, **fields) -> dict:
    event = copy.deepcopy(template)
    event.update(fields)
    return event


def record(record_name: str, **fields) -> dict:
    return like(load_record(record_name)["expected"], **fields)


def build(events: list[dict], *, losses: dict | None = None, nat: dict | None = None) -> dict:
    s = Summary()
    for number, event in enumerate(events, 1):
        s.add(event, number)
    recorded = fixture_summary()
    meta = {k: recorded[k] for k in ("ktrace_version", "events_schema", "node", "window", "options", "degraded")}
    return s.build(meta=meta, losses=losses or recorded["losses"]["by_family"], probes=recorded["probes"],
                   files=recorded["files"], warnings=[], nat=nat)


def _jobs(n: int, refused_each: int, comm: str = "kt-job") -> list[dict]:
    """n short-lived processes of one command, each refused refused_each times by one port."""
    refused = record("tcp_state_refused")
    return [like(refused, pid=1000 + i, tid=1000 + i, comm=comm, process=comm, sk=f"0x{i:x}{j}")
            for i in range(n) for j in range(refused_each)]


def _every_rule_events() -> tuple[list[dict], dict, dict]:
    """Events, losses and a NAT section that make every rule of the summary schema fire."""
    events = list(EVENTS)  # close_wait, connect_refused, dns_timeout, dns_server_dropped, tcp_reset, packet_drops...
    events.append(record("tcp_state_timeout"))
    events.append(record("tcp_state_established", handshake_ms=1100.0))
    events += [record("retransmit_syn") for _ in range(5)]
    query, reply = FIRST["dns_query"], FIRST["dns_reply"]
    silent = {"daddr": "10.9.9.9", "dport": 53}
    events += [like(query, role="client", **silent), like(FIRST["dns_timeout"], role="client", **silent)] * 3
    slow = {"daddr": "10.8.8.8", "dport": 53}
    events += [like(query, role="client", **slow) for _ in range(5)]
    events += [like(reply, role="client", rtt_ms=900.0, late=False, continuation=False, error=None, **slow)
               for _ in range(5)]
    events.append(like(query, role="client", error="ECONNREFUSED", daddr="10.7.7.7", dport=53))
    events += [record("dns_lookup_getaddrinfo_eai_again") for _ in range(3)]
    events.append(record("dns_lookup_getaddrinfo_ok", latency_ms=1500.0))
    events.append(record("oom_kill_tp_btf"))
    run, failed = record("exec_tp_btf"), record("exit_status_tp_btf")
    for pid in range(60_000, 60_006):  # one executable failing six times: a crash loop
        events += [like(run, pid=pid, tid=pid), like(failed, pid=pid, tid=pid)]
    fork = record("fork_tp_btf")
    events += [like(fork, child_pid=50_000 + i, ts_ns=fork["ts_ns"] + i) for i in range(250)]
    runq = like(FIRST["runq_histogram"], buckets=[{"from_us": 65536, "to_us": 131072, "count": 100}], max_ms=100.0)
    bio = like(FIRST["bio_histogram"], buckets=[{"from_us": 262144, "to_us": 524288, "count": 10}], max_ms=400.0)
    events += [runq, bio]
    losses = copy.deepcopy(fixture_summary()["losses"]["by_family"])
    losses["tcp_state"]["ringbuf_full"] = 3
    table = {"netns": 4026531833, "entries_max": 100, "limit": 100, "drop": 2, "early_drop": 0, "insert_failed": 1}
    nat = {**fixture_summary().get("nat", {}), "tables": [table]} if fixture_summary().get("nat") else None
    return events, losses, nat or {"tables": [table]}


def test_every_rule_fires_on_the_synthetic_window_and_every_finding_shows_its_evidence():
    events, losses, nat = _every_rule_events()
    doc = build(events, losses=losses, nat=nat)
    rules = {f["rule"] for f in doc["findings"]}
    enum = set(schemas.load_schema("summary")["$defs"]["finding"]["properties"]["rule"]["enum"])
    assert rules == enum, enum - rules
    for f in doc["findings"]:
        evidence = f["evidence"]
        if f["rule"] in ("events_lost", "conntrack_pressure"):  # no event shows these: a pointer into the summary
            target = doc
            for part in evidence["summary"].strip("/").split("/"):
                target = target[int(part)] if isinstance(target, list) else target[part]
            assert target, f["rule"]
        else:
            assert evidence["lines"], f"{f['rule']}: {f['title']}"
            assert "summary" not in evidence
            for line in evidence["lines"]:
                assert 1 <= line <= len(events)


def test_findings_of_every_rule_validate_against_the_summary_schema():
    events, losses, nat = _every_rule_events()
    doc = build(events, losses=losses, nat=nat)
    for f in doc["findings"]:
        assert schemas.validate("summary", {**fixture_summary(), "findings": [f]}) == [], f["rule"]


def test_forty_jobs_refused_by_one_port_are_one_finding_adding_up_their_connects():
    doc = build(_jobs(40, 3))
    [f] = [f for f in doc["findings"] if f["rule"] == "connect_refused"]
    assert f["evidence"]["count"] == 120 and f["subject"]["processes"] == 40
    assert len(f["subject"]["pids"]) == 5 and f["subject"]["pids_omitted"] == 35
    assert all(p["count"] == 3 for p in f["subject"]["pids"])
    assert f["subject"]["comm"] == "kt-job" and "40 processes" in f["title"] and "120 connect(s)" in f["title"]


def test_jobs_of_two_commands_or_two_remotes_are_two_findings():
    other = [like(e, daddr="127.0.0.2") for e in _jobs(3, 1)]
    doc = build(_jobs(3, 1) + _jobs(2, 1, comm="kt-other") + other)
    refused = sorted((f["subject"]["comm"], f["subject"]["remote"], f["evidence"]["count"])
                     for f in doc["findings"] if f["rule"] == "connect_refused")
    remote = refused[0][1].rsplit(":", 1)[1]
    assert refused == [("kt-job", "127.0.0.1:" + remote, 3), ("kt-job", "127.0.0.2:" + remote, 3),
                       ("kt-other", "127.0.0.1:" + remote, 2)]


def test_jobs_of_one_command_in_two_pods_are_two_findings():
    refused = _jobs(4, 1)
    for i, event in enumerate(refused):
        event["k8s"] = {**(event["k8s"] or FIRST["dns_timeout"]["k8s"]), "pod_uid": f"pod-{i % 2}"}
    doc = build(refused)
    findings = [f for f in doc["findings"] if f["rule"] == "connect_refused"]
    assert sorted(f["evidence"]["count"] for f in findings) == [2, 2]
    assert sorted(f["pods"][0]["pod_uid"] for f in findings) == ["pod-0", "pod-1"]


def test_findings_are_ordered_by_severity_then_impact_and_the_console_prints_every_critical_one():
    oom = record("oom_kill_tp_btf")
    kills = [like(oom, pid=7000 + i, comm=f"kt-hog{i}", process=f"kt-hog{i}") for i in range(12)]
    doc = build(_jobs(40, 3) + EVENTS + kills)
    severities = [f["severity"] for f in doc["findings"]]
    assert severities == sorted(severities, key=summary_mod.SEVERITY_ORDER.get)
    for a, b in zip(doc["findings"], doc["findings"][1:]):
        if a["severity"] == b["severity"]:
            assert a["evidence"]["count"] >= b["evidence"]["count"]
    assert doc["findings"][0]["rule"] == "oom_kill"
    console = doc["console"]
    assert console["findings_shown"] == 12  # 12 critical findings: more than the 10 of the console, all shown
    assert console["findings_shown"] + console["findings_omitted"] == len(doc["findings"])
    shown = console["lines"][1:1 + console["findings_shown"]]
    assert shown == [f"  [{f['severity']}] {f['title']}" for f in doc["findings"][:12]]
    assert console["lines"][1 + console["findings_shown"]].startswith(f"  ... {console['findings_omitted']} more")


def test_the_console_lists_ten_findings_when_none_is_critical():
    doc = build(EVENTS)
    console = doc["console"]
    assert console["findings_shown"] == min(10, len(doc["findings"]))
    assert console["lines"][0].endswith(f"{len(doc['findings'])} findings")


def test_130_oom_kills_keep_100_victims_say_30_are_omitted_and_one_finding_counts_all():
    oom = record("oom_kill_tp_btf")
    doc = build([like(oom, pid=20_000 + i, tid=20_000 + i) for i in range(130)])
    assert doc["oom"]["kills"] == 130
    assert len(doc["oom"]["victims"]) == MAX_VICTIMS and doc["oom"]["victims_omitted"] == 30
    [f] = [f for f in doc["findings"] if f["rule"] == "oom_kill"]
    assert f["evidence"]["count"] == 130 and f["subject"]["processes"] == 101  # 100 named, the others together
    assert f["severity"] == "critical" and "130 processes" in f["title"]


def _capped_lists(doc: dict, path: str = "") -> list[tuple[str, list, int]]:
    """Every (path, list, omitted) of a summary document: the lists that have a sibling name_omitted."""
    out = []
    if isinstance(doc, dict):
        for key, value in doc.items():
            if isinstance(value, list) and f"{key}_omitted" in doc:
                out.append((f"{path}/{key}", value, doc[f"{key}_omitted"]))
            out += _capped_lists(value, f"{path}/{key}")
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            out += _capped_lists(value, f"{path}/{i}")
    return out


def _many(n: int) -> list[dict]:
    """n processes (and n servers, names, flows, executables, cgroups, disks, pods...) of every kind of event."""
    events = []
    for i in range(n):
        who = {"pid": 30_000 + i, "tid": 30_000 + i, "comm": f"kt-p{i}", "process": f"kt-p{i}"}
        k8s = {**FIRST["dns_timeout"]["k8s"], "pod_uid": f"pod-{i}"}
        events.append(record("tcp_state_syn_sent", **who, k8s=k8s, daddr=f"10.1.{i // 250}.{i % 250}"))
        events.append(record("retransmit_syn", **who, k8s=k8s, daddr=f"10.1.{i // 250}.{i % 250}"))
        events.append(record("udp_flow_egress", **who, k8s=k8s, dport=1000 + i, bytes=100 + i))
        dns = {"daddr": f"10.2.{i // 250}.{i % 250}", "dport": 53, "role": "client"}
        events.append(like(FIRST["dns_query"], **who, k8s=k8s, **dns))
        events.append(like(FIRST["dns_timeout"], **who, k8s=k8s, **dns))
        events.append(like(FIRST["dns_query"], **who, k8s=k8s, role="server", saddr="127.0.0.1", sport=2000 + i))
        events.append(record("dns_lookup_getaddrinfo_eai_again", **who, name=f"n{i}.test"))
        events.append(record("oom_kill_tp_btf", **who))
        events.append(record("exec_tp_btf", **who, filename=f"/bin/kt{i}"))
        events.append(record("fork_tp_btf", **who, child_pid=60_000 + i))
        events.append(record("exit_status_tp_btf", **who, exit_status=2, exit_code=2 << 8))
        events.append(like(FIRST["drop_count"], reason=f"REASON_{i}", protocol=f"ipv4/p{i}"))
        events.append(like(FIRST["runq_histogram"], cgroup_id=10_000 + i, memcg_id=10_000 + i, cgroup=10_000 + i))
        events.append(like(FIRST["bio_histogram"], dev=f"254:{i}"))
    return events


def test_every_capped_list_says_how_many_rows_it_left_out():
    n = 120
    doc = build(_many(n))
    capped = {path: (len(rows), omitted) for path, rows, omitted in _capped_lists(doc)}
    expect = {  # list: how many rows it can show, of the n of each kind made
        "/top_talkers": 10, "/tcp/retransmits": 20, "/udp/top_talkers": 10, "/udp/top_flows": 10,
        "/dns/by_server": 20, "/dns/by_process": 20, "/dns/served": 20, "/dns_suspects": 100,
        "/dns_lookups/top_names": 20, "/dns_lookups/failing_names": 20, "/dns_lookups/top_processes": 20,
        "/oom/victims": 100, "/processes/top_forking_parents": 10, "/processes/top_executables": 10,
        "/processes/nonzero_exits_by_comm": 10, "/drops/top_reasons": 5, "/drops/top": 10,
        "/sched/cgroups": 100, "/blockio/devices": 100, "/pods/pods": 100,
    }
    for path, shown in expect.items():
        assert capped[path] == (shown, n - shown), path
    # every list with a cap has its count, whatever its size here
    assert {"/drops/flows", "/sched/worst_waiters", "/blockio/worst_requests"} <= set(capped)
    assert schemas.validate("summary", doc) == []


@pytest.mark.parametrize("path", ["/top_talkers", "/dns/by_server", "/oom/victims", "/pods/pods"])
def test_a_list_under_its_cap_leaves_nothing_out(path):
    capped = {p: (len(rows), omitted) for p, rows, omitted in _capped_lists(build(_many(3)))}
    assert capped[path] == (3, 0)
