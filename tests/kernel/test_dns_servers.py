"""DNS against real servers from Debian (unbound, dnsmasq) in a namespace of their own, asked by dig from another.

Ground truth is the server's own count (unbound-control stats, dnsmasq's query log) and the answers dig printed;
ktrace sees both ends on this node: dig as the client, the server as the server.
"""

from __future__ import annotations

import pytest

from ktrace.analyze.dns import is_message
from tests.dnsservers import ANSWER, SERVER_ADDR, ZONE, Dnsmasq, NetnsPair, Unbound
from tests.helpers import record_during

QUERIES = 20


@pytest.fixture
def net():
    with NetnsPair("kt10dns") as net:
        yield net


def _messages(bundle, kind: str, netns: int, role: str) -> list[dict]:
    return [e for e in bundle.of_type(kind) if e["netns_sk"] == netns and e["role"] == role and is_message(e)]


def _dig_over_tcp(net: NetnsPair, answers: list[str], keepopen: bool) -> None:
    """QUERIES A queries over TCP: one connection each, or all on one connection (+keepopen)."""
    names = [f"q{i}.{ZONE}" for i in range(QUERIES)]
    if keepopen:
        answers.extend(net.dig("+tcp", "+keepopen", *names))
    else:
        for name in names:
            answers.extend(net.dig("+tcp", name))


def _check_one_query_and_one_reply_per_exchange(bundle, net: NetnsPair, server_comm: str) -> None:
    client_ns, server_ns = net.inode(net.client_ns), net.inode(net.server_ns)
    for netns, role in ((client_ns, "client"), (server_ns, "server")):
        queries = _messages(bundle, "dns_query", netns, role)
        replies = _messages(bundle, "dns_reply", netns, role)
        assert len(queries) == QUERIES and len(replies) == QUERIES, role
        assert {e["protocol"] for e in queries + replies} == {"tcp"}
        assert all(r["rtt_ms"] is not None and not r.get("late") for r in replies), role
        # every reply answers a distinct query
        assert len({r["query_line"] for r in replies}) == QUERIES
    assert {e["comm"] for e in _messages(bundle, "dns_query", server_ns, "server")} == {server_comm}
    assert not bundle.of_type("dns_timeout")
    dns = bundle.summary["dns"]
    served = [row for row in dns["served"] if row["server"] == f"{SERVER_ADDR}:53"]
    assert sum(row["queries"] for row in served) == QUERIES
    assert sum(row["replies"] for row in served) == QUERIES
    assert sum(row["timeouts"] + row["unanswered_at_window_end"] for row in served) == 0
    client = next(row for row in dns["by_server"] if row["server"] == f"{SERVER_ADDR}:53")
    assert (client["queries"], client["replies"], client["timeouts"]) == (QUERIES, QUERIES, 0)
    rules = {f["rule"] for f in bundle.summary["findings"]}
    assert not rules & {"dns_timeout", "dns_server_dropped", "dns_server_unresponsive"}


@pytest.mark.parametrize("keepopen", [False, True], ids=["connection-per-query", "one-connection"])
def test_unbound_over_tcp_counts_one_query_and_one_reply_per_exchange_on_both_sides(tmp_path, net, keepopen):
    with Unbound(net, tmp_path) as unbound:
        before = unbound.stats()
        answers: list[str] = []
        bundle = record_during(tmp_path, lambda: _dig_over_tcp(net, answers, keepopen))
        after = unbound.stats()
    assert len(answers) == QUERIES and all(line.split()[-1] == ANSWER for line in answers)
    # unbound's own count of the queries it got over TCP during the window
    assert after["num.query.tcp"] - before["num.query.tcp"] == QUERIES
    assert after["total.num.queries"] - before["total.num.queries"] == QUERIES
    _check_one_query_and_one_reply_per_exchange(bundle, net, "unbound")
    # unbound reads each query's 2-byte length first, then the message: the length is folded into it
    prefixes = [e for e in bundle.of_type("dns_query")
                if e["netns_sk"] == net.inode(net.server_ns) and e.get("length_prefix")]
    assert len(prefixes) == QUERIES and {e["bytes"] for e in prefixes} == {2}


def test_dnsmasq_over_tcp_reading_the_length_byte_by_byte_counts_one_query_per_exchange(tmp_path, net):
    with Dnsmasq(net, tmp_path) as dnsmasq:
        answers: list[str] = []
        logged_before = sum(dnsmasq.queries_logged(f"q{i}.{ZONE}") for i in range(QUERIES))
        bundle = record_during(tmp_path, lambda: _dig_over_tcp(net, answers, keepopen=False))
        logged = sum(dnsmasq.queries_logged(f"q{i}.{ZONE}") for i in range(QUERIES)) - logged_before
    assert len(answers) == QUERIES and logged == QUERIES
    _check_one_query_and_one_reply_per_exchange(bundle, net, "dnsmasq")
    prefixes = [e for e in bundle.of_type("dns_query")
                if e["netns_sk"] == net.inode(net.server_ns) and e.get("length_prefix")]
    assert prefixes and {e["bytes"] for e in prefixes} <= {1, 2}
