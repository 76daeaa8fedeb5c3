"""Pod and container names from kubelet's log files, when the runtime cannot be asked."""

from __future__ import annotations

from pathlib import Path

from ktrace.enrich.containers import ContainerNames

UID = "3f8e2b1a-1c2d-4e5f-8a9b-0c1d2e3f4a5b"
OTHER_UID = "0c1d2e3f-4a5b-4e5f-8a9b-3f8e2b1a1c2d"
CID = "ff0e51e5" + "0" * 48 + "12346ef1"
SIDECAR = "aa" * 32


def _names(root: Path) -> ContainerNames:
    return ContainerNames(None, pod_logs_dir=root / "pods", container_logs_dir=root / "containers",
                          kubelet_pods_dir=root / "kubelet-pods")


def _kubelet_logs(root: Path) -> Path:
    """The layout kubelet writes: a dir per pod, a dir per container in it, a link per container log."""
    pod_dir = root / "pods" / f"shop_cart-7d9f_{UID}"
    for container in ("cart", "istio-proxy"):
        (pod_dir / container).mkdir(parents=True)
        (pod_dir / container / "0.log").touch()
    (root / "pods" / f"kube-system_coredns-5d78_{OTHER_UID}" / "coredns").mkdir(parents=True)
    (root / "containers").mkdir()
    (root / "containers" / f"cart-7d9f_shop_cart-{CID}.log").symlink_to(pod_dir / "cart" / "0.log")
    return root


def test_a_container_log_link_names_namespace_pod_and_container(tmp_path: Path) -> None:
    names = _names(_kubelet_logs(tmp_path))
    assert names.lookup(UID, CID) == {"namespace": "shop", "pod": "cart-7d9f", "container": "cart", "image": None}


def test_without_a_link_the_pod_dir_names_the_pod_but_not_one_of_two_containers(tmp_path: Path) -> None:
    names = _names(_kubelet_logs(tmp_path))
    assert names.lookup(UID, SIDECAR) == {"namespace": "shop", "pod": "cart-7d9f", "container": None, "image": None}


def test_a_pod_with_one_container_names_it(tmp_path: Path) -> None:
    names = _names(_kubelet_logs(tmp_path))
    assert names.lookup(OTHER_UID, SIDECAR) == {"namespace": "kube-system", "pod": "coredns-5d78",
                                                "container": "coredns", "image": None}


def test_the_pod_cgroup_itself_gets_the_pod_but_no_container(tmp_path: Path) -> None:
    names = _names(_kubelet_logs(tmp_path))
    assert names.lookup(OTHER_UID, None) == {"namespace": "kube-system", "pod": "coredns-5d78", "container": None,
                                             "image": None}


def test_no_log_dirs_no_names(tmp_path: Path) -> None:
    names = _names(tmp_path / "missing")
    assert names.lookup(UID, CID) == {"namespace": None, "pod": None, "container": None, "image": None}
    assert names.report()["containers_known"] == 0


def test_the_log_dirs_are_scanned_at_most_once_a_second(tmp_path: Path) -> None:
    root = _kubelet_logs(tmp_path)
    names = _names(root)
    assert names.lookup(UID, SIDECAR)["container"] is None
    (root / "containers" / f"cart-7d9f_shop_istio-proxy-{SIDECAR}.log").touch()
    assert names.lookup(UID, SIDECAR)["container"] is None  # within the second: no rescan per cgroup
    names._next_log_scan = 0.0
    assert names.lookup(UID, SIDECAR)["container"] == "istio-proxy"


def _kubelet_pod_dir(root: Path, uid: str, hosts: str, containers: tuple[str, ...]) -> None:
    """kubelet's /var/lib/kubelet/pods/<uid>: hosts file, service account volume, a dir per container."""
    pod_dir = root / "kubelet-pods" / uid
    token_volume = pod_dir / "volumes" / "kubernetes.io~projected" / "kube-api-access-x7k2p"
    token_volume.mkdir(parents=True)
    (token_volume / "namespace").write_text("payments")
    (pod_dir / "etc-hosts").write_text(hosts)
    for container in containers:
        (pod_dir / "containers" / container / "1a2b3c4d").mkdir(parents=True)


POD_HOSTS = ("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
             "10.244.1.17\tledger-6b8d\n")
HOST_NETWORK_HOSTS = "# Kubernetes-managed hosts file (host network).\n127.0.0.1\tlocalhost\n10.0.0.4\tnode-3\n"


def test_kubelets_pod_dir_names_namespace_pod_and_only_container(tmp_path: Path) -> None:
    _kubelet_pod_dir(tmp_path, UID, POD_HOSTS, ("ledger",))
    assert _names(tmp_path).lookup(UID, CID) == {"namespace": "payments", "pod": "ledger-6b8d",
                                                 "container": "ledger", "image": None}


def test_a_host_network_pods_hosts_file_is_the_nodes_not_a_pod_name(tmp_path: Path) -> None:
    _kubelet_pod_dir(tmp_path, UID, HOST_NETWORK_HOSTS, ("agent", "sidecar"))
    assert _names(tmp_path).lookup(UID, CID) == {"namespace": "payments", "pod": None, "container": None,
                                                 "image": None}


def test_the_log_dirs_come_before_the_pod_dir(tmp_path: Path) -> None:
    _kubelet_logs(tmp_path)
    _kubelet_pod_dir(tmp_path, UID, POD_HOSTS, ("ledger",))
    assert _names(tmp_path).lookup(UID, CID)["pod"] == "cart-7d9f"


def test_the_first_runtime_socket_that_exists_is_used(tmp_path: Path, monkeypatch) -> None:
    import socket

    from ktrace.enrich import containers

    paths = [tmp_path / "containerd.sock", tmp_path / "crio.sock", tmp_path / "k3s.sock"]
    monkeypatch.setattr(containers, "SOCKETS", tuple(paths))
    assert containers.find_socket() is None
    paths[0].touch()  # a leftover file, not a socket
    listeners = []
    for path in paths[1:]:
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(path))
        listeners.append(listener)
    try:
        assert containers.find_socket() == paths[1]
    finally:
        for listener in listeners:
            listener.close()
