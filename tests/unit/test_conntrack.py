"""ktrace.enrich.conntrack: parsing, the table, NAT kinds, held-back events and the nat section (no kernel)."""

from __future__ import annotations

from ktrace import schemas
from ktrace.analyze.nat import conntrack_findings
from ktrace.enrich.conntrack import (
    Annotator,
    ConntrackReader,
    ConntrackTable,
    Entry,
    NatAnalysis,
    parse_proc_line,
    read_stats,
)
from tests.unit.conftest import fixture_summary

TCP_LINE = ("ipv4     2 tcp      6 119 TIME_WAIT src=10.96.0.10 dst=10.96.0.10 sport=46280 dport=80 src=10.77.0.1 "
            "dst=10.96.0.10 sport=8080 dport=46280 [ASSURED] mark=0 zone=0 use=2")
UDP_LINE = ("ipv4     2 udp      17 29 src=10.96.0.10 dst=10.96.0.10 sport=48624 dport=53 [UNREPLIED] src=10.77.0.1 "
            "dst=10.96.0.10 sport=5353 dport=48624 mark=0 zone=0 use=2")


def entry(orig, reply, proto="tcp", netns=1) -> Entry:
    return Entry(proto, orig, reply, "ESTABLISHED", 0, 0, netns)


class FakeReader:
    """The reader's capture-loop side, with rounds moved by hand."""

    def __init__(self) -> None:
        self.table = ConntrackTable()
        self.rounds_started = self.rounds_done = 1
        self.noted: list[tuple[int, int]] = []

    def note(self, netns: int, pid: int) -> None:
        self.noted.append((netns, pid))

    def lookup(self, *key):
        return self.table.lookup(*key)


def tcp_event(saddr="10.96.0.10", sport=46280, daddr="10.96.0.10", dport=80, kind="tcp_state") -> dict:
    return {"type": kind, "pid": 7, "comm": "curl", "netns": 1, "saddr": saddr, "sport": sport, "daddr": daddr,
            "dport": dport, "protocol": "tcp"}


def test_a_proc_line_parses_into_both_tuples_with_state_mark_and_zone():
    e = parse_proc_line(TCP_LINE, netns=5)
    assert e == Entry("tcp", ("10.96.0.10", 46280, "10.96.0.10", 80), ("10.77.0.1", 8080, "10.96.0.10", 46280),
                      "TIME_WAIT", 0, 0, 5)
    assert e.nat == "dnat"


def test_a_udp_proc_line_without_a_reply_is_unreplied():
    assert parse_proc_line(UDP_LINE).state == "UNREPLIED"
    assert parse_proc_line(UDP_LINE.replace("[UNREPLIED] ", "")).state == "REPLIED"


def test_other_protocols_are_skipped():
    assert parse_proc_line("ipv4 2 icmp 1 29 src=1.1.1.1 dst=2.2.2.2 type=8 code=0 id=1 src=2.2.2.2 dst=1.1.1.1 "
                           "type=0 code=0 id=1 mark=0 use=1") is None


def test_nat_kinds():
    assert entry(("a", 1, "b", 2), ("b", 2, "a", 1)).nat is None
    assert entry(("a", 1, "vip", 80), ("be", 8080, "a", 1)).nat == "dnat"
    assert entry(("a", 1, "b", 2), ("b", 2, "gw", 9)).nat == "snat"
    assert entry(("a", 1, "vip", 80), ("be", 8080, "gw", 9)).nat == "both"


def test_the_table_matches_each_of_the_four_directions_and_says_which():
    table = ConntrackTable()
    dns = entry(("c", 40000, "vip", 53), ("be", 5353, "c", 40000), proto="udp")
    table.update([dns])
    assert table.lookup("udp", "c", 40000, "vip", 53, 1) == (dns, "original")  # the client's query out
    assert table.lookup("udp", "be", 5353, "c", 40000, 1) == (dns, "reply")  # the backend's answer out
    assert table.lookup("udp", "vip", 53, "c", 40000, 1) == (dns, "original_reversed")  # the answer in, at the client
    assert table.lookup("udp", "c", 40000, "be", 5353, 1) == (dns, "reply_reversed")  # the query in, at the backend
    assert table.lookup("tcp", "c", 40000, "vip", 53, 1) is None


def test_the_table_matches_only_in_the_events_namespace():
    table = ConntrackTable()
    mine = entry(("c", 1, "vip", 80), ("be", 8080, "c", 1), netns=1)
    other = entry(("c", 1, "vip", 80), ("x", 9, "c", 1), netns=2)
    table.update([mine, other])
    assert table.lookup("tcp", "c", 1, "vip", 80, 1) == (mine, "original")
    assert table.lookup("tcp", "c", 1, "vip", 80, 2) == (other, "original")
    # the backend's namespace (3) tracks nothing: the client namespace's entry is not its own
    assert table.lookup("tcp", "be", 8080, "c", 1, 3) is None
    assert table.lookup("tcp", "c", 1, "vip", 80, 0) is None


def test_a_literal_tuple_wins_over_another_entrys_reversed_one():
    dns = entry(("c", 40000, "vip", 53), ("be", 5353, "c", 40000), proto="udp")
    from_vip = entry(("vip", 53, "c", 40000), ("c", 40000, "vip", 53), proto="udp")  # dns's original reversed
    for order in ([dns, from_vip], [from_vip, dns]):
        table = ConntrackTable()
        table.update(order)
        assert table.lookup("udp", "vip", 53, "c", 40000, 1) == (from_vip, "original")
        assert table.lookup("udp", "c", 40000, "be", 5353, 1) == (dns, "reply_reversed")
        assert len(table) == 2


def _reader(own: int, node: int) -> ConntrackReader:
    reader = ConntrackReader()  # nothing is read until start()
    reader.own_netns, reader.node_netns = own, node
    return reader


def test_an_event_whose_namespace_has_no_entry_gets_the_nodes_where_service_dnat_lives():
    reader = _reader(own=9, node=1)
    service = entry(("10.244.0.5", 40000, "10.96.0.10", 53), ("10.244.1.7", 53, "10.244.0.5", 40000), "udp", netns=1)
    in_pod = entry(("10.244.0.5", 40001, "10.0.0.2", 53), ("10.0.0.2", 53, "10.244.0.5", 40001), "udp", netns=5)
    reader.table.update([service, in_pod])
    # a pod (netns 5) whose own table lacks the entry, and the backend pod (netns 6, tracking nothing)
    assert reader.lookup("udp", "10.244.0.5", 40000, "10.96.0.10", 53, 5) == (service, "original")
    assert reader.lookup("udp", "10.244.0.5", 40000, "10.244.1.7", 53, 6) == (service, "reply_reversed")
    assert reader.lookup("udp", "10.244.0.5", 40001, "10.0.0.2", 53, 5) == (in_pod, "original")
    # another pod's table is never searched
    assert reader.lookup("udp", "10.244.0.5", 40001, "10.0.0.2", 53, 6) is None


def test_ktraces_own_namespace_is_the_nodes_too_when_pid_1s_is_another():
    reader = _reader(own=1, node=7)  # hostNetwork without hostPID, or PID 1 out of reach
    service = entry(("10.244.0.5", 40000, "10.96.0.10", 53), ("10.244.1.7", 53, "10.244.0.5", 40000), "udp", netns=1)
    reader.table.update([service])
    assert reader.lookup("udp", "10.244.0.5", 40000, "10.96.0.10", 53, 5) == (service, "original")


def test_a_loopback_tuple_is_never_matched_in_another_namespace():
    reader = _reader(own=1, node=1)
    reader.table.update([entry(("127.0.0.1", 40000, "127.0.0.1", 53), ("127.0.0.1", 53, "127.0.0.1", 40000),
                               "udp", netns=1)])
    assert reader.lookup("udp", "127.0.0.1", 40000, "127.0.0.1", 53, 1) is not None
    assert reader.lookup("udp", "127.0.0.1", 40000, "127.0.0.1", 53, 5) is None


def test_the_table_is_bounded():
    table = ConntrackTable(max_entries=2)
    table.update(entry(("c", port, "s", 80), ("s", 80, "c", port)) for port in range(1, 5))
    assert len(table) == 2 and table.full


def test_an_event_that_misses_waits_for_a_round_that_started_after_it():
    reader = FakeReader()
    annotator = Annotator(reader)
    event = tcp_event()
    assert not annotator.annotate(event)
    assert annotator.hold(event) == []
    reader.table.update([parse_proc_line(TCP_LINE, netns=1)])
    reader.rounds_done = 1  # the round running when the event came: may have missed it
    assert annotator.ready() == []
    reader.rounds_started = reader.rounds_done = 2
    (written,) = annotator.ready()
    assert written["conntrack"] == {"state": "TIME_WAIT", "nat": "dnat", "matched": "original", "netns": 1,
                                    "mark": 0, "zone": 0,
                                    "reply": {"saddr": "10.77.0.1", "sport": 8080, "daddr": "10.96.0.10",
                                              "dport": 46280}}
    assert reader.noted == [(1, 7), (1, 7)]


def test_at_the_window_end_every_held_event_is_written_null_if_unmatched():
    annotator = Annotator(FakeReader())
    event = tcp_event(sport=1)
    annotator.annotate(event)
    annotator.hold(event)
    assert annotator.ready(window_end=True) == [event] and event["conntrack"] is None
    assert annotator.unmatched == 1


def test_events_without_a_peer_are_not_looked_up():
    event = tcp_event(daddr="0.0.0.0", dport=0)
    assert Annotator(FakeReader()).annotate(event) and event["conntrack"] is None


def test_the_nat_section_lists_vip_to_backend_with_processes():
    reader = FakeReader()
    reader.table.update([parse_proc_line(TCP_LINE, netns=1)])
    annotator = Annotator(reader)
    for kind in ("connect", "tcp_state"):
        assert annotator.annotate(tcp_event(kind=kind))
    nat = annotator.nat_summary({"netlink": 1, "proc": 0, "failed": 0}, len(reader.table), [])
    assert nat["translations"] == [{"protocol": "tcp", "original": "10.96.0.10:80", "translated": "10.77.0.1:8080",
                                    "nat": "dnat", "connections": 1, "events": 2,
                                    "processes": [{"pid": 7, "comm": "curl"}], "processes_omitted": 0, "pods": [],
                                    "pods_omitted": 0}]
    assert nat["translations_omitted"] == 0
    assert nat["events_annotated"] == 2 and nat["entries"] == 1


def _pod(n: int) -> dict:
    return {"pod_uid": f"8f3b2c1a-4d5e-4f60-9a7b-{n:012x}", "qos": "burstable", "container_id": "c" * 64,
            "runtime": "containerd", "namespace": "shop", "pod": f"cart-{n}", "container": "cart"}


def test_a_translation_names_the_pods_whose_events_used_it():
    reader = FakeReader()
    reader.table.update([parse_proc_line(TCP_LINE, netns=1)])
    annotator = Annotator(reader)
    for kind, k8s, attribution in (("connect", _pod(1), "current"), ("tcp_state", _pod(1), "socket_owner"),
                                   ("tcp_state", _pod(2), "current"),
                                   ("tcp_state", _pod(3), "cpu")):  # pod 3 was only on the CPU
        assert annotator.annotate({**tcp_event(kind=kind), "k8s": k8s, "attribution": attribution})
    nat = annotator.nat_summary({"netlink": 1, "proc": 0, "failed": 0}, 1, [])
    assert schemas.validate("summary", {**fixture_summary(), "nat": nat}) == []
    (row,) = nat["translations"]
    assert row["events"] == 4
    assert row["pods"] == [{"pod_uid": _pod(1)["pod_uid"], "namespace": "shop", "pod": "cart-1", "events": 2},
                           {"pod_uid": _pod(2)["pod_uid"], "namespace": "shop", "pod": "cart-2", "events": 1}]


def test_a_translation_lists_at_most_20_pods():
    reader = FakeReader()
    reader.table.update([parse_proc_line(TCP_LINE, netns=1)])
    annotator = Annotator(reader)
    for n in range(25):
        annotator.annotate({**tcp_event(), "k8s": _pod(n), "attribution": "current"})
    (row,) = annotator.nat_summary({"netlink": 1, "proc": 0, "failed": 0}, 1, [])["translations"]
    assert row["events"] == 25 and len(row["pods"]) == 20 and row["pods_omitted"] == 5
    assert {p["pod"] for p in row["pods"]} == {f"cart-{n}" for n in range(20)}  # the first ones seen


def test_a_translation_lists_at_most_20_processes_and_says_how_many_more_used_it():
    reader = FakeReader()
    reader.table.update([parse_proc_line(TCP_LINE, netns=1)])
    annotator = Annotator(reader)
    for pid in range(100, 130):
        annotator.annotate({**tcp_event(), "pid": pid})
        annotator.annotate({**tcp_event(), "pid": pid})  # a process seen twice is one row, or one left out
    (row,) = annotator.nat_summary({"netlink": 1, "proc": 0, "failed": 0}, 1, [])["translations"]
    assert [p["pid"] for p in row["processes"]] == list(range(100, 120)) and row["processes_omitted"] == 10


def test_translations_past_the_cap_are_counted():
    nat = NatAnalysis()
    for n in range(NatAnalysis.MAX_TRANSLATIONS + 3):
        line = TCP_LINE.replace("dport=80 ", f"dport={1000 + n} ", 1)
        assert line != TCP_LINE
        nat.add(tcp_event(), parse_proc_line(line, netns=1))
    summary = nat.summary()
    assert len(summary["translations"]) == NatAnalysis.MAX_TRANSLATIONS and summary["translations_omitted"] == 3


# /proc/net/stat/nf_conntrack of a 2-CPU node (the layout of kernel 6.18): entries is the namespace's count
STAT = "".join(line + "\n" for line in (
    "entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error"
    "  expect_new expect_create expect_delete search_restart",
    "000000f0  00000000 00000000 00000000 00000003 00000000 00000000 00000000 00000000 00000002 00000010 00000001"
    " 00000000  00000000 00000000 00000000 00000000",
    "000000f0  00000000 00000000 00000000 00000001 00000000 00000000 00000000 00000000 00000001 00000005 00000000"
    " 00000000  00000000 00000000 00000000 00000000",
))


def test_table_statistics_sum_the_cpus_and_keep_the_namespace_count(tmp_path):
    path = tmp_path / "nf_conntrack"
    path.write_text(STAT)
    assert read_stats(str(path)) == {"entries": 240, "drop": 21, "early_drop": 1, "insert_failed": 3}


def _table(**counts: int) -> dict:
    return {"netns": 4026531840, "entries_max": 100, "limit": 262144, "drop": 0, "early_drop": 0,
            "insert_failed": 0, **counts}


def test_conntrack_findings_by_what_the_table_refused():
    assert conntrack_findings([_table()]) == []
    (full,) = conntrack_findings([_table(entries_max=262144, drop=21, early_drop=1)])
    assert (full["severity"], full["evidence"]["count"]) == ("critical", 22)
    assert full["title"].startswith("conntrack table full in netns 4026531840: 21 new connections dropped")
    (near,) = conntrack_findings([_table(entries_max=240000)])
    assert near["severity"] == "warning" and "nearly full" in near["title"]
    (race,) = conntrack_findings([_table(insert_failed=3)])
    assert race["severity"] == "warning" and race["title"].startswith("3 conntrack inserts failed")
    assert conntrack_findings([_table(limit=None, entries_max=10**6)]) == []
