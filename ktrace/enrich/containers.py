"""Container id → namespace, pod, container and image: from the runtime over CRI, else from kubelet's files.

The cgroup path already gives the pod UID and the container id (ktrace.enrich.k8s); the names come from:

1. the CRI socket of the runtime (--cri-socket, or the first of SOCKETS that exists): every sandbox and container
   listed once when the window starts, then one ContainerStatus per container id not seen before, never per event.
   A container is looked up when its cgroup is created (the cgroup_mkdir event), so one that runs and is removed
   within the window is still named. A runtime that does not answer within the deadline is asked nothing more:
   one warning, and the names come from the files below.
2. /var/log/containers/<pod>_<namespace>_<container>-<id>.log, the links kubelet makes for every container's log;
3. /var/log/pods/<namespace>_<pod>_<uid>/ (kubelet's podLogsDir, --pod-logs-dir), kubelet's log directory of every
   pod: namespace and pod by pod UID, and the container when the pod has only one;
4. /var/lib/kubelet/pods/<uid>/, kubelet's own directory of the pod: the namespace from the service account volume,
   the pod's hostname (its name, unless spec.hostname says otherwise) from the hosts file kubelet writes for pods
   with their own network, and the container when the pod has only one.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SOCKETS = (  # auto-detected in this order: the runtimes' default CRI endpoints
    Path("/run/containerd/containerd.sock"),
    Path("/var/run/containerd/containerd.sock"),
    Path("/run/crio/crio.sock"),
    Path("/var/run/crio/crio.sock"),
    Path("/run/k3s/containerd/containerd.sock"),
    Path("/run/cri-dockerd.sock"),
)
CALL_TIMEOUT_S = 2.0  # per CRI call; a healthy runtime answers in milliseconds
MAX_ENTRIES = 16384  # containers and pods remembered
RESCAN_S = 1.0  # at most one listing of the runtime's sandboxes, and one of the log directories, per second
POD_LOGS_DIR = Path("/var/log/pods")  # kubelet's podLogsDir
CONTAINER_LOGS_DIR = Path("/var/log/containers")  # fixed in kubelet
KUBELET_PODS_DIR = Path("/var/lib/kubelet/pods")  # kubelet's --root-dir + /pods
# the first line of the hosts file kubelet writes for a pod with its own network (a hostNetwork pod's is the node's)
POD_HOSTS_HEADER = "# Kubernetes-managed hosts file."
# kubelet: /var/log/containers/<pod>_<namespace>_<container>-<64 hex id>.log
_CONTAINER_LOG = re.compile(r"(?P<pod>[^_]+)_(?P<namespace>[^_]+)_(?P<container>.+)-(?P<id>[0-9a-f]{64})\.log")
# kubelet: /var/log/pods/<namespace>_<pod>_<uid>
_POD_LOG_DIR = re.compile(r"(?P<namespace>[^_]+)_(?P<pod>[^_]+)_(?P<uid>[0-9a-fA-F-]{32,36})")


@dataclass
class _Known:
    namespace: str | None = None
    pod: str | None = None
    container: str | None = None
    image: str | None = None

    def as_dict(self) -> dict:
        return {"namespace": self.namespace, "pod": self.pod, "container": self.container, "image": self.image}


UNNAMED = _Known().as_dict()  # what lookup() says when nothing knows the container


def _read_small(path: Path) -> str | None:
    try:
        with open(path, errors="replace") as f:
            return f.read(4096).strip() or None
    except OSError:
        return None


def find_socket() -> Path | None:
    return next((p for p in SOCKETS if p.is_socket()), None)


class ContainerNames:
    """(pod UID, container id) → {namespace, pod, container, image}, None where nothing says."""

    def __init__(self, socket: Path | None, timeout_s: float = CALL_TIMEOUT_S, pod_logs_dir: Path = POD_LOGS_DIR,
                 container_logs_dir: Path = CONTAINER_LOGS_DIR, kubelet_pods_dir: Path = KUBELET_PODS_DIR) -> None:
        self.socket = socket
        self.timeout_s = timeout_s
        self.pod_logs_dir = pod_logs_dir
        self.container_logs_dir = container_logs_dir
        self.kubelet_pods_dir = kubelet_pods_dir
        self.client = None
        self.warnings: list[str] = []
        self.runtime: dict | None = None
        self.queries = 0  # ContainerStatus calls made during the window
        self._containers: dict[str, _Known] = {}  # by container or sandbox id
        self._pods: dict[str, _Known] = {}  # by pod UID
        self._asked: set[str] = set()  # container ids the runtime was asked about (answer or not)
        self._pod_dirs_read: set[str] = set()  # pod UIDs whose kubelet directory was read (found or not)
        self._next_sandbox_list = self._next_log_scan = 0.0
        self._thread: threading.Thread | None = None

    # --- the runtime ---------------------------------------------------------------------------------------

    def start(self) -> None:
        """Connect and list in the background (the probes load meanwhile); wait() before the window starts."""
        self._thread = threading.Thread(target=self._connect, name="ktrace-cri", daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            # three calls, each with its deadline; the margin is for importing grpc
            self._thread.join(timeout=3 * self.timeout_s + 1)
            if self._thread.is_alive():
                self._warn("no answer in time")
                self.client = None
            self._thread = None

    def _connect(self) -> None:
        if self.socket is None:
            return
        if not self.socket.is_socket():
            self._warn("not a socket" if self.socket.exists() else "does not exist")
            return
        try:
            from ktrace.cri.client import CriClient, CriError
        except ImportError as e:  # grpcio or protobuf missing or too old: names from the files only
            self.warnings.append(f"CRI: cannot load the gRPC client ({e}); pod names from kubelet's log files only")
            return
        client = CriClient(self.socket, self.timeout_s)
        try:
            self.runtime = client.version()
        except CriError as e:
            client.close()
            self._warn(str(e))
            return
        self.client = client
        try:
            self._add_sandboxes(client.sandboxes())
            for cid, names in client.containers().items():
                self._add_container(cid, names)
        except CriError as e:
            if e.unreachable:
                client.close()
                self.client = None
                self._warn(str(e))
            else:  # e.g. a listing too large: containers are still asked for one by one
                self.warnings.append(f"CRI socket {self.socket}: {e}; containers are asked for one by one")
        self._next_sandbox_list = time.monotonic() + RESCAN_S

    def _warn(self, why: str) -> None:
        self.warnings.append(f"CRI socket {self.socket}: {why}; pod names from kubelet's log files only")

    def _add_sandboxes(self, sandboxes: list) -> None:
        for s in sandboxes:
            known = _Known(s.namespace, s.pod, None, None)
            self._remember(self._containers, s.sandbox_id, known)
            if s.pod_uid:
                self._remember(self._pods, s.pod_uid, known)

    def _add_container(self, cid: str, names) -> None:
        pod = self._pods.get(names.pod_uid or "") or self._containers.get(names.sandbox_id or "")
        known = _Known(names.namespace or (pod.namespace if pod else None), names.pod or (pod.pod if pod else None),
                       names.container, names.image)
        self._remember(self._containers, cid, known)
        if names.pod_uid and names.pod_uid not in self._pods and known.pod:
            self._remember(self._pods, names.pod_uid, _Known(known.namespace, known.pod))

    @staticmethod
    def _remember(table: dict, key: str, value: _Known) -> None:
        if len(table) >= MAX_ENTRIES:
            table.clear()
        table[key] = value

    def _ask_runtime(self, cid: str) -> None:
        """One ContainerStatus per container id, then, if it is no container, the sandboxes once more."""
        from ktrace.cri.client import CriError

        self._asked.add(cid)
        if len(self._asked) > MAX_ENTRIES:
            self._asked.clear()
        self.queries += 1
        try:
            names = self.client.container(cid)
            if names is not None:
                self._add_container(cid, names)
            elif time.monotonic() >= self._next_sandbox_list:  # a sandbox (pause) container, or one removed already
                self._next_sandbox_list = time.monotonic() + RESCAN_S
                self._add_sandboxes(self.client.sandboxes())
        except CriError as e:
            if e.unreachable:
                self._warn(str(e))
                self.client.close()
                self.client = None

    # --- kubelet's files -----------------------------------------------------------------------------------

    def _scan_logs(self) -> None:
        now = time.monotonic()
        if now < self._next_log_scan:
            return
        self._next_log_scan = now + RESCAN_S
        try:
            for entry in self.container_logs_dir.iterdir():
                m = _CONTAINER_LOG.fullmatch(entry.name)
                if m and m["id"] not in self._containers:
                    self._remember(self._containers, m["id"], _Known(m["namespace"], m["pod"], m["container"]))
        except OSError:
            pass
        try:
            for entry in self.pod_logs_dir.iterdir():
                m = _POD_LOG_DIR.fullmatch(entry.name)
                if m and m["uid"] not in self._pods:
                    containers = [d.name for d in entry.iterdir() if d.is_dir()] if entry.is_dir() else []
                    only = containers[0] if len(containers) == 1 else None
                    self._remember(self._pods, m["uid"], _Known(m["namespace"], m["pod"], only))
        except OSError:
            pass

    def _read_pod_dir(self, pod_uid: str) -> None:
        """Once per pod UID: what kubelet's own directory of the pod tells."""
        if pod_uid in self._pod_dirs_read or len(self._pod_dirs_read) >= MAX_ENTRIES:
            return
        self._pod_dirs_read.add(pod_uid)
        pod_dir = self.kubelet_pods_dir / pod_uid
        if not pod_dir.is_dir():
            return
        namespace = None
        for file in sorted(pod_dir.glob("volumes/kubernetes.io~projected/*/namespace")):
            namespace = _read_small(file)
            if namespace:
                break
        name = None
        hosts = (_read_small(pod_dir / "etc-hosts") or "").splitlines()
        if hosts and hosts[0].strip() == POD_HOSTS_HEADER:
            entries = [line.split() for line in hosts[1:] if line.strip() and not line.startswith("#")]
            name = entries[-1][-1] if entries and len(entries[-1]) > 1 else None
        try:
            containers = [d.name for d in (pod_dir / "containers").iterdir() if d.is_dir()]
        except OSError:
            containers = []
        only = containers[0] if len(containers) == 1 else None
        if namespace or name:
            self._remember(self._pods, pod_uid, _Known(namespace, name, only))

    # --- the lookup ----------------------------------------------------------------------------------------

    def lookup(self, pod_uid: str, container_id: str | None) -> dict:
        """Called once per cgroup (the caller caches): at most one CRI call, else at most one directory scan."""
        known = self._containers.get(container_id) if container_id else None
        if known is None and container_id and self.client is not None and container_id not in self._asked:
            self._ask_runtime(container_id)
            known = self._containers.get(container_id)
        pod = self._pods.get(pod_uid)
        if (known is None and container_id) or (pod is None and (known is None or known.pod is None)):
            self._scan_logs()
            known = self._containers.get(container_id) if container_id else None
            pod = self._pods.get(pod_uid)
            if pod is None:
                self._read_pod_dir(pod_uid)
                pod = self._pods.get(pod_uid)
        result = known.as_dict() if known is not None else dict(UNNAMED)
        if pod is not None:
            result["namespace"] = result["namespace"] or pod.namespace
            result["pod"] = result["pod"] or pod.pod
            if container_id is not None and known is None:
                result["container"] = pod.container  # the pod's only container, from its log directory
        return result

    def report(self) -> dict:
        """summary.json's `cri`: where the names came from."""
        return {
            "socket": str(self.socket) if self.socket else None,
            "connected": self.client is not None,
            "runtime": self.runtime,
            "containers_known": len(self._containers),
            "pods_known": len(self._pods),
            "queries": self.queries,
        }

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
