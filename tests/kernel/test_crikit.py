"""tests/crikit.py itself, with real containerd and real pods: the cgroups kubelet would give them, loopback
traffic and DNS from a hostNetwork pod, exit status, and a teardown that leaves nothing behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests import crikit
from tests.dnsnet import FAKEDNS
from tests.helpers import require_containerd, wait_for

UNIFIED = Path("/sys/fs/cgroup/unified")


def cgroup_lines(pid: int) -> dict[str, str]:
    """/proc/<pid>/cgroup as {"0": v2 path, "memory": path, "name=systemd": path, ...}."""
    lines = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        hid, controllers, path = line.split(":", 2)
        lines["0" if hid == "0" else controllers] = path
    return lines


def expected_cgroup(naming: str, uid: str, cid: str) -> str:
    """kubelet's pod cgroup plus containerd's container cgroup, written out for each naming scheme."""
    if naming == "cgroupfs":
        return f"/kubepods/burstable/pod{uid}/{cid}"
    pod_slice = f"kubepods-burstable-pod{uid.replace('-', '_')}.slice"
    return f"/kubepods.slice/kubepods-burstable.slice/{pod_slice}/cri-containerd-{cid}.scope"


@pytest.mark.parametrize("naming", ["cgroupfs", "systemd"])
def test_container_runs_in_kubelet_style_cgroup(containerd: crikit.Containerd, naming: str) -> None:
    uid = "3f8e2b1a-1c2d-4e5f-8a9b-" + os.urandom(6).hex()
    pod = containerd.run_pod(f"cg-{naming}", "team-a", uid, naming=naming)
    try:
        cid = containerd.start_container(pod, "worker", ["sleep", "300"])
        pid = containerd.container_pid(cid)
        assert pid > 0
        want = expected_cgroup(naming, uid, cid)
        lines = cgroup_lines(pid)
        assert lines["0"] == want
        assert lines["memory"] == want  # absolute cgroupsPath: the same path in every v1 hierarchy
        assert crikit.container_cgroup(pod, cid) == want

        cgroup_dir = UNIFIED / want.lstrip("/")
        assert cgroup_dir.stat().st_ino > 1  # the id bpf_get_current_cgroup_id() reports for the process
        assert str(pid) in (cgroup_dir / "cgroup.procs").read_text().split()

        status, info = containerd.container_status(cid)
        assert status.state == containerd.pb.CONTAINER_RUNNING
        assert dict(status.labels) == {"io.kubernetes.container.name": "worker", "io.kubernetes.pod.name": pod.name,
                                       "io.kubernetes.pod.namespace": "team-a", "io.kubernetes.pod.uid": uid}
        assert info["sandboxID"] == pod.sandbox_id
    finally:
        containerd.remove_pod(pod)
    for hierarchy in crikit.cgroup_mounts():
        assert not (hierarchy / pod.cgroup_parent.lstrip("/")).exists()


def test_container_reaches_a_loopback_server_of_the_test(containerd: crikit.Containerd) -> None:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(30)
    port = server.getsockname()[1]
    pod = containerd.run_pod("client", "team-a")
    try:
        cid = containerd.start_container(pod, "nc", ["sh", "-c", f"echo hello-from-pod | nc 127.0.0.1 {port}"])
        conn, _ = server.accept()
        with conn:
            conn.settimeout(30)
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(100)
                if not chunk:
                    break
                data += chunk
        assert data == b"hello-from-pod\n"
        assert containerd.wait_exited(cid) == 0
    finally:
        server.close()
        containerd.remove_pod(pod)


def test_exited_container_is_reported_exited_with_its_code(containerd: crikit.Containerd) -> None:
    pod = containerd.run_pod("short", "team-a")
    try:
        cid = containerd.start_container(pod, "once", ["sh", "-c", "echo done; exit 7"])
        assert containerd.wait_exited(cid) == 7
        status, _ = containerd.container_status(cid)
        assert status.state == containerd.pb.CONTAINER_EXITED
        assert containerd.logs(cid) == "done\n"
        containerd.remove_container(cid)
        assert containerd.list_containers(pod) == []
    finally:
        containerd.remove_pod(pod)


def free_port() -> int:
    """A loopback port free for both UDP and TCP, for fakedns.py."""
    while True:
        with socket.socket() as tcp:
            tcp.bind(("127.0.0.1", 0))
            port = tcp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
                try:
                    udp.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port


def test_busybox_nslookup_queries_a_fake_server_on_a_non_53_port(containerd: crikit.Containerd,
                                                                  tmp_path: Path) -> None:
    """busybox 1.35: `nslookup HOST SERVER:PORT`, so a test's fake DNS needs no port 53."""
    ready, control = tmp_path / "dns.ready", tmp_path / "dns"
    port = free_port()
    dns = subprocess.Popen([sys.executable, FAKEDNS, "--ready-file", str(ready), "--control-dir", str(control),
                            "--listen", "127.0.0.1", "--port", str(port)])
    pod = containerd.run_pod("resolver", "team-a")
    try:
        wait_for(ready, dns)
        cid = containerd.start_container(pod, "lookup", ["nslookup", "-type=a", "web.test", f"127.0.0.1:{port}"])
        assert containerd.wait_exited(cid) == 0, containerd.logs(cid)
        assert "Address: 127.0.0.5" in containerd.logs(cid)
        queries = [json.loads(line) for line in (control / "queries.jsonl").read_text().splitlines()]
        assert [(q["proto"], q["name"], q["qtype"], q["action"]) for q in queries] == [
            ("udp", "web.test", 1, "answer")]
    finally:
        containerd.remove_pod(pod)
        dns.terminate()
        dns.wait(timeout=10)


def live_processes_mentioning(text: str) -> list[tuple[int, str]]:
    """(pid, command line) of every non-zombie process whose command line contains text."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append((int(proc.name), cmdline))
    return found


def empty_leaf_cgroups(root: Path) -> list[Path]:
    """Cgroups under root with no child cgroups and no processes: what a leaking teardown leaves."""
    empty = []
    for dirpath, dirnames, _ in os.walk(root):
        if not dirnames and not (Path(dirpath) / "cgroup.procs").read_text().strip():
            empty.append(Path(dirpath))
    return empty


def test_teardown_leaves_no_pods_cgroups_mounts_or_processes(crikit_image: Path) -> None:
    with crikit.Containerd(crikit_image) as kit:
        pods = [kit.run_pod("gone-cgfs", "team-a", naming="cgroupfs"),
                kit.run_pod("gone-sd", "team-a", naming="systemd")]
        pids = [kit.container_pid(kit.start_container(pod, "worker", ["sleep", "300"])) for pod in pods]
        kit_dir, containerd_pid, shims = kit.dir, kit.proc.pid, kit.shim_pids()
        assert len(shims) == 2  # one per pod
        assert crikit.mounts_under(kit_dir)  # rootfs overlays and sandbox shm, for close() to undo
    # the pods were left running: close() had to remove them

    assert not kit_dir.exists()
    assert crikit.mounts_under(kit_dir) == []
    assert live_processes_mentioning(str(kit_dir)) == []
    for pid in [containerd_pid, *shims, *pids]:
        assert not is_alive(pid), pid
    for hierarchy in crikit.cgroup_mounts():
        for pod in pods:
            assert not (hierarchy / pod.cgroup_parent.lstrip("/")).exists()
        for root in ("kubepods", "kubepods.slice"):
            assert empty_leaf_cgroups(hierarchy / root) == []
    shim_sockets = crikit.SHIM_SOCKET_DIR
    assert not shim_sockets.exists() or any(shim_sockets.iterdir())


def is_alive(pid: int) -> bool:
    """True if pid is a live process (zombies, which are waiting for init to reap them, are not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_failed_start_leaves_nothing(tmp_path: Path) -> None:
    require_containerd()
    broken = tmp_path / "not-an-image.tar"
    broken.write_bytes(b"not a tarball")
    kit = crikit.Containerd(broken)
    with pytest.raises(subprocess.CalledProcessError):
        kit.__enter__()
    assert not kit.dir.exists()
    assert kit.proc is not None and kit.proc.poll() is not None


def test_pod_dns_servers_become_the_containers_resolv_conf(containerd: crikit.Containerd) -> None:
    pod = containerd.run_pod("dns-config", "team-a", dns_servers=["127.0.0.1"])
    try:
        cid = containerd.start_container(pod, "resolv", ["cat", "/etc/resolv.conf"])
        assert containerd.wait_exited(cid) == 0
        assert containerd.logs(cid) == "nameserver 127.0.0.1\n"
    finally:
        containerd.remove_pod(pod)
