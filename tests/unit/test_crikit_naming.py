"""The cgroup names the container kit gives pods, and the runc wrapper's expansion of systemd's form."""

import pytest

from tests.crikit import pod_cgroup_parent
from tests.runc_systemd_naming import expand, subcommand

UID = "3f8e2b1a-1c2d-4e5f-8a9b-0c1d2e3f4a5b"


@pytest.mark.parametrize(("naming", "qos", "parent"), [
    ("cgroupfs", "burstable", f"/kubepods/burstable/pod{UID}"),
    ("cgroupfs", "guaranteed", f"/kubepods/pod{UID}"),
    ("systemd", "besteffort", "/kubepods.slice/kubepods-besteffort.slice/"
                              "kubepods-besteffort-pod3f8e2b1a_1c2d_4e5f_8a9b_0c1d2e3f4a5b.slice"),
    ("systemd", "guaranteed", "/kubepods.slice/kubepods-pod3f8e2b1a_1c2d_4e5f_8a9b_0c1d2e3f4a5b.slice"),
])
def test_pod_cgroup_parent_is_kubelets(naming: str, qos: str, parent: str) -> None:
    assert pod_cgroup_parent(UID, naming, qos) == parent


def test_systemd_form_expands_to_the_nested_slices_and_a_scope() -> None:
    assert expand("kubepods-burstable-pod3f8e_1c2d.slice:cri-containerd:ab12") == (
        "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod3f8e_1c2d.slice/cri-containerd-ab12.scope")


def test_cgroupfs_paths_are_left_alone() -> None:
    assert expand("/kubepods/burstable/pod1/ab12") is None


def test_subcommand_skips_global_flag_values() -> None:
    assert subcommand(["--root", "/r/create", "--log", "/l", "--log-format", "json", "create", "--bundle", "/b",
                       "id"]) == "create"
    assert subcommand(["--root", "/r", "delete", "--force", "create"]) == "delete"
