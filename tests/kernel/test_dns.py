"""DNS through real resolvers against a fake server in a namespace the test makes.

The namespace has its own resolv.conf (`ip netns exec` bind-mounts it), so glibc
lookups inside it go to the fake server on the namespace's loopback.
"""

from __future__ import annotations

import pytest

from tests.dnsnet import DnsNetns
from tests.helpers import record_during


@pytest.fixture
def ns(tmp_path):
    with DnsNetns(tmp_path, "dns") as ns:
        yield ns


def _client_events(bundle, kind: str, comm: str) -> list[dict]:
    return [e for e in bundle.of_type(kind) if e["comm"] == comm and e["role"] == "client"]


def test_glibc_getaddrinfo_queries_are_paired_with_their_replies(tmp_path, ns):
    lookups = []
    bundle = record_during(tmp_path, lambda: lookups.extend(
        ns.run_json("getaddrinfo", f"svc{i}.example.test") for i in range(5)))
    assert all(r["ok"] for r in lookups)
    queries = _client_events(bundle, "dns_query", "kt-gai")
    replies = _client_events(bundle, "dns_reply", "kt-gai")
    # glibc asks A and AAAA for each name, on one connected socket
    assert len(queries) == 10 and len(replies) == 10
    assert {(q["daddr"], q["dport"], q["protocol"]) for q in queries} == {("127.0.0.1", 53, "udp")}
    lines = bundle.paths["events.jsonl"].read_bytes().splitlines()
    for reply in replies:
        assert reply["rtt_ms"] is not None and reply["rtt_ms"] > 0
        query = lines[reply["query_line"] - 1]
        assert b'"type":"dns_query"' in query and str(reply["sport"]).encode() in query
    assert not bundle.of_type("dns_timeout")
    dns = bundle.summary["dns"]
    assert dns["queries"] >= 10 and dns["replies"] >= 10 and dns["timeouts"] == 0
    server = next(s for s in dns["by_server"] if s["server"] == "127.0.0.1:53")
    assert server["rtt_ms"]["count"] >= 10 and server["rtt_ms"]["p50"] > 0
    # the fake server's own view: queries it received and answered
    served = next(s for s in dns["served"] if s["comm"] == "kt-dns")
    assert served["queries"] >= 10 and served["replies"] >= 10


def test_getent_hosts_through_gethostbyname2_is_paired(tmp_path, ns):
    bundle = record_during(tmp_path, lambda: ns.exec("getent", "hosts", "web.example.test", check=True))
    queries = _client_events(bundle, "dns_query", "getent")
    replies = _client_events(bundle, "dns_reply", "getent")
    assert queries and len(replies) == len(queries)
    assert all(r["rtt_ms"] is not None for r in replies)


def test_a_dropped_name_becomes_dns_timeouts_and_a_suspect_naming_client_and_server(tmp_path, ns):
    ns.drop(["broken.example.test"])
    results = []

    def work() -> None:
        results.append(ns.run_json("getaddrinfo", "fine.example.test"))
        results.append(ns.run_json("getaddrinfo", "broken.example.test"))
        results.append(ns.run_json("getaddrinfo", "broken.example.test"))

    bundle = record_during(tmp_path, work, "--dns-timeout=500ms")
    assert [r["ok"] for r in results] == [True, False, False]
    timeouts = _client_events(bundle, "dns_timeout", "kt-gai")
    # two lookups of A and AAAA, none answered
    assert len(timeouts) == 4
    for t in timeouts:
        assert t["daddr"] == "127.0.0.1" and t["dport"] == 53
        assert t["waited_ms"] >= 500 and t["window_end"] is False
    # one suspect per failing process (each lookup ran in its own), none for the one that got its answers
    suspects = [s for s in bundle.summary["dns_suspects"] if s["comm"] == "kt-gai"]
    assert len(suspects) == 2
    for suspect in suspects:
        assert suspect["server"] == "127.0.0.1:53" and suspect["netns"] == timeouts[0]["netns"]
        assert suspect["timeouts"] == 2 and suspect["replies"] == 0 and suspect["queries"] == 2
        assert suspect["first"] <= suspect["last"] and len(suspect["lines"]) == 2
    finding = next(f for f in bundle.summary["findings"] if f["rule"] == "dns_timeout")
    assert finding["subject"]["comm"] == "kt-gai" and finding["subject"]["server"] == "127.0.0.1:53"


def test_a_server_that_stops_answering_is_named_unresponsive(tmp_path, ns):
    ns.silence()
    results = []
    bundle = record_during(tmp_path, lambda: results.extend(
        ns.run_json("getaddrinfo", f"n{i}.example.test") for i in range(2)), "--dns-timeout=500ms")
    assert not any(r["ok"] for r in results)
    assert len(_client_events(bundle, "dns_timeout", "kt-gai")) == 4
    rules = {f["rule"]: f for f in bundle.summary["findings"]}
    assert rules["dns_server_unresponsive"]["subject"]["server"] == "127.0.0.1:53"
    # the fake server read every query and answered none
    assert rules["dns_server_dropped"]["subject"]["comm"] == "kt-dns"


@pytest.mark.parametrize("server", ["127.0.0.1", "::1"])
def test_an_unconnected_client_is_paired_like_a_connected_one(tmp_path, ns, server):
    result = {}
    bundle = record_during(tmp_path, lambda: result.update(
        ns.run_json("unconnected", server, "plain.example.test", "--count", "3")))
    assert result["answered"] == 3
    queries = _client_events(bundle, "dns_query", "kt-dig")
    replies = _client_events(bundle, "dns_reply", "kt-dig")
    assert len(queries) == 3 and len(replies) == 3
    # the socket has no peer: the address comes from sendto() and recvfrom()
    assert {(e["daddr"], e["dport"]) for e in queries + replies} == {(server, 53)}
    assert {e["family"] for e in queries} == {"ipv6" if ":" in server else "ipv4"}
    assert all(r["rtt_ms"] is not None and r["rtt_ms"] > 0 for r in replies)


def test_dns_over_tcp_is_paired_and_the_second_read_of_a_reply_is_a_continuation(tmp_path, ns):
    result = {}
    bundle = record_during(tmp_path, lambda: result.update(ns.run_json("tcp", "127.0.0.1", "tcp.example.test")))
    assert result["ok"]
    queries = _client_events(bundle, "dns_query", "kt-dnstcp")
    replies = _client_events(bundle, "dns_reply", "kt-dnstcp")
    assert len(queries) == 1 and queries[0]["protocol"] == "tcp"
    paired = [r for r in replies if r["rtt_ms"] is not None]
    assert len(paired) == 1
    assert all(r.get("continuation") for r in replies if r["rtt_ms"] is None)
    assert bundle.summary["dns"]["by_process"][0]["timeouts"] == 0
