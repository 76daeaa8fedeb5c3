"""Findings on the real kernel, with the network namespace's own counters (nstat), the servers' logs and bpftrace
as ground truth: a healthy nginx under ab raises no drop warning while its drops stay counted, real loss still
warns, 40 failing jobs and an OOM kill make a handful of grouped findings with the OOM kill first, and --dns-only
keeps other drops out."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import Ktrace, Rig, record_during, wait_for
from tests.prockit import MemoryCgroup, oom_hog

HTTP_PORT = 8080
CLOSED_UDP_PORT = 9999
REQUESTS = 2000
DATAGRAMS = 150
JOBS = 40
CONNECTS_PER_JOB = 3
REFUSED_PORT = 9

NGINX_CONF = """
daemon off;
master_process on;
worker_processes 2;
user root;
pid {dir}/nginx.pid;
error_log {dir}/error.log;
events {{ worker_connections 256; }}
http {{
    access_log {dir}/access.log;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    server {{
        listen 127.0.0.1:{port};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""

# One failing job: CONNECTS_PER_JOB connects to 127.0.0.1:REFUSED_PORT (refused), then exit 3.
JOB = f"""
import socket, sys
for _ in range({CONNECTS_PER_JOB}):
    s = socket.socket()
    try:
        s.connect(("127.0.0.1", {REFUSED_PORT}))
    except ConnectionRefusedError:
        pass
    s.close()
sys.exit(3)
"""


class Netns(Rig):
    """A network namespace kt10fd-<hint>-<pid> with its loopback up, deleted on exit."""

    def __init__(self, hint: str) -> None:
        self.name = f"kt10fd-{hint}-{os.getpid()}"
        self.made = False
        self.inode = 0  # the namespace's inode number, as events name it (kept after the namespace is gone)

    def _start(self) -> None:
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True)
        self.made = True
        self.inode = os.stat(f"/run/netns/{self.name}").st_ino
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True, capture_output=True)

    def close(self) -> None:
        if self.made:
            subprocess.run(["ip", "netns", "del", self.name], check=False, capture_output=True)
            self.made = False

    def command(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def nstat(self) -> dict[str, int]:
        """The namespace's absolute SNMP counters (nstat -a, without touching nstat's history)."""
        out = subprocess.run(self.command("nstat", "-asz", "--json"), check=True, capture_output=True, text=True)
        return json.loads(out.stdout)["kernel"]


class Nginx(Rig):
    """A real nginx (master and 2 workers) on 127.0.0.1:HTTP_PORT inside a namespace, logs in its directory."""

    def __init__(self, ns: Netns, directory: Path) -> None:
        self.ns, self.dir = ns, directory
        self.proc: subprocess.Popen | None = None

    def _start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        conf = self.dir / "nginx.conf"
        conf.write_text(NGINX_CONF.format(dir=self.dir, port=HTTP_PORT))
        self.proc = subprocess.Popen(self.ns.command("nginx", "-c", str(conf), "-p", str(self.dir)),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self.dir / "nginx.pid", self.proc)
        for _ in range(200):  # bounded: the workers listen once the master has forked them
            probe = subprocess.run(self.ns.command(sys.executable, "-c", f"import socket; socket.create_connection("
                                                   f"('127.0.0.1', {HTTP_PORT}), 1).close()"), capture_output=True)
            if probe.returncode == 0:
                break
            time.sleep(0.05)
        else:
            raise RuntimeError(f"nginx does not answer: {(self.dir / 'error.log').read_text()}")

    def requests_logged(self) -> int:
        return len((self.dir / "access.log").read_text().splitlines())

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # the master stops its workers
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def _drop_findings(summary: dict) -> dict[str, dict]:
    return {f["subject"]["reason"]: f for f in summary["findings"] if f["rule"] == "packet_drops"}


BPFTRACE = """
tracepoint:skb:kfree_skb /args->reason != 1/ {
    $skb = (struct sk_buff *)args->skbaddr;
    $sk = $skb->sk;
    $ns = $sk != 0 ? $sk->__sk_common.skc_net.net->ns.inum : $skb->dev->nd_net.net->ns.inum;
    if ($ns == NETNS) { @[args->reason] = count(); }
}
"""


def test_a_healthy_nginx_under_ab_raises_no_drop_warning_while_its_drops_stay_counted(tmp_path):
    with Netns("web") as ns, Nginx(ns, tmp_path / "nginx") as nginx:
        script = tmp_path / "drops.bt"
        script.write_text(BPFTRACE.replace("NETNS", str(ns.inode)))
        out = tmp_path / "bpftrace.out"
        # bpftrace on the same tracepoint, for drops in this namespace only, around the whole window
        tracer = subprocess.Popen(["bpftrace", "-f", "json", "-o", str(out), str(script)],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            for _ in range(200):
                if out.exists() and "attached_probes" in out.read_text():
                    break
                time.sleep(0.05)
            before = ns.nstat()
            ab: dict = {}

            def work() -> None:
                ab["run"] = subprocess.run(ns.command("ab", "-q", "-n", str(REQUESTS), "-c", "10",
                                                      f"http://127.0.0.1:{HTTP_PORT}/"),
                                           capture_output=True, text=True, timeout=240)
                ab["after"] = ns.nstat()

            bundle = record_during(tmp_path, work, "--probes=tcp_state,drops", f"--ports={HTTP_PORT}")
        finally:
            tracer.send_signal(2)
            tracer.wait(timeout=30)
        assert ab["run"].returncode == 0 and "Failed requests:        0" in ab["run"].stdout, ab["run"].stdout
        assert nginx.requests_logged() == REQUESTS
        accepted = ab["after"]["TcpPassiveOpens"] - before.get("TcpPassiveOpens", 0)
        assert accepted >= REQUESTS  # ab may open a few connections more than it sends requests on

    truth: dict[str, int] = {}
    for line in out.read_text().splitlines():
        record = json.loads(line)
        if record.get("type") == "map":
            truth = {str(k): v for k, v in record["data"]["@"].items()}
    s = bundle.summary
    assert s["tcp"]["connections"]["accepted"] == accepted  # port HTTP_PORT is only this namespace's nginx
    mine = [e for e in bundle.of_type("drop") if e["netns_pkt"] == ns.inode]
    by_reason: dict[str, int] = {}
    for e in mine:
        by_reason[e["reason"]] = by_reason.get(e["reason"], 0) + 1
    # the same drops as bpftrace counted in the namespace, reason by reason (bpftrace keys are reason codes)
    codes = {e["reason"]: e["reason_code"] for e in mine}
    assert {codes[r]: n for r, n in by_reason.items()} == {int(k): v for k, v in truth.items()}
    assert by_reason.get("QUEUE_PURGE", 0) >= REQUESTS // 2  # the FINs of connections that closed normally
    # counted in the summary, as routine: no warning
    for reason, n in by_reason.items():
        row = next(r for r in s["drops"]["by_reason"] if r["reason"] == reason)
        assert row["count"] >= n and row["routine"] is True, reason
    assert s["drops"]["routine"] >= len(mine)
    findings = _drop_findings(s)
    for reason in by_reason:
        assert findings[reason]["severity"] == "info" and findings[reason]["subject"]["routine"] is True
        assert findings[reason]["evidence"]["lines"]
    assert not [f for f in findings.values() if f["severity"] != "info" and f["subject"]["reason"] in by_reason]


def test_datagrams_to_a_closed_port_still_warn(tmp_path):
    with Netns("udp") as ns:
        before = ns.nstat()
        after: dict = {}

        def work() -> None:
            code = (f"import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                    f"for _ in range({DATAGRAMS}): s.sendto(b'x' * 100, ('127.0.0.1', {CLOSED_UDP_PORT}))")
            subprocess.run(ns.command(sys.executable, "-c", code), check=True, timeout=60)
            after.update(ns.nstat())

        bundle = record_during(tmp_path, work, "--probes=drops", f"--ports={CLOSED_UDP_PORT}")
    no_ports = after["UdpNoPorts"] - before.get("UdpNoPorts", 0)
    assert no_ports == DATAGRAMS
    mine = [e for e in bundle.of_type("drop") if e["netns_pkt"] == ns.inode and e["dport"] == CLOSED_UDP_PORT]
    assert len(mine) == no_ports and {e["reason"] for e in mine} == {"NO_SOCKET"}
    finding = _drop_findings(bundle.summary)["NO_SOCKET"]
    assert finding["severity"] == "warning" and finding["subject"]["routine"] is False
    assert finding["evidence"]["count"] >= DATAGRAMS


def test_forty_failing_jobs_and_an_oom_kill_are_a_handful_of_grouped_findings_with_the_oom_kill_first(tmp_path):
    with Netns("jobs") as ns:
        before = ns.nstat()
        result: dict = {}

        def work() -> None:
            jobs = [subprocess.Popen(ns.command(sys.executable, "-c", JOB)) for _ in range(JOBS)]
            result["codes"] = [job.wait(timeout=120) for job in jobs]
            result["after"] = ns.nstat()
            with MemoryCgroup() as cgroup:
                result["hog"], result["hog_code"] = oom_hog(cgroup)
                result["oom_kills"] = cgroup.oom_kills()

        ktrace = Ktrace(tmp_path, "--probes=tcp_state,reset,drops,process,oom", f"--ports={REFUSED_PORT}",
                        duration="120s").started()
        try:
            work()
        finally:
            ktrace.signal(2)
        assert ktrace.finish() in (0, 3), ktrace.stderr
        bundle = ktrace.bundle()
    assert result["codes"] == [3] * JOBS and result["hog_code"] == -9 and result["oom_kills"] == 1
    fails = result["after"]["TcpAttemptFails"] - before.get("TcpAttemptFails", 0)
    assert fails == JOBS * CONNECTS_PER_JOB  # the namespace's own count of refused connects

    s = bundle.summary
    findings = s["findings"]
    assert len(findings) <= 8, [f["title"] for f in findings]
    top = findings[0]
    assert top["rule"] == "oom_kill" and top["severity"] == "critical" and top["subject"]["pid"] == result["hog"]
    # printed on the console, and the console's view is in the bundle exactly as printed
    console = s["console"]["lines"]
    assert console[1] == f"  [critical] {top['title']}"
    printed = [line for line in ktrace.stderr.splitlines() if line.startswith("  [")]
    assert printed == [line for line in console if line.startswith("  [")]

    [refused] = [f for f in findings if f["rule"] == "connect_refused"]
    assert refused["evidence"]["count"] == fails and refused["subject"]["processes"] == JOBS
    assert len(refused["subject"]["pids"]) == 5 and refused["subject"]["pids_omitted"] == JOBS - 5
    assert all(p["count"] == CONNECTS_PER_JOB for p in refused["subject"]["pids"])
    job_pids = {e["pid"] for e in bundle.of_type("tcp_state") if e["new_state"] == "SYN_SENT"
                and e["dport"] == REFUSED_PORT}
    assert len(job_pids) == JOBS and {p["pid"] for p in refused["subject"]["pids"]} <= job_pids
    received = [f for f in findings if f["rule"] == "tcp_reset" and f["subject"]["direction"] == "received"]
    assert [f["evidence"]["count"] for f in received] == [fails]
    # (other crash loops may be the host's own: pyenv's shims run readlink, exiting 1)
    [crash] = [f for f in findings if f["rule"] == "crash_loop" and "exit 3" in f["subject"]["reasons"]]
    assert crash["subject"]["reasons"] == {"exit 3": JOBS, "SIGKILL": 1}  # the jobs, and the OOM-killed hog
    severities = [f["severity"] for f in findings]
    assert severities == sorted(severities, key={"critical": 0, "warning": 1, "info": 2}.get)


def test_dns_only_keeps_drops_of_other_traffic_out_and_counts_them_as_filtered(tmp_path):
    with Netns("dnsonly") as ns:
        before = ns.nstat()
        after: dict = {}

        def work() -> None:
            code = ("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                    f"for _ in range({DATAGRAMS}): s.sendto(b'x' * 100, ('127.0.0.1', {CLOSED_UDP_PORT}))\n"
                    "for _ in range(20): s.sendto(b'x' * 100, ('127.0.0.1', 53))")
            subprocess.run(ns.command(sys.executable, "-c", code), check=True, timeout=60)
            after.update(ns.nstat())

        bundle = record_during(tmp_path, work, "--dns-only", "--probes=drops")
    assert after["UdpNoPorts"] - before.get("UdpNoPorts", 0) == DATAGRAMS + 20
    drops = bundle.of_type("drop")
    mine = [e for e in drops if e["netns_pkt"] == ns.inode]
    # the 20 to the DNS port are kept, one by one; the 150 to another port are not
    assert len(mine) == 20 and {e["dport"] for e in mine} == {53}
    assert all(53 in (e["sport"], e["dport"]) for e in drops)
    assert not bundle.of_type("drop_count")  # nothing counted of other traffic
    assert bundle.summary["losses"]["by_family"]["drops"]["filtered"] >= DATAGRAMS
    assert bundle.summary["losses"]["balanced"]

