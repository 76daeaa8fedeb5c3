"""Events name the thread and its process; rows keyed by process name the process (its thread group leader's
comm), with /proc as the ground truth: a Python program whose network work runs in a thread it renamed, and dig,
whose resolver threads are isc-net-*."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dnsnet import DnsNetns
from tests.helpers import record_during

LEADER, WORKER = "kt10pn-main", "kt10pn-net"
REFUSED = 3
DROPPED = "gone.example.test"

# The leader and a worker thread get names of their own (prctl PR_SET_NAME names the calling thread). The worker
# prints the pids, waits until the test has read /proc, then makes REFUSED refused connects to 127.0.0.1:1 and asks
# the namespace's DNS server (which drops it) for DROPPED once.
PROGRAM = f"""
import ctypes, json, os, socket, struct, sys, threading
libc = ctypes.CDLL(None)
libc.prctl(15, b"{LEADER}", 0, 0, 0)

def work():
    libc.prctl(15, b"{WORKER}", 0, 0, 0)
    print(json.dumps({{"pid": os.getpid(), "tid": threading.get_native_id()}}), flush=True)
    sys.stdin.readline()
    for _ in range({REFUSED}):
        s = socket.socket()
        try:
            s.connect(("127.0.0.1", 1))
        except ConnectionRefusedError:
            pass
        s.close()
    q = struct.pack("!HHHHHH", 0x4b10, 0x0100, 1, 0, 0, 0)
    q += b"".join(bytes([len(p)]) + p.encode() for p in "{DROPPED}".split(".")) + b"\\0" + struct.pack("!HH", 1, 1)
    u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    u.connect(("127.0.0.1", 53))
    u.send(q)
    u.settimeout(1.5)
    try:
        u.recv(512)
    except socket.timeout:
        pass
    u.close()

t = threading.Thread(target=work)
t.start()
t.join()
"""


@pytest.fixture
def ns(tmp_path):
    with DnsNetns(tmp_path, "kt10pn") as ns:
        ns.drop([DROPPED])
        yield ns


def _proc_comm(path: str) -> str:
    return Path(path).read_text().rstrip("\n")


def test_a_renamed_worker_thread_is_the_events_comm_and_its_process_names_every_row(tmp_path, ns):
    truth: dict = {}

    def work() -> None:
        proc = subprocess.Popen(ns.command(sys.executable, "-c", PROGRAM), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        try:
            ids = json.loads(proc.stdout.readline())
            truth.update(ids, leader=_proc_comm(f"/proc/{ids['pid']}/comm"),
                         thread=_proc_comm(f"/proc/{ids['pid']}/task/{ids['tid']}/comm"))
            proc.stdin.write("go\n")
            proc.stdin.close()
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    bundle = record_during(tmp_path, work, "--probes=tcp_state,udp,dns", "--dns-timeout=500ms")
    pid, tid = truth["pid"], truth["tid"]
    assert (truth["leader"], truth["thread"]) == (LEADER, WORKER)  # what the kernel says the two are called

    connects = [e for e in bundle.of_type("tcp_state") if e["pid"] == pid and e["new_state"] == "SYN_SENT"]
    queries = [e for e in bundle.of_type("dns_query") if e["pid"] == pid]
    timeouts = [e for e in bundle.of_type("dns_timeout") if e["pid"] == pid]
    assert len(connects) == REFUSED and len(queries) == 1 and len(timeouts) == 1
    for event in connects + queries + timeouts:
        assert (event["tid"], event["comm"], event["process"]) == (tid, truth["thread"], truth["leader"])

    s = bundle.summary
    [refused] = [f for f in s["findings"] if f["rule"] == "connect_refused" and f["subject"]["pid"] == pid]
    assert refused["subject"]["comm"] == truth["leader"] and truth["leader"] in refused["title"]
    assert WORKER not in refused["title"]
    [talker] = [r for r in s["top_talkers"] if r["pid"] == pid]
    assert talker["comm"] == truth["leader"] and talker["refused"] == REFUSED
    [suspect] = [r for r in s["dns_suspects"] if r["pid"] == pid]
    assert suspect["comm"] == truth["leader"] and suspect["timeouts"] == 1
    [by_process] = [r for r in s["dns"]["by_process"] if r["pid"] == pid]
    assert by_process["comm"] == truth["leader"]
    [dns_timeout] = [f for f in s["findings"] if f["rule"] == "dns_timeout" and f["subject"]["pid"] == pid]
    assert dns_timeout["subject"]["comm"] == truth["leader"]
    # the fake server received the one query (its own log)
    assert [q["name"] for q in ns.queries() if q["name"].rstrip(".") == DROPPED] == [DROPPED]


def test_dig_whose_resolver_thread_sends_is_named_dig_in_the_dns_rows(tmp_path, ns):
    runs: list[subprocess.CompletedProcess] = []

    def work() -> None:
        for i in range(3):
            runs.append(ns.exec("dig", "@127.0.0.1", "+tries=1", "+time=2", f"d{i}.example.test", "A"))

    bundle = record_during(tmp_path, work, "--probes=udp,dns")
    assert all(r.returncode == 0 and "status: NOERROR" in r.stdout for r in runs), [r.stdout for r in runs]
    queries = [e for e in bundle.of_type("dns_query") if e["role"] == "client" and e["process"] == "dig"]
    assert len(queries) == 3  # the fake server's log has the same three
    assert sorted(q["name"].rstrip(".") for q in ns.queries() if q["name"].startswith("d")) == [
        f"d{i}.example.test" for i in range(3)]
    # dig's own threads did the work: their names are not the process's
    assert all(q["comm"] != "dig" and q["tid"] != q["pid"] for q in queries), [q["comm"] for q in queries]
    pids = {q["pid"] for q in queries}
    rows = [r for r in bundle.summary["dns"]["by_process"] if r["pid"] in pids]
    assert len(rows) == 3 and {r["comm"] for r in rows} == {"dig"}
    assert sum(r["queries"] for r in rows) == 3 and sum(r["replies"] for r in rows) == 3
