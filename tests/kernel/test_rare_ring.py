"""The rare families have a ring of their own: a TCP churn that overflows a deliberately tiny main ring loses
TCP state changes (counted as ringbuf_full), while every exec, fork and exit of a process storm and every DNS
query and reply of the same window reach the bundle."""

from __future__ import annotations

import subprocess

from benchmarks.bench import workload_command
from tests.dnsnet import DnsNetns
from tests.helpers import record_during
from tests.prockit import fork_storm

RARE = ("oom", "process", "cgroups", "dns")
CHURN_CAP_S = 120  # the churn's own time cap; the test stops it as soon as the work is done
LOOKUPS = 10


def test_a_tcp_flood_on_a_tiny_ring_loses_state_changes_but_no_exec_fork_exit_or_dns_message(tmp_path):
    storm: dict = {}
    lookups: list[dict] = []
    with DnsNetns(tmp_path, "rare") as ns:
        def work() -> None:
            churn = subprocess.Popen([*workload_command(), "tcp", "100000000", "-t", str(CHURN_CAP_S)],
                                     stdout=subprocess.DEVNULL)
            try:
                storm.update(fork_storm(300))
                lookups.extend(ns.run_json("getaddrinfo", f"rare{i}.example.test") for i in range(LOOKUPS))
            finally:
                churn.kill()
                churn.wait()

        bundle = record_during(tmp_path, work, "--ring-size=4K")
        served = [q for q in ns.queries() if q["proto"] == "udp"]

    rings = {m["map"]: m["max_entries"] for m in bundle.node["maps"] if m["map"] in ("events", "rare")}
    assert rings == {"events": 4096, "rare": 1 << 20}
    assert bundle.summary["options"]["rare_ring_bytes"] == 1 << 20

    losses = bundle.summary["losses"]
    by_family = losses["by_family"]
    # the main ring was overflowed: TCP state changes were lost, and counted
    assert by_family["tcp_state"]["ringbuf_full"] > 0
    assert losses["balanced"]
    for family in RARE:
        assert by_family[family]["ringbuf_full"] == 0, (family, by_family[family])
    assert by_family["process"]["written"] == by_family["process"]["seen"]
    assert by_family["dns"]["written"] == by_family["dns"]["seen"]

    # every child the forker recorded: its fork, its exec, its exit (with the exit code the forker reaped)
    parent, children = storm["pid"], storm["children"]
    assert len(children) == 300
    forks = sorted(e["child_pid"] for e in bundle.of_type("fork") if e["pid"] == parent)
    assert forks == sorted(children)
    execs = {e["pid"]: e["filename"] for e in bundle.of_type("exec") if e["pid"] in children}
    assert execs == {pid: "/bin/sh" if code == 3 else "/bin/true" for pid, code in children.items()}
    exits = {e["pid"]: e["exit_status"] for e in bundle.of_type("exit") if e["pid"] in children}
    assert exits == children

    # every DNS message: as many queries as the fake server received, each answered, at both ends
    assert all(r["ok"] for r in lookups)
    assert len(served) >= 2 * LOOKUPS  # glibc asks A and AAAA for each name
    client_queries = [e for e in bundle.of_type("dns_query") if e["comm"] == "kt-gai" and e["role"] == "client"]
    client_replies = [e for e in bundle.of_type("dns_reply") if e["comm"] == "kt-gai" and e["role"] == "client"]
    server_queries = [e for e in bundle.of_type("dns_query") if e["comm"] == "kt-dns" and e["role"] == "server"]
    server_replies = [e for e in bundle.of_type("dns_reply") if e["comm"] == "kt-dns" and e["role"] == "server"]
    assert len(client_queries) == len(server_queries) == len(served)
    assert len(client_replies) == len(server_replies) == len(served)
    assert all(r["rtt_ms"] is not None for r in client_replies)
    assert not [e for e in bundle.of_type("dns_timeout") if e.get("comm") == "kt-gai"]
