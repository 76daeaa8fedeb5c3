"""--with-conntrack: events carry the conntrack entry of their flow, and the summary lists the NAT seen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ktrace.schemas import validate_bundle
from tests.helpers import record_during

NATTRAFFIC = str(Path(__file__).resolve().parent / "nattraffic.py")
BACKEND, VIP = "10.77.0.1", "10.96.0.10"
TCP_BACKEND, UDP_BACKEND, TCP_VIP, UDP_VIP = 8080, 5353, 80, 53
RULES = f"""table ip nat {{
  chain output {{
    type nat hook output priority -100;
    ip daddr {VIP} tcp dport {TCP_VIP} dnat to {BACKEND}:{TCP_BACKEND}
    ip daddr {VIP} udp dport {UDP_VIP} dnat to {BACKEND}:{UDP_BACKEND}
  }}
}}
"""


@pytest.fixture
def nat_netns() -> Iterator[str]:
    """A namespace where 10.96.0.10:80/tcp and :53/udp (a "Service VIP") are DNATed to 10.77.0.1 (a "backend")."""
    name = f"kt-ct-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        for cmd in (["ip", "link", "set", "lo", "up"], ["ip", "addr", "add", f"{BACKEND}/32", "dev", "lo"],
                    ["ip", "addr", "add", f"{VIP}/32", "dev", "lo"]):
            subprocess.run(["ip", "-n", name, *cmd[1:]], check=True)
        # the rules live in the namespace: deleting it deletes them
        subprocess.run(["ip", "netns", "exec", name, "nft", "-f", "-"], input=RULES, text=True, check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def talk_through_vip(netns: str) -> dict:
    out = subprocess.run(["ip", "netns", "exec", netns, sys.executable, NATTRAFFIC, str(TCP_BACKEND),
                          str(UDP_BACKEND), str(TCP_VIP), str(UDP_VIP)], capture_output=True, text=True, check=True,
                         timeout=60)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_tcp_events_through_a_dnat_carry_the_reply_tuple_of_the_backend(tmp_path, nat_netns):
    result = {}
    bundle = record_during(tmp_path, lambda: result.update(talk_through_vip(nat_netns)),
                           "--with-conntrack", "--with-connect-latency")
    csaddr, csport, cdaddr, cdport = result["tcp_client"]
    assert (cdaddr, cdport) == (VIP, TCP_VIP)
    client_events = [e for e in bundle.events if e["type"] in ("connect", "tcp_state")
                     and (e["saddr"], e["sport"], e["daddr"], e["dport"]) == (csaddr, csport, VIP, TCP_VIP)]
    assert {e["type"] for e in client_events} == {"connect", "tcp_state"}, client_events
    for event in client_events:
        ct = event["conntrack"]
        assert ct is not None, event
        assert ct["nat"] == "dnat"
        assert ct["reply"] == {"saddr": BACKEND, "sport": TCP_BACKEND, "daddr": csaddr, "dport": csport}
        assert ct["state"] in ("SYN_SENT", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT", "CLOSE")
    # the backend's accepted socket sees the reply tuple as its own: the same entry
    bsaddr, bsport, bdaddr, bdport = result["tcp_backend"]
    backend_events = [e for e in bundle.of_type("tcp_state")
                      if (e["saddr"], e["sport"], e["daddr"], e["dport"]) == (bsaddr, bsport, bdaddr, bdport)]
    assert backend_events and all(e["conntrack"] and e["conntrack"]["nat"] == "dnat" for e in backend_events)

    translations = bundle.summary["nat"]["translations"]
    tcp = next(t for t in translations if t["protocol"] == "tcp" and t["original"] == f"{VIP}:{TCP_VIP}")
    assert tcp["translated"] == f"{BACKEND}:{TCP_BACKEND}" and tcp["nat"] == "dnat"
    assert tcp["connections"] >= 1 and tcp["processes"]
    assert bundle.summary["nat"]["reads"]["failed"] == 0
    assert validate_bundle({k: v for k, v in bundle.paths.items() if k != "bundle.tgz"}) == []


def test_a_udp_flow_through_a_dnat_carries_its_entry(tmp_path, nat_netns):
    result = {}
    bundle = record_during(tmp_path, lambda: result.update(talk_through_vip(nat_netns)), "--with-conntrack")
    saddr, sport, _, _ = result["udp_client"]
    flows = [f for f in bundle.of_type("udp_flow") if f["direction"] == "egress"
             and (f["saddr"], f["sport"], f["daddr"], f["dport"]) == (saddr, sport, VIP, UDP_VIP)]
    assert flows, bundle.of_type("udp_flow")
    ct = flows[0]["conntrack"]
    assert ct["nat"] == "dnat" and ct["state"] in ("REPLIED", "ASSURED")
    assert ct["reply"] == {"saddr": BACKEND, "sport": UDP_BACKEND, "daddr": saddr, "dport": sport}
    udp = [t for t in bundle.summary["nat"]["translations"] if t["protocol"] == "udp"]
    assert {(t["original"], t["translated"]) for t in udp} >= {(f"{VIP}:{UDP_VIP}", f"{BACKEND}:{UDP_BACKEND}")}


def test_without_the_option_no_event_has_a_conntrack_field_and_the_summary_none(tmp_path, nat_netns):
    bundle = record_during(tmp_path, lambda: talk_through_vip(nat_netns), "--with-connect-latency")
    assert not any("conntrack" in e for e in bundle.events)
    assert bundle.summary["nat"] is None
    assert bundle.summary["options"]["with_conntrack"] is False


CONNTRACK_MAX = Path("/proc/sys/net/netfilter/nf_conntrack_max")
# one connection through the VIP, a pause long enough for two conntrack reads of this namespace (the baseline of
# its counters), then 60 more while the table holds only LIMIT entries: the SYNs beyond it are dropped
FLOOD = f"""
import socket, time
listener = socket.socket()
listener.bind(("{BACKEND}", {TCP_BACKEND}))
listener.listen(128)
def connect():
    s = socket.socket()
    s.settimeout(0.2)
    try:
        s.connect(("{VIP}", {TCP_VIP}))
        return s
    except OSError:
        s.close()
held = [connect()]
time.sleep(4.5)
held += [connect() for _ in range(60)]
print(sum(s is None for s in held))
"""
LIMIT = 24


def test_a_full_conntrack_table_is_a_critical_finding(tmp_path, nat_netns):
    before = CONNTRACK_MAX.read_text()
    out = []
    try:
        CONNTRACK_MAX.write_text(str(LIMIT))  # the limit of every namespace: ours is the only one filling up
        bundle = record_during(tmp_path, lambda: out.append(subprocess.run(
            ["ip", "netns", "exec", nat_netns, sys.executable, "-c", FLOOD], capture_output=True, text=True,
            check=True, timeout=120).stdout), "--with-conntrack", "--probes=tcp_state,connect")
    finally:
        CONNTRACK_MAX.write_text(before)
    failed = int(out[0])
    assert failed > 0  # the kernel did drop SYNs: the table was full
    netns = os.stat(f"/run/netns/{nat_netns}").st_ino
    table = next(t for t in bundle.summary["nat"]["tables"] if t["netns"] == netns)
    assert table["limit"] == LIMIT and table["entries_max"] >= LIMIT - 1
    assert table["drop"] + table["early_drop"] > 0
    found = [f for f in bundle.summary["findings"] if f["rule"] == "conntrack_pressure" and f["severity"] == "critical"]
    assert len(found) == 1 and found[0]["subject"] == table, found
    assert validate_bundle({k: v for k, v in bundle.paths.items() if k != "bundle.tgz"}) == []
