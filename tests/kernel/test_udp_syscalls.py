"""udp and dns through the syscall tracepoints, the alternative for kernels older than sock_send_length (6.3).

Both sock_*_length alternatives are skipped with --skip-hook, so the loader takes the third one; the traffic
goes through every send and receive syscall it covers, and the counts must come out exact.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dnsnet import DnsNetns
from tests.helpers import Ktrace

UDPTRAFFIC = str(Path(__file__).resolve().parent / "udptraffic.py")
SOCK_LENGTH_HOOKS = ("tp_btf/sock_{send,recv}_length", "tracepoint/sock/sock_{send,recv}_length")
SYSCALL_HOOK = "tracepoint/syscalls/sys_{enter,exit}_{send,recv}{to,msg,mmsg}"
N, SIZE = 1000, 100
CONNECTED_N, CONNECTED_SIZE = 300, 64
MMSG_BATCHES = 5


def traffic(*args: str) -> tuple[int, dict]:
    proc = subprocess.Popen([sys.executable, UDPTRAFFIC, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return proc.pid, json.loads(out.strip().splitlines()[-1])


def resolve(ns, *role_args: str) -> tuple[int, dict]:
    proc = ns.popen(*role_args)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return proc.pid, json.loads(out.strip().splitlines()[-1])


def with_syscall_alternative(tmp: Path) -> Ktrace:
    return Ktrace(tmp, *(f"--skip-hook={h}" for h in SOCK_LENGTH_HOOKS), duration="20s").started()


def finished(ktrace: Ktrace):
    ktrace.signal(signal.SIGINT)
    rc = ktrace.finish()
    assert rc == 0, ktrace.stderr
    return ktrace.bundle()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory):
    """One window with the syscall alternative: UDP over v4 and v6 through all six syscalls."""
    tmp = tmp_path_factory.mktemp("udp-syscalls")
    ktrace = with_syscall_alternative(tmp)
    try:
        done = {}
        for family in ("4", "6"):
            done[f"unconnected{family}"] = traffic("unconnected", family, str(N), str(SIZE))
            done[f"connected{family}"] = traffic("connected", family, str(CONNECTED_N), str(CONNECTED_SIZE))
            done[f"mmsg{family}"] = traffic("mmsg", family, str(MMSG_BATCHES))
        yield {"bundle": finished(ktrace), **done}
    finally:
        ktrace.kill()


@pytest.fixture(scope="module")
def dns_run(tmp_path_factory: pytest.TempPathFactory):
    """One window with the syscall alternative: resolvers asking a fake DNS server in a namespace."""
    tmp = tmp_path_factory.mktemp("dns-syscalls")
    with DnsNetns(tmp, "sys") as ns:
        ktrace = with_syscall_alternative(tmp)
        try:
            done = {
                "getaddrinfo": resolve(ns, "getaddrinfo", "web.test"),
                "unconnected": resolve(ns, "unconnected", "127.0.0.1", "web.test", "--count", "3"),
                "tcp": resolve(ns, "tcp", "127.0.0.1", "web.test", "--count", "2"),
            }
            yield {"bundle": finished(ktrace), **done}
        finally:
            ktrace.kill()


def flows_of(bundle, pid: int) -> dict[tuple, dict]:
    """(direction, saddr, sport, daddr, dport) → the process's udp_flow event; each appears once."""
    flows = {}
    for e in bundle.of_type("udp_flow"):
        if e["pid"] == pid:
            key = (e["direction"], e["saddr"], e["sport"], e["daddr"], e["dport"])
            assert key not in flows, f"flow written twice: {key}"
            flows[key] = e
    return flows


def counts(flow: dict) -> tuple[int, int, int]:
    return flow["packets"], flow["bytes"], flow["errors"]


def test_the_probe_table_shows_the_syscall_alternative_chosen_for_udp_and_dns(run):
    bundle = run["bundle"]
    for probes in (bundle.summary["probes"], bundle.node["probes"]):
        rows = {row["family"]: row for row in probes}
        for family in ("udp", "dns"):
            row = rows[family]
            assert row["status"] == "ok" and row["chosen"] == SYSCALL_HOOK
            assert [(a["hook"], a["status"], a["reason"]) for a in row["alternatives"]] == [
                (SOCK_LENGTH_HOOKS[0], "skipped", "skipped by --skip-hook"),
                (SOCK_LENGTH_HOOKS[1], "skipped", "skipped by --skip-hook"),
                (SYSCALL_HOOK, "chosen", ""),
            ]
            assert "skipped by --skip-hook" in row["reason"]
    assert bundle.node["args"]["skip_hooks"] == sorted(SOCK_LENGTH_HOOKS)
    assert bundle.summary["options"]["skip_hooks"] == sorted(SOCK_LENGTH_HOOKS)


@pytest.mark.parametrize("family", ["4", "6"])
def test_sendto_and_recvfrom_on_unconnected_sockets_are_exact_flows_with_both_ends(run, family):
    pid, out = run[f"unconnected{family}"]
    assert out["received"] == N and out["peers"] == [out["sender"]]
    (shost, sport), (rhost, rport) = out["sender"], out["receiver"]
    flows = flows_of(run["bundle"], pid)
    # the receiver peeked at some datagrams before reading them: a peek is not a datagram
    assert {key: counts(f) for key, f in flows.items()} == {
        ("egress", shost, sport, rhost, rport): (N, N * SIZE, 0),
        ("ingress", shost, sport, rhost, rport): (N, N * SIZE, 0),
    }
    assert all(f["comm"] == "kt-sendto" and f["family"] == f"ipv{family}" for f in flows.values())


@pytest.mark.parametrize("family", ["4", "6"])
def test_send_and_recv_on_connected_sockets_are_exact_flows(run, family):
    pid, out = run[f"connected{family}"]
    assert out["received"] == CONNECTED_N
    (shost, sport), (rhost, rport) = out["sender"], out["receiver"]
    flows = flows_of(run["bundle"], pid)
    assert {key: counts(f) for key, f in flows.items()} == {
        ("egress", shost, sport, rhost, rport): (CONNECTED_N, CONNECTED_N * CONNECTED_SIZE, 0),
        ("ingress", shost, sport, rhost, rport): (CONNECTED_N, CONNECTED_N * CONNECTED_SIZE, 0),
    }
    assert all(f["comm"] == "kt-send" for f in flows.values())


@pytest.mark.parametrize("family", ["4", "6"])
def test_sendmmsg_and_recvmmsg_count_every_message_with_its_own_peer(run, family):
    pid, out = run[f"mmsg{family}"]
    batches, (to_a1, to_b, to_a2) = out["batches"], out["sizes"]
    assert out["a_received"] == [2 * batches, batches * (to_a1 + to_a2)]
    assert out["b_received"] == [batches, batches * to_b]
    (shost, sport), (ahost, aport), (bhost, bport) = out["sender"], out["a"], out["b"]
    flows = flows_of(run["bundle"], pid)
    # one sendmmsg sends to a, b and a again: each message is a datagram of its own length to its own msg_name
    assert {key: counts(f) for key, f in flows.items()} == {
        ("egress", shost, sport, ahost, aport): (2 * batches, batches * (to_a1 + to_a2), 0),
        ("egress", shost, sport, bhost, bport): (batches, batches * to_b, 0),
        ("ingress", shost, sport, ahost, aport): (2 * batches, batches * (to_a1 + to_a2), 0),
        ("ingress", shost, sport, bhost, bport): (batches, batches * to_b, 0),
    }


def dns_of(bundle, pid: int) -> tuple[list[dict], list[dict]]:
    events = [e for e in bundle.events if e["type"] in ("dns_query", "dns_reply", "dns_timeout") and e["pid"] == pid]
    assert not [e for e in events if e["type"] == "dns_timeout"]
    return [e for e in events if e["type"] == "dns_query"], [e for e in events if e["type"] == "dns_reply"]


def test_glibc_getaddrinfo_sendmmsg_queries_are_paired_with_their_replies(dns_run):
    run = dns_run
    pid, out = run["getaddrinfo"]
    assert out["ok"] and sorted(out["addresses"]) == ["127.0.0.5", "::5"]
    queries, replies = dns_of(run["bundle"], pid)
    # glibc connects its socket, sends A and AAAA with one sendmmsg and reads each reply with recvfrom
    assert len(queries) >= 2 and len(replies) == len(queries)
    for e in queries + replies:
        assert e["comm"] == "kt-gai" and e["role"] == "client" and e["protocol"] == "udp"
        assert (e["daddr"], e["dport"]) == ("127.0.0.1", 53) and e["sport"] > 0
    assert all(r["rtt_ms"] is not None and r["rtt_ms"] > 0 for r in replies)


def test_an_unconnected_dns_client_gets_its_queries_paired_with_their_replies(dns_run):
    run = dns_run
    pid, out = run["unconnected"]
    assert out["sent"] == out["answered"] == 3
    local_port = int(out["local"].rsplit(":", 1)[1])
    queries, replies = dns_of(run["bundle"], pid)
    assert len(queries) == len(replies) == 3
    for e in queries + replies:
        assert e["comm"] == "kt-dig" and e["role"] == "client"
        # sendto's address and recvfrom's source, read from the caller's memory
        assert (e["daddr"], e["dport"]) == ("127.0.0.1", 53) and e["sport"] == local_port
    assert all(r["rtt_ms"] is not None and r["rtt_ms"] > 0 for r in replies)


def test_the_dns_server_side_is_seen_through_the_same_syscalls(dns_run):
    run = dns_run
    pid, out = run["unconnected"]
    local_port = int(out["local"].rsplit(":", 1)[1])
    server = [e for e in run["bundle"].events if e["type"] in ("dns_query", "dns_reply") and e["comm"] == "kt-dns"
              and e["dport"] == local_port]
    # the server receives each query (a query it received) and sends each reply, to the client's port
    assert sorted(e["type"] for e in server) == ["dns_query"] * 3 + ["dns_reply"] * 3
    assert all(e["role"] == "server" and e["sport"] == 53 for e in server)


def test_dns_over_tcp_send_and_recv_are_seen_on_the_dns_port(dns_run):
    pid, out = dns_run["tcp"]
    assert out["ok"] and out["answered"] == 2
    queries, replies = dns_of(dns_run["bundle"], pid)
    # each query is one send(); each reply two recv()s, the length prefix and the message
    assert len(queries) == 2 and len(replies) == 4
    for e in queries + replies:
        assert e["comm"] == "kt-dnstcp" and e["protocol"] == "tcp" and e["role"] == "client"
        assert (e["daddr"], e["dport"]) == ("127.0.0.1", 53)
    # the length read alone is the message's length prefix; the message read is the reply
    answered = [r for r in replies if not r.get("length_prefix")]
    assert len(answered) == 2 and all(r["rtt_ms"] is not None and r["rtt_ms"] > 0 for r in answered)
    assert [r["bytes"] for r in replies if r.get("length_prefix")] == [2, 2]


@pytest.mark.parametrize("window", ["run", "dns_run"])
def test_nothing_was_lost(window, request):
    losses = request.getfixturevalue(window)["bundle"].summary["losses"]["by_family"]
    for family in ("udp", "dns"):
        assert losses[family]["ringbuf_full"] == 0 and losses[family]["undecodable"] == 0


def test_an_unknown_hook_label_is_a_usage_error_that_lists_the_known_ones(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ktrace", "--skip-hook=bogus", f"--out-dir={tmp_path}"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stdout == "" and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("ktrace: error: ") and "unknown hook bogus; known: " in result.stderr
    assert SYSCALL_HOOK in result.stderr and SOCK_LENGTH_HOOKS[0] in result.stderr
    assert not list(tmp_path.iterdir())
