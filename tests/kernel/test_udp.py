"""UDP flows counted in the kernel, --dns-only, and no payload byte in the bundle."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import tarfile

import pytest

from tests.dnsnet import RESOLVER, DnsNetns
from tests.helpers import Server, closed_port, record_during, start_client


def udp_pair(*args: str) -> dict:
    out = subprocess.run([sys.executable, RESOLVER, "udp-pair", *args], capture_output=True, text=True, check=True,
                         timeout=300)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _split(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


@pytest.mark.parametrize(("count", "family", "mode"), [
    (100_000, "4", ["--recv-from"]),
    (10_000, "6", ["--connected", "--recv-from"]),
])
def test_datagrams_between_two_sockets_are_one_flow_per_direction_with_exact_counts(tmp_path, count, family, mode):
    size = 120
    result = {}
    bundle = record_during(tmp_path, lambda: result.update(
        udp_pair("--count", str(count), "--size", str(size), "--family", family, *mode)))
    assert result["received"] == count
    sender, receiver = _split(result["sender"]), _split(result["receiver"])
    flows = [f for f in bundle.of_type("udp_flow") if f["comm"] == "kt-udp"]
    egress = [f for f in flows if f["direction"] == "egress"]
    ingress = [f for f in flows if f["direction"] == "ingress"]
    assert len(egress) == 1 and len(ingress) == 1, flows
    for flow in (egress[0], ingress[0]):
        assert (flow["saddr"], flow["sport"]) == sender
        assert (flow["daddr"], flow["dport"]) == receiver
        assert flow["packets"] == count and flow["bytes"] == count * size and flow["errors"] == 0
        assert flow["family"] == ("ipv6" if family == "6" else "ipv4")
        assert flow["last_ts_ns"] >= flow["ts_ns"]
    udp = bundle.summary["losses"]["by_family"]["udp"]
    # every datagram was counted in the kernel map: none crossed the ring buffer
    assert udp["seen"] == udp["aggregated"] >= 2 * count
    assert udp["written"] == udp["seen"] and udp["ringbuf_full"] == 0
    assert bundle.summary["losses"]["balanced"]
    talker = next(t for t in bundle.summary["udp"]["top_talkers"] if t["comm"] == "kt-udp")
    assert talker["bytes_out"] == talker["bytes_in"] == count * size


def test_a_receiver_without_a_source_address_still_counts_exactly(tmp_path):
    # recv() on an unconnected socket never learns who sent: the source is unknown, the counts are not
    result = {}
    bundle = record_during(tmp_path, lambda: result.update(udp_pair("--count", "1000", "--size", "64")))
    ingress = [f for f in bundle.of_type("udp_flow") if f["comm"] == "kt-udp" and f["direction"] == "ingress"]
    assert len(ingress) == 1
    assert (ingress[0]["saddr"], ingress[0]["sport"]) == ("0.0.0.0", 0)
    assert (ingress[0]["daddr"], ingress[0]["dport"]) == _split(result["receiver"])
    assert ingress[0]["packets"] == 1000 and ingress[0]["bytes"] == 64_000


def test_dns_only_writes_only_dns_while_other_tcp_and_udp_traffic_runs(tmp_path):
    server = Server(tmp_path)
    try:
        with DnsNetns(tmp_path, "dnsonly") as ns:
            def work() -> None:
                client = start_client(server.port, 20, 2, 0, closed_port())
                udp_pair("--count", "500", "--size", "64", "--recv-from")
                assert ns.run_json("getaddrinfo", "only.example.test")["ok"]
                client.wait(timeout=60)

            bundle = record_during(tmp_path, work, "--dns-only")
    finally:
        server.stop()
    types = {e["type"] for e in bundle.events}
    assert types <= {"dns_query", "dns_reply", "dns_timeout", "udp_flow", "tcp_state", "connect", "reset",
                     "retransmit", "drop", "drop_count"}
    assert {"dns_query", "dns_reply"} <= types
    for e in bundle.events:
        if e["type"] == "drop_count":  # every drop is counted, whatever the port
            continue
        if e["type"] == "udp_flow" or e["type"].startswith("dns_"):
            assert 53 in (e["sport"], e["dport"]), e
        else:
            assert 53 in (e["sport"], e["dport"]), e  # TCP only on DNS ports
    assert not [e for e in bundle.events if e.get("comm") in ("kt-udp", "kt-client", "kt-server")]
    losses = bundle.summary["losses"]["by_family"]
    # the unrelated traffic was seen and filtered in the kernel, and counted
    assert losses["udp"]["filtered"] >= 1000
    assert losses["tcp_state"]["filtered"] > 0
    assert bundle.summary["losses"]["balanced"]
    assert bundle.summary["options"]["dns_only"] is True


def test_no_payload_byte_reaches_the_bundle(tmp_path):
    secret = "kt-payload-secret-7f3a91"
    name = "kt-name-secret-4c2e.example.test"
    with DnsNetns(tmp_path, "secret") as ns:
        def work() -> None:
            udp_pair("--count", "200", "--size", "200", "--payload", secret, "--recv-from")
            assert ns.run_json("getaddrinfo", name)["ok"]
            assert ns.run_json("unconnected", "127.0.0.1", name)["answered"] == 1

        bundle = record_during(tmp_path, work)
    assert bundle.of_type("udp_flow") and bundle.of_type("dns_reply")
    blobs = [path.read_bytes() for path in bundle.paths.values()]
    with tarfile.open(bundle.paths["bundle.tgz"]) as tgz:
        blobs += [tgz.extractfile(member).read() for member in tgz.getmembers() if member.isfile()]
    blobs.append(gzip.decompress(bundle.paths["bundle.tgz"].read_bytes()))
    for blob in blobs:
        for needle in (secret, name, "kt-name-secret"):
            assert needle.encode() not in blob


def _one_datagram_per_socket(receiver, n: int, keep: list) -> None:
    """n fresh sockets each send one datagram: n egress flows, and n ingress flows on the receiver.
    The sockets stay open (in keep), so no two flows share a port."""
    import socket

    for _ in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        keep.append(s)
        s.bind(("127.0.0.1", 0))
        s.sendto(b"f" * 10, receiver.getsockname())
        receiver.recvfrom(64)


def test_a_full_flow_map_loses_no_datagram(tmp_path):
    import socket
    import time

    receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    receiver.bind(("127.0.0.1", 0))
    port = receiver.getsockname()[1]
    senders: list = []

    def work() -> None:
        _one_datagram_per_socket(receiver, 100, senders)  # 200 flows for a map of 64: the rest cross the ring
        time.sleep(3.5)  # idle long enough to be read out early while the window runs
        _one_datagram_per_socket(receiver, 100, senders)

    try:
        bundle = record_during(tmp_path, work, "--udp-flows=64", f"--ports={port}")
    finally:
        for s in [receiver, *senders]:
            s.close()
    flows = [f for f in bundle.of_type("udp_flow") if port in (f["sport"], f["dport"])]
    egress = [f for f in flows if f["direction"] == "egress"]
    ingress = [f for f in flows if f["direction"] == "ingress"]
    # every datagram counted once, each flow on one line
    assert (len(egress), len(ingress)) == (200, 200)
    assert all(f["packets"] == 1 and f["bytes"] == 10 for f in flows)
    assert len({(f["direction"], f["sport"]) for f in flows}) == 400
    kernel_map = bundle.summary["udp"]["kernel_map"]
    assert kernel_map["max_entries"] == 64
    assert kernel_map["datagrams_via_ring"] > 0 and kernel_map["read_early"] > 0
    udp = bundle.summary["losses"]["by_family"]["udp"]
    assert udp["written"] == udp["seen"] - udp["filtered"] >= 400 and udp["ringbuf_full"] == 0
    assert bundle.summary["losses"]["balanced"]
