"""--sample with TCP between two namespaces: both ends of each connection are kept or left out together.

The server is tests/kernel/traffic.py in one namespace, the client makes 40 connections from the other, every
other one non-blocking, and 20 to a closed port of the server (refused with a reset from no socket), and prints the
local port of each (getsockname()). The decision is a hash of the two ports
(bpf/common.bpf.h kt_sample_ports), so which connections are kept can be worked out from the client's own record.
A connecting socket enters SYN_SENT before the kernel picks its port: with --sample that change waits in the
kernel until the port is known and then carries it; without --sample it is sent at once, with port 0, as always.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest

from tests.helpers import TRAFFIC, Ktrace, kept_by_ports, wait_for
from tests.tcpnet import CLIENT_ADDR, SERVER_ADDR, TwoHosts

CONNECTIONS = 40
REFUSED = 20
CLOSED_PORT = 47002  # nothing listens on it in the server's namespace
TCP_FAMILIES = ("tcp_state", "connect", "retransmit", "reset")


@pytest.fixture
def net():
    with TwoHosts("smp") as net:
        yield net


@pytest.mark.parametrize("every", [4, 1])
def test_sampled_tcp_keeps_or_drops_both_ends_of_each_connection_together(tmp_path, net, every):
    port_file = tmp_path / "server.port"
    before = {ns: net.nstat(ns) for ns in (net.client, net.server)}
    ktrace = Ktrace(tmp_path, f"--sample={every}", duration="120s").started()
    try:
        server = net.popen(net.server, sys.executable, TRAFFIC, "server", str(port_file), SERVER_ADDR)
        wait_for(port_file, server)
        server_port = int(port_file.read_text())
        out = net.run(net.client, sys.executable, TRAFFIC, "pings", SERVER_ADDR, str(server_port),
                      str(CONNECTIONS), str(CLOSED_PORT), str(REFUSED)).stdout
        server.kill()  # its listening socket closes inside the window
        server.wait()
    finally:
        ktrace.signal(signal.SIGINT)
    assert ktrace.finish() in (0, 3), ktrace.stderr
    bundle = ktrace.bundle()
    opens = {ns: net.nstat(ns) - before[ns] for ns in before}

    record = json.loads(out)
    ports, refused = record["ok"], record["refused"]
    assert len(ports) == CONNECTIONS == len(set(ports)) and len(refused) == REFUSED == len(set(refused))
    kept = {p for p in ports if kept_by_ports(p, server_port, every)}
    if every > 1:
        assert kept and kept != set(ports)  # 40 ports: some of each (all alike has odds of about 1e-5)
    else:
        assert kept == set(ports)

    states = bundle.of_type("tcp_state")
    client = [e for e in states if e["saddr"] == CLIENT_ADDR and e["daddr"] == SERVER_ADDR
              and e["dport"] == server_port]
    server_side = [e for e in states if e["saddr"] == SERVER_ADDR and e["sport"] == server_port
                   and e["dport"] in ports]
    syn_sent = [e for e in client if e["new_state"] == "SYN_SENT"]
    assert all(e["comm"] == "kt-pings" for e in syn_sent)
    if every > 1:
        # held until the port was known, then sent with it: exactly the connections the hash keeps
        assert sorted(e["sport"] for e in syn_sent) == sorted(kept)
        assert {e["sport"] for e in client} == kept
    else:
        # unchanged without --sample: sent at once, before the kernel picked the port; one per active open
        assert len(syn_sent) == CONNECTIONS and {e["sport"] for e in syn_sent} == {0}
        assert {e["sport"] for e in client if e["new_state"] != "SYN_SENT"} == kept
    established = [e for e in client if e["old_state"] == "SYN_SENT" and e["new_state"] == "ESTABLISHED"]
    assert sorted(e["sport"] for e in established) == sorted(kept)
    # the server's half of each connection: the same decision, the one predicted
    assert sorted(e["dport"] for e in server_side if e["old_state"] == "LISTEN") == sorted(kept)
    assert {e["dport"] for e in server_side} == kept
    per_connection = Counter(e["dport"] for e in server_side)
    assert all(per_connection[p] >= 3 for p in kept)  # SYN_RECV, ESTABLISHED and the close
    connects = [e for e in bundle.of_type("connect") if e["dport"] == server_port and e["daddr"] == SERVER_ADDR]
    assert sorted(e["sport"] for e in connects) == sorted(kept)
    # a non-blocking connect() returns before the handshake: there its return settled the SYN_SENT, elsewhere the
    # change to ESTABLISHED inside the call did
    assert {e["sport"]: e["errno"] for e in connects} == {
        p: "EINPROGRESS" if i % 2 else None for i, p in enumerate(ports) if p in kept}
    # the kernel's own count of the connections made (nstat in each namespace)
    assert opens[net.client]["TcpActiveOpens"] == CONNECTIONS + REFUSED
    assert opens[net.server]["TcpPassiveOpens"] == CONNECTIONS
    # a listening socket is no flow: always kept
    listening = [e for e in states if e["saddr"] == SERVER_ADDR and e["sport"] == server_port
                 and "LISTEN" in (e["old_state"], e["new_state"]) and e["new_state"] != "SYN_RECV"]
    assert [(e["old_state"], e["new_state"]) for e in listening] == [("CLOSE", "LISTEN"), ("LISTEN", "CLOSE")]

    # refused: the client's SYN_SENT settled by the reset it received; the server's reset, from no socket, by the
    # packet's ports; both the same decision
    kept_refused = {p for p in refused if kept_by_ports(p, CLOSED_PORT, every)}
    to_closed = [e for e in states if e["saddr"] == CLIENT_ADDR and e["dport"] == CLOSED_PORT]
    refusals = [e for e in to_closed if e["new_state"] == "CLOSE" and e.get("error") == "ECONNREFUSED"]
    assert sorted(e["sport"] for e in refusals) == sorted(kept_refused)
    refused_syn_sent = [e for e in to_closed if e["new_state"] == "SYN_SENT"]
    assert sorted(e["sport"] for e in refused_syn_sent) == (sorted(kept_refused) if every > 1 else [0] * REFUSED)
    assert opens[net.server]["TcpOutRsts"] == REFUSED
    resets = bundle.of_type("reset")
    received = [e for e in resets if e["direction"] == "received" and e["dport"] == CLOSED_PORT
                and e["saddr"] == CLIENT_ADDR]
    sent = [e for e in resets if e["direction"] == "sent" and e["sport"] == CLOSED_PORT and e["saddr"] == SERVER_ADDR]
    assert sorted(e["sport"] for e in received) == sorted(kept_refused)
    assert sorted(e["dport"] for e in sent) == sorted(kept_refused)
    refused_connects = [e for e in bundle.of_type("connect") if e["dport"] == CLOSED_PORT]
    assert sorted(e["sport"] for e in refused_connects) == sorted(kept_refused)
    assert all(e["errno"] == "ECONNREFUSED" for e in refused_connects)

    summary = bundle.summary
    assert summary["losses"]["balanced"], summary["losses"]
    sampled_out = summary["losses"]["by_family"]["tcp_state"]["sampled_out"]
    print(f"\n--sample={every}: kept {len(kept)}/{CONNECTIONS} connections and {len(kept_refused)}/{REFUSED} refused "
          f"ones as predicted; tcp_state {summary['losses']['by_family']['tcp_state']}")
    if every > 1:
        # a client left out: SYN_SENT, ESTABLISHED, FIN_WAIT1, FIN_WAIT2, TIME_WAIT; the server: at least 3
        assert sampled_out >= 8 * (CONNECTIONS - len(kept))
        assert summary["losses"]["by_family"]["connect"]["sampled_out"] >= CONNECTIONS - len(kept)
        decisions = {row["family"]: row["decision"] for row in summary["sampling"]["families"]}
        assert all(decisions[f] == "ports" for f in TCP_FAMILIES)
        assert summary["tcp"]["sample_every"] == every
    else:
        assert sampled_out == 0 and summary["sampling"] == {"every": 1, "families": []}


BLACK_HOLE_PORT = 47001


def test_sampled_syn_sent_still_waiting_for_its_port_when_the_window_ends_is_written_not_lost(tmp_path, net):
    net.nft(net.server, f"""table inet kt_smp {{
  chain in {{
    type filter hook prerouting priority -300;
    tcp dport {BLACK_HOLE_PORT} drop
  }}
}}
""")
    ktrace = Ktrace(tmp_path, "--sample=4", duration="120s").started()
    try:
        # a blocking connect() to a port that never answers: no other event until its first SYN retransmit (1 s)
        client = net.popen(net.client, sys.executable, TRAFFIC, "wait-connect", SERVER_ADDR, str(BLACK_HOLE_PORT),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        local_port = 0
        for _ in range(500):
            lines = net.run(net.client, "ss", "-Htn", "state", "syn-sent",
                            f"( dport = :{BLACK_HOLE_PORT} )").stdout.split()
            if lines:
                local_port = int(next(w for w in lines if w.startswith(CLIENT_ADDR)).rsplit(":", 1)[1])
                break
            time.sleep(0.01)
        assert local_port, "the connect never reached SYN_SENT"
    finally:
        ktrace.signal(signal.SIGINT)
    assert ktrace.finish() in (0, 3), ktrace.stderr
    client.kill()
    client.wait()
    bundle = ktrace.bundle()

    syn_sent = [e for e in bundle.of_type("tcp_state") if e["new_state"] == "SYN_SENT"
                and e["daddr"] == SERVER_ADDR and e["dport"] == BLACK_HOLE_PORT]
    retransmits = [e for e in bundle.of_type("retransmit") if e["dport"] == BLACK_HOLE_PORT]
    if syn_sent and syn_sent[0]["sport"] == 0:
        # still waiting when the probes were detached: read from the kernel's held map and written as it was
        assert len(syn_sent) == 1 and syn_sent[0]["comm"] == "kt-connect" and not retransmits
    elif syn_sent:
        # a SYN retransmit came first and settled it by the ports, as the hash keeps it
        assert len(syn_sent) == 1 and syn_sent[0]["sport"] == local_port
        assert kept_by_ports(local_port, BLACK_HOLE_PORT, 4)
    else:
        # settled by a SYN retransmit and left out, counted
        assert not kept_by_ports(local_port, BLACK_HOLE_PORT, 4)
        assert bundle.summary["losses"]["by_family"]["tcp_state"]["sampled_out"] >= 1
    assert bundle.summary["losses"]["balanced"], bundle.summary["losses"]
