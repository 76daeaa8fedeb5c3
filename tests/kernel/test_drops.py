"""Packet drops: counted in the kernel by reason and protocol, checked against the kernel's own SNMP counters."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from ktrace import probes
from ktrace.events.drops import kernel_drop_reasons
from tests.helpers import record_during

DATAGRAMS = 200


def _snmp(path: str, table: str) -> dict[str, int]:
    """One table of /proc/net/snmp (header line, value line) or /proc/net/snmp6 (name value lines)."""
    lines = Path(path).read_text().splitlines()
    if path.endswith("snmp6"):
        return {name: int(value) for name, value in (line.split() for line in lines) if name.startswith(table)}
    rows = [line.split()[1:] for line in lines if line.startswith(f"{table}:")]
    return dict(zip(rows[0], map(int, rows[1])))


def _udp_counters() -> dict[str, int]:
    udp, udp6 = _snmp("/proc/net/snmp", "Udp"), _snmp("/proc/net/snmp6", "Udp6")
    return {"NoPorts": udp["NoPorts"], "RcvbufErrors": udp["RcvbufErrors"], "Udp6NoPorts": udp6["Udp6NoPorts"]}


def _closed_udp_port(family: int = socket.AF_INET) -> int:
    """A loopback UDP port nothing is bound to."""
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        return s.getsockname()[1]


def _blast(sender: socket.socket, to: tuple, n: int, size: int = 1000) -> None:
    for _ in range(n):
        sender.sendto(b"d" * size, to)


def _small_receiver() -> socket.socket:
    """A socket with the smallest receive buffer, never read: most datagrams sent to it are dropped."""
    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    receiver.bind(("127.0.0.1", 0))
    return receiver


def _count(summary: dict, reason: str, protocol: str) -> int:
    return next((row["count"] for row in summary["drops"]["top"]
                 if row["reason"] == reason and row["protocol"] == protocol), 0)


def test_every_drop_is_counted_by_reason_and_protocol_at_least_as_often_as_the_kernel_counted_it(tmp_path):
    closed4, closed6 = _closed_udp_port(), _closed_udp_port(socket.AF_INET6)
    receiver = _small_receiver()
    delta: dict[str, int] = {}

    def work() -> None:
        before = _udp_counters()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s4, \
                socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s6:
            _blast(s4, ("127.0.0.1", closed4), 100, size=10)
            _blast(s6, ("::1", closed6), 50, size=10)
            _blast(s4, receiver.getsockname(), DATAGRAMS)
        after = _udp_counters()
        delta.update({name: after[name] - before[name] for name in after})

    try:
        bundle = record_during(tmp_path, work)
    finally:
        receiver.close()
    # what the kernel's own counters prove was dropped while the window was open
    assert delta["NoPorts"] >= 100 and delta["Udp6NoPorts"] >= 50
    assert delta["RcvbufErrors"] >= DATAGRAMS // 2  # 2048 bytes hold a datagram or two of 1000 bytes
    summary = bundle.summary
    assert _count(summary, "NO_SOCKET", "ipv4/udp") >= delta["NoPorts"]
    assert _count(summary, "NO_SOCKET", "ipv6/udp") >= delta["Udp6NoPorts"]
    assert _count(summary, "SOCKET_RCVBUFF", "ipv4/udp") >= delta["RcvbufErrors"]
    # the names are the running kernel's, from its BTF
    names = set(kernel_drop_reasons(probes.vmlinux_btf()).values())
    assert {"NO_SOCKET", "SOCKET_RCVBUFF"} <= names
    assert all(row["reason"] in names or row["reason"][0].isdigit() or row["reason"].startswith("SUBSYS_")
               for row in summary["drops"]["by_reason"])
    assert "CONSUMED" not in {row["reason"] for row in summary["drops"]["by_reason"]}
    # nothing was selected: every drop was counted in the kernel, none crossed the ring buffer
    assert bundle.of_type("drop") == []
    assert summary["drops"]["single"] == 0
    losses = summary["losses"]["by_family"]["drops"]
    assert losses["seen"] == losses["aggregated"] == losses["written"] == summary["drops"]["total"]
    assert losses["ringbuf_full"] == 0 and summary["losses"]["balanced"]
    assert summary["drops"]["kernel_map"]["full"] is False
    counted = sum(e["count"] for e in bundle.of_type("drop_count"))
    assert counted == summary["drops"]["counted_in_kernel"] == summary["drops"]["total"]
    findings = {f["subject"]["reason"]: f for f in summary["findings"] if f["rule"] == "packet_drops"}
    assert "nothing listens" in findings["NO_SOCKET"]["hint"].lower()
    assert findings["SOCKET_RCVBUFF"]["severity"] in ("warning", "critical")
    assert "ipv4/udp" in findings["SOCKET_RCVBUFF"]["subject"]["protocols"]


def test_drops_on_selected_ports_are_events_with_their_flow_and_socket(tmp_path):
    selected, unselected = _closed_udp_port(), _closed_udp_port()
    receiver = _small_receiver()
    recv_port = receiver.getsockname()[1]
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind(("127.0.0.1", 0))
    sport = sender.getsockname()[1]

    def work() -> None:
        _blast(sender, ("127.0.0.1", selected), 20, size=10)
        _blast(sender, ("127.0.0.1", unselected), 30, size=10)
        _blast(sender, ("127.0.0.1", recv_port), 50)

    try:
        bundle = record_during(tmp_path, work, f"--ports={selected},{recv_port}")
        inode = os.fstat(receiver.fileno()).st_ino
    finally:
        sender.close()
        receiver.close()
    drops = [e for e in bundle.of_type("drop") if e["sport"] == sport]
    to_closed = [e for e in drops if e["dport"] == selected]
    assert len(to_closed) == 20
    for e in to_closed:
        assert (e["reason"], e["protocol"], e["family"]) == ("NO_SOCKET", "ipv4/udp", "ipv4")
        assert (e["saddr"], e["daddr"]) == ("127.0.0.1", "127.0.0.1")
        assert e["sk"] == "0x0" and e["sk_ino"] == 0 and e["attribution"] == "cpu"
    # a datagram into the full receive queue names the receiving socket (the tracepoint's rx_sk)
    overflow = [e for e in drops if e["dport"] == recv_port]
    assert overflow and all(e["reason"] == "SOCKET_RCVBUFF" for e in overflow)
    assert {e["sk_ino"] for e in overflow} == {inode}
    assert {e["sk_uid"] for e in overflow} == {os.getuid()}
    # the unselected port's drops never crossed the ring: only counted
    assert not [e for e in bundle.of_type("drop") if e["dport"] == unselected]
    assert _count(bundle.summary, "NO_SOCKET", "ipv4/udp") >= 20 + 30
    flows = {(f["destination"], f["reason"]): f for f in bundle.summary["drops"]["flows"]}
    assert flows[(f"127.0.0.1:{selected}", "NO_SOCKET")]["count"] == 20
    assert flows[(f"127.0.0.1:{recv_port}", "SOCKET_RCVBUFF")]["sk_ino"] == inode
    losses = bundle.summary["losses"]["by_family"]["drops"]
    assert losses["seen"] == losses["written"] == losses["aggregated"] + len(bundle.of_type("drop"))
    assert bundle.summary["losses"]["balanced"]
