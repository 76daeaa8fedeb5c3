"""Pod and container names from a real containerd over CRI: events from inside pods name their pod.

The pods are real (tests/crikit.py: containerd with its CRI plugin, runc, an image built offline), hostNetwork,
in kubelet's cgroups of both naming schemes; their traffic goes to a TCP server and a fake DNS server of the
test's own on loopback.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import crikit
from tests.dnsnet import FAKEDNS
from tests.helpers import closed_port, record_during, wait_for
from tests.kernel.test_crikit import free_port


class Peers:
    """A TCP server that accepts and closes, and a fake DNS server on another port, both on one node address."""

    def __init__(self, tmp_path: Path, address: str = "127.0.0.1") -> None:
        self.address = address
        self.server = socket.socket()
        self.server.bind((address, 0))
        self.server.listen(128)
        self.tcp_port = self.server.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()
        self.dns_port = free_port()
        ready = tmp_path / "dns.ready"
        self.dns = subprocess.Popen([sys.executable, FAKEDNS, "--ready-file", str(ready), "--control-dir",
                                     str(tmp_path / "dns"), "--listen", address, "--port", str(self.dns_port)])
        wait_for(ready, self.dns)

    def _accept(self) -> None:
        self.server.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self.server.accept()
                conn.close()
            except OSError:
                continue

    def client_script(self, rounds: int, tcp: str | None = None, dns: str | None = None) -> list[str]:
        """A TCP connect and an A query, `rounds` times (busybox: nc and nslookup SERVER:PORT), to the servers or
        to the given address:port of each."""
        tcp = tcp or f"{self.address}:{self.tcp_port}"
        dns = dns or f"{self.address}:{self.dns_port}"
        host, port = tcp.rsplit(":", 1)
        once = f"echo hi | nc {host} {port}; nslookup -type=a web.test {dns} >/dev/null"
        return ["sh", "-c", f"for i in $(seq {rounds}); do {once}; sleep 0.2; done"]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.server.close()
        self.dns.terminate()
        self.dns.wait(timeout=10)


@pytest.fixture
def peers(tmp_path: Path) -> Iterator[Peers]:
    p = Peers(tmp_path)
    try:
        yield p
    finally:
        p.close()


def pod_events(bundle, peers: Peers, pod: crikit.Pod) -> dict[str, list[dict]]:
    """The pod's connects to the TCP server and its queries to the DNS server."""
    mine = [e for e in bundle.events if (e.get("k8s") or {}).get("pod_uid") == pod.uid]
    return {"connect": [e for e in mine if e["type"] == "connect" and e["dport"] == peers.tcp_port],
            "dns_query": [e for e in mine if e["type"] == "dns_query" and e["dport"] == peers.dns_port]}


def expected_k8s(pod: crikit.Pod, container_id: str, container: str) -> dict:
    return {"pod_uid": pod.uid, "qos": pod.qos, "container_id": container_id,
            "runtime": "containerd" if pod.naming == "systemd" else None,  # cgroupfs: the bare id names no runtime
            "namespace": pod.namespace, "pod": pod.name, "container": container, "image": crikit.IMAGE}


def test_connects_and_dns_from_two_pods_carry_their_pod_and_container(tmp_path, containerd, peers):
    pods = [containerd.run_pod("web-7d9f", "team-a", naming="cgroupfs"),
            containerd.run_pod("api-5c4b", "team-b", naming="systemd")]
    try:
        # running before the window: named from the runtime's list when ktrace starts, not asked one by one
        containers = {pod.uid: containerd.start_container(pod, "client", peers.client_script(rounds=300))
                      for pod in pods}
        bundle = record_during(tmp_path, lambda: time.sleep(3), f"--cri-socket={containerd.socket}",
                               f"--dns-ports={peers.dns_port}", "--probes=tcp_state,connect,dns,cgroups")
    finally:
        for pod in pods:
            containerd.remove_pod(pod)

    cri = bundle.summary["cri"]
    assert cri["connected"] and cri["runtime"]["runtime_name"] == "containerd"
    assert cri["queries"] == 0  # every event's names came from the listing at the start
    for pod in pods:
        events = pod_events(bundle, peers, pod)
        assert events["connect"] and events["dns_query"], (pod, events)
        want = expected_k8s(pod, containers[pod.uid], "client")
        for event in events["connect"] + events["dns_query"]:
            assert event["k8s"] == want, event
            assert event["cgroup_path"] == crikit.container_cgroup(pod, containers[pod.uid])
        row = next(r for r in bundle.summary["pods"]["pods"] if r["pod_uid"] == pod.uid)
        assert (row["namespace"], row["pod"]) == (pod.namespace, pod.name)
        assert row["tcp_connects"] >= len(events["connect"])


# connects and queries are decoded as they happen; UDP flows only when the window ends, long after the container
# was removed: they are named only because the container was looked up when its cgroup appeared
@pytest.mark.parametrize("probes", ["tcp_state,connect,dns,cgroups,process", "udp,cgroups"])
def test_a_container_that_connects_and_is_gone_within_the_window_is_still_named(tmp_path, containerd, peers, probes):
    pod = containerd.run_pod("batch-0", "team-c", naming="systemd", qos="besteffort")
    started = []

    def run_and_remove() -> None:
        cid = containerd.start_container(pod, "once", peers.client_script(rounds=1))
        started.append(cid)
        assert containerd.wait_exited(cid) == 0, containerd.logs(cid)
        containerd.remove_pod(pod)  # container, sandbox and cgroups gone before the window ends
        assert cid not in {c.id for c in containerd.list_containers()}

    try:
        bundle = record_during(tmp_path, run_and_remove, f"--cri-socket={containerd.socket}",
                               f"--dns-ports={peers.dns_port}", f"--probes={probes}")
    finally:
        if pod.sandbox_id in containerd.pods:  # the work failed before removing it
            containerd.remove_pod(pod)
    (cid,) = started
    want = expected_k8s(pod, cid, "once")
    assert not Path(f"/sys/fs/cgroup/unified{crikit.container_cgroup(pod, cid)}").exists()
    assert bundle.summary["cri"]["queries"] >= 1  # asked once, when its cgroup appeared
    if "connect" in probes:
        events = pod_events(bundle, peers, pod)
        assert len(events["connect"]) == 1 and events["dns_query"], events
        for event in events["connect"] + events["dns_query"]:
            assert event["k8s"] == want, event
        # the container's processes started and exited in the window, under its name
        execs = [e for e in bundle.of_type("exec") if (e.get("k8s") or {}).get("container_id") == cid]
        assert execs and all(e["k8s"] == want for e in execs)
    else:
        flows = [e for e in bundle.of_type("udp_flow") if e["dport"] == peers.dns_port and e["direction"] == "egress"
                 and (e.get("k8s") or {}).get("container_id") == cid]
        assert flows, bundle.of_type("udp_flow")
        for flow in flows:
            assert flow["k8s"] == want, flow


def test_without_the_runtime_names_come_from_the_pods_log_directory(tmp_path, containerd, peers):
    """--without-cri: kubelet's podLogsDir naming (the kit has containerd write logs in that layout in its dir)."""
    pod = containerd.run_pod("logs-only", "team-d", naming="cgroupfs")
    try:
        cid = containerd.start_container(pod, "client", peers.client_script(rounds=300))
        bundle = record_during(tmp_path, lambda: time.sleep(2), "--without-cri", f"--dns-ports={peers.dns_port}",
                               f"--pod-logs-dir={pod.log_directory.parent}", "--probes=tcp_state,connect,dns")
    finally:
        containerd.remove_pod(pod)
    events = pod_events(bundle, peers, pod)
    assert events["connect"], events
    for event in events["connect"]:
        assert event["k8s"] == {**expected_k8s(pod, cid, "client"), "image": None}, event
    assert bundle.summary["cri"]["socket"] is None


def test_doctor_names_the_runtime_behind_the_socket(containerd):
    out = subprocess.run([sys.executable, "-m", "ktrace", "doctor", f"--cri-socket={containerd.socket}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = next(line for line in out.stdout.splitlines() if line.startswith("pod names: "))
    assert line.startswith(f"pod names: CRI {containerd.socket} · containerd 1.") and "(v1)" in line, line


def test_a_finding_about_a_process_in_a_pod_names_the_pod(tmp_path, containerd):
    pod = containerd.run_pod("checkout-8f2a", "shop", naming="cgroupfs")
    port = closed_port()
    try:
        def refused() -> None:
            cid = containerd.start_container(pod, "probe", ["sh", "-c", f"nc 127.0.0.1 {port} </dev/null; exit 0"])
            assert containerd.wait_exited(cid) == 0

        bundle = record_during(tmp_path, refused, f"--cri-socket={containerd.socket}",
                               "--probes=tcp_state,connect,reset,cgroups")
    finally:
        containerd.remove_pod(pod)
    finding = next(f for f in bundle.summary["findings"] if f["rule"] == "connect_refused"
                   and f["subject"]["remote"] == f"127.0.0.1:{port}")
    assert finding["pods"] == [{"pod_uid": pod.uid, "namespace": "shop", "pod": "checkout-8f2a",
                                "lines": len(finding["evidence"]["lines"])}]
    row = next(r for r in bundle.summary["pods"]["pods"] if r["pod_uid"] == pod.uid)
    assert {"rule": "connect_refused", "severity": finding["severity"], "count": 1} in row["findings"]
    assert row["tcp_connects_failed"] == 1
    assert row["tcp_remotes"][0]["remote"] == f"127.0.0.1:{port}" and row["tcp_remotes"][0]["refused"] == 1


def test_an_oom_killed_container_is_named(tmp_path, containerd):
    """kubelet's most common question: which pod was OOMKilled? A 32 MiB container that buffers 200 MiB."""
    pod = containerd.run_pod("ledger-0", "payments", naming="systemd")
    started = []
    try:
        def oom() -> None:
            # tail keeps the last line: /dev/zero has no newline, so it holds everything it reads
            cid = containerd.start_container(pod, "ledger", ["sh", "-c", "head -c 200m /dev/zero | tail -n 1"],
                                             memory_limit=32 << 20)
            started.append(cid)
            containerd.wait_exited(cid)

        bundle = record_during(tmp_path, oom, f"--cri-socket={containerd.socket}", "--probes=oom,cgroups")
    finally:
        containerd.remove_pod(pod)
    (cid,) = started
    # the OOM killer may take a second task of the container (head, sh) after tail; all are the container's
    kills = [e for e in bundle.of_type("oom_kill") if (e.get("k8s") or {}).get("container_id") == cid]
    assert "tail" in {k["comm"] for k in kills}, kills
    for kill in kills:
        assert kill["k8s"] == expected_k8s(pod, cid, "ledger")
        assert kill["memcg_path"] == crikit.container_cgroup(pod, cid)
    findings = [f for f in bundle.summary["findings"] if f["rule"] == "oom_kill"]
    assert findings
    for finding in findings:
        assert [(p["pod_uid"], p["namespace"], p["pod"]) for p in finding["pods"]] == [
            (pod.uid, "payments", "ledger-0")], finding


SERVICE_VIP, DNS_VIP = "10.96.77.10", "10.96.0.10"  # a Service and the cluster DNS, as kube-proxy would DNAT them


def test_a_pod_with_its_own_network_reaches_services_through_the_nodes_dnat(tmp_path, containerd_podnet):
    """The common case of a Kubernetes node: a pod in its own network namespace talks to a Service VIP and to the
    cluster DNS VIP; the node's nat table sends both to backends (here servers of the test on the node end of the
    pod's veth). Events carry the pod, conntrack the backend, and the NAT section names the pod."""
    node = containerd_podnet.node_address
    peers = Peers(tmp_path, node)
    table = f"kt_svc_{os.getpid()}"
    rules = f"""table ip {table} {{
      chain prerouting {{
        type nat hook prerouting priority -100;
        ip daddr {SERVICE_VIP} tcp dport 80 dnat to {node}:{peers.tcp_port}
        ip daddr {DNS_VIP} udp dport 53 dnat to {node}:{peers.dns_port}
      }}
    }}
    """
    subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True)
    pod = containerd_podnet.run_pod("frontend-6d5f", "shop", naming="systemd", pod_network=True)
    try:
        cid = containerd_podnet.start_container(pod, "web", peers.client_script(
            rounds=300, tcp=f"{SERVICE_VIP}:80", dns=DNS_VIP))
        bundle = record_during(tmp_path, lambda: time.sleep(3), f"--cri-socket={containerd_podnet.socket}",
                               "--with-conntrack", "--probes=tcp_state,connect,dns,udp,udp_peers,cgroups")
    finally:
        containerd_podnet.remove_pod(pod)
        subprocess.run(["nft", "delete", "table", "ip", table], check=False)
        peers.close()

    want = expected_k8s(pod, cid, "web")
    host_netns = os.stat("/proc/self/ns/net").st_ino
    mine = [e for e in bundle.events if (e.get("k8s") or {}).get("container_id") == cid]
    connects = [e for e in mine if e["type"] == "connect" and (e["daddr"], e["dport"]) == (SERVICE_VIP, 80)]
    queries = [e for e in mine if e["type"] == "dns_query" and (e["daddr"], e["dport"]) == (DNS_VIP, 53)]
    assert connects and queries, mine[:5]
    for event in connects + queries:
        assert event["k8s"] == want, event
        assert event["saddr"] == containerd_podnet.pod_address and event["netns"] != host_netns
    for event in connects:  # the entry lives in the node's namespace, where the DNAT happened
        assert event["conntrack"]["nat"] == "dnat", event
        assert (event["conntrack"]["reply"]["saddr"], event["conntrack"]["reply"]["sport"]) == (node, peers.tcp_port)

    pods_named = [{"pod_uid": pod.uid, "namespace": "shop", "pod": "frontend-6d5f"}]
    translations = {(t["protocol"], t["original"]): t for t in bundle.summary["nat"]["translations"]}
    tcp = translations[("tcp", f"{SERVICE_VIP}:80")]
    assert tcp["translated"] == f"{node}:{peers.tcp_port}" and tcp["nat"] == "dnat"
    assert [{k: p[k] for k in ("pod_uid", "namespace", "pod")} for p in tcp["pods"]] == pods_named
    udp = translations[("udp", f"{DNS_VIP}:53")]
    assert udp["translated"] == f"{node}:{peers.dns_port}"
    assert [{k: p[k] for k in ("pod_uid", "namespace", "pod")} for p in udp["pods"]] == pods_named
