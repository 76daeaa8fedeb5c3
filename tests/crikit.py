"""Real containerd (with its CRI plugin) running real pods on this host, for tests that check pod identity.

    image = build_image(tmp_dir)                       # once per session: busybox + pause, an OCI tarball
    with Containerd(image) as ctrd:
        pod = ctrd.run_pod("web", "team-a", naming="systemd")
        cid = ctrd.start_container(pod, "worker", ["sleep", "300"])
        pid = ctrd.container_pid(cid)                  # /proc/<pid>/cgroup: 0::<ctrd.container_cgroup(pod, cid)>

The kit talks to containerd the way kubelet does, over CRI gRPC: pods get kubelet's cgroup parents
(/kubepods/<qos>/pod<uid> or the kubepods.slice form) and containers kubelet's labels. Pods use the host
network, so a container can reach loopback servers the test owns; a kit made with pod_network=True also has
one pod network (a veth pair and CNI's host-device plugin), so that one pod at a time can have its own network
namespace, reaching the node at kit.node_address from kit.pod_address through the node's netfilter.

Everything lives in one directory under /tmp (root, state, socket, runc root, pod logs), except what
containerd 1.6 and runc put outside it: shim sockets in /run/containerd/s and the kubepods cgroups. On exit,
even after a failure, the kit removes its pods, stops its containerd and shims by PID, deletes leftover runc
containers, unmounts what is mounted under its directory, removes the empty cgroups of its pods and their
empty kubepods ancestors, deletes its veth pair, and removes its directory.

Host quirks handled here (tried by hand on the test VM): the missing CAP_SYS_RESOURCE needs
restrict_oom_score_adj; with no systemd, runc's systemd driver cannot run, so tests/runc_systemd_naming.py
turns containerd's "slice:prefix:id" cgroupsPath into systemd's path for the cgroupfs driver; a hostNetwork
sandbox must not set a hostname (runc refuses one without a UTS namespace).
"""

from __future__ import annotations

import errno
import importlib.util
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from tests.helpers import Rig

TESTS_DIR = Path(__file__).resolve().parent
PROTO = TESTS_DIR / "cri_kubelet.proto"
RUNC_WRAPPER = TESTS_DIR / "runc_systemd_naming.py"
BUSYBOX = Path("/bin/busybox")
APPLETS = ("sh", "sleep", "nc", "nslookup", "wget", "cat", "echo", "ls", "ps", "env", "true", "false")
IMAGE = "localhost/busybox:latest"
PAUSE_IMAGE = "localhost/pause:3.6"
K8S_NAMESPACE = "k8s.io"  # the containerd namespace the CRI plugin works in
CGROUP_ROOT = Path("/sys/fs/cgroup")
SHIM_SOCKET_DIR = Path("/run/containerd/s")  # hard-coded in containerd 1.6
QOS_CLASSES = ("guaranteed", "burstable", "besteffort")
RPC_TIMEOUT = 60.0
PT_INTERP = 3

# The CRI methods the kit calls; the wire path is runtime.v1's whatever package the test proto has.
METHODS = {
    "Version": ("VersionRequest", "VersionResponse"),
    "RunPodSandbox": ("RunPodSandboxRequest", "RunPodSandboxResponse"),
    "StopPodSandbox": ("StopPodSandboxRequest", "StopPodSandboxResponse"),
    "RemovePodSandbox": ("RemovePodSandboxRequest", "RemovePodSandboxResponse"),
    "ListPodSandbox": ("ListPodSandboxRequest", "ListPodSandboxResponse"),
    "CreateContainer": ("CreateContainerRequest", "CreateContainerResponse"),
    "StartContainer": ("StartContainerRequest", "StartContainerResponse"),
    "StopContainer": ("StopContainerRequest", "StopContainerResponse"),
    "RemoveContainer": ("RemoveContainerRequest", "RemoveContainerResponse"),
    "ListContainers": ("ListContainersRequest", "ListContainersResponse"),
    "ContainerStatus": ("ContainerStatusRequest", "ContainerStatusResponse"),
}


class CrikitError(RuntimeError):
    pass


# --- what the host must have ---------------------------------------------------------------------------------

def is_static(binary: Path) -> bool:
    """True if the ELF file has no PT_INTERP program header (no dynamic loader), so it runs alone in an image."""
    data = binary.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2:  # ELF64 only; busybox-static on amd64/arm64 is
        return False
    order = "little" if data[5] == 1 else "big"
    phoff = int.from_bytes(data[0x20:0x28], order)
    phentsize = int.from_bytes(data[0x36:0x38], order)
    phnum = int.from_bytes(data[0x38:0x3A], order)
    for i in range(phnum):
        start = phoff + i * phentsize
        if int.from_bytes(data[start:start + 4], order) == PT_INTERP:
            return False
    return True


def unavailable() -> str | None:
    """Why real containerd pods cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root to run containerd"
    missing = [tool for tool in ("containerd", "containerd-shim-runc-v2", "ctr", "runc", "umoci")
               if shutil.which(tool) is None]
    if missing:
        return f"not installed: {', '.join(missing)} (make setup installs containerd, runc, umoci)"
    if not (CNI_PLUGINS / "host-device").exists():
        return f"no CNI plugins in {CNI_PLUGINS} (make setup installs containernetworking-plugins)"
    if not BUSYBOX.exists() or not is_static(BUSYBOX):
        return f"{BUSYBOX} is missing or not statically linked (install busybox-static)"
    for module in ("grpc", "grpc_tools"):
        if importlib.util.find_spec(module) is None:
            return f"python module {module} is missing (pip install -e .[test])"
    if not (CGROUP_ROOT / "unified").is_dir() and not (CGROUP_ROOT / "cgroup.controllers").exists():
        return "no cgroup2 hierarchy mounted"
    return None


# --- the image -----------------------------------------------------------------------------------------------

def build_image(out_dir: Path) -> Path:
    """An OCI image tarball with two tags, IMAGE (busybox applets, sleeps by default) and PAUSE_IMAGE (the same
    rootfs sleeping forever), built offline with umoci from the host's static busybox. Returns the tarball."""
    out_dir.mkdir(parents=True, exist_ok=True)
    layout, unpacked = out_dir / "oci", out_dir / "unpacked"

    def umoci(*args: str) -> None:
        subprocess.run(["umoci", *args], check=True, capture_output=True, text=True)

    umoci("init", "--layout", str(layout))
    umoci("new", "--image", f"{layout}:busybox")
    umoci("unpack", "--image", f"{layout}:busybox", str(unpacked))
    rootfs = unpacked / "rootfs"
    for sub in ("bin", "tmp", "etc", "proc", "sys", "dev"):
        (rootfs / sub).mkdir(exist_ok=True)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    for applet in APPLETS:
        (rootfs / "bin" / applet).symlink_to("busybox")
    umoci("repack", "--image", f"{layout}:busybox", str(unpacked))
    umoci("config", "--image", f"{layout}:busybox", "--config.env", "PATH=/bin",
          "--config.entrypoint", "/bin/sleep", "--config.cmd", "3600")
    umoci("config", "--image", f"{layout}:busybox", "--tag", "pause", "--config.cmd", "2147483647")
    # `ctr images import` names images by these annotations and wants full references
    index_file = layout / "index.json"
    index = json.loads(index_file.read_text())
    refs = {"busybox": IMAGE, "pause": PAUSE_IMAGE}
    for manifest in index["manifests"]:
        ref = refs[manifest["annotations"]["org.opencontainers.image.ref.name"]]
        manifest["annotations"]["org.opencontainers.image.ref.name"] = ref
        manifest["annotations"]["io.containerd.image.name"] = ref
    index_file.write_text(json.dumps(index))
    tarball = out_dir / "busybox-oci.tar"
    subprocess.run(["tar", "-C", str(layout), "-cf", str(tarball), "."], check=True)
    shutil.rmtree(unpacked)
    shutil.rmtree(layout)
    return tarball


# --- the CRI messages ----------------------------------------------------------------------------------------

_messages: ModuleType | None = None


def messages() -> ModuleType:
    """tests/cri_kubelet.proto compiled with grpc_tools.protoc and imported, once per process (a second import
    would register the same file in protobuf's default pool again)."""
    global _messages
    if _messages is None:
        with tempfile.TemporaryDirectory(prefix="kt-criproto-") as out:
            subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{PROTO.parent}", f"--python_out={out}",
                            str(PROTO)], check=True, capture_output=True, text=True)
            spec = importlib.util.spec_from_file_location("cri_kubelet_pb2", Path(out) / "cri_kubelet_pb2.py")
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        _messages = module
    return _messages


# --- pods ----------------------------------------------------------------------------------------------------

@dataclass
class Pod:
    sandbox_id: str
    name: str
    namespace: str
    uid: str
    naming: str           # "cgroupfs" or "systemd": which driver's cgroup names kubelet would use
    qos: str
    cgroup_parent: str    # as kubelet passes it and as /proc/<pid>/cgroup shows it
    log_directory: Path
    config: object = field(repr=False)  # the PodSandboxConfig message, passed again to CreateContainer
    pod_network: bool = False  # its own network namespace (the kit's one pod network), else the node's


def pod_cgroup_parent(uid: str, naming: str, qos: str) -> str:
    """kubelet's pod cgroup (pkg/kubelet/cm): guaranteed pods sit right under kubepods."""
    if qos not in QOS_CLASSES:
        raise ValueError(f"qos must be one of {QOS_CLASSES}, not {qos!r}")
    if naming == "cgroupfs":
        return "/kubepods" + ("" if qos == "guaranteed" else f"/{qos}") + f"/pod{uid}"
    if naming == "systemd":
        # systemd unit names cannot hold "-" inside a component, so kubelet escapes the uid's dashes
        pod_slice = "kubepods" + ("" if qos == "guaranteed" else f"-{qos}") + f"-pod{uid.replace('-', '_')}.slice"
        parts = pod_slice[: -len(".slice")].split("-")
        return "".join("/" + "-".join(parts[: i + 1]) + ".slice" for i in range(len(parts)))
    raise ValueError(f"naming must be cgroupfs or systemd, not {naming!r}")


def container_cgroup(pod: Pod, container_id: str) -> str:
    """The container's cgroup as /proc/<pid>/cgroup shows it (containerd's cgroupsPath for the driver)."""
    if pod.naming == "systemd":
        return f"{pod.cgroup_parent}/cri-containerd-{container_id}.scope"
    return f"{pod.cgroup_parent}/{container_id}"


def cgroup_mounts() -> list[Path]:
    """Mount points of every cgroup v1 and v2 hierarchy, one per hierarchy."""
    seen: dict[str, Path] = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fstype = right.split()[0]
        if fstype in ("cgroup", "cgroup2"):
            fields = left.split()
            seen.setdefault(fields[2], Path(unescape_mount_path(fields[4])))  # keyed by major:minor
    return list(seen.values())


def unescape_mount_path(path: str) -> str:
    return path.encode().decode("unicode_escape") if "\\" in path else path


def mounts_under(directory: Path) -> list[str]:
    prefix = str(directory).rstrip("/") + "/"
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = unescape_mount_path(line.split()[4])
        if point.startswith(prefix) or point == str(directory):
            found.append(point)
    return found


# --- containerd ----------------------------------------------------------------------------------------------

CONFIG = """\
version = 2
root = "{d}/root"
state = "{d}/state"

[grpc]
  address = "{sock}"

[debug]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  disable_apparmor = true
  # the VM's root lacks CAP_SYS_RESOURCE, so the sandbox's oom_score_adj of -998 would fail in runc
  restrict_oom_score_adj = true
  # a random port: several kits may run at once
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "{d}/runc"
        BinaryName = "{runc}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni/bin"
    # empty unless the kit has a pod network: then hostNetwork pods only (NetworkReady=false is expected)
    conf_dir = "{d}/cni/net.d"
"""

# The pod network: one veth pair, whose pod end CNI's host-device plugin moves into the pod's namespace as eth0,
# with a static address and a default route to the node end. Enough for one pod with its own network at a time,
# reaching servers of the test on the node address, through the node's netfilter (DNAT), as a pod does.
CNI_PLUGINS = Path("/usr/lib/cni")  # Debian's containernetworking-plugins
# documentation ranges, the first one the machine does not use itself (its own network may be one of them)
POD_NETWORKS = ("198.51.100.0/24", "203.0.113.0/24", "192.0.2.0/24")
CNI_CONFIG = """\
{{"cniVersion": "1.0.0", "name": "kt-podnet", "plugins": [{{"type": "host-device", "device": "{device}",
  "ipam": {{"type": "static", "addresses": [{{"address": "{pod}/24", "gateway": "{node}"}}],
           "routes": [{{"dst": "0.0.0.0/0", "gw": "{node}"}}]}}}}]}}
"""


class Containerd(Rig):
    """A private containerd with the CRI plugin, under /tmp/kt-cri-*; pods made with it are removed on exit."""

    def __init__(self, image_tar: Path | None = None, start_timeout: float = 30.0, pod_network: bool = False) -> None:
        self.image_tar = image_tar
        self.pod_network = pod_network
        # the veth pair of the pod network (interface names: at most 15 bytes)
        self.veth_pod, self.veth_node = f"ktpod{os.getpid() % 100000}", f"ktnode{os.getpid() % 100000}"
        self._veth_made = False
        self.node_address = self.pod_address = ""  # the node end of the veth, and the pod's address
        self.start_timeout = start_timeout
        self.dir = Path()
        self.socket = ""
        self.proc: subprocess.Popen | None = None
        self.pods: dict[str, Pod] = {}
        self.containers: dict[str, Pod] = {}       # container id -> its pod
        self.timings: dict[str, float] = {}
        self._touched_cgroups: set[str] = set()   # pod cgroup parents, removed (when empty) on exit
        self._channel = None
        self._calls: dict = {}
        self.pb: ModuleType = messages()

    # lifecycle

    def _start(self) -> None:
        import grpc

        # short: the socket path must fit a sockaddr_un (108 bytes)
        self.dir = Path(tempfile.mkdtemp(prefix="kt-cri-", dir="/tmp"))
        self.socket = str(self.dir / "containerd.sock")
        if self.image_tar is None:
            started = time.monotonic()
            self.image_tar = build_image(self.dir / "image")
            self.timings["image_build"] = time.monotonic() - started
        for sub in ("cni/net.d", "cni/bin", "runc", "pods", "opt"):
            (self.dir / sub).mkdir(parents=True)
        config = self.dir / "config.toml"
        config.write_text(CONFIG.format(d=self.dir, sock=self.socket, pause=PAUSE_IMAGE, runc=RUNC_WRAPPER))
        if self.pod_network:
            self._make_pod_network()  # before containerd starts: it reads its CNI configuration once

        started = time.monotonic()
        env = dict(os.environ)
        # the runc wrapper's "#!/usr/bin/env python3" then finds this interpreter, not a slower shim
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"
        with open(self.dir / "containerd.log", "wb") as log:
            self.proc = subprocess.Popen(["containerd", "--config", str(config)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self._channel = grpc.insecure_channel(f"unix://{self.socket}")
        self._wait_ready()
        self.timings["containerd_start"] = time.monotonic() - started

        started = time.monotonic()
        subprocess.run(["ctr", "--address", self.socket, "-n", K8S_NAMESPACE, "images", "import",
                        str(self.image_tar)], check=True, capture_output=True, text=True)
        self.timings["image_import"] = time.monotonic() - started

    def _make_pod_network(self) -> None:
        network = free_network()
        self.node_address, self.pod_address = str(network[1]), str(network[10])
        for plugin in ("host-device", "static", "loopback"):
            (self.dir / "cni" / "bin" / plugin).symlink_to(CNI_PLUGINS / plugin)
        (self.dir / "cni" / "net.d" / "10-kt-podnet.conflist").write_text(
            CNI_CONFIG.format(device=self.veth_pod, pod=self.pod_address, node=self.node_address))
        subprocess.run(["ip", "link", "add", self.veth_pod, "type", "veth", "peer", "name", self.veth_node],
                       check=True, capture_output=True)
        self._veth_made = True
        for cmd in (["addr", "add", f"{self.node_address}/24", "dev", self.veth_node],
                    ["link", "set", self.veth_node, "up"]):
            subprocess.run(["ip", *cmd], check=True, capture_output=True)

    def _remove_pod_network(self) -> None:
        if self._veth_made:  # deleting one end deletes the pair, wherever the other end is
            subprocess.run(["ip", "link", "del", self.veth_node], check=True, capture_output=True)
            self._veth_made = False

    def _wait_ready(self) -> None:
        import grpc

        deadline = time.monotonic() + self.start_timeout
        last = ""
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise CrikitError(f"containerd exited with {self.proc.returncode}: {self.log_tail()}")
            if Path(self.socket).exists():
                try:
                    version = self._call("Version", self.pb.VersionRequest(version="v1"), timeout=2.0)
                    if version.runtime_api_version == "v1":
                        return
                    last = f"runtime_api_version {version.runtime_api_version!r}"
                except grpc.RpcError as exc:
                    last = f"{exc.code().name}: {exc.details()}"
            time.sleep(0.05)
        raise CrikitError(f"containerd's CRI did not answer within {self.start_timeout}s ({last}): {self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        log = self.dir / "containerd.log"
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else ""

    def _call(self, method: str, request: object, timeout: float = RPC_TIMEOUT):
        call = self._calls.get(method)
        if call is None:
            request_type, response_type = METHODS[method]
            assert self._channel is not None
            call = self._channel.unary_unary(
                f"/runtime.v1.RuntimeService/{method}",
                request_serializer=getattr(self.pb, request_type).SerializeToString,
                response_deserializer=getattr(self.pb, response_type).FromString)
            self._calls[method] = call
        return call(request, timeout=timeout)

    # pods and containers

    def run_pod(self, name: str, namespace: str = "default", uid: str | None = None, *, naming: str = "cgroupfs",
                qos: str = "burstable", dns_servers: Iterable[str] = (), pod_network: bool = False) -> Pod:
        """A ready pod sandbox with kubelet's cgroup parent for the naming scheme and QoS class: hostNetwork, or
        with pod_network its own network namespace with pod_address (a kit made with pod_network=True)."""
        if pod_network and not self.pod_network:
            raise CrikitError("this kit has no pod network: Containerd(pod_network=True)")
        pb = self.pb
        uid = uid or str(uuid.uuid4())
        parent = pod_cgroup_parent(uid, naming, qos)
        log_directory = self.dir / "pods" / f"{namespace}_{name}_{uid}"
        log_directory.mkdir(parents=True, exist_ok=True)
        labels = {"io.kubernetes.pod.name": name, "io.kubernetes.pod.namespace": namespace,
                  "io.kubernetes.pod.uid": uid}
        host_network = pb.NamespaceOption(network=pb.POD if pod_network else pb.NODE, pid=pb.CONTAINER, ipc=pb.POD)
        config = pb.PodSandboxConfig(
            metadata=pb.PodSandboxMetadata(name=name, uid=uid, namespace=namespace, attempt=0),
            # no hostname: the sandbox shares the host's UTS namespace, as a hostNetwork pod does
            log_directory=str(log_directory),
            labels=labels,
            linux=pb.LinuxPodSandboxConfig(
                cgroup_parent=parent,
                security_context=pb.LinuxSandboxSecurityContext(namespace_options=host_network)))
        dns_servers = list(dns_servers)
        if dns_servers:
            config.dns_config.servers.extend(dns_servers)
        self._touched_cgroups.add(parent)
        started = time.monotonic()
        sandbox_id = self._call("RunPodSandbox", pb.RunPodSandboxRequest(config=config)).pod_sandbox_id
        self.timings[f"run_pod {namespace}/{name}"] = time.monotonic() - started
        pod = Pod(sandbox_id, name, namespace, uid, naming, qos, parent, log_directory, config, pod_network)
        self.pods[sandbox_id] = pod
        return pod

    def start_container(self, pod: Pod, name: str, argv: list[str], *, env: dict[str, str] | None = None,
                        labels: dict[str, str] | None = None, memory_limit: int = 0) -> str:
        """Create and start a container running argv in the pod, labelled as kubelet labels it; its id."""
        pb = self.pb
        all_labels = {"io.kubernetes.container.name": name, "io.kubernetes.pod.name": pod.name,
                      "io.kubernetes.pod.namespace": pod.namespace, "io.kubernetes.pod.uid": pod.uid,
                      **(labels or {})}
        (pod.log_directory / name).mkdir(exist_ok=True)
        config = pb.ContainerConfig(
            metadata=pb.ContainerMetadata(name=name, attempt=0),
            image=pb.ImageSpec(image=IMAGE),
            command=argv,
            envs=[pb.KeyValue(key=k, value=v) for k, v in (env or {}).items()],
            labels=all_labels,
            log_path=f"{name}/0.log",
            linux=pb.LinuxContainerConfig(
                resources=pb.LinuxContainerResources(memory_limit_in_bytes=memory_limit),  # 0: no limit
                security_context=pb.LinuxContainerSecurityContext(
                    namespace_options=pb.NamespaceOption(network=pb.POD if pod.pod_network else pb.NODE,
                                                         pid=pb.CONTAINER, ipc=pb.POD))))
        started = time.monotonic()
        container_id = self._call("CreateContainer", pb.CreateContainerRequest(
            pod_sandbox_id=pod.sandbox_id, config=config, sandbox_config=pod.config)).container_id
        self.containers[container_id] = pod
        self._call("StartContainer", pb.StartContainerRequest(container_id=container_id))
        self.timings[f"start_container {pod.namespace}/{pod.name}/{name}"] = time.monotonic() - started
        return container_id

    def container_status(self, container_id: str) -> tuple[object, dict]:
        """The ContainerStatus message and containerd's verbose info (pid, runtimeSpec, ...)."""
        resp = self._call("ContainerStatus", self.pb.ContainerStatusRequest(container_id=container_id, verbose=True))
        info = json.loads(resp.info["info"]) if "info" in resp.info else {}
        return resp.status, info

    def container_pid(self, container_id: str) -> int:
        """The host PID of the container's first process (0 once it has exited)."""
        return int(self.container_status(container_id)[1].get("pid", 0))

    def wait_exited(self, container_id: str, timeout: float = 30.0) -> int:
        """Wait until the runtime reports the container exited; its exit code."""
        deadline = time.monotonic() + timeout
        while True:
            status, _ = self.container_status(container_id)
            if status.state == self.pb.CONTAINER_EXITED:
                return status.exit_code
            if time.monotonic() > deadline:
                raise CrikitError(f"container {container_id} still {self.pb.ContainerState.Name(status.state)} "
                                  f"after {timeout}s")
            time.sleep(0.05)

    def logs(self, container_id: str) -> str:
        """The container's stdout and stderr, without the CRI log prefix ("<time> <stream> <F|P> ")."""
        pod = self.containers[container_id]
        status, _ = self.container_status(container_id)
        path = pod.log_directory / f"{status.metadata.name}/0.log"
        if not path.exists():
            return ""
        out = []
        for line in path.read_text(errors="replace").splitlines():
            parts = line.split(" ", 3)
            out.append(parts[3] if len(parts) == 4 else "")
        return "\n".join(out) + ("\n" if out else "")

    def stop_container(self, container_id: str, timeout: int = 0) -> None:
        self._call("StopContainer", self.pb.StopContainerRequest(container_id=container_id, timeout=timeout))

    def remove_container(self, container_id: str) -> None:
        """Stop (SIGKILL right away) and remove the container."""
        self.stop_container(container_id)
        self._call("RemoveContainer", self.pb.RemoveContainerRequest(container_id=container_id))
        self.containers.pop(container_id, None)

    def remove_pod(self, pod: Pod) -> None:
        """Stop and remove the sandbox and its containers, then the pod's cgroups (and empty kubepods parents)."""
        self._call("StopPodSandbox", self.pb.StopPodSandboxRequest(pod_sandbox_id=pod.sandbox_id))
        self._call("RemovePodSandbox", self.pb.RemovePodSandboxRequest(pod_sandbox_id=pod.sandbox_id))
        self.pods.pop(pod.sandbox_id, None)
        for cid in [cid for cid, p in self.containers.items() if p is pod]:
            del self.containers[cid]
        self._remove_cgroups([pod.cgroup_parent])

    def list_containers(self, pod: Pod | None = None) -> list:
        flt = self.pb.ContainerFilter(pod_sandbox_id=pod.sandbox_id if pod else "")
        return list(self._call("ListContainers", self.pb.ListContainersRequest(filter=flt)).containers)

    # teardown

    def close(self) -> None:
        """Undo everything, step by step; a failing step does not stop the others. Raises if anything is left."""
        errors: list[str] = []

        def step(what: str, fn, *args) -> None:
            try:
                fn(*args)
            except Exception as exc:  # noqa: BLE001 - every later step must still run
                errors.append(f"{what}: {type(exc).__name__}: {exc}")

        started = time.monotonic()
        if self.proc is not None and self.proc.poll() is None and self._channel is not None:
            for pod in list(self.pods.values()):
                step(f"remove pod {pod.namespace}/{pod.name}", self.remove_pod, pod)
        if self._channel is not None:
            step("close the gRPC channel", self._channel.close)
            self._channel = None
        step("stop containerd", self._stop_containerd)
        if self.dir != Path():
            step("delete leftover runc containers", self._delete_runc_leftovers)
            step("kill leftover shims", self._kill_shims)
            step("unmount", self._unmount)
        step("remove cgroups", self._remove_cgroups, sorted(self._touched_cgroups))
        step("remove shim socket dir", self._remove_shim_socket_dir)
        step("remove the pod network", self._remove_pod_network)
        if self.dir != Path() and self.dir.exists():
            left = mounts_under(self.dir)
            if left:
                errors.append(f"not removing {self.dir}: still mounted {left}")
            else:
                step(f"remove {self.dir}", shutil.rmtree, self.dir)
        self.timings["teardown"] = time.monotonic() - started
        if errors:
            raise CrikitError("crikit teardown left things behind:\n  " + "\n  ".join(errors))

    def _stop_containerd(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=15)

    def _delete_runc_leftovers(self) -> None:
        runc_root = self.dir / "runc"
        if not runc_root.is_dir():
            return
        for ns_root in runc_root.iterdir():  # the shim keeps one runc root per containerd namespace
            listed = subprocess.run(["runc", "--root", str(ns_root), "list", "-q"], capture_output=True, text=True)
            for cid in listed.stdout.split():
                subprocess.run(["runc", "--root", str(ns_root), "delete", "--force", cid], capture_output=True)

    def shim_pids(self) -> list[int]:
        """PIDs of containerd-shim processes serving this kit's containerd (their -address is our socket)."""
        pids = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if argv and os.path.basename(argv[0]).startswith(b"containerd-shim") and self.socket.encode() in argv:
                pids.append(int(proc.name))
        return pids

    def _kill_shims(self) -> None:
        for pid in self.shim_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _unmount(self) -> None:
        for point in sorted(mounts_under(self.dir), key=len, reverse=True):
            if subprocess.run(["umount", point], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", point], capture_output=True)

    def _remove_cgroups(self, parents: Iterable[str]) -> None:
        """In every hierarchy: the empty dirs left in each pod cgroup (runc removes only container leaves), the pod
        cgroup, then its ancestors up to /kubepods(.slice) while they are empty. Busy or non-empty ones stay."""
        parents = list(parents)
        for hierarchy in cgroup_mounts():
            for parent in parents:
                pod_dir = hierarchy / parent.lstrip("/")
                if pod_dir.is_dir():
                    for dirpath, _, _ in sorted(os.walk(pod_dir), key=lambda w: len(w[0]), reverse=True):
                        rmdir_retrying(Path(dirpath))
                ancestor = pod_dir.parent
                while ancestor != hierarchy and ancestor.is_dir():
                    if not rmdir_retrying(ancestor):
                        break
                    ancestor = ancestor.parent

    def _remove_shim_socket_dir(self) -> None:
        # removed only when empty: another containerd on the host may be using it
        for directory in (SHIM_SOCKET_DIR, SHIM_SOCKET_DIR.parent):
            try:
                directory.rmdir()
            except OSError:
                return


def free_network() -> ipaddress.IPv4Network:
    """The first of POD_NETWORKS that overlaps no address or route of the machine."""
    used = []
    for command in (["ip", "-4", "-o", "addr", "show"], ["ip", "-4", "route", "show", "table", "all"]):
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        for word in out.split():
            try:
                used.append(ipaddress.ip_network(word, strict=False))
            except ValueError:
                continue
    for candidate in map(ipaddress.IPv4Network, POD_NETWORKS):
        if not any(candidate.overlaps(net) for net in used if net.prefixlen > 0):
            return candidate
    raise CrikitError(f"every pod network candidate is in use here: {POD_NETWORKS}")


def rmdir_retrying(path: Path, attempts: int = 40) -> bool:
    """rmdir a cgroup that has no child cgroups; True if it is gone. A cgroup whose last process is still exiting
    refuses with EBUSY for a moment, so that is retried; one with children (also EBUSY) is left at once."""
    for _ in range(attempts):
        try:
            if any(child.is_dir() for child in path.iterdir()):
                return False
            path.rmdir()
            return True
        except FileNotFoundError:
            return True
        except OSError as exc:
            if exc.errno != errno.EBUSY:
                return False
            time.sleep(0.05)
    return False
