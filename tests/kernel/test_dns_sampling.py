"""--sample with DNS in two namespaces: both ends of each exchange are kept or left out together.

The server is fakedns in one namespace, the clients are dig in the other, one fresh socket (and port) per query.
The decision is a hash of the two ports (bpf/common.bpf.h kt_sample_ports), so which exchanges are kept can be
worked out from the ports the server logged.
"""

from __future__ import annotations

import signal

import pytest

from ktrace.analyze.dns import is_message
from tests.dnsservers import SERVER_ADDR, FakeDns, NetnsPair
from tests.helpers import Ktrace, kept_by_ports

EVERY = 4
QUERIES = 40


@pytest.fixture
def net():
    with NetnsPair("kt10smp") as net:
        yield net


def test_sampled_dns_keeps_or_drops_both_ends_of_each_exchange_together(tmp_path, net):
    names = [f"s{i}.sample.test" for i in range(QUERIES)]
    with FakeDns(net, tmp_path) as server:
        answers: list[str] = []
        ktrace = Ktrace(tmp_path, f"--sample={EVERY}", duration="120s").started()
        try:
            for name in names:
                answers.extend(net.dig(name))
        finally:
            ktrace.signal(signal.SIGINT)
        assert ktrace.finish() in (0, 3), ktrace.stderr
        bundle = ktrace.bundle()
        logged = {q["name"]: q for q in server.queries() if q["name"] in names}
    assert len(answers) == QUERIES and len(logged) == QUERIES
    # one source port per query; dig picks them at random, so two queries may share one: a list, not a set
    ports = sorted(int(q["peer"].rsplit(":", 1)[1]) for q in logged.values())
    kept = [p for p in ports if kept_by_ports(p, 53, EVERY)]
    assert kept and kept != ports  # 40 random ports: some of each (all alike has odds of about 1e-5)
    client_ns, server_ns = net.inode(net.client_ns), net.inode(net.server_ns)

    def mine(kind: str, netns: int) -> list[dict]:
        return [e for e in bundle.of_type(kind) if e["netns_sk"] == netns and is_message(e)]

    client_q, client_r = mine("dns_query", client_ns), mine("dns_reply", client_ns)
    server_q, server_r = mine("dns_query", server_ns), mine("dns_reply", server_ns)
    # the client's port is its sport, the server's dport: the same decision at both ends, the one predicted
    assert sorted(e["sport"] for e in client_q) == sorted(kept)
    assert sorted(e["sport"] for e in client_r) == sorted(kept)
    assert sorted(e["dport"] for e in server_q) == sorted(kept)
    assert sorted(e["dport"] for e in server_r) == sorted(kept)
    assert all(r["rtt_ms"] is not None for r in client_r + server_r)
    assert not bundle.of_type("dns_timeout")
    assert {e["daddr"] for e in client_q} == {SERVER_ADDR}
    # the UDP flows of those sockets follow the same decision
    flows = [f for f in bundle.of_type("udp_flow") if f["netns_sk"] == client_ns and f["direction"] == "egress"]
    assert {f["sport"] for f in flows if f["dport"] == 53} == set(kept)
    # the summary says what was sampled and marks the counts
    summary = bundle.summary
    assert summary["sampling"]["every"] == EVERY
    decisions = {row["family"]: row["decision"] for row in summary["sampling"]["families"]}
    assert decisions["dns"] == "ports" and decisions["udp"] == "ports" and decisions["tcp_state"] == "ports"
    assert summary["dns"]["sample_every"] == EVERY and summary["udp"]["sample_every"] == EVERY
    # each exchange left out is 4 DNS messages: query and reply, at each end
    assert summary["losses"]["by_family"]["dns"]["sampled_out"] >= 4 * (QUERIES - len(kept))
    assert not [f for f in summary["findings"] if f["rule"].startswith("dns_")]
    # and so does the console
    assert f"ktrace: sampled 1 flow in {EVERY} of tcp_state, connect, retransmit, reset, udp, dns:" in ktrace.stderr
