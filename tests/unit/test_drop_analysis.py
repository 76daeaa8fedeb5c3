"""ktrace.analyze.drops and ktrace.events.drops on the recorded window and golden drop records.

The fixture window (tests/fixtures/record.py) dropped the SYNs of 3 connects to 127.0.0.1:1
(NO_SOCKET; port 1 is selected, so they are drop events) and most of 50 datagrams of 1000 bytes
sent to a never-read socket with SO_RCVBUF=2048 on an unselected port (SOCKET_RCVBUFF, counted in
the kernel: a drop_count line).
"""

from __future__ import annotations

import copy

import pytest

from ktrace.analyze import drops as analysis
from ktrace.analyze.drops import DropAnalysis
from ktrace.events import generated
from ktrace.events.decode import Decoder, family_and_weight
from ktrace.events.drops import count_events, kernel_drop_reasons, protocol_label, reason_name
from tests.unit.conftest import fixture_events, fixture_summary, load_record

EVENTS = fixture_events()


def _replay(events: list[dict]) -> DropAnalysis:
    a = DropAnalysis()
    for number, event in enumerate(events, 1):
        a.add(event, number)
    return a


def _counted(reason: str, count: int, protocol: str = "ipv4/udp") -> dict:
    """A recorded drop_count line, with another reason and count."""
    line = copy.deepcopy(next(e for e in EVENTS if e["type"] == "drop_count"))
    line.update(reason=reason, count=count, protocol=protocol)
    return line


def test_replaying_the_recorded_events_gives_the_recorded_drops_section():
    recorded = fixture_summary()["drops"]
    assert _replay(EVENTS).summary(recorded["kernel_map"]) == recorded


def test_counted_and_single_drops_add_up_to_the_totals():
    s = _replay(EVENTS).summary()
    assert s["total"] == s["counted_in_kernel"] + s["single"] == sum(r["count"] for r in s["by_reason"])
    assert sum(r["count"] for r in s["by_protocol"]) == s["total"]
    assert s["counted_in_kernel"] == sum(e["count"] for e in EVENTS if e["type"] == "drop_count")
    assert s["single"] == sum(1 for e in EVENTS if e["type"] == "drop")


def test_the_loss_table_counts_a_drop_count_line_as_its_drops():
    line = _counted("NO_SOCKET", 7)
    assert family_and_weight(line) == ("drops", 7)
    assert family_and_weight(load_record("drop_no_socket")["expected"]) == ("drops", 1)
    losses = fixture_summary()["losses"]["by_family"]["drops"]
    assert losses["written"] == _replay(EVENTS).summary()["total"]


def test_reasons_are_ranked_by_drops_and_every_reason_is_a_finding_loss_first():
    s = _replay(EVENTS).summary()
    assert s["top_reasons"][0] == "SOCKET_RCVBUFF"
    assert [r["count"] for r in s["by_reason"]] == sorted((r["count"] for r in s["by_reason"]), reverse=True)
    findings = _replay(EVENTS).findings()
    assert sorted(f["subject"]["reason"] for f in findings) == sorted(r["reason"] for r in s["by_reason"])
    routine = [f["subject"]["routine"] for f in findings]
    assert routine == sorted(routine)  # the reasons that mean loss first
    assert all(f["rule"] == "packet_drops" for f in findings)


def test_single_drops_give_a_finding_its_example_lines_and_times():
    finding = next(f for f in _replay(EVENTS).findings() if f["subject"]["reason"] == "NO_SOCKET")
    lines = finding["evidence"]["lines"]
    assert lines and all(EVENTS[n - 1]["reason"] == "NO_SOCKET" for n in lines)
    kinds = [EVENTS[n - 1]["type"] for n in lines]
    assert kinds[0] == "drop" and kinds == sorted(kinds)  # the single drops first, then any drop_count line
    assert finding["evidence"]["first"] <= finding["evidence"]["last"]
    assert finding["subject"]["protocols"] == ["ipv4/tcp"]
    assert "nothing listens" in finding["hint"].lower()


def test_a_reason_only_counted_in_the_kernel_has_no_example_lines():
    finding = next(f for f in _replay(EVENTS).findings() if f["subject"]["reason"] == "SOCKET_RCVBUFF")
    counted = [n for n, e in enumerate(EVENTS, 1) if e["type"] == "drop_count" and e["reason"] == "SOCKET_RCVBUFF"]
    assert finding["evidence"] == {"count": 49, "lines": counted}  # the kernel's count lines are the evidence
    assert "SO_RCVBUF" in finding["hint"]


def test_severity_grows_with_the_count():
    a = _replay([_counted("NO_SOCKET", analysis.WARNING_AT - 1), _counted("SOCKET_RCVBUFF", analysis.WARNING_AT),
                 _counted("NETFILTER_DROP", analysis.CRITICAL_AT)])
    severity = {f["subject"]["reason"]: f["severity"] for f in a.findings()}
    assert severity == {"NO_SOCKET": "info", "SOCKET_RCVBUFF": "warning", "NETFILTER_DROP": "critical"}


def test_routine_reasons_stay_info_however_many():
    a = _replay([_counted("OTHERHOST", 10 * analysis.CRITICAL_AT, "ipv4")])
    assert [f["severity"] for f in a.findings()] == ["info"]


def test_every_reason_becomes_a_finding_and_unknown_ones_get_the_general_hint():
    a = _replay([_counted(f"REASON_{i}", 100 + i) for i in range(8)])
    findings = a.findings()
    assert [f["subject"]["reason"] for f in findings] == [f"REASON_{i}" for i in range(7, -1, -1)]
    assert {f["hint"] for f in findings} == {analysis.DEFAULT_HINT}
    s = a.summary()
    assert len(s["top_reasons"]) == analysis.TOP_REASONS and s["top_reasons_omitted"] == 8 - analysis.TOP_REASONS


@pytest.mark.parametrize("reason", ["QUEUE_PURGE", "TCP_OLD_DATA", "SOCKET_CLOSE", "NOT_SPECIFIED", "TCP_CLOSE",
                                    "DUP_FRAG", "TCP_OLD_SEQUENCE"])
def test_routine_reasons_of_a_healthy_server_are_info_and_still_counted(reason):
    a = _replay([_counted(reason, 2000, "ipv4/tcp"), _counted("NO_SOCKET", analysis.WARNING_AT, "ipv4/udp")])
    severity = {f["subject"]["reason"]: (f["severity"], f["subject"]["routine"]) for f in a.findings()}
    assert severity == {reason: ("info", True), "NO_SOCKET": ("warning", False)}
    s = a.summary()
    assert s["total"] == 2000 + analysis.WARNING_AT and s["routine"] == 2000
    assert {r["reason"]: r["routine"] for r in s["by_reason"]} == {reason: True, "NO_SOCKET": False}


@pytest.mark.parametrize("reason", ["NO_SOCKET", "SOCKET_RCVBUFF", "TCP_OFO_QUEUE_PRUNE", "TCP_OFO_DROP",
                                    "NETFILTER_DROP", "TCP_LISTEN_OVERFLOW", "TCP_ZEROWINDOW"])
def test_reasons_that_mean_loss_warn(reason):
    assert reason not in analysis.ROUTINE
    [f] = _replay([_counted(reason, analysis.WARNING_AT)]).findings()
    assert f["severity"] == "warning" and f["subject"]["routine"] is False


def test_the_capped_drop_lists_say_how_many_they_left_out():
    events = [_counted(f"REASON_{i}", 100 + i, f"ipv4/p{j}") for i in range(4) for j in range(4)]
    s = _replay(events).summary()
    assert len(s["top"]) == analysis.TOP and s["top_omitted"] == 16 - analysis.TOP
    assert s["top_reasons_omitted"] == 0 and s["flows_omitted"] == 0


def test_no_drops_no_findings():
    a = _replay([e for e in EVENTS if e["type"] not in ("drop", "drop_count")])
    assert a.findings() == []
    assert a.summary()["total"] == 0 and a.summary()["by_reason"] == []


def test_flows_group_single_drops_by_reason_endpoints_and_socket():
    s = _replay(EVENTS).summary()
    flows = [f for f in s["flows"] if f["reason"] == "NO_SOCKET"]
    assert len(flows) == 3  # three connects, each from its own port
    assert all(f["destination"] == "127.0.0.1:1" and f["count"] == 1 and f["sk"] == "0x0" for f in flows)


def test_golden_records_name_the_reason_and_the_receiving_socket():
    rcvbuff = load_record("drop_socket_rcvbuff")["expected"]
    assert (rcvbuff["reason"], rcvbuff["protocol"], rcvbuff["attribution"]) == ("SOCKET_RCVBUFF", "ipv4/udp", "cpu")
    assert rcvbuff["sk"] != "0x0" and rcvbuff["sk_ino"] > 0 and rcvbuff["sk_uid"] == 0
    no_socket = load_record("drop_no_socket")["expected"]
    assert (no_socket["reason"], no_socket["protocol"], no_socket["dport"]) == ("NO_SOCKET", "ipv4/tcp", 1)
    assert no_socket["sk"] == "0x0" and no_socket["sk_uid"] is None


def test_a_reason_unknown_to_the_decoder_is_its_number():
    fixture = load_record("drop_no_socket")
    event, _ = Decoder(fixture["boot_to_wall_offset_ns"]).decode(bytes.fromhex(fixture["hex"]))
    assert event["reason"] == str(event["reason_code"])


def test_kernel_reason_names_lose_their_prefixes_and_the_non_reasons():
    class Btf:
        def enum(self, name: str) -> dict[int, str]:
            assert name == "skb_drop_reason"
            return {0: "SKB_NOT_DROPPED_YET", 1: "SKB_CONSUMED", 3: "SKB_DROP_REASON_NO_SOCKET",
                    130: "SKB_DROP_REASON_MAX", 16: "SKB_DROP_REASON_SUBSYS_SHIFT",
                    0xFFFF0000: "SKB_DROP_REASON_SUBSYS_MASK"}

    assert kernel_drop_reasons(Btf()) == {0: "NOT_DROPPED_YET", 1: "CONSUMED", 3: "NO_SOCKET"}
    assert kernel_drop_reasons(None) == {}
    recorded = load_record("drop_no_socket")["drop_reasons"]
    assert {"NO_SOCKET", "SOCKET_RCVBUFF", "CONSUMED", "NETFILTER_DROP"} <= set(recorded.values())


def test_reason_and_protocol_labels():
    assert reason_name({3: "NO_SOCKET"}, 3) == "NO_SOCKET"
    assert reason_name({}, 500) == "500"
    assert reason_name({}, (2 << 16) | 5) == "SUBSYS_2:5"
    assert protocol_label(0x0800, 17) == "ipv4/udp"
    assert protocol_label(0x86DD, 58) == "ipv6/icmpv6"
    assert protocol_label(0x0806, 0) == "arp"
    assert protocol_label(0x88E5, 0) == "0x88e5"
    assert protocol_label(0x0800, 250) == "ipv4/250"


def test_the_kernel_map_becomes_drop_count_lines_the_most_first():
    key = generated.DROP_KEY.struct
    raw = [(key.pack(3, 0x0800, 17), 5), (key.pack(6, 0x0800, 17), 40), (key.pack(2, 0x0806, 0), 5)]
    lines = count_events(raw, {2: "NOT_SPECIFIED", 3: "NO_SOCKET", 6: "SOCKET_RCVBUFF"}, "2026-11-22T00:00:00.000Z", 9)
    assert [(e["reason"], e["protocol"], e["count"]) for e in lines] == [
        ("SOCKET_RCVBUFF", "ipv4/udp", 40), ("NOT_SPECIFIED", "arp", 5), ("NO_SOCKET", "ipv4/udp", 5)]
    assert all(next(iter(e)) == "type" and e["type"] == "drop_count" for e in lines)
