"""TCP between two network namespaces with packets lost on the way, checked against each namespace's own counters
(nstat): retransmitted segments under random loss, SYN-ACK retransmits, resets from a closed port, and connects the
application gave up on."""

from __future__ import annotations

import json
import shutil
import sys
import time

import pytest

from ktrace.probes import FAMILY_BY_NAME
from ktrace.schemas import validate_bundle
from tests.helpers import TRAFFIC, record_during, wait_for
from tests.tcpnet import CLIENT_ADDR, SERVER_ADDR, TwoHosts

IPERF_PORT = 5201
RETRANSMIT_HOOKS = [hook.label for hook in FAMILY_BY_NAME["retransmit"].chain[:2]]  # tp_btf, then the tracepoint
LISTEN_PORT_FILE = "server.port"


def _drop_rules(match: str) -> str:
    """Drop what match selects as it arrives in a namespace, before anything else sees it."""
    return f"""table inet kt_loss {{
  chain in {{
    type filter hook prerouting priority -300;
    {match} drop
  }}
}}
"""


def _wait_listening(net: TwoHosts, ns: str, port: int) -> None:
    """Until something listens on port in ns (iperf3 has no ready signal of its own)."""
    for _ in range(300):
        if net.run(ns, "ss", "-Hltn", f"( sport = :{port} )").stdout.strip():
            return
        time.sleep(0.02)
    raise AssertionError(f"nothing listens on port {port} in {ns}")


def _server(net: TwoHosts, tmp_path) -> int:
    """traffic.py's server, listening on SERVER_ADDR in the server namespace: its port."""
    port_file = tmp_path / LISTEN_PORT_FILE
    proc = net.popen(net.server, sys.executable, TRAFFIC, "server", str(port_file), SERVER_ADDR)
    wait_for(port_file, proc)
    return int(port_file.read_text())


def _hook_args(hook: str) -> list[str]:
    """Options that make the loader take this retransmit alternative."""
    return [f"--skip-hook={h}" for h in RETRANSMIT_HOOKS[:RETRANSMIT_HOOKS.index(hook)]]


def _chosen(bundle, family: str) -> str:
    return next(row["chosen"] for row in bundle.summary["probes"] if row["family"] == family)


@pytest.mark.parametrize("hook", RETRANSMIT_HOOKS)
def test_retransmitted_segments_under_random_loss_match_the_kernels_tcp_retrans_segs(tmp_path, hook):
    if shutil.which("iperf3") is None:
        pytest.fail("iperf3 is needed (make setup installs it)")
    with TwoHosts("loss") as net:
        # 5% of what the server sends is lost on the way to the client. Not in the server's own output hook:
        # a drop there fails the transmit locally, and TCP mostly sends the data again as new data, without a
        # retransmit to count
        net.nft(net.client, _drop_rules(f"ip saddr {SERVER_ADDR} numgen random mod 100 < 5"))
        server = net.popen(net.server, "iperf3", "-s", "-1", "-B", SERVER_ADDR, "-p", str(IPERF_PORT))
        _wait_listening(net, net.server, IPERF_PORT)
        before = {ns: net.nstat(ns) for ns in (net.server, net.client)}

        def transfer() -> None:
            # -R: the server sends; bounded by bytes
            net.run(net.client, "iperf3", "-c", SERVER_ADDR, "-p", str(IPERF_PORT), "-R", "-n", "16M",
                    "--connect-timeout", "5000")
            server.wait(timeout=60)

        bundle = record_during(tmp_path, transfer, f"--ports={IPERF_PORT}", *_hook_args(hook))
        after = {ns: net.nstat(ns) for ns in (net.server, net.client)}

    assert _chosen(bundle, "retransmit") == hook
    kernel = {ns: after[ns]["TcpRetransSegs"] - before[ns]["TcpRetransSegs"] for ns in before}
    assert kernel[net.server] >= 50, kernel  # the loss really made the server retransmit
    server_side = [e for e in bundle.of_type("retransmit") if e["saddr"] == SERVER_ADDR]
    data = [e for e in server_side if e["kind"] == "data"]
    # the random loss can take a SYN-ACK too: the kernel counts it in TcpRetransSegs and TcpExtTCPSynRetrans
    synacks = [e for e in server_side if e["kind"] == "synack"]
    syn_retrans = after[net.server]["TcpExtTCPSynRetrans"] - before[net.server]["TcpExtTCPSynRetrans"]
    assert len(synacks) == syn_retrans, (len(synacks), syn_retrans)
    segments = sum(e["segments"] for e in data if e["err"] == 0) + len(synacks)
    print(f"\nserver: {len(data)} skbs, {len(synacks)} SYN-ACKs, {segments} segments; TcpRetransSegs server "
          f"{kernel[net.server]}, client {kernel[net.client]}; summary {bundle.summary['tcp']['retransmitted']}")
    assert data and abs(segments - kernel[net.server]) <= 0.1 * kernel[net.server], (segments, kernel)
    # the skbs are fewer than the segments when the kernel retransmits GSO skbs
    assert len(data) <= segments
    total = bundle.summary["tcp"]["retransmitted"]
    both = kernel[net.server] + kernel[net.client]
    assert abs(total["segments"] - both) <= 0.1 * both, (total, kernel)
    assert total["skbs"] == len(bundle.of_type("retransmit")) - total["synacks"]


@pytest.mark.parametrize("hook", RETRANSMIT_HOOKS)
def test_syn_acks_lost_on_the_way_are_retransmits_of_kind_synack_as_the_kernel_counts_them(tmp_path, hook):
    with TwoHosts("synack") as net:
        port = _server(net, tmp_path)
        net.nft(net.client, _drop_rules(f"ip saddr {SERVER_ADDR} tcp sport {port} tcp flags & (syn | ack) == "
                                        "syn | ack"))
        before = net.nstat(net.server)
        result: dict = {}

        def connects() -> None:
            # the SYN-ACKs never arrive: the client gives up after 3.5 s; meanwhile the server resends its SYN-ACK
            out = net.run(net.client, sys.executable, TRAFFIC, "give-up", SERVER_ADDR, str(port), "2", "3.5").stdout
            result.update(json.loads(out.strip().splitlines()[-1]))

        bundle = record_during(tmp_path, connects, f"--ports={port}", *_hook_args(hook))
        after = net.nstat(net.server)

    assert _chosen(bundle, "retransmit") == hook
    assert result["timeouts"] == 2
    syn_retrans = after["TcpExtTCPSynRetrans"] - before["TcpExtTCPSynRetrans"]
    retrans_segs = after["TcpRetransSegs"] - before["TcpRetransSegs"]
    assert syn_retrans >= 2 and syn_retrans == retrans_segs  # the server retransmitted SYN-ACKs and nothing else
    synacks = [e for e in bundle.of_type("retransmit") if e["kind"] == "synack"]
    print(f"\nsynack events {len(synacks)}; TcpExtTCPSynRetrans {syn_retrans}, TcpRetransSegs {retrans_segs}")
    assert len(synacks) == syn_retrans
    assert all(e["saddr"] == SERVER_ADDR and e["sport"] == port and e["daddr"] == CLIENT_ADDR
               and e["dport"] in result["ports"] and e["segments"] == 1 and e["state"] == "NEW_SYN_RECV"
               for e in synacks)
    assert all(e["comm"] == "kt-server" for e in synacks)
    assert bundle.summary["tcp"]["retransmitted"]["synacks"] == syn_retrans
    assert validate_bundle({k: v for k, v in bundle.paths.items() if k != "bundle.tgz"}) == []


def test_a_reset_from_a_closed_port_is_filed_under_the_namespace_that_sent_it(tmp_path):
    attempts = 5
    with TwoHosts("rst") as net:
        closed = 47999  # nothing listens in the server namespace
        before = net.nstat(net.server)
        script = ("import socket\n"
                  f"for _ in range({attempts}):\n"
                  "    try:\n"
                  f"        socket.create_connection(('{SERVER_ADDR}', {closed}), timeout=5)\n"
                  "    except ConnectionRefusedError:\n"
                  "        pass\n")
        bundle = record_during(tmp_path, lambda: net.run(net.client, sys.executable, "-c", script), f"--ports={closed}")
        after = net.nstat(net.server)
        server_ns, client_ns = net.inode(net.server), net.inode(net.client)

    out_rsts = after["TcpOutRsts"] - before["TcpOutRsts"]
    assert out_rsts == attempts
    sent = [e for e in bundle.of_type("reset") if e["direction"] == "sent"]
    print(f"\nresets sent {len(sent)} in netns {sorted({e['netns_pkt'] for e in sent})} (task netns "
          f"{sorted({e['netns'] for e in sent})}); TcpOutRsts {out_rsts}; server netns {server_ns}")
    assert len(sent) == out_rsts
    assert all(e["sk"] == "0x0" and e["reason"] == "NO_SOCKET" and e["saddr"] == SERVER_ADDR for e in sent)
    assert {e["netns_pkt"] for e in sent} == {server_ns}
    received = [e for e in bundle.of_type("reset") if e["direction"] == "received"]
    assert len(received) == attempts and {e["netns_pkt"] for e in received} == {client_ns}
    rows = [r for r in bundle.summary["tcp"]["resets"] if r["direction"] == "sent"]
    assert rows == [{"pid": None, "comm": None, "direction": "sent", "reason": "NO_SOCKET", "netns": server_ns,
                     "count": attempts}]


def test_a_client_giving_up_on_a_black_holed_port_is_a_syn_timeout_finding_with_the_remote(tmp_path):
    attempts = 3
    with TwoHosts("giveup") as net:
        port = 47998
        net.nft(net.server, _drop_rules(f"tcp dport {port} tcp flags & (syn | ack) == syn"))
        before = net.nstat(net.client)
        result: dict = {}
        proc_pid: list[int] = []

        def connects() -> None:
            # 2.5 s each: the SYN and its retransmits go unanswered (at 1 s and, with tcp_syn_linear_timeouts
            # (6.9+), at 2 s; at 3 s before that), then the client closes the socket
            proc = net.popen(net.client, sys.executable, TRAFFIC, "give-up", SERVER_ADDR, str(port), str(attempts),
                             "2.5", stdout=-1, text=True)
            out, _ = proc.communicate(timeout=60)
            proc_pid.append(proc.pid)
            result.update(json.loads(out.strip().splitlines()[-1]))

        bundle = record_during(tmp_path, connects, f"--ports={port}")
        after = net.nstat(net.client)

    assert result["timeouts"] == attempts
    active_opens = after["TcpActiveOpens"] - before["TcpActiveOpens"]
    syn_retrans = after["TcpExtTCPSynRetrans"] - before["TcpExtTCPSynRetrans"]
    assert active_opens == attempts
    closes = [e for e in bundle.of_type("tcp_state") if e["old_state"] == "SYN_SENT" and e["new_state"] == "CLOSE"]
    print(f"\nabandoned {bundle.summary['tcp']['connections']['abandoned']}, syn_retransmits "
          f"{[e['syn_retransmits'] for e in closes]}; TcpActiveOpens {active_opens}, TcpExtTCPSynRetrans {syn_retrans}")
    assert len(closes) == attempts and all("error" not in e for e in closes)
    assert sum(e["syn_retransmits"] for e in closes) == syn_retrans >= attempts
    assert bundle.summary["tcp"]["connections"]["abandoned"] == attempts
    assert bundle.summary["tcp"]["connections"]["timed_out"] == 0
    findings = [f for f in bundle.summary["findings"] if f["rule"] == "syn_timeout"]
    assert len(findings) == 1
    assert findings[0]["subject"] == {"pid": proc_pid[0], "comm": "kt-giveup", "remote": f"{SERVER_ADDR}:{port}",
                                      "processes": 1, "pids": [{"pid": proc_pid[0], "count": attempts}],
                                      "pids_omitted": 0, "timed_out": 0, "abandoned": attempts}
    assert findings[0]["severity"] == "critical" and findings[0]["evidence"]["count"] == attempts
    assert {e["sport"] for e in closes} == set(result["ports"])


def test_curl_giving_up_on_a_black_holed_port_is_counted_per_attempt(tmp_path):
    if shutil.which("curl") is None:
        pytest.fail("curl is needed (make setup installs it)")
    attempts = 3
    with TwoHosts("curl") as net:
        port = 47997
        net.nft(net.server, _drop_rules(f"tcp dport {port} tcp flags & (syn | ack) == syn"))
        before = net.nstat(net.client)
        pids: list[int] = []

        def connects() -> None:
            for _ in range(attempts):
                curl = net.popen(net.client, "curl", "--silent", "--connect-timeout", "2.5",
                                 f"http://{SERVER_ADDR}:{port}/")
                assert curl.wait(timeout=30) == 28  # CURLE_OPERATION_TIMEDOUT
                pids.append(curl.pid)

        bundle = record_during(tmp_path, connects, f"--ports={port}")
        after = net.nstat(net.client)

    assert after["TcpActiveOpens"] - before["TcpActiveOpens"] == attempts
    closes = [e for e in bundle.of_type("tcp_state") if e["old_state"] == "SYN_SENT" and e["new_state"] == "CLOSE"]
    assert sorted(e["pid"] for e in closes) == sorted(pids) and all("error" not in e for e in closes)
    assert sum(e["syn_retransmits"] for e in closes) == after["TcpExtTCPSynRetrans"] - before["TcpExtTCPSynRetrans"]
    assert bundle.summary["tcp"]["connections"]["abandoned"] == attempts
    findings = [f for f in bundle.summary["findings"] if f["rule"] == "syn_timeout"]
    assert sum(f["evidence"]["count"] for f in findings) == sum(f["subject"]["abandoned"] for f in findings) == attempts
    assert all(f["subject"]["comm"] == "curl" and f["subject"]["remote"] == f"{SERVER_ADDR}:{port}"
               and f["severity"] == "critical" for f in findings)
