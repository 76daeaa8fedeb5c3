"""ktrace.analyze: the TCP view of a window, replayed from the recorded events.jsonl.

The fixture window (tests/fixtures/record.py): kt-client makes 6 echo connections
(one over ::1), 3 refused connects to 127.0.0.1:1 and 3 connections to a kt-server
port whose accepted sockets the server never closes, so they sit in CLOSE_WAIT.
Edge cases replay subsets of those recorded lines, or the recorded golden events.
"""

from __future__ import annotations

import copy

import pytest

from ktrace.analyze import tcp
from ktrace.analyze.summary import Summary
from tests.unit.conftest import fixture_events, fixture_summary, load_record

META_KEYS = ("ktrace_version", "events_schema", "node", "window", "options", "degraded")
EVENTS = fixture_events()
SERVER_PID = next(e["pid"] for e in EVENTS if e["type"] == "tcp_state" and e["new_state"] == "LISTEN")
CLIENT_PID = next(e["pid"] for e in EVENTS if e["type"] == "connect")
LEAK_PORT = 47002


def _replay(events: list[dict], lines: bool = True) -> Summary:
    summary = Summary()
    for number, event in enumerate(events, 1):
        summary.add(event, number if lines else None)
    return summary


def _build(summary: Summary, losses: dict | None = None) -> dict:
    recorded = fixture_summary()
    return summary.build(meta={k: recorded[k] for k in META_KEYS},
                         losses=recorded["losses"]["by_family"] if losses is None else losses,
                         probes=recorded["probes"], files=recorded["files"], warnings=recorded["warnings"],
                         udp_map=recorded["udp"]["kernel_map"], drops_map=recorded["drops"]["kernel_map"],
                         process_counts={"threads_created": recorded["processes"]["threads_created"]},
                         latency_losses={s: recorded[s]["kernel_losses"] for s in ("sched", "blockio")},
                         cri=recorded["cri"], coverage=recorded.get("coverage"))


def _rules(findings: list[dict]) -> list[str]:
    return [f["rule"] for f in findings]


def _socket_lines(sport: int, dport: int) -> list[dict]:
    """The recorded events of one connection seen from the socket with these local and remote ports."""
    return [e for e in EVENTS if e["type"] == "tcp_state" and e["sport"] == sport and e["dport"] == dport]


def test_fixture_is_the_window_the_tests_describe():
    assert SERVER_PID != CLIENT_PID
    # exec events name the interpreter: the processes rename themselves after it
    assert {e["comm"] for e in EVENTS if e.get("pid") == SERVER_PID and e["type"] != "exec"} == {"kt-server"}
    assert {e["comm"] for e in EVENTS if e.get("pid") == CLIENT_PID and e["type"] != "exec"} == {"kt-client"}


# --- the whole window ---


def test_replaying_events_offline_reproduces_the_summary_written_live():
    assert _build(_replay(EVENTS)) == fixture_summary()


def test_refused_connects_are_counted_once_per_socket():
    # each refused connect left three lines: SYN_SENT -> CLOSE with ECONNREFUSED, connect() with errno
    # ECONNREFUSED and the RST received; the count comes from the state change alone
    refused_sockets = [e for e in EVENTS if e["type"] == "tcp_state" and e.get("error") == "ECONNREFUSED"]
    assert len(refused_sockets) == 3
    assert sum(1 for e in EVENTS if e["type"] == "connect" and e["errno"] == "ECONNREFUSED") == 3
    assert sum(1 for e in EVENTS if e["type"] == "reset" and e["direction"] == "received") == 3
    assert _replay(EVENTS).tcp.summary()["connections"]["refused"] == 3


def test_refused_connects_are_one_finding_per_process_and_remote():
    findings = [f for f in _replay(EVENTS).tcp.findings() if f["rule"] == "connect_refused"]
    assert len(findings) == 1
    assert findings[0]["subject"] == {"pid": CLIENT_PID, "comm": "kt-client", "remote": "127.0.0.1:1",
                                      "processes": 1, "pids": [{"pid": CLIENT_PID, "count": 3}], "pids_omitted": 0}
    assert findings[0]["evidence"]["count"] == 3


def test_refused_finding_points_at_the_lines_of_the_refusals():
    finding = next(f for f in _replay(EVENTS).tcp.findings() if f["rule"] == "connect_refused")
    assert [EVENTS[n - 1].get("error") for n in finding["evidence"]["lines"]] == ["ECONNREFUSED"] * 3


def test_close_wait_sockets_are_attributed_to_the_server_process():
    assert _replay(EVENTS).tcp.summary()["close_wait"] == [{"pid": SERVER_PID, "comm": "kt-server", "sockets": 3}]


def test_close_wait_finding_names_the_server_and_the_peers_that_closed():
    finding = next(f for f in _replay(EVENTS).tcp.findings() if f["rule"] == "close_wait")
    peers = sorted(f"127.0.0.1:{e['sport']}" for e in EVENTS
                   if e["type"] == "tcp_state" and e["dport"] == LEAK_PORT and e["new_state"] == "ESTABLISHED"
                   and e["pid"] == CLIENT_PID)
    assert finding["severity"] == "warning"
    assert finding["subject"] == {"pid": SERVER_PID, "comm": "kt-server", "remotes": peers, "remotes_omitted": 0,
                                  "processes": 1, "pids": [{"pid": SERVER_PID, "count": 3}], "pids_omitted": 0}
    assert finding["evidence"]["count"] == 3


def test_open_sockets_at_the_end_are_the_listeners_and_the_close_wait_ones():
    assert _replay(EVENTS).tcp.summary()["open_sockets_by_state"] == {"CLOSE_WAIT": 3, "LISTEN": 3}


def test_handshake_percentiles_are_nearest_rank_over_completed_handshakes_only():
    times = sorted(e["handshake_ms"] for e in EVENTS if e["type"] == "tcp_state" and "handshake_ms" in e
                   and e["new_state"] == "ESTABLISHED")
    assert len(times) == 9  # 6 echo + 3 held; the 3 refused connects are no handshake
    handshake = _replay(EVENTS).tcp.summary()["handshake_ms"]
    assert handshake == {"count": 9, "p50": times[4], "p99": times[8], "max": times[-1]}
    assert 0 < handshake["p50"] <= handshake["p99"] <= handshake["max"]


def test_connections_are_counted_from_both_ends():
    assert _replay(EVENTS).tcp.summary()["connections"] == {
        "attempted": 12, "established": 9, "accepted": 9, "refused": 3, "timed_out": 0, "abandoned": 0}


def test_top_talkers_split_outbound_and_inbound_per_process():
    rows = {row["comm"]: row for row in _replay(EVENTS).tcp.top_talkers()}
    assert (rows["kt-client"]["outbound"], rows["kt-client"]["inbound"], rows["kt-client"]["refused"]) == (12, 0, 3)
    assert (rows["kt-server"]["outbound"], rows["kt-server"]["inbound"]) == (0, 9)


def test_resets_sent_for_a_closed_port_are_not_attributed_to_a_process():
    resets = _replay(EVENTS).tcp.summary()["resets"]
    netns = next(e["netns_pkt"] for e in EVENTS if e["type"] == "reset")
    assert {"pid": None, "comm": None, "direction": "sent", "reason": "NO_SOCKET", "netns": netns, "count": 3} in resets
    assert {"pid": CLIENT_PID, "comm": "kt-client", "direction": "received", "reason": None, "netns": netns,
            "count": 3} in resets


def test_a_reset_with_no_socket_is_filed_under_the_packets_namespace_not_the_cpus():
    event = copy.deepcopy(load_record("reset_sent_no_socket")["expected"])
    event["netns"], event["netns_pkt"] = 4026531840, 4026532999  # as if a process of another namespace was on the CPU
    analysis = _replay([event]).tcp
    assert analysis.summary()["resets"][0]["netns"] == 4026532999
    assert analysis.findings()[0]["subject"]["netns"] == 4026532999


# --- edge cases, from recorded lines ---


def test_socket_closed_within_the_window_is_not_left_open():
    port = next(e["sport"] for e in EVENTS if e["type"] == "connect" and e["dport"] == 47001)
    server_side = _socket_lines(47001, port)
    assert [e["new_state"] for e in server_side][-1] == "CLOSE"
    assert _replay(server_side).tcp.summary()["open_sockets_by_state"] == {}


def test_close_wait_closed_later_in_the_window_is_not_reported():
    port = next(e["sport"] for e in EVENTS if e["type"] == "connect" and e["dport"] == 47001)
    server_side = _socket_lines(47001, port)
    upto = next(i for i, e in enumerate(server_side) if e["new_state"] == "CLOSE_WAIT") + 1
    assert len(_replay(server_side[:upto]).tcp.close_wait()) == 1
    assert _replay(server_side).tcp.close_wait() == {}


def test_capped_events_still_count_but_have_no_line_numbers():
    analysis = _replay(EVENTS, lines=False).tcp
    finding = next(f for f in analysis.findings() if f["rule"] == "connect_refused")
    assert finding["evidence"]["count"] == 3 and finding["evidence"]["lines"] == []


def test_timed_out_connect_is_a_critical_syn_timeout():
    event = load_record("tcp_state_timeout")["expected"]
    analysis = _replay([event]).tcp
    assert analysis.summary()["connections"]["timed_out"] == 1
    finding = analysis.findings()[0]
    assert (finding["rule"], finding["severity"]) == ("syn_timeout", "critical")
    assert finding["subject"]["remote"] == f"{event['daddr']}:{event['dport']}"


def test_connect_the_application_gave_up_on_after_syn_retransmits_is_a_critical_syn_timeout():
    event = load_record("tcp_state_abandoned")["expected"]
    assert "error" not in event and event["syn_retransmits"] >= 1
    analysis = _replay([event]).tcp
    assert analysis.summary()["connections"]["abandoned"] == 1
    assert analysis.summary()["connections"]["timed_out"] == 0
    [finding] = analysis.findings()
    assert (finding["rule"], finding["severity"]) == ("syn_timeout", "critical")
    assert finding["subject"] == {"pid": event["pid"], "comm": event["comm"], "processes": 1,
                                  "pids": [{"pid": event["pid"], "count": 1}], "pids_omitted": 0,
                                  "remote": f"{event['daddr']}:{event['dport']}", "timed_out": 0, "abandoned": 1}


def test_a_connect_closed_before_any_syn_retransmit_is_not_abandoned():
    event = copy.deepcopy(load_record("tcp_state_abandoned")["expected"])
    event["syn_retransmits"] = 0  # closed within the first RTO: nothing says the SYN went unanswered
    analysis = _replay([event]).tcp
    assert analysis.summary()["connections"]["abandoned"] == 0 and analysis.findings() == []


def test_timed_out_and_abandoned_connects_to_one_remote_are_one_finding():
    timeout = load_record("tcp_state_timeout")["expected"]
    abandoned = copy.deepcopy(load_record("tcp_state_abandoned")["expected"])
    assert (abandoned["daddr"], abandoned["dport"]) == (timeout["daddr"], timeout["dport"])
    abandoned.update(pid=timeout["pid"], comm=timeout["comm"])
    findings = [f for f in _replay([timeout, abandoned, abandoned]).tcp.findings() if f["rule"] == "syn_timeout"]
    assert len(findings) == 1
    assert (findings[0]["subject"]["timed_out"], findings[0]["subject"]["abandoned"]) == (1, 2)
    assert findings[0]["evidence"]["count"] == 3 and findings[0]["evidence"]["lines"] == [1, 2, 3]


def test_retransmits_are_counted_as_skbs_as_segments_and_as_syn_acks():
    syn = load_record("retransmit_syn")["expected"]
    synack = load_record("retransmit_synack")["expected"]
    gso = {**syn, "segments": 3}  # a GSO skb of three segments
    failed = {**syn, "err": -105}  # not sent (ENOBUFS): the kernel does not count its segments
    summary = _replay([syn, synack, gso, failed]).tcp.summary()
    assert summary["retransmitted"] == {"skbs": 3, "segments": 1 + 1 + 3, "synacks": 1, "failed": 1}
    rows = {row["remote"]: row for row in summary["retransmits"]}
    assert rows[f"{syn['daddr']}:{syn['dport']}"]["segments"] == 1 + 3 + 1


def test_failed_handshake_time_is_not_a_slow_handshake():
    event = load_record("tcp_state_timeout")["expected"]
    assert event["handshake_ms"] >= tcp.SLOW_HANDSHAKE_MS
    assert "slow_handshake" not in _rules(_replay([event]).tcp.findings())


@pytest.mark.parametrize(("handshake_ms", "slow"), [(tcp.SLOW_HANDSHAKE_MS - 0.001, False),
                                                    (tcp.SLOW_HANDSHAKE_MS, True)])
def test_established_handshake_of_900_ms_or_more_is_slow(handshake_ms, slow):
    event = copy.deepcopy(load_record("tcp_state_established")["expected"])
    event["handshake_ms"] = handshake_ms  # as if the SYN had been retransmitted
    assert ("slow_handshake" in _rules(_replay([event]).tcp.findings())) is slow


@pytest.mark.parametrize(("count", "hotspot"), [(tcp.RETRANSMIT_HOTSPOT - 1, False), (tcp.RETRANSMIT_HOTSPOT, True)])
def test_retransmits_to_one_remote_are_a_hotspot_from_five(count, hotspot):
    event = load_record("retransmit_syn")["expected"]
    analysis = _replay([event] * count).tcp
    assert analysis.summary()["retransmits"][0]["count"] == count
    assert ("retransmit_hotspot" in _rules(analysis.findings())) is hotspot


def test_findings_are_sorted_most_severe_first():
    timeout = load_record("tcp_state_timeout")["expected"]
    findings = _build(_replay([*EVENTS, timeout]))["findings"]
    severities = [f["severity"] for f in findings]
    assert severities[0] == "critical"
    assert severities == sorted(severities, key=["critical", "warning", "info"].index)


def test_events_lost_in_transit_are_a_warning_ranked_by_how_many_pointing_at_the_loss_table():
    losses = copy.deepcopy(fixture_summary()["losses"]["by_family"])
    losses["tcp_state"]["seen"] += 200
    losses["tcp_state"]["ringbuf_full"] += 200
    doc = _build(_replay(EVENTS), losses)
    lost = doc["findings"][0]  # more events than any other warning rests on
    assert (lost["rule"], lost["severity"]) == ("events_lost", "warning")
    assert lost["evidence"] == {"count": 200, "lines": [], "summary": "/losses/total"}
    assert doc["losses"]["balanced"] is True


def test_losses_that_do_not_add_up_are_flagged_unbalanced():
    losses = copy.deepcopy(fixture_summary()["losses"]["by_family"])
    losses["reset"]["seen"] += 1
    assert _build(_replay(EVENTS), losses)["losses"]["balanced"] is False


def test_runs_the_kernel_skipped_are_counted_apart_from_seen_and_leave_the_losses_unbalanced():
    losses = copy.deepcopy(fixture_summary()["losses"]["by_family"])
    for row in losses.values():
        row["missed"] = 0
    losses["tcp_state"]["missed"] = 3  # the hook never ran for them: seen and written do not know them
    doc = _build(_replay(EVENTS), losses)
    assert doc["losses"]["total"]["missed"] == 3
    assert doc["losses"]["balanced"] is False
    lost = [f for f in doc["findings"] if f["rule"] == "events_lost"]
    assert len(lost) == 1 and lost[0]["evidence"] == {"count": 3, "lines": [], "summary": "/losses/total"}
    assert "3 runs of ktrace's hooks skipped by the kernel" in lost[0]["title"]


def test_no_run_skipped_keeps_the_losses_balanced_and_a_kernel_that_cannot_tell_adds_none():
    losses = copy.deepcopy(fixture_summary()["losses"]["by_family"])
    for row in losses.values():
        row["missed"] = 0
    losses["sched"]["missed"] = None  # before 5.12 the kernel does not count skipped runs
    doc = _build(_replay(EVENTS), losses)
    assert doc["losses"]["total"]["missed"] == 0 and doc["losses"]["balanced"] is True
    assert "events_lost" not in _rules(doc["findings"])


def test_percentile_of_no_samples_is_none():
    assert tcp.percentile([], 0.5) is None
    assert tcp.percentile([4.2], 0.99) == 4.2
