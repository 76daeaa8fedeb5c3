"""The libc files the dns_names uprobes go on: the host's, and every one that a running process maps.

A uprobe belongs to a file's inode: one attachment covers every process that maps
that file, including processes started later. A container whose image carries its
own libc maps another inode, so each one found is attached on its own. Files are
found through ldconfig and known paths (the host's, or ktrace's own image's in a
pod) and through /proc/<pid>/maps of every process, and opened through
/proc/<pid>/map_files, which reaches the mapped file whatever mount namespace or
chroot it lives in, even after it was deleted (a process still running on the libc
that a package upgrade replaced).
"""

from __future__ import annotations

import functools
import os
import platform
import re
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

MAX_FILES = 64
SCAN_BUDGET_S = 3.0  # reading every process's maps stops after this long
PROC = Path("/proc")
# glibc (libc.so.6, old libc-2.x.so) and musl, whose dynamic linker is its libc (Alpine: ld-musl-<arch>.so.1;
# Debian's musl package: /lib/<arch>-linux-musl/libc.so behind an ld-musl symlink)
LIBC_NAME = re.compile(r"/(libc\.so\.6|libc-[0-9][0-9.]*\.so|ld-musl-[a-z0-9_]+\.so\.1|libc\.musl-[a-z0-9_]+\.so\.1"
                       r"|[a-z0-9_]+-linux-musl/libc\.so)$")
KNOWN_PATHS = (
    "/lib/x86_64-linux-gnu/libc.so.6", "/lib/aarch64-linux-gnu/libc.so.6", "/lib64/libc.so.6",
    "/usr/lib64/libc.so.6", "/lib/libc.so.6", "/usr/lib/libc.so.6", "/lib/ld-musl-x86_64.so.1",
    "/lib/ld-musl-aarch64.so.1",
)
# e_machine of the ELF files this build's BPF programs can read the arguments of
ELF_MACHINE = {"x86_64": 62, "aarch64": 183}
_DELETED = " (deleted)"


@dataclass(frozen=True)
class LibcFile:
    path: str  # what ktrace opens: a host path or /proc/<pid>/map_files/<range>
    shown: str  # how it is reported: "/usr/lib/x86_64-linux-gnu/libc.so.6" or "pid 812:/lib/ld-musl-x86_64.so.1"


@dataclass
class Discovery:
    files: list[LibcFile] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (shown, why it is not used)
    processes: int = 0  # processes whose maps were read
    complete: bool = True  # False when the scan ran out of time
    elapsed_ms: float = 0.0


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    """What tells two libc files apart. Not st_dev: every overlay mount (every container) has its own,
    while the layers below, where the real inode is, are shared by all containers of an image. A copy
    unpacked anywhere else has another ctime."""
    return st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def _elf_problem(path: str) -> str | None:
    """Why this file cannot carry our uprobes, or None: it must be a 64-bit ELF of this machine."""
    try:
        with open(path, "rb") as f:
            head = f.read(20)
    except OSError as exc:
        return f"cannot read: {exc.strerror}"
    machine = platform.machine()
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return "not an ELF file"
    if head[4] != 2 or head[5] != 1 or int.from_bytes(head[18:20], "little") != ELF_MACHINE.get(machine):
        return f"not a 64-bit {machine} ELF"
    return None


def host_candidates() -> list[str]:
    """libc paths ldconfig knows, then the usual places."""
    paths: list[str] = []
    try:
        out = subprocess.run(["ldconfig", "-p"], capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.SubprocessError):
        out = ""
    for line in out.splitlines():
        if "=>" in line and line.split()[0] == "libc.so.6":
            paths.append(line.rsplit("=>", 1)[1].strip())
    paths += [p for p in KNOWN_PATHS if os.path.exists(p)]
    return list(dict.fromkeys(paths))


def mapped_candidates(budget_s: float = SCAN_BUDGET_S) -> tuple[list[tuple[str, str]], int, bool]:
    """(opening path, shown) of each libc mapped by a running process, one per distinct mapping;
    with the number of processes read and whether the scan finished within its budget."""
    deadline = time.monotonic() + budget_s
    found: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()  # (maps dev, maps inode)
    processes = 0
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        if time.monotonic() > deadline:
            return found, processes, False
        try:
            maps = (entry / "maps").read_text()
        except OSError:
            continue  # gone, or a kernel thread
        processes += 1
        for line in maps.splitlines():
            if "libc" not in line and "musl" not in line:
                continue
            parts = line.split(maxsplit=5)
            if len(parts) < 6:
                continue
            path = parts[5].removesuffix(_DELETED)
            if not LIBC_NAME.search(path) or (parts[3], parts[4]) in seen:
                continue
            seen.add((parts[3], parts[4]))
            shown = f"pid {entry.name}:{parts[5]}"
            found.append((str(entry / "map_files" / parts[0]), shown))
    return found, processes, True


@functools.cache
def discover() -> Discovery:
    """Every distinct libc file on the node, at most MAX_FILES, host files first. Cached: one scan per run."""
    start = time.monotonic()
    result = Discovery()
    identities: set[tuple[int, int, int, int]] = set()
    mapped, result.processes, result.complete = mapped_candidates()
    for path, shown in [(p, p) for p in host_candidates()] + mapped:
        try:
            identity = _identity(os.stat(path))
        except OSError as exc:
            result.skipped.append((shown, f"cannot stat: {exc.strerror}"))
            continue
        if identity in identities:
            continue
        problem = _elf_problem(path)
        if problem:
            result.skipped.append((shown, problem))
            identities.add(identity)
            continue
        if len(result.files) >= MAX_FILES:
            result.skipped.append((shown, f"more than {MAX_FILES} libc files"))
            continue
        identities.add(identity)
        result.files.append(LibcFile(path, shown))
    result.elapsed_ms = round((time.monotonic() - start) * 1000, 1)
    return result
