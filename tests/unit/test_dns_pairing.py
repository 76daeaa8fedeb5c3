"""DNS query/reply pairing, dns_timeout, UDP flow merging and the DNS and UDP analyses, on recorded events."""

from __future__ import annotations

from ktrace.analyze.dns import DnsAnalysis
from ktrace.analyze.udp import UdpAnalysis
from ktrace.events.dns import DnsPairer
from ktrace.events.flows import UdpFlows
from tests.unit.conftest import fixture_events, load_record

MS = 1_000_000
TIMEOUT_NS = 2000 * MS
QUERY = load_record("dns_query_client")["expected"]
REPLY = load_record("dns_reply_client")["expected"]
T0 = QUERY["ts_ns"]


def _at(event: dict, ms: float, **changes: object) -> dict:
    return {**event, "ts_ns": T0 + int(ms * MS), **changes}


class Written(list):
    def write(self, event: dict) -> int:
        self.append(dict(event))
        return len(self)

    def of(self, kind: str) -> list[dict]:
        return [e for e in self if e["type"] == kind]


def _pairer() -> tuple[DnsPairer, Written]:
    out = Written()
    return DnsPairer(out.write, TIMEOUT_NS, lambda ns: f"t{ns}"), out


def test_the_recorded_query_and_reply_share_a_socket_and_remote():
    assert (QUERY["sk"], QUERY["daddr"], QUERY["dport"]) == (REPLY["sk"], REPLY["daddr"], REPLY["dport"])


def test_replies_answer_the_oldest_query_of_their_socket_and_remote_first():
    pairer, out = _pairer()
    pairer.add(_at(QUERY, 0))
    pairer.add(_at(QUERY, 1))
    pairer.add(_at(REPLY, 5))
    pairer.add(_at(REPLY, 7))
    replies = out.of("dns_reply")
    assert [r["rtt_ms"] for r in replies] == [5.0, 6.0]
    assert [r["query_line"] for r in replies] == [1, 2]
    pairer.expire(T0 + 10 * TIMEOUT_NS, window_end=True)
    assert not out.of("dns_timeout")


def test_a_reply_on_another_socket_answers_nothing():
    pairer, out = _pairer()
    pairer.add(_at(QUERY, 0))
    pairer.add(_at(REPLY, 5, sk="0x1"))
    assert out.of("dns_reply")[0]["rtt_ms"] is None and out.of("dns_reply")[0]["query_line"] is None


def test_a_query_times_out_once_it_has_waited_the_timeout_and_not_before():
    pairer, out = _pairer()
    pairer.add(_at(QUERY, 0))
    pairer.expire(T0 + TIMEOUT_NS - 1)
    assert not out.of("dns_timeout")
    pairer.expire(T0 + TIMEOUT_NS + 50 * MS)
    (timeout,) = out.of("dns_timeout")
    assert timeout["ts_ns"] == T0 + TIMEOUT_NS and timeout["waited_ms"] == 2000.0  # due at the timeout, not when seen
    assert timeout["window_end"] is False and timeout["query_line"] == 1 and timeout["query_time"] == QUERY["time"]
    assert (timeout["pid"], timeout["comm"], timeout["daddr"], timeout["dport"]) == (
        QUERY["pid"], QUERY["comm"], QUERY["daddr"], QUERY["dport"])


def test_queries_still_young_when_the_window_ends_are_marked_window_end():
    pairer, out = _pairer()
    pairer.add(_at(QUERY, 0))
    pairer.expire(T0 + 300 * MS, window_end=True)
    (timeout,) = out.of("dns_timeout")
    assert timeout["window_end"] is True and timeout["waited_ms"] == 300.0


def test_a_reply_after_the_timeout_is_paired_late():
    pairer, out = _pairer()
    pairer.add(_at(QUERY, 0))
    pairer.expire(T0 + TIMEOUT_NS)
    pairer.add(_at(REPLY, 2500))
    (reply,) = out.of("dns_reply")
    assert reply["late"] is True and reply["rtt_ms"] == 2500.0 and reply["query_line"] == 1


def test_a_failed_send_is_not_waited_for():
    pairer, out = _pairer()
    pairer.add(_at(QUERY, 0, error="ENETUNREACH", bytes=None))
    pairer.expire(T0 + 10 * TIMEOUT_NS, window_end=True)
    assert out.of("dns_query") and not out.of("dns_timeout")


def test_the_second_read_of_a_tcp_reply_is_a_continuation():
    pairer, out = _pairer()
    tcp = {"protocol": "tcp"}
    pairer.add(_at(QUERY, 0, **tcp))
    pairer.add(_at(REPLY, 3, bytes=300, **tcp))
    pairer.add(_at(REPLY, 3.1, bytes=60, **tcp))
    first, second = out.of("dns_reply")
    assert first["rtt_ms"] == 3.0 and "continuation" not in first
    assert second["continuation"] is True and second["rtt_ms"] is None


def test_a_tcp_length_prefix_read_alone_is_part_of_the_message_and_the_rtt_runs_to_the_message():
    pairer, out = _pairer()
    tcp = {"protocol": "tcp"}
    pairer.add(_at(QUERY, 0, **tcp))
    pairer.add(_at(REPLY, 3, bytes=2, **tcp))  # the client reads the length first
    pairer.add(_at(REPLY, 3.5, bytes=58, **tcp))
    prefix, message = out.of("dns_reply")
    assert prefix["length_prefix"] is True and prefix["rtt_ms"] is None and prefix["query_line"] is None
    assert message["rtt_ms"] == 3.5 and message["query_line"] == 1 and "continuation" not in message
    pairer.expire(T0 + 10 * TIMEOUT_NS, window_end=True)
    assert not out.of("dns_timeout")


def _server(ms: float, kind: str, nbytes: int) -> dict:
    """A local DNS server's TCP read (query) or write (reply) on its accepted socket."""
    return _at(QUERY if kind == "dns_query" else REPLY, ms, type=kind, role="server", protocol="tcp",
               bytes=nbytes, sport=53, dport=40000, sk="0x5", sk_ino=777)


def test_a_server_reading_the_length_and_the_message_apart_receives_one_query_per_exchange():
    pairer, out = _pairer()
    analysis = DnsAnalysis()
    for i in range(3):  # unbound: recv(2), recv(52), send(58); or two 1-byte reads of the length
        reads = [2, 52] if i < 2 else [1, 1, 52]
        for j, n in enumerate(reads):
            pairer.add(_server(i * 10 + j * 0.1, "dns_query", n))
        pairer.add(_server(i * 10 + 1, "dns_reply", 58))
    pairer.expire(T0 + 10 * TIMEOUT_NS, window_end=True)
    assert not out.of("dns_timeout")
    queries = [q for q in out.of("dns_query") if not q.get("length_prefix")]
    assert [q["bytes"] for q in queries] == [52, 52, 52]
    assert [r["rtt_ms"] for r in out.of("dns_reply")] == [0.9, 0.9, 0.8]  # from the message, not the length
    for number, event in enumerate(out, 1):
        analysis.add(event, number)
    (served,) = analysis.summary()["served"]
    assert (served["queries"], served["replies"], served["timeouts"]) == (3, 3, 0)
    assert not [f for f in analysis.findings(2.0) if f["rule"] == "dns_server_dropped"]


def test_a_reply_to_a_fresh_socket_at_a_reused_address_answers_that_socket_not_the_old_one():
    pairer, out = _pairer()
    # the kernel gave the closed socket's memory to the next one: same sk, another port and inode
    pairer.add(_at(QUERY, 0, sport=40001, sk_ino=1001))  # dropped by the server
    pairer.add(_at(QUERY, 100, sport=40002, sk_ino=1002))
    pairer.add(_at(REPLY, 100.2, sport=40002, sk_ino=1002))
    (reply,) = out.of("dns_reply")
    assert reply["rtt_ms"] == 0.2 and reply["query_line"] == 2
    pairer.expire(T0 + 10 * TIMEOUT_NS)
    (timeout,) = out.of("dns_timeout")
    assert (timeout["sport"], timeout["sk_ino"]) == (40001, 1001)


def test_the_same_socket_address_and_port_with_another_inode_is_another_socket():
    pairer, out = _pairer()
    pairer.add(_at(QUERY, 0, sk_ino=1001))
    pairer.add(_at(REPLY, 5, sk_ino=1002))
    assert out.of("dns_reply")[0]["rtt_ms"] is None


def test_late_replies_count_in_the_reply_times_make_slow_dns_and_the_timeout_says_they_came_late():
    pairer, out = _pairer()
    for i in range(5):
        pairer.add(_at(QUERY, i, sport=41000 + i, sk_ino=2000 + i))
    pairer.expire(T0 + TIMEOUT_NS + 10 * MS)
    for i in range(5):
        pairer.add(_at(REPLY, 3000 + i, sport=41000 + i, sk_ino=2000 + i))
    analysis = DnsAnalysis()
    for number, event in enumerate(out, 1):
        analysis.add(event, number)
    summary = analysis.summary()
    assert (summary["queries"], summary["replies"], summary["late_replies"], summary["timeouts"]) == (5, 5, 5, 5)
    assert summary["rtt_ms"]["count"] == 5 and summary["rtt_ms"]["p50"] == 3000.0
    findings = {f["rule"]: f for f in analysis.findings(2.0)}
    assert findings["slow_dns"]["evidence"]["count"] == 5
    timeout = findings["dns_timeout"]
    assert "5 of them were answered late (the slowest after 3000 ms), 0 never" in timeout["title"]
    assert timeout["severity"] == "warning"  # slow, not lost


def _flow(**changes: object) -> dict:
    return {**load_record("udp_flow_egress")["expected"], **changes}


def test_pieces_of_one_flow_are_summed_and_keep_the_first_and_last_times():
    flows = UdpFlows()
    first = _flow()
    flows.add(dict(first))
    flows.add(_flow(packets=1, bytes=32, errors=1, last_error="ECONNREFUSED", ts_ns=first["ts_ns"] + 10,
                    last_ts_ns=first["last_ts_ns"] + 10, last_time="later"))
    flows.add(_flow(direction="ingress"))
    merged = flows.take()
    assert len(merged) == 2
    egress = next(f for f in merged if f["direction"] == "egress")
    assert egress["packets"] == first["packets"] + 1 and egress["bytes"] == first["bytes"] + 32
    assert egress["errors"] == 1 and egress["last_error"] == "ECONNREFUSED"
    assert egress["ts_ns"] == first["ts_ns"] and egress["last_time"] == "later"
    assert flows.take() == []


# --- analyses over the recorded bundle ---

EVENTS = fixture_events()


def _dns() -> DnsAnalysis:
    analysis = DnsAnalysis()
    for number, event in enumerate(EVENTS, 1):
        analysis.add(event, number)
    return analysis


def test_the_recorded_dropped_query_is_one_suspect_naming_the_client_and_the_server():
    (suspect,) = _dns().suspects()
    timeout = next(e for e in EVENTS if e["type"] == "dns_timeout" and e["role"] == "client")
    assert (suspect["pid"], suspect["comm"]) == (timeout["pid"], "kt-client")
    assert suspect["server"] == f"{timeout['daddr']}:{timeout['dport']}"
    assert suspect["timeouts"] == 1 and suspect["replies"] == suspect["queries"] - 1
    assert EVENTS[suspect["lines"][0] - 1] == timeout


def test_rtts_are_kept_per_server_and_ipv6_servers_are_bracketed():
    servers = {row["server"]: row for row in _dns().summary()["by_server"]}
    assert set(servers) == {"127.0.0.1:47053", "[::1]:47053"}
    assert all(row["rtt_ms"]["count"] == row["replies"] for row in servers.values())


def test_a_server_that_never_answers_is_unresponsive_and_slow_replies_make_slow_dns():
    analysis = DnsAnalysis()
    for i in range(3):
        analysis.add(_at(QUERY, i, daddr="10.0.0.10", time=f"2026-11-22T00:00:0{i}.000Z"), None)
        analysis.add({**_at(QUERY, i, daddr="10.0.0.10"), "type": "dns_timeout", "window_end": False}, None)
    for i in range(5):
        analysis.add(_at(QUERY, i, daddr="10.0.0.11"), None)
        analysis.add(_at(REPLY, i + 800, daddr="10.0.0.11", rtt_ms=800.0), None)
    rules = {(f["rule"], f["subject"].get("server")) for f in analysis.findings(2.0)}
    assert ("dns_server_unresponsive", "10.0.0.10:47053") in rules
    assert ("dns_timeout", "10.0.0.10:47053") in rules
    assert ("slow_dns", "10.0.0.11:47053") in rules
    assert not any(server == "10.0.0.11:47053" for rule, server in rules if rule != "slow_dns")


def test_udp_top_talkers_are_by_bytes_both_ways():
    analysis = UdpAnalysis()
    for number, event in enumerate(EVENTS, 1):
        analysis.add(event, number)
    summary = analysis.summary()
    client = next(t for t in summary["top_talkers"] if t["comm"] == "kt-client")
    flows = [e for e in EVENTS if e["type"] == "udp_flow" and e["pid"] == client["pid"]]
    assert client["bytes_out"] == sum(f["bytes"] for f in flows if f["direction"] == "egress")
    assert client["bytes"] == sum(f["bytes"] for f in flows)
    assert summary["top_flows"][0]["bytes"] == max(f["bytes"] for f in EVENTS if f["type"] == "udp_flow")


def test_a_local_server_answering_late_is_not_said_to_drop_queries():
    pairer, out = _pairer()
    pairer.add(_server(0, "dns_query", 52))
    pairer.add(_server(1, "dns_query", 52))
    pairer.expire(T0 + TIMEOUT_NS + 10 * MS)
    pairer.add(_server(2500, "dns_reply", 58))  # the first one, late; the second never
    analysis = DnsAnalysis()
    for number, event in enumerate(out, 1):
        analysis.add(event, number)
    (dropped,) = [f for f in analysis.findings(2.0) if f["rule"] == "dns_server_dropped"]
    assert dropped["evidence"]["count"] == 1
    assert "1 of 2 queries received were not answered within 2 s (1 more were answered late)" in dropped["title"]
