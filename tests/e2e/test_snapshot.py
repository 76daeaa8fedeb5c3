"""The snapshot as a user runs it: real probes, real loopback traffic, the bundle on disk."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections import Counter, defaultdict

import orjson
import pytest

from ktrace.events.decode import family_and_weight
from ktrace.snapshot import AGGREGATE_TYPES
from tests.dnsnet import RESOLVER
from tests.helpers import Ktrace, Server, closed_port, start_client

N_OK, N_REFUSED, N_HOLD = 100, 10, 5
LATENCY_TYPES = ("runq_histogram", "runq_latency", "bio_histogram", "bio_latency")


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory):
    """100 good connections, 10 refused connects, 5 sockets the server leaves in CLOSE_WAIT."""
    tmp = tmp_path_factory.mktemp("scenario")
    server = Server(tmp)
    ktrace = Ktrace(tmp, duration="5s").started()
    try:
        client = start_client(server.port, N_OK, N_REFUSED, N_HOLD, closed_port())
        assert client.wait(timeout=60) == 0
        rc = ktrace.finish()
        assert rc == 0, ktrace.stderr
        yield {"bundle": ktrace.bundle(), "server": server, "client_pid": client.pid, "ktrace": ktrace}
    finally:
        ktrace.kill()
        server.stop()


def _client_sockets(bundle, port: int, client_pid: int) -> dict[tuple[str, int], list[dict]]:
    """Client-side state changes per socket life (a socket address is reused after CLOSE)."""
    socks: dict[tuple[str, int], list[dict]] = {}
    life: dict[str, int] = defaultdict(int)
    for e in bundle.of_type("tcp_state"):
        if e["pid"] == client_pid and e["dport"] == port:
            if e["new_state"] == "SYN_SENT":
                life[e["sk"]] += 1
            socks.setdefault((e["sk"], life[e["sk"]]), []).append(e)
    return socks


def test_every_client_connection_is_recorded_with_the_clients_pid_and_comm(scenario):
    bundle, port, pid = scenario["bundle"], scenario["server"].port, scenario["client_pid"]
    syn_sent = [e for e in bundle.of_type("tcp_state")
                if e["new_state"] == "SYN_SENT" and e["dport"] == port and e["pid"] == pid]
    assert len(syn_sent) == N_OK + N_HOLD
    assert {e["comm"] for e in syn_sent} == {"kt-client"}
    established = [e for e in bundle.of_type("tcp_state")
                   if e["old_state"] == "SYN_SENT" and e["new_state"] == "ESTABLISHED" and e["dport"] == port]
    assert len(established) == N_OK + N_HOLD
    assert all(e["pid"] == pid and e["comm"] == "kt-client" for e in established)
    assert all(e["handshake_ms"] > 0 for e in established)
    assert all(e["saddr"] == "127.0.0.1" and e["sport"] > 0 for e in established)


def test_each_good_connection_goes_through_its_whole_life(scenario):
    socks = _client_sockets(scenario["bundle"], scenario["server"].port, scenario["client_pid"])
    complete = [s for s in socks.values()
                if [e["new_state"] for e in s][:2] == ["SYN_SENT", "ESTABLISHED"] and s[-1]["new_state"] == "CLOSE"]
    assert len(complete) >= N_OK


def test_connect_calls_carry_errno_and_time(scenario):
    bundle, port, pid = scenario["bundle"], scenario["server"].port, scenario["client_pid"]
    connects = [e for e in bundle.of_type("connect") if e["pid"] == pid]
    ok = [e for e in connects if e["dport"] == port]
    refused = [e for e in connects if e["errno"] == "ECONNREFUSED"]
    assert len(ok) == N_OK + N_HOLD and all(e["ret"] == 0 and e["duration_ms"] > 0 for e in ok)
    assert len(refused) == N_REFUSED
    assert all(e["comm"] == "kt-client" and e["protocol"] == "tcp" for e in connects)


def test_server_side_sockets_are_attributed_to_the_server(scenario):
    bundle, server = scenario["bundle"], scenario["server"]
    accepted = [e for e in bundle.of_type("tcp_state")
                if e["sport"] == server.port and e["old_state"] == "LISTEN" and e["new_state"] == "SYN_RECV"]
    assert len(accepted) == N_OK + N_HOLD
    # the server accept()s each one: it owns them from then on, also their changes before accept()
    assert {(e["pid"], e["comm"], e["attribution"]) for e in accepted} == {(server.pid, "kt-server", "socket_owner")}


def test_summary_reports_refused_connects_for_the_client(scenario):
    summary, pid = scenario["bundle"].summary, scenario["client_pid"]
    assert summary["tcp"]["connections"]["refused"] == N_REFUSED
    refused = [f for f in summary["findings"] if f["rule"] == "connect_refused"]
    assert len(refused) == 1
    assert refused[0]["subject"]["pid"] == pid and refused[0]["evidence"]["count"] == N_REFUSED
    assert len(refused[0]["evidence"]["lines"]) > 0


def test_summary_reports_close_wait_sockets_of_the_server(scenario):
    summary, server = scenario["bundle"].summary, scenario["server"]
    assert summary["tcp"]["close_wait"] == [{"pid": server.pid, "comm": "kt-server", "sockets": N_HOLD}]
    finding = [f for f in summary["findings"] if f["rule"] == "close_wait"]
    assert len(finding) == 1 and finding[0]["subject"]["pid"] == server.pid
    assert finding[0]["evidence"]["count"] == N_HOLD


def test_nothing_is_lost_and_the_losses_add_up(scenario):
    losses = scenario["bundle"].summary["losses"]
    assert losses["balanced"]
    assert losses["total"]["ringbuf_full"] == 0 and losses["total"]["capped"] == 0
    # a histogram line stands for every wait it counted, an outlier for none; any other line is one kernel event
    weights = [family_and_weight(e) for e in scenario["bundle"].events]
    assert losses["total"]["written"] == sum(weight for family, weight in weights if family is not None)
    assert all(weight == 1 for e, (_, weight) in zip(scenario["bundle"].events, weights)
               if e["type"] not in LATENCY_TYPES and e["type"] != "drop_count")
    for family, row in losses["by_family"].items():
        lost = sum(v for k, v in row.items() if k not in ("seen", "written", "aggregated"))
        assert row["seen"] == row["written"] + lost, family


def test_bundle_files_are_private_and_the_tgz_holds_the_other_three(scenario):
    paths = scenario["bundle"].paths
    for path in paths.values():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    with tarfile.open(paths["bundle.tgz"]) as tar:
        names = sorted(tar.getnames())
        assert names == sorted(paths[k].name for k in ("events.jsonl", "summary.json", "node.json"))
        assert tar.extractfile(paths["events.jsonl"].name).read() == paths["events.jsonl"].read_bytes()


def test_summary_hashes_match_the_files(scenario):
    import hashlib

    bundle = scenario["bundle"]
    files = bundle.summary["files"]
    assert files["events"]["sha256"] == hashlib.sha256(bundle.paths["events.jsonl"].read_bytes()).hexdigest()
    assert files["node"]["sha256"] == hashlib.sha256(bundle.paths["node.json"].read_bytes()).hexdigest()


def test_probe_table_is_in_summary_and_node(scenario):
    bundle = scenario["bundle"]
    assert bundle.summary["probes"] == bundle.node["probes"]
    chosen = {row["family"]: row["chosen"] for row in bundle.summary["probes"]}
    assert chosen["tcp_state"] and chosen["connect"] and chosen["retransmit"] and chosen["reset"]


def test_bundle_validates_against_the_schemas(scenario):
    from ktrace.schemas import validate_bundle

    assert validate_bundle(scenario["bundle"].paths["summary.json"]) == []


def test_ports_filter_writes_only_that_port_and_the_kernel_counts_the_rest(tmp_path):
    wanted, other = Server(tmp_path), Server(tmp_path)
    ktrace = Ktrace(tmp_path, f"--ports={wanted.port}", duration="3s").started()
    try:
        for server in (wanted, other):
            assert start_client(server.port, 20, 0, 0, closed_port()).wait(timeout=60) == 0
        assert ktrace.finish() == 0, ktrace.stderr
        bundle = ktrace.bundle()
    finally:
        ktrace.kill()
        wanted.stop()
        other.stop()
    assert bundle.events
    # every network event is of that port: process, OOM and latency events have no port, and drop_count lines are
    # the kernel's counts of every drop
    network = [e for e in bundle.events
               if "sport" in e and e["type"] not in LATENCY_TYPES and e["type"] != "drop_count"]
    assert all(wanted.port in (e["sport"], e["dport"]) for e in network)
    assert sum(1 for e in bundle.of_type("tcp_state") if e["new_state"] == "SYN_SENT") == 20
    by_family = bundle.summary["losses"]["by_family"]
    # the other server's 20 connections never crossed the ring buffer: the kernel filtered them
    assert by_family["tcp_state"]["filtered"] >= 20 * 8
    assert by_family["connect"]["filtered"] >= 20
    assert bundle.summary["losses"]["balanced"]


def record_client_traffic(tmp_path, *args: str, connections: int, duration: str = "3s"):
    """A snapshot with these flags while kt-client makes this many connections: (bundle, server port)."""
    server = Server(tmp_path)
    ktrace = Ktrace(tmp_path, *args, duration=duration).started()
    try:
        assert start_client(server.port, connections, 0, 0, closed_port()).wait(timeout=120) == 0
        assert ktrace.finish() == 0, ktrace.stderr
        return ktrace.bundle(), server.port
    finally:
        ktrace.kill()
        server.stop()


def _per_event(bundle) -> list[dict]:
    return [e for e in bundle.events if e["type"] not in AGGREGATE_TYPES]


def test_max_events_writes_exactly_that_many_and_counts_the_rest_as_capped(tmp_path):
    bundle, _ = record_client_traffic(tmp_path, "--max-events=50", connections=30)
    assert len(_per_event(bundle)) == 50
    total = bundle.summary["losses"]["total"]
    aggregated = sum(family_and_weight(e)[1] for e in bundle.events if e["type"] in AGGREGATE_TYPES)
    assert total["written"] == 50 + aggregated
    assert total["capped"] >= 30 * 10 - 50
    assert total["disk_full"] == 0
    assert total["seen"] == total["written"] + total["capped"] + total["filtered"] + total["sampled_out"] + total[
        "aggregated"] - aggregated


def test_max_bytes_is_an_exact_cap_on_the_per_event_lines(tmp_path):
    bundle, _ = record_client_traffic(tmp_path, "--max-bytes=20000", connections=30)
    lines = bundle.paths["events.jsonl"].read_bytes().splitlines(keepends=True)
    per_event = sum(len(line) for line in lines if orjson.loads(line)["type"] not in AGGREGATE_TYPES)
    assert 20000 - 1000 < per_event <= 20000
    assert bundle.summary["losses"]["total"]["capped"] > 0
    assert bundle.summary["coverage"]["cuts"][0]["by"] == "max_bytes"


def test_a_capped_window_still_has_every_aggregate_line_and_whole_window_counts(tmp_path):
    """--max-events=2000 on a busy window: the per-event lines are its first part; the UDP flows, the latency
    histograms and the drop counts cover all of it, and so do summary.json's counts."""
    server = Server(tmp_path)
    ktrace = Ktrace(tmp_path, "--max-events=2000", duration="120s").started()
    try:
        client = start_client(server.port, 400, 20, 0, closed_port())  # refused SYNs: drops by NO_SOCKET
        udp = subprocess.run([sys.executable, RESOLVER, "udp-pair", "--count", "3000", "--size", "64"],
                             capture_output=True, text=True, check=True, timeout=300)
        assert client.wait(timeout=120) == 0
        fd, path = tempfile.mkstemp(dir=tmp_path)  # a synchronous write: a block request, so a bio histogram
        os.write(fd, os.urandom(64 << 10))
        os.fsync(fd)
        os.close(fd)
        os.unlink(path)
        ktrace.signal(signal.SIGINT)
        assert ktrace.finish() == 0, ktrace.stderr
        bundle = ktrace.bundle()
    finally:
        ktrace.kill()
        server.stop()
    assert json.loads(udp.stdout.strip().splitlines()[-1])

    in_file = Counter(e["type"] for e in bundle.events)
    assert len(_per_event(bundle)) == 2000
    for kind in ("udp_flow", "runq_histogram", "bio_histogram", "drop_count"):
        assert in_file[kind] > 0, kind
    coverage = bundle.summary["coverage"]
    assert coverage["counts"] == coverage["aggregate_lines"] == "whole_window"
    assert coverage["counts_in_file"] == dict(in_file)
    assert coverage["per_event_lines"]["whole_window"] is False
    [cut] = coverage["cuts"]
    assert cut["by"] == "max_events" and cut["limit"] == 2000
    # the lines are in the order the rings gave them, not strictly by time: the range is the lines' own
    assert coverage["per_event_lines"]["first"] <= coverage["per_event_lines"]["last"]
    assert cut["from"] is not None
    # counts: the whole window, far past the 2,000 lines the file holds
    counts = bundle.summary["counts"]
    assert counts["tcp_state"] >= 400 * 10 > in_file["tcp_state"]
    assert bundle.summary["tcp"]["connections"]["refused"] == 20
    # every datagram of the UDP traffic is in the flow lines, which a cap never cuts
    ingress = [f for f in bundle.of_type("udp_flow") if f["comm"] == "kt-udp" and f["direction"] == "ingress"]
    assert sum(f["packets"] for f in ingress) == 3000
    assert "capped" in bundle.summary["console"]["lines"][0]


def test_sample_keeps_about_a_tenth_of_the_flows_each_complete(tmp_path):
    n = 300
    bundle, port = record_client_traffic(tmp_path, "--sample=10", connections=n, duration="6s")
    client = list(_client_sockets(bundle, port, ktrace_client_pid(bundle)).values())
    # 2n sockets (client and server side); 1 in 10 kept: binomial, 6 standard deviations wide
    kept = len([e for e in bundle.of_type("tcp_state")
                if e["new_state"] in ("SYN_SENT", "SYN_RECV") and port in (e["sport"], e["dport"])])
    assert 2 * n * 0.1 - 45 <= kept <= 2 * n * 0.1 + 45, kept
    for sock in client:
        states = [e["new_state"] for e in sock]
        assert states[0] == "SYN_SENT" and states[-1] == "CLOSE", states
    assert bundle.summary["losses"]["by_family"]["tcp_state"]["sampled_out"] > 0
    assert bundle.summary["losses"]["balanced"]


def ktrace_client_pid(bundle) -> int:
    pids = {e["pid"] for e in bundle.of_type("tcp_state") if e["comm"] == "kt-client"}
    assert len(pids) == 1
    return pids.pop()


def test_sigterm_mid_window_still_writes_a_complete_bundle(tmp_path):
    server = Server(tmp_path)
    ktrace = Ktrace(tmp_path, duration="60s").started()
    try:
        assert start_client(server.port, 10, 0, 0, closed_port()).wait(timeout=60) == 0
        ktrace.signal(signal.SIGTERM)
        assert ktrace.finish(timeout=30) == 0, ktrace.stderr
        bundle = ktrace.bundle()
    finally:
        ktrace.kill()
        server.stop()
    assert bundle.summary["window"]["ended_by"] == "SIGTERM"
    assert bundle.summary["window"]["actual_s"] < 30
    assert sum(1 for e in bundle.of_type("tcp_state") if e["comm"] == "kt-client" and e["new_state"] == "SYN_SENT") \
        == 10
    from ktrace.schemas import validate_bundle

    assert validate_bundle(bundle.paths["summary.json"]) == []
