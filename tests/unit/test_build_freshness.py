"""The committed BPF objects and generated decoders match the sources they come from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ktrace import build
from tests.helpers import REQUIRE_KERNEL


def test_manifest_lists_every_bpf_source_with_its_current_hash():
    manifest = json.loads(build.MANIFEST.read_text())
    current = build.manifest()
    assert manifest["sources"] == current["sources"], "bpf/ or vmlinux/ changed: run `make bpf`"


def test_committed_objects_are_the_ones_make_bpf_built():
    manifest = json.loads(build.MANIFEST.read_text())
    assert manifest["objects"] == build.manifest()["objects"], "objects differ from the manifest: run `make bpf`"
    assert manifest["objects"], "no BPF objects in ktrace/bpf/"


def test_generated_decoders_match_the_objects_btf():
    from ktrace import libbpf
    from ktrace.errors import LibbpfMissing

    try:
        libbpf.library()
    except LibbpfMissing as exc:
        if REQUIRE_KERNEL:
            raise
        pytest.skip(str(exc))
    assert build.GENERATED.read_text() == build.render(), "decoders drifted: run `make generate`"


def test_every_event_kind_has_a_layout_and_a_probe_family():
    from ktrace import probes
    from ktrace.events import generated

    assert set(generated.LAYOUTS) == set(generated.KIND)
    assert set(generated.FAMILY.values()) <= set(probes.FAMILY_BY_NAME)


def test_committed_cri_bindings_match_the_proto(tmp_path):
    from grpc_tools import protoc

    cri = Path(build.__file__).parent / "cri"
    assert protoc.main(["protoc", f"-I{cri}", f"--python_out={tmp_path}", str(cri / "cri.proto")]) == 0
    assert (tmp_path / "cri_pb2.py").read_text() == (cri / "cri_pb2.py").read_text(), "run `make proto`"
