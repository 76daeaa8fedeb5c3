"""DNS through real resolvers against a fake server in a namespace the test makes.

The namespace has its own resolv.conf (`ip netns exec` bind-mounts it), so glibc
lookups inside it go to the fake server on the namespace's loopback.
"""

from __future__ import annotations

import json
import subprocess

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


def test_dns_over_tcp_is_paired_with_the_message_and_the_length_read_alone_is_a_length_prefix(tmp_path, ns):
    result = {}
    bundle = record_during(tmp_path, lambda: result.update(ns.run_json("tcp", "127.0.0.1", "tcp.example.test")))
    assert result["ok"]
    queries = _client_events(bundle, "dns_query", "kt-dnstcp")
    replies = _client_events(bundle, "dns_reply", "kt-dnstcp")
    assert len(queries) == 1 and queries[0]["protocol"] == "tcp"
    # the client reads the 2-byte length, then the message: the RTT runs to the message
    prefix, message = replies
    assert prefix["length_prefix"] is True and prefix["bytes"] == 2 and prefix["rtt_ms"] is None
    assert message["rtt_ms"] is not None and message["bytes"] > 2 and "length_prefix" not in message
    assert bundle.summary["dns"]["by_process"][0]["timeouts"] == 0
    assert bundle.summary["dns"]["by_process"][0]["replies"] == 1

DELAY_MS = 3000
SLOW_CLIENTS = 5  # slow_dns needs 5 replies (ktrace.analyze.dns.MIN_SLOW_REPLIES)


def _slow_lookups(ns, results: list[dict]) -> None:
    """SLOW_CLIENTS resolvers at once, each waiting up to 6 s for its one reply."""
    procs = [ns.popen("unconnected", "127.0.0.1", f"slow{i}.example.test", "--timeout", "6")
             for i in range(SLOW_CLIENTS)]
    for proc in procs:
        out, _err = proc.communicate(timeout=60)
        results.append(json.loads(out.strip().splitlines()[-1]))


@pytest.mark.parametrize("timeout_args", [("--dns-timeout=1s",), ()], ids=["timeout-1s", "default-timeout"])
def test_a_reply_after_3_s_counts_in_rtt_ms_and_makes_slow_dns(tmp_path, ns, timeout_args):
    ns.delay(DELAY_MS)
    results: list[dict] = []
    bundle = record_during(tmp_path, lambda: _slow_lookups(ns, results), *timeout_args)
    assert [r["answered"] for r in results] == [1] * SLOW_CLIENTS
    client_ms = sorted(r["ms"][0] for r in results)
    replies = _client_events(bundle, "dns_reply", "kt-dig")
    assert len(replies) == SLOW_CLIENTS
    # each RTT lies between the server's delay and what its client measured around send and receive
    assert all(DELAY_MS <= r["rtt_ms"] <= client_ms[-1] for r in replies)
    server = next(s for s in bundle.summary["dns"]["by_server"] if s["server"] == "127.0.0.1:53")
    assert server["replies"] == SLOW_CLIENTS and server["rtt_ms"]["count"] == SLOW_CLIENTS
    assert server["rtt_ms"]["p50"] >= DELAY_MS
    findings = {f["rule"]: f for f in bundle.summary["findings"] if f["subject"].get("server") == "127.0.0.1:53"}
    assert findings["slow_dns"]["subject"]["rtt_ms"]["p99"] >= DELAY_MS
    timeouts = _client_events(bundle, "dns_timeout", "kt-dig")
    if timeout_args:  # 1 s: every query timed out, then its reply came late
        assert bundle.summary["options"]["dns_timeout_s"] == 1.0
        assert len(timeouts) == SLOW_CLIENTS and all(not t["window_end"] for t in timeouts)
        assert all(r.get("late") for r in replies) and server["late_replies"] == SLOW_CLIENTS
        late = [f for f in bundle.summary["findings"]
                if f["rule"] == "dns_timeout" and f["subject"]["comm"] == "kt-dig"]
        # each says its queries were answered late, none lost: slow, not critical
        assert late and all("answered late" in f["title"] and ", 0 never" in f["title"] for f in late)
        assert {f["severity"] for f in late} == {"warning"}
    else:  # glibc's 5 s: a 3 s reply is slow, not a timeout
        assert bundle.summary["options"]["dns_timeout_s"] == 5.0
        assert not timeouts and not any(r.get("late") for r in replies)
        assert "dns_timeout" not in findings


FRESH_QUERIES = 30
# the udp/dns alternatives, each run alone by skipping the ones before it (ktrace.probes)
DNS_HOOKS = ("tp_btf/sock_{send,recv}_length", "tracepoint/sock/sock_{send,recv}_length",
             "tracepoint/syscalls/sys_{enter,exit}_{send,recv}{to,msg,mmsg}")


@pytest.mark.parametrize("hook", DNS_HOOKS, ids=["tp_btf", "tracepoint", "syscalls"])
def test_queries_from_fresh_sockets_pair_with_their_own_socket_and_the_dropped_third_go_unanswered(tmp_path, ns,
                                                                                                  hook):
    names = [f"fresh{i}.example.test" for i in range(FRESH_QUERIES)]
    dropped = {name for i, name in enumerate(names) if i % 3 == 2}
    ns.drop(sorted(dropped))
    digs: list[subprocess.CompletedProcess] = []

    def work() -> None:
        for name in names:  # one dig, so one new socket, per query
            digs.append(ns.exec("dig", "@127.0.0.1", "+tries=1", "+timeout=1", "+noall", "+answer", name))

    skip = [f"--skip-hook={h}" for h in DNS_HOOKS[:DNS_HOOKS.index(hook)]]
    bundle = record_during(tmp_path, work, "--dns-timeout=2s", *skip)
    assert next(row for row in bundle.summary["probes"] if row["family"] == "dns")["chosen"] == hook
    answered = {name for name, d in zip(names, digs) if name in d.stdout}
    assert answered == set(names) - dropped
    # the server's log: which source port asked for which name, and whether it was answered
    seen = {q["name"]: q for q in ns.queries() if q["name"] in names}
    assert len(seen) == FRESH_QUERIES
    port_of = {name: int(q["peer"].rsplit(":", 1)[1]) for name, q in seen.items()}
    # a fresh socket per query, told apart by inode below: dig picks its port at random, and may pick one twice
    mine = set(port_of.values())
    queries = [e for e in bundle.of_type("dns_query") if e["role"] == "client" and e["sport"] in mine]
    replies = [e for e in bundle.of_type("dns_reply") if e["role"] == "client" and e["sport"] in mine]
    timeouts = [e for e in bundle.of_type("dns_timeout") if e["role"] == "client" and e["sport"] in mine]
    assert len(queries) == FRESH_QUERIES and all(q["sk_ino"] > 0 for q in queries)
    assert len({q["sk_ino"] for q in queries}) == FRESH_QUERIES
    lines = bundle.paths["events.jsonl"].read_bytes().splitlines()
    assert len(replies) == FRESH_QUERIES - len(dropped)
    for reply in replies:
        query = json.loads(lines[reply["query_line"] - 1])
        # the query it answers is its own socket's: same port, same inode
        assert (query["sport"], query["sk_ino"]) == (reply["sport"], reply["sk_ino"])
        assert not reply.get("late") and reply["rtt_ms"] < 1000  # dig waited 1 s at most
    assert {r["sport"] for r in replies} == {port_of[n] for n in answered}
    assert len(timeouts) == len(dropped) and {t["sport"] for t in timeouts} == {port_of[n] for n in dropped}
    assert not [f for f in bundle.summary["findings"] if f["rule"] == "slow_dns"]
