"""Who an event's task is, beyond its ids: its cgroup path and Kubernetes pod and container.

Resolved once per (cgroup_id, memcg_id) pair and cached (bounded), so that an
event costs a dict lookup; the decoder adds the result to the task block it
caches, so most events cost nothing at all.

Which cgroup names a task: its v1 memory cgroup on v1 and hybrid hosts (where
kubelet and the runtimes place pods by controller), unless that is the root
memory cgroup; then, and on cgroup2-only hosts, its cgroup2 cgroup.
"""

from __future__ import annotations

from collections.abc import Callable

from ktrace import probes
from ktrace.enrich import k8s
from ktrace.enrich.cgroup import CgroupPaths, hierarchy_names, memory_root
from ktrace.enrich.containers import UNNAMED

MAX_ENTRIES = 16384  # cached (cgroup_id, memcg_id) pairs
ROOT_CGROUP_ID = 1  # the kernfs id of every hierarchy's root
NO_K8S = None

# (pod UID, container id or None) → {namespace, pod, container, image}, None where unknown
# (ktrace.enrich.containers.ContainerNames.lookup)
ContainerLookup = Callable[[str, "str | None"], dict]


class Identity:
    """(cgroup_id, memcg_id) → {"cgroup_path", "k8s"}, fed by cgroup_mkdir events as the window runs."""

    def __init__(self, paths: CgroupPaths | None = None, v1_memory: bool | None = None,
                 containers: ContainerLookup | None = None, max_entries: int = MAX_ENTRIES) -> None:
        self.paths = paths or CgroupPaths()
        if v1_memory is None:
            root = memory_root()
            v1_memory = root is not None and root != probes.cgroup2_root()
        self.v1_memory = v1_memory
        self.containers = containers
        self.max_entries = max_entries
        self.hierarchies = hierarchy_names()
        self._cache: dict[tuple[int, int], dict] = {}

    def cgroup_path(self, cgroup_id: int, memcg_id: int) -> str | None:
        if self.v1_memory and memcg_id and memcg_id != ROOT_CGROUP_ID:
            return self.paths.path("memory", memcg_id)
        return self.paths.path("unified", cgroup_id)

    def of(self, cgroup_id: int, memcg_id: int) -> dict:
        key = (cgroup_id, memcg_id)
        found = self._cache.get(key)
        if found is None:
            if len(self._cache) >= self.max_entries:
                self._cache.clear()
            path = self.cgroup_path(cgroup_id, memcg_id)
            found = self._cache[key] = {"cgroup_path": path, "k8s": self.k8s(path)}
        return found

    def k8s(self, path: str | None) -> dict | None:
        pod = k8s.parse_cgroup_path(path) if path else None
        if pod is None:
            return NO_K8S
        names = self.containers(pod["pod_uid"], pod["container_id"]) if self.containers else UNNAMED
        return {**pod, **names}

    def add_mkdir(self, event: dict) -> None:
        """A cgroup_mkdir event: remember the new cgroup's path, in the hierarchy CgroupPaths knows it by."""
        hierarchy = self.hierarchies.get(event["hierarchy_id"])
        if hierarchy in ("memory", "unified"):
            self.paths.add(hierarchy, event["new_cgroup_id"], event["new_cgroup_path"])
            if self.containers:  # a new container: named now, while the runtime still knows it
                pod = k8s.parse_cgroup_path(event["new_cgroup_path"])
                if pod is not None and pod["container_id"]:
                    self.containers(pod["pod_uid"], pod["container_id"])


def owner_pod(event: dict) -> dict | None:
    """The k8s block of the pod an event belongs to, or None: its task's, unless the task is only whoever
    happened to be on the CPU (attribution cpu, e.g. a reset sent for a closed port), which is no owner."""
    if event.get("attribution") == "cpu":
        return None
    return event.get("k8s")
