"""Every event's cgroup path and Kubernetes pod: kubelet-named cgroups in the v1 memory hierarchy, both drivers.

The cgroups live under a top directory of the test's own (/sys/fs/cgroup/memory/kt-ident-<pid>-<n>), so no real
kubepods cgroup is touched; kubelet's naming is found anywhere in the path.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.helpers import Ktrace, record_during

V1_MEMORY = Path("/sys/fs/cgroup/memory")
# a TCP connect to a listener of its own and a UDP datagram, both on loopback
WORKER = """
import socket
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen()
socket.create_connection(listener.getsockname()).close()
listener.close()
udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
udp.sendto(b"kt-ident", ("127.0.0.1", 9))
udp.close()
"""


class KubeletCgroups:
    """A pod's container cgroup in kubelet's naming under a test-unique top directory, removed on exit."""

    def __init__(self, driver: str) -> None:
        self.top = V1_MEMORY / f"kt-ident-{os.getpid()}-{time.monotonic_ns()}"
        self.pod_uid = str(uuid.uuid4())
        self.container_id = uuid.uuid4().hex + uuid.uuid4().hex
        if driver == "cgroupfs":
            self.leaf = self.top / f"kubepods-kt{os.getpid()}" / "besteffort" / f"pod{self.pod_uid}" / self.container_id
            self.runtime = None
        else:
            underscored = self.pod_uid.replace("-", "_")
            self.leaf = (self.top / "kubepods.slice" / "kubepods-besteffort.slice"
                         / f"kubepods-besteffort-pod{underscored}.slice" / f"cri-containerd-{self.container_id}.scope")
            self.runtime = "containerd"
        self.id = 0

    @property
    def shown(self) -> str:
        """The path as /proc/<pid>/cgroup shows it."""
        return "/" + str(self.leaf.relative_to(V1_MEMORY))

    def create(self) -> KubeletCgroups:
        self.leaf.mkdir(parents=True)
        self.id = self.leaf.stat().st_ino
        return self

    def run_worker(self) -> int:
        """Run the worker inside the container's cgroup; its pid."""
        procs = self.leaf / "cgroup.procs"
        worker = subprocess.Popen([sys.executable, "-c", WORKER],
                                  preexec_fn=lambda: procs.write_text(str(os.getpid())))
        assert worker.wait(timeout=60) == 0
        return worker.pid

    def remove(self) -> None:
        for directory in (self.leaf, *self.leaf.parents):
            if directory == V1_MEMORY:
                return
            if not directory.exists():
                continue
            for _ in range(100):  # a process that just exited may still hold the cgroup for a moment
                try:
                    directory.rmdir()
                    break
                except OSError:
                    time.sleep(0.05)
            else:
                directory.rmdir()

    def check(self, event: dict) -> None:
        assert event["memcg_id"] == self.id
        assert event["cgroup_path"] == self.shown
        assert event["k8s"] == {"pod_uid": self.pod_uid, "qos": "besteffort", "container_id": self.container_id,
                                "runtime": self.runtime, "namespace": None, "pod": None, "container": None,
                                "image": None}


def _worker_events(bundle, pid: int) -> dict[str, list[dict]]:
    return {kind: [e for e in bundle.of_type(kind) if e["pid"] == pid] for kind in ("connect", "udp_flow")}


@pytest.mark.parametrize("driver", ["cgroupfs", "systemd"])
def test_events_of_a_process_in_a_kubelet_cgroup_carry_its_pod_and_container(tmp_path, driver):
    cgroups = KubeletCgroups(driver).create()
    try:
        pids = []
        bundle = record_during(tmp_path, lambda: pids.append(cgroups.run_worker()))
    finally:
        cgroups.remove()
    events = _worker_events(bundle, pids[0])
    assert events["connect"] and events["udp_flow"], events
    for event in events["connect"] + events["udp_flow"]:
        cgroups.check(event)
    row = next(p for p in bundle.summary["pods"]["pods"] if p["pod_uid"] == cgroups.pod_uid)
    assert row["qos"] == "besteffort" and row["containers"] == [cgroups.container_id]
    assert row["tcp_connects"] == 1 and row["tcp_connects_failed"] == 0
    # events whose task block is only whoever was on the CPU are no pod's (ktrace.enrich.identity.owner_pod)
    assert row["events"] == sum(1 for e in bundle.events if (e.get("k8s") or {}).get("pod_uid") == cgroups.pod_uid
                                and e.get("attribution") != "cpu")


def test_a_cgroup_created_used_and_removed_inside_the_window_still_resolves(tmp_path):
    cgroups = KubeletCgroups("systemd")
    pids = []

    def work() -> None:
        try:
            cgroups.create()
            pids.append(cgroups.run_worker())
        finally:
            cgroups.remove()

    bundle = record_during(tmp_path, work)
    assert not cgroups.top.exists()
    # every level was seen being created, with the id later events name it by
    mkdirs = {e["new_cgroup_path"]: e for e in bundle.of_type("cgroup_mkdir")}
    leaf = mkdirs[cgroups.shown]
    assert leaf["new_cgroup_id"] == cgroups.id and leaf["level"] == len(Path(cgroups.shown).parts) - 1
    assert leaf["pid"] == os.getpid()
    # the UDP flow is read from the kernel when the window ends, long after its cgroup was removed
    events = _worker_events(bundle, pids[0])
    assert events["connect"] and events["udp_flow"], events
    for event in events["connect"] + events["udp_flow"]:
        cgroups.check(event)
    cgroups_row = bundle.summary["losses"]["by_family"]["cgroups"]
    assert cgroups_row["seen"] == cgroups_row["written"] >= 5


class UnansweringRuntime:
    """A CRI socket that accepts connections and never says a word (a hung runtime), or, once closed, a socket
    file nobody listens on (a runtime that died)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(64)  # connections wait in the backlog, unanswered

    def close(self) -> None:
        self.listener.close()  # the socket file stays: connecting to it is refused


@pytest.mark.parametrize("runtime", ["hung", "dead"])
def test_a_runtime_that_does_not_answer_costs_a_warning_not_the_snapshot(tmp_path, runtime):
    unanswering = UnansweringRuntime(tmp_path / "cri.sock")
    if runtime == "dead":
        unanswering.close()
    cgroups = KubeletCgroups("systemd").create()
    try:
        ktrace = Ktrace(tmp_path, f"--cri-socket={unanswering.path}", duration="6s").started()
        pid = cgroups.run_worker()
        status = ktrace.finish(timeout=60)
    finally:
        cgroups.remove()
        unanswering.close()
    assert status in (0, 3), ktrace.stderr
    bundle = ktrace.bundle()
    why = "DEADLINE_EXCEEDED" if runtime == "hung" else "UNAVAILABLE"
    warnings = [w for w in bundle.summary["warnings"] if w.startswith(f"CRI socket {unanswering.path}: ")]
    assert len(warnings) == 1 and why in warnings[0], bundle.summary["warnings"]
    assert f"ktrace: warning: {warnings[0]}" in ktrace.stderr
    # the window ran its full length: the runtime's deadline passed while the probes loaded, not inside the window
    assert bundle.summary["window"]["ended_by"] == "duration"
    assert bundle.summary["cri"] == {"socket": str(unanswering.path), "connected": False, "runtime": None,
                                     "containers_known": 0, "pods_known": 0, "queries": 0}
    # identity from the cgroup path alone
    events = _worker_events(bundle, pid)
    assert events["connect"] and events["udp_flow"], events
    for event in events["connect"] + events["udp_flow"]:
        cgroups.check(event)
