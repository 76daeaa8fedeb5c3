"""kubelet's cgroup naming → pod UID, QoS class, container id and runtime (ktrace.enrich.k8s)."""

from __future__ import annotations

import pytest

from ktrace.enrich.cgroup import CgroupPaths, hierarchy_names
from ktrace.enrich.identity import Identity
from ktrace.enrich.k8s import parse_cgroup_path

UID = "8f3b2c1a-4d5e-4f60-9a7b-0c1d2e3f4a5b"
UID_ = UID.replace("-", "_")
CID = "3f1e5a7c9b2d4e6f8a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f"
PAUSE = "a" * 64


@pytest.mark.parametrize(("path", "expected"), [
    # cgroupfs driver
    (f"/kubepods/besteffort/pod{UID}/{CID}", (UID, "besteffort", CID, None)),
    (f"/kubepods/burstable/pod{UID}/{CID}", (UID, "burstable", CID, None)),
    (f"/kubepods/pod{UID}/{CID}", (UID, "guaranteed", CID, None)),
    (f"/kubepods/burstable/pod{UID}/{PAUSE}", (UID, "burstable", PAUSE, None)),  # the sandbox (pause) container
    (f"/kubepods/burstable/pod{UID}", (UID, "burstable", None, None)),  # the pod's own cgroup
    (f"/kubepods/besteffort/pod{UID}/crio-{CID}", (UID, "besteffort", CID, "cri-o")),
    # systemd driver, each runtime
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice/cri-containerd-{CID}.scope",
     (UID, "burstable", CID, "containerd")),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-{CID}.scope",
     (UID, "besteffort", CID, "cri-o")),
    (f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{UID_}.slice/crio-conmon-{CID}.scope",
     (UID, "besteffort", CID, "cri-o-conmon")),
    (f"/kubepods.slice/kubepods-pod{UID_}.slice/docker-{CID}.scope", (UID, "guaranteed", CID, "docker")),
    (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID_}.slice", (UID, "burstable", None, None)),
    # a container's own nested cgroups still belong to it
    (f"/kubepods/burstable/pod{UID}/{CID}/init.scope", (UID, "burstable", CID, None)),
    # nested under other cgroups: kind (docker), k3s, kubelet --cgroup-root, a test's own top directory
    (f"/docker/{'e' * 64}/kubepods/besteffort/pod{UID}/{CID}", (UID, "besteffort", CID, None)),
    (f"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
     f"kubelet-kubepods-besteffort-pod{UID_}.slice/cri-containerd-{CID}.scope", (UID, "besteffort", CID, "containerd")),
    (f"/kt-ident-123/kubepods-kt123/burstable/pod{UID}/{CID}", (UID, "burstable", CID, None)),
    # static pods: the UID is a 32-digit hash, no dashes
    ("/kubepods/burstable/pod0123456789abcdef0123456789abcdef/" + CID,
     ("0123456789abcdef0123456789abcdef", "burstable", CID, None)),
    # upper-case hex is normalised
    (f"/kubepods/besteffort/pod{UID.upper()}/{CID.upper()}", (UID, "besteffort", CID, None)),
])
def test_kubelet_paths_name_their_pod_and_container(path: str, expected: tuple) -> None:
    uid, qos, container_id, runtime = expected
    assert parse_cgroup_path(path) == {"pod_uid": uid, "qos": qos, "container_id": container_id, "runtime": runtime}


@pytest.mark.parametrize("path", [
    "/", "/user.slice/user-0.slice/session-1.scope", "/system.slice/kubelet.service",
    "/system.slice/containerd.service", "/kubepods", "/kubepods/burstable", "/kubepods.slice",
    "/kubepods.slice/kubepods-burstable.slice", f"/docker/{CID}",
    f"/somewhere/pod{UID}/{CID}",  # a pod-like name that is not under kubepods
    f"/kubepods/burstable/podnot-a-uid/{CID}", f"/kubepods/besteffort/pod{UID}x/{CID}",
])
def test_other_paths_are_not_pods(path: str) -> None:
    assert parse_cgroup_path(path) is None


def test_a_non_container_child_of_a_pod_has_no_container_id() -> None:
    assert parse_cgroup_path(f"/kubepods/burstable/pod{UID}/not-a-container")["container_id"] is None


def test_hierarchy_ids_map_to_the_names_cgroup_paths_uses() -> None:
    text = "12:pids:/\n7:memory:/user.slice\n4:cpu,cpuacct:/\n1:name=systemd:/init.scope\n0::/init.scope\n"
    assert hierarchy_names(text) == {0: "unified", 12: "pids", 7: "memory", 4: "cpu,cpuacct", 1: "name=systemd"}


def _identity(v1_memory: bool, containers=None) -> Identity:
    paths = CgroupPaths(roots={"memory": None, "unified": None})
    identity = Identity(paths, v1_memory=v1_memory, containers=containers)
    identity.hierarchies = {0: "unified", 7: "memory"}
    return identity


def _mkdir(identity: Identity, hierarchy_id: int, cgroup_id: int, path: str) -> None:
    identity.add_mkdir({"hierarchy_id": hierarchy_id, "new_cgroup_id": cgroup_id, "new_cgroup_path": path})


def test_a_cgroup_seen_created_resolves_without_a_walk() -> None:
    identity = _identity(v1_memory=True)
    _mkdir(identity, 7, 500, f"/kubepods/besteffort/pod{UID}/{CID}")
    found = identity.of(1, 500)
    assert found["cgroup_path"] == f"/kubepods/besteffort/pod{UID}/{CID}"
    assert found["k8s"] == {"pod_uid": UID, "qos": "besteffort", "container_id": CID, "runtime": None,
                            "namespace": None, "pod": None, "container": None, "image": None}


def test_v1_hosts_name_the_memory_cgroup_unless_it_is_the_root() -> None:
    identity = _identity(v1_memory=True)
    _mkdir(identity, 7, 500, "/mem")
    _mkdir(identity, 0, 600, "/unified")
    assert identity.of(600, 500)["cgroup_path"] == "/mem"
    assert identity.of(600, 1)["cgroup_path"] == "/unified"


def test_cgroup2_hosts_name_the_cgroup2_cgroup() -> None:
    identity = _identity(v1_memory=False)
    _mkdir(identity, 0, 600, "/unified")
    assert identity.of(600, 600)["cgroup_path"] == "/unified"


def test_mkdir_in_other_hierarchies_is_not_taken_for_a_memory_cgroup() -> None:
    identity = _identity(v1_memory=True)
    _mkdir(identity, 4, 500, "/cpu-only")
    assert identity.of(1, 500)["cgroup_path"] is None


def test_the_container_lookup_names_namespace_pod_and_container() -> None:
    asked = []

    def lookup(pod_uid: str, container_id: str | None) -> dict:
        asked.append((pod_uid, container_id))
        return {"namespace": "shop", "pod": "cart-7d9", "container": "cart", "image": "shop/cart:1.2"}

    identity = _identity(v1_memory=True, containers=lookup)
    _mkdir(identity, 7, 500, f"/kubepods/besteffort/pod{UID}/{CID}")
    assert asked == [(UID, CID)]  # asked when the cgroup appears, while the runtime still knows the container
    k8s = identity.of(1, 500)["k8s"]
    assert (k8s["namespace"], k8s["pod"], k8s["container"], k8s["image"]) == ("shop", "cart-7d9", "cart",
                                                                               "shop/cart:1.2")


def test_unknown_cgroups_have_no_path_and_no_pod() -> None:
    assert _identity(v1_memory=True).of(1, 999) == {"cgroup_path": None, "k8s": None}
