"""--with-conntrack: events carry the conntrack entry of their flow, and the summary lists the NAT seen."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ktrace.schemas import validate_bundle
from tests.helpers import Rig, record_during

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


def conntrack_list(netns: str, proto: str = "udp") -> list[dict]:
    """`conntrack -L` inside the namespace, the ground truth: each entry's original and reply tuples."""
    out = subprocess.run(["ip", "netns", "exec", netns, "conntrack", "-L", "-p", proto], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    return _parse_conntrack(out)


def _parse_conntrack(out: str) -> list[dict]:
    entries = []
    for line in out.splitlines():
        fields = dict.fromkeys(("src", "dst", "sport", "dport"))
        tuples = []
        for word in line.split():
            key, _, value = word.partition("=")
            if key in fields:
                fields[key] = value
                if key == "dport":
                    tuples.append((fields["src"], int(fields["sport"]), fields["dst"], int(fields["dport"])))
        if len(tuples) >= 2:
            entries.append({"orig": tuples[0], "reply": tuples[1], "unreplied": "[UNREPLIED]" in line})
    return entries


def reply_of(entry: dict) -> dict:
    saddr, sport, daddr, dport = entry["reply"]
    return {"saddr": saddr, "sport": sport, "daddr": daddr, "dport": dport}


def flow_tuple(flow: dict) -> tuple[str, int, str, int]:
    return flow["saddr"], flow["sport"], flow["daddr"], flow["dport"]


def test_udp_flows_of_both_ends_through_a_dnat_match_the_entry_in_all_four_directions(tmp_path, nat_netns):
    """One namespace, the client and the backend on its loopback: all four flows are of the one DNAT entry."""
    result, listed = {}, []

    def work() -> None:
        result.update(talk_through_vip(nat_netns))
        listed.extend(conntrack_list(nat_netns))

    bundle = record_during(tmp_path, work, "--with-conntrack", "--probes=tcp_state,udp,udp_peers")
    client, backend = tuple(result["udp_client"]), tuple(result["udp_backend"])
    (truth,) = [e for e in listed if e["orig"] == client]
    assert truth["reply"] == backend and not truth["unreplied"]
    netns = os.stat(f"/run/netns/{nat_netns}").st_ino
    expected = {  # (direction, the flow's source → destination): which tuple of the entry it is
        ("egress", client): "original",  # the query out of the client, to the VIP
        ("ingress", backend[2:] + backend[:2]): "reply_reversed",  # the query into the backend
        ("egress", backend): "reply",  # the answer out of the backend
        ("ingress", client[2:] + client[:2]): "original_reversed",  # the answer into the client, from the VIP
    }
    flows = {(f["direction"], flow_tuple(f)): f for f in bundle.of_type("udp_flow")
             if {flow_tuple(f), flow_tuple(f)[2:] + flow_tuple(f)[:2]} & {client, backend}}
    assert set(flows) == set(expected), flows
    for key, matched in expected.items():
        flow = flows[key]
        assert flow["netns_sk"] == netns
        ct = flow["conntrack"]
        assert ct is not None, (key, flow)
        assert (ct["matched"], ct["nat"], ct["reply"], ct["netns"]) == (matched, "dnat", reply_of(truth), netns), key
        assert ct["state"] in ("REPLIED", "ASSURED")
    assert validate_bundle({k: v for k, v in bundle.paths.items() if k != "bundle.tgz"}) == []


SERVICE_VIP, DNSMASQ_PORT, ANSWER = "10.96.0.53", 5353, "10.1.2.3"
QUERIES = 5
SERVER_TRACKS = """table inet kt10filter {
  chain input {
    type filter hook input priority 0;
    ct state new,established accept
  }
}
"""


def netns_inode(path: str) -> int:
    return os.stat(path).st_ino


class DnsBehindVip(Rig):
    """dig in a client netns asks 10.96.0.53:53/udp (a Service VIP), which nftables DNATs to dnsmasq on :5353 in a
    server netns. dnat_in="client": the client's netns does it (output hook), over one veth pair to the server;
    dnat_in="node": the node's (this) namespace does it (prerouting), routing between two veth pairs, as kube-proxy
    does for pods. The server's netns tracks connections only when asked (a `ct state` rule, as a firewall has);
    else its conntrack table stays empty."""

    def __init__(self, tmp_path, dnat_in: str, server_tracks: bool) -> None:
        n = os.getpid() % 100000
        self.client, self.server = f"kt10nat-c-{n}", f"kt10nat-s-{n}"
        self.dnat_in, self.server_tracks = dnat_in, server_tracks
        self.node_table = f"kt10nat{n}"
        self.host_veths = (f"kt10hc{n}", f"kt10hs{n}")
        if dnat_in == "client":
            self.client_addr, self.server_addr = "10.78.0.1", "10.78.0.2"
        else:
            self.client_addr, self.server_addr = "10.178.1.2", "10.178.2.2"
        self.log = tmp_path / "dnsmasq.log"
        self.dnsmasq: subprocess.Popen | None = None
        self._made: list[str] = []  # what close() undoes

    def _run(self, *cmd: str, netns: str | None = None, stdin: str | None = None) -> None:
        prefix = ["ip", "netns", "exec", netns] if netns else []
        subprocess.run([*prefix, *cmd], input=stdin, text=True, check=True, capture_output=True)

    def _start(self) -> None:
        n = os.getpid() % 100000
        for ns in (self.client, self.server):
            self._run("ip", "netns", "add", ns)
            self._made.append(ns)
            self._run("ip", "link", "set", "lo", "up", netns=ns)
        dnat = f"ip daddr {SERVICE_VIP} udp dport 53 dnat to {self.server_addr}:{DNSMASQ_PORT}"
        if self.dnat_in == "client":
            self._run("ip", "link", "add", f"kt10c{n}", "netns", self.client, "type", "veth", "peer", "name",
                      f"kt10s{n}", "netns", self.server)
            for ns, dev, addr in ((self.client, f"kt10c{n}", self.client_addr),
                                  (self.server, f"kt10s{n}", self.server_addr)):
                self._run("ip", "addr", "add", f"{addr}/24", "dev", dev, netns=ns)
                self._run("ip", "link", "set", dev, "up", netns=ns)
            self._run("ip", "route", "add", f"{SERVICE_VIP}/32", "via", self.server_addr, netns=self.client)
            self._run("nft", "-f", "-", netns=self.client, stdin=(
                f"table ip kt10nat {{\n chain output {{\n type nat hook output priority -100;\n {dnat}\n }}\n}}\n"))
        else:
            for ns, dev, host_dev, net in ((self.client, f"kt10c{n}", self.host_veths[0], "10.178.1"),
                                           (self.server, f"kt10s{n}", self.host_veths[1], "10.178.2")):
                self._run("ip", "link", "add", dev, "netns", ns, "type", "veth", "peer", "name", host_dev)
                self._run("ip", "addr", "add", f"{net}.2/24", "dev", dev, netns=ns)
                self._run("ip", "link", "set", dev, "up", netns=ns)
                self._run("ip", "route", "add", "default", "via", f"{net}.1", netns=ns)
                self._run("ip", "addr", "add", f"{net}.1/24", "dev", host_dev)
                self._run("ip", "link", "set", host_dev, "up")
                # forwarding on these two devices only, not the node's ip_forward
                self._run("sysctl", "-qw", f"net.ipv4.conf.{host_dev}.forwarding=1")
            self._run("nft", "-f", "-", stdin=(
                f"table ip {self.node_table} {{\n chain prerouting {{\n type nat hook prerouting priority -100;\n"
                f" iifname \"{self.host_veths[0]}\" {dnat}\n }}\n}}\n"))
            self._made.append("node table")
        if self.server_tracks:
            self._run("nft", "-f", "-", netns=self.server, stdin=SERVER_TRACKS)
        with open(self.log, "wb") as log:
            self.dnsmasq = subprocess.Popen(
                ["ip", "netns", "exec", self.server, "dnsmasq", "--keep-in-foreground", "--log-queries",
                 "--log-facility=-", "--no-resolv", "--no-hosts", "--bind-interfaces", "--user=root",
                 f"--listen-address={self.server_addr}", f"--port={DNSMASQ_PORT}", f"--address=/svc.test/{ANSWER}",
                 "--pid-file="], stdout=log, stderr=subprocess.STDOUT)
        for _ in range(200):  # bounded: dnsmasq binds within milliseconds
            if self.dnsmasq.poll() is not None:
                raise RuntimeError(f"dnsmasq exited {self.dnsmasq.returncode}: {self.log.read_text()}")
            listening = subprocess.run(["ip", "netns", "exec", self.server, "ss", "-Hlun", "sport", "=",
                                        f":{DNSMASQ_PORT}"], capture_output=True, text=True).stdout
            if listening.strip():
                return
            time.sleep(0.05)
        raise RuntimeError("dnsmasq never listened")

    @property
    def dnat_netns(self) -> str | None:
        """Where the DNAT entry lives: the client's netns, or the node's (None: this one)."""
        return self.client if self.dnat_in == "client" else None

    def dig(self) -> str:
        return subprocess.run(["ip", "netns", "exec", self.client, "dig", f"@{SERVICE_VIP}", "-p", "53", "svc.test",
                               "A", "+short", "+tries=1", "+time=5"], capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()

    def queries_logged(self) -> int:
        return sum(1 for line in self.log.read_text().splitlines() if "query[A] svc.test from" in line)

    def close(self) -> None:
        if self.dnsmasq is not None and self.dnsmasq.poll() is None:
            self.dnsmasq.terminate()
            self.dnsmasq.wait(timeout=10)
        if "node table" in self._made:
            subprocess.run(["nft", "delete", "table", "ip", self.node_table], check=False, capture_output=True)
        for ns in (self.client, self.server):  # the veth pairs (and the host ends) go with the namespaces
            if ns in self._made:
                subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        self._made.clear()


def conntrack_list_in(netns: str | None) -> list[dict]:
    if netns is not None:
        return conntrack_list(netns)
    out = subprocess.run(["conntrack", "-L", "-p", "udp", "--orig-dst", SERVICE_VIP], capture_output=True,
                         text=True, check=True, timeout=30).stdout
    return _parse_conntrack(out)


@pytest.mark.parametrize(("dnat_in", "server_tracks"), [("client", False), ("client", True), ("node", False)],
                         ids=["dnat-in-client-server-tracks-nothing", "dnat-in-client-server-tracks-its-own",
                              "dnat-in-node"])
def test_dns_through_a_service_vip_every_flow_carries_the_entry_conntrack_lists(tmp_path, dnat_in, server_tracks):
    """dig → VIP DNAT → dnsmasq, both ends' flows both ways. Each flow carries the entry `conntrack -L` lists in
    its own namespace, else in the node's (where kube-proxy's DNAT lives), else none: never the client namespace's
    entry on the server's flows."""
    answers, dnat_ct, server_ct = [], [], []
    with DnsBehindVip(tmp_path, dnat_in, server_tracks) as rig:
        def work() -> None:
            answers.extend(rig.dig() for _ in range(QUERIES))
            dnat_ct.extend(conntrack_list_in(rig.dnat_netns))
            server_ct.extend(conntrack_list(rig.server))

        bundle = record_during(tmp_path, work, "--with-conntrack", "--probes=tcp_state,udp,udp_peers")
        assert rig.queries_logged() == QUERIES  # dnsmasq's own log
        client_ns, server_ns = netns_inode(f"/run/netns/{rig.client}"), netns_inode(f"/run/netns/{rig.server}")
        client, server = rig.client_addr, rig.server_addr
    dnat_ns = client_ns if dnat_in == "client" else netns_inode("/proc/self/ns/net")  # ktrace's too: the node's
    assert answers == [ANSWER] * QUERIES
    dnat_entries = [e for e in dnat_ct if e["orig"][0] == client and e["orig"][2:] == (SERVICE_VIP, 53)]
    assert len(dnat_entries) == QUERIES and all(not e["unreplied"] for e in dnat_entries)
    assert {e["reply"][:2] for e in dnat_entries} == {(server, DNSMASQ_PORT)}
    server_entries = [e for e in server_ct if e["orig"][2:] == (server, DNSMASQ_PORT)]
    assert len(server_entries) == (QUERIES if server_tracks else 0)

    flows = bundle.of_type("udp_flow")
    by_port = {e["orig"][1]: e for e in dnat_entries}
    client_flows = [f for f in flows if f["netns_sk"] == client_ns and SERVICE_VIP in (f["saddr"], f["daddr"])]
    assert sorted((f["direction"], f["dport"] if f["direction"] == "ingress" else f["sport"]) for f in client_flows) \
        == sorted((d, port) for port in by_port for d in ("egress", "ingress"))
    for flow in client_flows:
        port = flow["sport"] if flow["direction"] == "egress" else flow["dport"]
        ct = flow["conntrack"]
        assert ct is not None, (flow["direction"], flow_tuple(flow), dnat_entries, bundle.summary["nat"])
        assert ct["matched"] == ("original" if flow["direction"] == "egress" else "original_reversed")
        assert (ct["nat"], ct["reply"], ct["netns"]) == ("dnat", reply_of(by_port[port]), dnat_ns), flow

    server_flows = [f for f in flows if f["netns_sk"] == server_ns and DNSMASQ_PORT in (f["sport"], f["dport"])]
    assert sorted((f["direction"], f["sport"] if f["direction"] == "ingress" else f["dport"]) for f in server_flows) \
        == sorted((d, port) for port in by_port for d in ("egress", "ingress"))
    own = {e["orig"][1]: e for e in server_entries}
    for flow in server_flows:
        port = flow["sport"] if flow["direction"] == "ingress" else flow["dport"]
        ct = flow["conntrack"]
        if dnat_in == "node":  # the packets crossed the node's namespace: its DNAT entry, seen from the backend
            assert ct is not None, flow
            assert ct["matched"] == ("reply_reversed" if flow["direction"] == "ingress" else "reply")
            assert (ct["nat"], ct["reply"], ct["netns"]) == ("dnat", reply_of(by_port[port]), dnat_ns), flow
        elif not server_tracks:
            assert ct is None, flow  # the client namespace's DNAT entry is not the server's
        else:
            assert ct is not None, flow
            assert ct["matched"] == ("original" if flow["direction"] == "ingress" else "reply")
            assert (ct["nat"], ct["reply"], ct["netns"]) == (None, reply_of(own[port]), server_ns), flow
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
