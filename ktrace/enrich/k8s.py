"""cgroup path → the Kubernetes pod and container it belongs to, from kubelet's naming.

kubelet names a pod's cgroup after its QoS class and UID, and the container
runtime names each container's cgroup after the container id, one level below:

    cgroupfs driver: /kubepods/<qos>/pod<uid>/<id>          (Guaranteed: /kubepods/pod<uid>/<id>)
    systemd driver:  /kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid with _>.slice/<runtime>-<id>.scope
                     (Guaranteed: /kubepods.slice/kubepods-pod<uid with _>.slice/...)

The kubepods part may sit anywhere in the path (kind and k3s nest it under their
own cgroups, kubelet's --cgroup-root moves it), so it is found by shape, not by
position. Sandbox (pause) containers look like any other container here; only the
runtime (CRI) can tell them apart.
"""

from __future__ import annotations

import re

QOS_CLASSES = ("besteffort", "burstable")  # Guaranteed pods sit directly under kubepods
# a pod UID: a UUID, or 32 hex digits (static pods: a hash of the manifest)
_UID = r"[0-9a-fA-F]{8}[-_]?[0-9a-fA-F]{4}[-_]?[0-9a-fA-F]{4}[-_]?[0-9a-fA-F]{4}[-_]?[0-9a-fA-F]{12}"
_CGROUPFS_POD = re.compile(rf"pod({_UID})")
# kubepods-burstable-pod<uid>.slice; kind's kubelet prefixes it (kubelet-kubepods-...)
_SYSTEMD_POD = re.compile(rf"(?:.+-)?kubepods(?:-({'|'.join(QOS_CLASSES)}))?-pod({_UID})\.slice")
_CONTAINER = re.compile(r"(?:(cri-containerd|crio-conmon|crio|docker|containerd)-)?([0-9a-fA-F]{64})(?:\.scope)?")
RUNTIMES = {"cri-containerd": "containerd", "containerd": "containerd", "crio": "cri-o",
            "crio-conmon": "cri-o-conmon", "docker": "docker"}


def _uid(raw: str) -> str:
    """The UID as the API server shows it: lower case, dashed (the systemd driver writes dashes as _)."""
    hexdigits = raw.replace("-", "").replace("_", "").lower()
    if "-" not in raw and "_" not in raw:  # a static pod's hash has no dashes
        return hexdigits
    return f"{hexdigits[:8]}-{hexdigits[8:12]}-{hexdigits[12:16]}-{hexdigits[16:20]}-{hexdigits[20:]}"


def _pod(parts: list[str], i: int) -> tuple[str, str] | None:
    """(pod UID, QoS class) when parts[i] is a pod's cgroup below a kubepods one."""
    part = parts[i]
    m = _SYSTEMD_POD.fullmatch(part)
    if m:
        return _uid(m.group(2)), m.group(1) or "guaranteed"
    m = _CGROUPFS_POD.fullmatch(part)
    if not m or i == 0:
        return None
    parent = parts[i - 1]
    if parent in QOS_CLASSES and i >= 2 and parts[i - 2].startswith("kubepods"):
        return _uid(m.group(1)), parent
    if parent.startswith("kubepods"):
        return _uid(m.group(1)), "guaranteed"
    return None


def parse_cgroup_path(path: str) -> dict | None:
    """{pod_uid, qos, container_id, runtime} of a kubelet-managed cgroup path; None for any other path.

    container_id and runtime are None for the pod's own cgroup; runtime is None for
    the cgroupfs driver, whose container cgroups are the bare id. "cri-o-conmon" is
    CRI-O's monitor process of container_id, not the container itself.
    """
    if "kubepods" not in path:  # the common case on a node: one substring test
        return None
    parts = [p for p in path.split("/") if p]
    for i in range(len(parts)):
        pod = _pod(parts, i)
        if pod is None:
            continue
        container_id = runtime = None
        if i + 1 < len(parts):
            m = _CONTAINER.fullmatch(parts[i + 1])
            if m:
                container_id = m.group(2).lower()
                runtime = RUNTIMES.get(m.group(1)) if m.group(1) else None
        return {"pod_uid": pod[0], "qos": pod[1], "container_id": container_id, "runtime": runtime}
    return None
