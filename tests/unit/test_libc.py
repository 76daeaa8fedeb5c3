"""ktrace.libc finds the libc files to put the dns_names uprobes on, once each."""

from __future__ import annotations

import os
import platform

import pytest

from ktrace import libc


@pytest.mark.parametrize("path", [
    "/usr/lib/x86_64-linux-gnu/libc.so.6", "/lib64/libc.so.6", "/lib/libc-2.17.so", "/lib/ld-musl-x86_64.so.1",
    "/lib/libc.musl-aarch64.so.1", "/lib/x86_64-linux-musl/libc.so",
])
def test_glibc_and_musl_file_names_are_recognised(path):
    assert libc.LIBC_NAME.search(path)


@pytest.mark.parametrize("path", [
    "/usr/lib/x86_64-linux-gnu/libcrypt.so.1", "/usr/lib/x86_64-linux-gnu/libc.so", "/lib/libc.so.6.bak",
    "/usr/lib/x86_64-linux-gnu/libcap.so.2", "/usr/lib/libcurl.so.4",
])
def test_other_libraries_are_not(path):
    assert not libc.LIBC_NAME.search(path)


def _elf(tmp_path, ident_class: int, data: int, machine: int) -> str:
    head = b"\x7fELF" + bytes([ident_class, data, 1]) + bytes(9) + (3).to_bytes(2, "little")
    path = tmp_path / "libc.so.6"
    path.write_bytes(head + machine.to_bytes(2, "little") + bytes(44))
    return str(path)


def test_a_64_bit_elf_of_this_machine_can_be_probed(tmp_path):
    machine = libc.ELF_MACHINE.get(platform.machine())
    if machine is None:
        pytest.skip(f"no BPF build for {platform.machine()}")
    assert libc._elf_problem(_elf(tmp_path, 2, 1, machine)) is None


def test_a_32_bit_or_foreign_elf_cannot(tmp_path):
    assert "not a 64-bit" in libc._elf_problem(_elf(tmp_path, 1, 1, 3))  # i386, like /lib32/libc.so.6
    assert "not a 64-bit" in libc._elf_problem(_elf(tmp_path, 2, 1, 40))  # ARM (32-bit machine number)


def test_a_file_that_is_not_elf_or_missing_cannot(tmp_path):
    text = tmp_path / "libc.so.6"
    text.write_text("GROUP ( /lib/libc.so.6 )\n")  # a linker script, as libc.so is
    assert libc._elf_problem(str(text)) == "not an ELF file"
    assert libc._elf_problem(str(tmp_path / "missing")).startswith("cannot read")


def test_this_interpreters_libc_is_found_through_its_maps():
    found, processes, complete = libc.mapped_candidates()
    assert complete and processes >= 1
    mine = [path for path, shown in found if shown.startswith(f"pid {os.getpid()}:")]
    if not mine:
        # another process mapping the same file was read first: ours was the same mapping
        assert found
        return
    assert mine[0].startswith(f"/proc/{os.getpid()}/map_files/")


def test_discover_lists_each_file_once_with_host_paths_first():
    result = libc.discover.__wrapped__()
    assert result.files, result.skipped
    identities = [libc._identity(os.stat(f.path)) for f in result.files]
    assert len(identities) == len(set(identities))
    from_proc = [f.shown.startswith("pid ") for f in result.files]
    assert from_proc == sorted(from_proc)  # files at host paths first, then those only a process maps


def test_discover_stops_at_the_cap_and_says_so(monkeypatch):
    monkeypatch.setattr(libc, "MAX_FILES", 0)
    result = libc.discover.__wrapped__()
    assert result.files == []
    assert any(reason == "more than 0 libc files" for _shown, reason in result.skipped)
