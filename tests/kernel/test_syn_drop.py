"""A connect whose first SYN is dropped, inside a network namespace the test makes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import TRAFFIC, Ktrace, Server


@pytest.fixture
def netns():
    name = f"kt-syn-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def nft(netns: str, *rule: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "nft", *rule], check=True)


def test_dropped_syn_costs_one_rto_and_the_retransmit_names_the_connecting_process(tmp_path, netns):
    server = Server(tmp_path, netns=netns)
    nft(netns, "add", "table", "inet", "kt_test")
    nft(netns, "add", "chain", "inet", "kt_test", "in", "{ type filter hook input priority 0; }")
    nft(netns, "add", "rule", "inet", "kt_test", "in", "tcp", "dport", str(server.port), "tcp", "flags", "syn",
        "drop")
    ktrace = Ktrace(tmp_path, duration="30s").started()
    try:
        client = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, TRAFFIC, "connect", "127.0.0.1",
                                   str(server.port)], stdout=subprocess.PIPE, text=True)
        time.sleep(0.3)  # the first SYN is dropped; the retransmission after the 1 s RTO gets through
        nft(netns, "delete", "table", "inet", "kt_test")
        out, _ = client.communicate(timeout=30)
        assert client.returncode == 0 and out.startswith("connected")
        ktrace.signal(signal.SIGINT)
        assert ktrace.finish() == 0, ktrace.stderr
        bundle = ktrace.bundle()
    finally:
        ktrace.kill()
        server.stop()

    established = [e for e in bundle.of_type("tcp_state") if e["dport"] == server.port
                   and e["old_state"] == "SYN_SENT" and e["new_state"] == "ESTABLISHED"]
    assert len(established) == 1
    assert established[0]["pid"] == client.pid and established[0]["comm"] == "kt-connect"
    assert 900 <= established[0]["handshake_ms"] <= 3500

    retransmits = [e for e in bundle.of_type("retransmit") if e["dport"] == server.port]
    assert retransmits, "no retransmit event for the dropped SYN"
    assert all(e["state"] == "SYN_SENT" for e in retransmits)
    assert {(e["pid"], e["comm"], e["attribution"]) for e in retransmits} == {(client.pid, "kt-connect",
                                                                               "socket_owner")}
    slow = [f for f in bundle.summary["findings"] if f["rule"] == "slow_handshake"]
    assert slow and slow[0]["subject"]["pid"] == client.pid
