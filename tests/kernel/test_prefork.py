"""A pre-fork web server (nginx: a root master that listens, unprivileged workers that accept and close) under a
load generator (ab): the server side names the worker that served each connection, as nginx's own log and
bpftrace on the same tracepoint do, and with 5% of what nginx sends lost on the way, every connection is recorded
with every change bpftrace sees and the retransmits nstat counts."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest

from ktrace.events.decode import TCP_STATES
from ktrace.probes import FAMILY_BY_NAME
from ktrace.schemas import validate_bundle
from tests.helpers import Rig, record_during
from tests.tcpnet import CLIENT_ADDR, SERVER_ADDR, TwoHosts

PORT = 8088
VIP, VIP_PORT = "10.231.1.10", 80  # a "Service" address the server's namespace DNATs to nginx
DNAT = f"""table ip nat {{
  chain pre {{
    type nat hook prerouting priority -100;
    ip daddr {VIP} tcp dport {VIP_PORT} dnat to {SERVER_ADDR}:{PORT}
  }}
}}
"""
REQUESTS, CONCURRENCY = 300, 4
WORKER_USER = "nobody"
NGINX_CONF = """\
user {user} {group};
worker_processes 2;
master_process on;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log notice;
events {{ worker_connections 256; accept_mutex off; }}
http {{
    log_format served '$pid $remote_port $status';
    access_log {dir}/access.log served;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_timeout 0;
    server {{
        listen {addr}:{port};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


class StateTracer(Rig):
    """bpftrace on the tracepoint ktrace's tcp_state family reads (sock:inet_sock_set_state), on the server's port:
    the pid of the task that made each state change. Its output goes to a file: a pipe read only at the end fills
    after a few thousand lines, and bpftrace then loses events while it waits to write."""

    PROGRAM = ("tracepoint:sock:inet_sock_set_state /args->protocol == 6 && args->sport == %d/ "
               "{ printf(\"%%d %%d %%d %%d\\n\", pid, args->dport, args->oldstate, args->newstate); }")

    def __init__(self, port: int, out: Path) -> None:
        self.port = port
        self.out = out
        self.proc: subprocess.Popen | None = None
        self._others: set[int] = set()

    @staticmethod
    def _programs() -> list[dict]:
        """The kernel's tracepoint programs on inet_sock_set_state (bpftrace names them after it, cut to 15)."""
        progs = json.loads(subprocess.run(["bpftool", "-j", "prog", "show"], capture_output=True, text=True,
                                          check=True).stdout)
        return [p for p in progs if p.get("type") == "tracepoint" and p.get("name") == "inet_sock_set_s"]

    def misses(self) -> int:
        """Runs of bpftrace's program the kernel skipped (another BPF program was running on that CPU): changes
        bpftrace never saw. bpftool leaves recursion_misses out when it is 0."""
        return sum(p.get("recursion_misses", 0) for p in self._programs() if p["id"] not in self._others)

    def _start(self) -> None:
        if shutil.which("bpftrace") is None:
            pytest.fail("bpftrace is needed (make setup installs it)")
        self._others = {p["id"] for p in self._programs()}  # loaded before bpftrace: not its own
        with open(self.out, "w") as out:
            self.proc = subprocess.Popen(["bpftrace", "-B", "line", "-e", self.PROGRAM % self.port],
                                         stdout=out, stderr=subprocess.PIPE, text=True)
        for _ in range(600):  # "Attaching 1 probe...", once it is attached (bounded: it attaches within seconds)
            if self.out.read_text().startswith("Attaching"):
                return
            assert self.proc.poll() is None, self.proc.communicate()[1]
            time.sleep(0.05)
        raise AssertionError(f"bpftrace did not attach: {self.out.read_text()[:200]!r}")

    def stop(self) -> list[dict]:
        """(pid, rport, old, new) of every change it saw; it says how many it lost, which must be none."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=30)
        out = self.out.read_text()
        assert "Lost" not in out + err, err
        rows = []
        for line in out.splitlines():
            f = line.split()
            if len(f) == 4 and all(x.isdigit() for x in f):
                rows.append({"pid": int(f[0]), "rport": int(f[1]), "old": TCP_STATES[int(f[2])],
                             "new": TCP_STATES[int(f[3])]})
        return rows

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _children(pid: int) -> set[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def _uid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return int(line.split()[1])
    raise AssertionError(f"no Uid line for {pid}")


@pytest.fixture
def nginx(tmp_path):
    if shutil.which("nginx") is None or shutil.which("ab") is None:
        pytest.fail("nginx and ab are needed (make setup installs nginx-light and apache2-utils)")
    conf_dir = tmp_path / "nginx"
    conf_dir.mkdir()
    conf_dir.chmod(0o755)  # workers run as nobody and write nothing here, but must traverse it
    tmp_path.chmod(0o755)
    conf = conf_dir / "nginx.conf"
    group = grp.getgrgid(pwd.getpwnam(WORKER_USER).pw_gid).gr_name
    conf.write_text(NGINX_CONF.format(user=WORKER_USER, group=group, dir=conf_dir, addr=SERVER_ADDR, port=PORT))
    with TwoHosts("prefork") as net:
        master = net.popen(net.server, "nginx", "-c", str(conf), "-p", str(conf_dir))
        workers: set[int] = set()
        for _ in range(200):  # bounded: nginx starts its workers within milliseconds
            workers = _children(master.pid)
            if len(workers) == 2 and (conf_dir / "nginx.pid").exists():
                break
            assert master.poll() is None, f"nginx exited with {master.returncode}"
            time.sleep(0.05)
        assert len(workers) == 2, f"nginx workers: {workers}"
        yield net, master, workers, conf_dir
        master.terminate()
        master.wait(timeout=30)


def test_a_prefork_servers_connections_are_owned_by_the_worker_that_served_them(tmp_path, nginx):
    net, master, workers, conf_dir = nginx
    worker_uid = _uid(next(iter(workers)))
    assert worker_uid != 0 and _uid(master.pid) == 0

    def load() -> None:
        out = net.run(net.client, "ab", "-n", str(REQUESTS), "-c", str(CONCURRENCY), f"http://{SERVER_ADDR}:{PORT}/")
        assert f"Complete requests:      {REQUESTS}" in out.stdout and "Failed requests:        0" in out.stdout

    before = net.nstat(net.server)
    with StateTracer(PORT, tmp_path / "bpftrace.out") as tracer:
        bundle = record_during(tmp_path, load, f"--ports={PORT}")
        traced = tracer.stop()
    passive_opens = net.nstat(net.server)["TcpPassiveOpens"] - before["TcpPassiveOpens"]

    # nginx's own log: which worker served the connection from each client port
    served = {}
    for line in (conf_dir / "access.log").read_text().splitlines():
        pid, port, status = line.split()
        assert status == "200"
        served[int(port)] = int(pid)
    assert len(served) == REQUESTS and set(served.values()) <= workers

    server_side = [e for e in bundle.events if e["type"] in ("tcp_state", "retransmit")
                   and e["saddr"] == SERVER_ADDR and e["sport"] == PORT and e["dport"] != 0]
    accepted = [e for e in server_side if e["type"] == "tcp_state" and e["old_state"] == "LISTEN"]
    # ab may open a connection it sends nothing on: the kernel's count, not the log's, is the truth here
    assert len(accepted) == passive_opens >= REQUESTS
    by_worker = [e for e in server_side if e["pid"] in workers and e["uid"] == worker_uid]
    print(f"\nserver-side events {len(server_side)}, naming a worker {len(by_worker)}, accepted {len(accepted)}, "
          f"logged {len(served)}, master {sum(e['pid'] == master.pid for e in server_side)}")
    assert len(by_worker) >= 0.9 * len(server_side), Counter((e["pid"], e["attribution"]) for e in server_side)
    # every event of a connection names the worker nginx logged for it
    wrong = [e for e in server_side if e["dport"] in served and e["pid"] != served[e["dport"]]]
    assert len(wrong) <= 0.1 * len(server_side), wrong[:5]
    # the worker's own close() is its own change, and the master never closes an accepted connection
    closes = [e for e in server_side if e["type"] == "tcp_state"
              and (e["old_state"], e["new_state"]) in (("ESTABLISHED", "FIN_WAIT1"), ("CLOSE_WAIT", "LAST_ACK"))]
    assert len(closes) == passive_opens
    assert all(e["attribution"] == "current" and e["pid"] == served.get(e["dport"], e["pid"]) and e["pid"] in workers
               for e in closes)
    assert not [e for e in server_side if e["pid"] == master.pid and e["new_state"] in ("FIN_WAIT1", "LAST_ACK",
                                                                                         "CLOSE")]
    # the summary's process rows: the workers accepted the connections, not the master
    inbound = {row["pid"]: row["inbound"] for row in bundle.summary["top_talkers"]}
    assert master.pid not in inbound
    assert sum(inbound.get(pid, 0) for pid in workers) == passive_opens
    # bpftrace names the task that made each change: for the worker's close(), the same worker
    assert len(traced) == len([e for e in server_side if e["type"] == "tcp_state"])
    closed_by = {r["rport"]: r["pid"] for r in traced if (r["old"], r["new"]) in (("ESTABLISHED", "FIN_WAIT1"),
                                                                                 ("CLOSE_WAIT", "LAST_ACK"))}
    assert closed_by == {e["dport"]: e["pid"] for e in closes}
    assert validate_bundle({k: v for k, v in bundle.paths.items() if k != "bundle.tgz"}) == []
    assert os.path.exists(f"/proc/{master.pid}")


def test_the_nat_rows_of_a_prefork_servers_connections_name_its_workers(tmp_path, nginx):
    net, master, workers, conf_dir = nginx
    net.nft(net.server, DNAT)
    net.run(net.client, "ip", "route", "add", f"{VIP}/32", "via", SERVER_ADDR)
    requests = 50

    def load() -> None:
        out = net.run(net.client, "ab", "-n", str(requests), "-c", "2", f"http://{VIP}:{VIP_PORT}/")
        assert f"Complete requests:      {requests}" in out.stdout

    bundle = record_during(tmp_path, load, f"--ports={PORT},{VIP_PORT}", "--with-conntrack")
    served = {int(line.split()[0]) for line in (conf_dir / "access.log").read_text().splitlines()}
    assert served <= workers and len(served) >= 1
    rows = [r for r in bundle.summary["nat"]["translations"]
            if r["original"] == f"{VIP}:{VIP_PORT}" and r["translated"] == f"{SERVER_ADDR}:{PORT}"]
    assert len(rows) == 1 and rows[0]["connections"] >= requests
    # the server side of the translation is the workers that served it, never the master
    users = {p["pid"] for p in rows[0]["processes"]}
    assert served <= users and master.pid not in users
    server_side = [e for e in bundle.of_type("tcp_state") if e["saddr"] == SERVER_ADDR and e["sport"] == PORT
                   and e.get("conntrack")]
    assert server_side and {e["pid"] for e in server_side} <= workers


LOSS = f"""table inet kt_loss {{
  chain in {{
    type filter hook prerouting priority -300;
    ip saddr {SERVER_ADDR} tcp sport {PORT} tcp flags & syn == 0 numgen random mod 100 < 10 drop
  }}
}}
"""


def test_a_prefork_servers_retransmits_name_the_worker_that_owns_the_connection(tmp_path, nginx):
    net, master, workers, conf_dir = nginx
    # 10% of what nginx sends after the handshake is lost on the way to the client: the worker's sockets retransmit
    net.nft(net.client, LOSS)
    requests = 200

    def load() -> None:
        out = net.run(net.client, "ab", "-n", str(requests), "-c", "8", f"http://{SERVER_ADDR}:{PORT}/")
        assert f"Complete requests:      {requests}" in out.stdout

    before = net.nstat(net.server)
    bundle = record_during(tmp_path, load, f"--ports={PORT}")
    retrans_segs = net.nstat(net.server)["TcpRetransSegs"] - before["TcpRetransSegs"]

    retransmits = [e for e in bundle.of_type("retransmit") if e["saddr"] == SERVER_ADDR and e["sport"] == PORT]
    assert retransmits and sum(e["segments"] for e in retransmits if e["err"] == 0) == retrans_segs
    assert {(e["kind"], e["attribution"]) for e in retransmits} == {("data", "socket_owner")}
    assert {e["pid"] for e in retransmits} <= workers and {e["uid"] for e in retransmits} == {_uid(min(workers))}


STATE_HOOKS = [hook.label for hook in FAMILY_BY_NAME["tcp_state"].chain[:2]]  # tp_btf, then the tracepoint
# 5% of everything nginx sends is lost on the way to the client, SYN-ACKs included: handshakes that end on a
# retransmitted SYN-ACK, children made by a later ACK, data and FINs sent again
RANDOM_LOSS = f"""table inet kt_loss {{
  chain in {{
    type filter hook prerouting priority -300;
    meta l4proto tcp tcp sport {PORT} numgen random mod 100 < 5 drop
  }}
}}
"""


def _wait_settled(net: TwoHosts, port: int) -> None:
    """Until no server socket on port is between LISTEN and TIME_WAIT: every state change and retransmit of the
    load has happened (a FIN lost on the way is sent again after ab has exited)."""
    for _ in range(1200):  # bounded: the RTO backoff of a FIN lost twice is a few seconds
        out = net.run(net.server, "ss", "-Htan", "state", "all", "exclude", "listening", "exclude", "time-wait",
                      f"( sport = :{port} )").stdout
        if not out.strip():
            return
        time.sleep(0.05)
    raise AssertionError(f"server sockets on {port} never settled: {out}")


@pytest.mark.parametrize("hook", STATE_HOOKS)
def test_every_connection_of_a_prefork_server_under_random_loss_is_recorded_as_bpftrace_sees_it(tmp_path, nginx,
                                                                                               hook):
    net, master, workers, conf_dir = nginx
    net.nft(net.client, RANDOM_LOSS)
    requests = 1000

    def load() -> None:
        out = net.run(net.client, "ab", "-n", str(requests), "-c", "8", f"http://{SERVER_ADDR}:{PORT}/")
        assert f"Complete requests:      {requests}" in out.stdout, out.stdout
        _wait_settled(net, PORT)  # the window ends after the last server-side change, as bpftrace's does

    skip = [f"--skip-hook={h}" for h in STATE_HOOKS[:STATE_HOOKS.index(hook)]]
    before = net.nstat(net.server)
    with StateTracer(PORT, tmp_path / "bpftrace.out") as tracer:
        bundle = record_during(tmp_path, load, *skip)  # no --ports: the unfiltered path, as a user runs it
        tracer_missed = tracer.misses()
        traced = tracer.stop()
    after = net.nstat(net.server)
    delta = {k: after[k] - before[k] for k in ("TcpPassiveOpens", "TcpRetransSegs", "TcpExtTCPSynRetrans")}

    assert next(row["chosen"] for row in bundle.summary["probes"] if row["family"] == "tcp_state") == hook
    server_side = [e for e in bundle.of_type("tcp_state")
                   if e["saddr"] == SERVER_ADDR and e["sport"] == PORT and e["dport"] != 0]
    ours = Counter((e["dport"], e["old_state"], e["new_state"]) for e in server_side)
    theirs = Counter((r["rport"], r["old"], r["new"]) for r in traced if r["rport"] != 0)
    retransmits = [e for e in bundle.of_type("retransmit") if e["saddr"] == SERVER_ADDR and e["sport"] == PORT]
    synacks = [e for e in retransmits if e["kind"] == "synack"]
    segments = sum(e["segments"] for e in retransmits if e["kind"] == "data" and e["err"] == 0) + len(synacks)
    losses = bundle.summary["losses"]
    opened = {"ktrace": sum(n for (_, old, _), n in ours.items() if old == "LISTEN"),
              "bpftrace": sum(n for (_, old, _), n in theirs.items() if old == "LISTEN")}
    # ab's ports come round again within one run: a port is not a connection, a (port, change) count is
    print(f"\n{hook}: connections {opened['ktrace']} (bpftrace {opened['bpftrace']}, "
          f"TcpPassiveOpens {delta['TcpPassiveOpens']}), changes {sum(ours.values())} (bpftrace "
          f"{sum(theirs.values())}); SYN-ACK retransmits {len(synacks)} (TcpExtTCPSynRetrans "
          f"{delta['TcpExtTCPSynRetrans']}), segments {segments} (TcpRetransSegs {delta['TcpRetransSegs']}); "
          f"tcp_state losses {losses['by_family']['tcp_state']}; bpftrace skipped {tracer_missed}")
    # the loss really took SYN-ACKs and data: the paths a lost packet opens were taken
    assert delta["TcpExtTCPSynRetrans"] > 0 and delta["TcpRetransSegs"] > delta["TcpExtTCPSynRetrans"]
    # per connection (the client's port), every change bpftrace saw on the same tracepoint, and nothing else. The
    # kernel skips a BPF program on a CPU where one is already running (a softirq that changes a socket's state
    # while a program runs in a syscall): such a change is missing from one side and counted in its misses
    row = losses["by_family"]["tcp_state"]
    only_ours, only_theirs = ours - theirs, theirs - ours
    assert sum(only_ours.values()) <= tracer_missed and sum(only_theirs.values()) <= row["missed"], (
        sorted(only_ours.items())[:10], sorted(only_theirs.items())[:10], tracer_missed, row["missed"])
    if not tracer_missed and not row["missed"]:
        assert ours == theirs
    accepted = [e for e in server_side if e["old_state"] == "LISTEN" and e["new_state"] == "SYN_RECV"]
    assert len(accepted) == delta["TcpPassiveOpens"] >= requests
    # connections whose SYN-ACK was lost are among them, from the listener's change on. Those the client
    # established: ab closes the connects it no longer needs at the end, and a SYN-ACK sent again to a closed
    # port gets a reset that ends the request before any child socket exists (bpftrace and nstat see none either)
    established = {e["sport"] for e in bundle.of_type("tcp_state") if e["saddr"] == CLIENT_ADDR
                   and e["dport"] == PORT and (e["old_state"], e["new_state"]) == ("SYN_SENT", "ESTABLISHED")}
    lost_synack = {e["dport"] for e in synacks} & established
    assert lost_synack and all(ours[(p, "LISTEN", "SYN_RECV")] >= 1 and ours[(p, "SYN_RECV", "ESTABLISHED")] >= 1
                               for p in lost_synack)
    assert len(synacks) == delta["TcpExtTCPSynRetrans"] and segments == delta["TcpRetransSegs"]
    # nothing was lost in transit; a run the kernel skipped is counted, and then the losses do not balance
    assert row["ringbuf_full"] == 0 and row["seen"] == row["written"] + row["filtered"]
    assert losses["balanced"] is (losses["total"]["missed"] == 0), losses
    assert ("events_lost" in {f["rule"] for f in bundle.summary["findings"]}) is (losses["total"]["missed"] > 0)
    assert validate_bundle({k: v for k, v in bundle.paths.items() if k != "bundle.tgz"}) == []
