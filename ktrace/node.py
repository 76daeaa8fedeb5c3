"""node.json: what the node is, so a bundle can be read without access to it."""

from __future__ import annotations

import os
import platform
import socket
from pathlib import Path

import psutil

from ktrace import __version__, libbpf, probes

SCHEMA = "ktrace.node/1"
BTF_PATH = Path("/sys/kernel/btf/vmlinux")


def node_name(explicit: str | None = None) -> str:
    return explicit or os.environ.get("NODE_NAME") or socket.gethostname()


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def os_release() -> str:
    for line in _read("/etc/os-release").splitlines():
        if line.startswith("PRETTY_NAME="):
            return line.split("=", 1)[1].strip('"')
    return ""


def cgroup_layout() -> dict:
    """v1, v2 or hybrid, with the mount points ktrace resolves ids under."""
    mounts = []
    for line in _read("/proc/self/mounts").splitlines():
        parts = line.split()
        if len(parts) >= 4 and parts[2] in ("cgroup", "cgroup2"):
            options = parts[3].split(",")
            controllers = [o for o in options if o not in ("rw", "ro", "nosuid", "nodev", "noexec", "relatime")]
            mounts.append({"path": parts[1], "type": parts[2], "options": controllers if parts[2] == "cgroup" else []})
    has_v1 = any(m["type"] == "cgroup" for m in mounts)
    v2 = [m["path"] for m in mounts if m["type"] == "cgroup2"]
    layout = "hybrid" if has_v1 and v2 else "v1" if has_v1 else "v2" if v2 else "none"
    return {"layout": layout, "unified": v2[0] if v2 else None, "mounts": mounts}


def lockdown() -> str | None:
    text = _read("/sys/kernel/security/lockdown")
    if "[" in text:
        return text.split("[", 1)[1].split("]", 1)[0]
    return text or None


def collect(node: str, args: dict, clock: dict, probe_table: list[dict], maps: list[dict]) -> dict:
    uname = platform.uname()
    try:
        libbpf_version = libbpf.version()
    except Exception:  # noqa: BLE001 - node.json is written even when libbpf is the problem
        libbpf_version = None
    tracefs = probes.tracefs()
    return {
        "schema": SCHEMA,
        "node": node,
        "hostname": socket.gethostname(),
        "kernel": {"release": uname.release, "version": uname.version, "machine": uname.machine},
        "os": os_release(),
        "btf": {"path": str(BTF_PATH), "present": BTF_PATH.exists(),
                "bytes": BTF_PATH.stat().st_size if BTF_PATH.exists() else None},
        "lockdown": lockdown(),
        "cgroup": cgroup_layout(),
        "cpus": psutil.cpu_count(),
        "memory_bytes": psutil.virtual_memory().total,
        "boot_time": psutil.boot_time(),
        "libbpf": libbpf_version,
        "ktrace": __version__,
        "python": platform.python_version(),
        "tracefs": str(tracefs) if tracefs else None,
        "args": args,
        "clock": clock,
        "probes": probe_table,
        "maps": maps,
    }
