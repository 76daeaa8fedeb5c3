"""A thin ctypes binding over the system libbpf (libbpf.so.1, version 1.0 or newer).

Only the calls ktrace uses are bound. Every failure becomes a BpfError that names
the step, the object or program, and errno. libbpf's own log goes to the
``ktrace.libbpf`` logger at DEBUG; its last lines are kept so a refused program
can be reported with the verifier's verdict.
"""

from __future__ import annotations

import collections
import ctypes
import ctypes.util
import errno as errno_mod
import logging
import os
from collections.abc import Iterator
from typing import Any

from ktrace.errors import BpfError, LibbpfMissing

log = logging.getLogger("ktrace.libbpf")

LIBBPF_MIN = (1, 0)

# enum libbpf_print_level
_LEVEL_WARN, _LEVEL_INFO, _LEVEL_DEBUG = 0, 1, 2

# BTF kinds (include/uapi/linux/btf.h)
BTF_KIND_INT = 1
BTF_KIND_PTR = 2
BTF_KIND_ARRAY = 3
BTF_KIND_STRUCT = 4
BTF_KIND_UNION = 5
BTF_KIND_ENUM = 6
BTF_KIND_FWD = 7
BTF_KIND_TYPEDEF = 8
BTF_KIND_VOLATILE = 9
BTF_KIND_CONST = 10
BTF_KIND_RESTRICT = 11
BTF_KIND_FUNC = 12
BTF_KIND_FUNC_PROTO = 13
BTF_KIND_VAR = 14
BTF_KIND_DATASEC = 15
BTF_KIND_FLOAT = 16
BTF_KIND_TYPE_TAG = 18
BTF_KIND_ENUM64 = 19

# enum bpf_prog_type values used by feature checks
BPF_PROG_TYPE_KPROBE = 2
BPF_PROG_TYPE_TRACEPOINT = 5
BPF_PROG_TYPE_RAW_TRACEPOINT = 17
BPF_PROG_TYPE_TRACING = 26

# struct bpf_prog_info (include/uapi/linux/bpf.h), a uapi layout that only ever grows at its end: its size on
# 6.18, and the offset of recursion_misses (v5.12, commit 9ed9e9ba2337 "bpf: Count the number of times recursion
# was prevented"). A kernel with a shorter struct writes back a shorter info_len.
_PROG_INFO_SIZE = 232
_RECURSION_MISSES_OFF = 208

_print_fn_type = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)

_lib: ctypes.CDLL | None = None
_libc = ctypes.CDLL(None, use_errno=True)
_print_fn: Any = None  # keeps the log callback alive for the life of the process
_recent_log: collections.deque[str] = collections.deque(maxlen=400)


class _UprobeOpts(ctypes.Structure):
    """struct bpf_uprobe_opts of libbpf 1.1 (newer versions add fields after func_name and read sz)."""

    _fields_ = [("sz", ctypes.c_size_t), ("ref_ctr_offset", ctypes.c_size_t), ("bpf_cookie", ctypes.c_uint64),
                ("retprobe", ctypes.c_bool), ("func_name", ctypes.c_char_p)]


class _BtfType(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("info", ctypes.c_uint32), ("size_or_type", ctypes.c_uint32)]


class _BtfMember(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("type", ctypes.c_uint32), ("offset", ctypes.c_uint32)]


class _BtfArray(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("index_type", ctypes.c_uint32), ("nelems", ctypes.c_uint32)]


class _BtfEnum(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("val", ctypes.c_int32)]


class _BtfEnum64(ctypes.Structure):
    _fields_ = [("name_off", ctypes.c_uint32), ("val_lo32", ctypes.c_uint32), ("val_hi32", ctypes.c_uint32)]


class _BtfVarSecinfo(ctypes.Structure):
    _fields_ = [("type", ctypes.c_uint32), ("offset", ctypes.c_uint32), ("size", ctypes.c_uint32)]


def _sig(lib: ctypes.CDLL, name: str, restype: Any, *argtypes: Any) -> None:
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)


def _declare(lib: ctypes.CDLL) -> None:
    vp, cp, i, u32, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_size_t
    _sig(lib, "libbpf_major_version", u32)
    _sig(lib, "libbpf_minor_version", u32)
    _sig(lib, "libbpf_version_string", cp)
    _sig(lib, "libbpf_set_print", vp, _print_fn_type)
    _sig(lib, "libbpf_num_possible_cpus", i)
    _sig(lib, "libbpf_probe_bpf_prog_type", i, i, vp)
    _sig(lib, "bpf_object__open_file", vp, cp, vp)
    _sig(lib, "bpf_object__load", i, vp)
    _sig(lib, "bpf_object__close", None, vp)
    _sig(lib, "bpf_object__btf", vp, vp)
    _sig(lib, "bpf_object__next_program", vp, vp, vp)
    _sig(lib, "bpf_object__find_program_by_name", vp, vp, cp)
    _sig(lib, "bpf_object__find_map_by_name", vp, vp, cp)
    _sig(lib, "bpf_program__name", cp, vp)
    _sig(lib, "bpf_program__section_name", cp, vp)
    _sig(lib, "bpf_program__set_autoload", i, vp, ctypes.c_bool)
    _sig(lib, "bpf_program__autoload", ctypes.c_bool, vp)
    _sig(lib, "bpf_program__fd", i, vp)
    _sig(lib, "bpf_obj_get_info_by_fd", i, i, vp, ctypes.POINTER(u32))
    _sig(lib, "bpf_program__attach", vp, vp)
    _sig(lib, "bpf_program__attach_cgroup", vp, vp, i)
    _sig(lib, "bpf_program__attach_uprobe_opts", vp, vp, i, cp, sz, ctypes.POINTER(_UprobeOpts))
    _sig(lib, "bpf_link__destroy", i, vp)
    _sig(lib, "bpf_link__fd", i, vp)
    _sig(lib, "bpf_program__attach_iter", vp, vp, vp)
    _sig(lib, "bpf_iter_create", i, i)
    _sig(lib, "bpf_map__fd", i, vp)
    _sig(lib, "bpf_map__set_max_entries", i, vp, u32)
    _sig(lib, "bpf_map__max_entries", u32, vp)
    _sig(lib, "bpf_map__value_size", u32, vp)
    _sig(lib, "bpf_map__key_size", u32, vp)
    _sig(lib, "bpf_map__type", i, vp)
    _sig(lib, "bpf_map__initial_value", vp, vp, ctypes.POINTER(sz))
    _sig(lib, "bpf_map__reuse_fd", i, vp, i)
    _sig(lib, "bpf_map_lookup_elem", i, i, vp, vp)
    _sig(lib, "bpf_map_update_elem", i, i, vp, vp, ctypes.c_uint64)
    _sig(lib, "bpf_map_delete_elem", i, i, vp)
    _sig(lib, "bpf_map_get_next_key", i, i, vp, vp)
    _sig(lib, "btf__parse", vp, cp, vp)
    _sig(lib, "btf__load_vmlinux_btf", vp)
    _sig(lib, "btf__free", None, vp)
    _sig(lib, "btf__type_cnt", u32, vp)
    _sig(lib, "btf__type_by_id", ctypes.POINTER(_BtfType), vp, u32)
    _sig(lib, "btf__name_by_offset", cp, vp, u32)
    _sig(lib, "btf__find_by_name_kind", i, vp, cp, u32)
    _libc.vsnprintf.restype = ctypes.c_int
    _libc.vsnprintf.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_void_p]


def _on_libbpf_print(level: int, fmt: bytes, args: int) -> int:
    # Never let an exception escape a ctypes callback: ctypes prints and swallows it.
    try:
        buf = ctypes.create_string_buffer(2048)
        _libc.vsnprintf(buf, len(buf), fmt, args)
        text = buf.value.decode("utf-8", "replace").rstrip("\n")
        for line in text.splitlines():
            _recent_log.append(line)
            log.debug("%s", line)
    except Exception:  # noqa: BLE001 - nothing may escape into C
        pass
    return 0


def library() -> ctypes.CDLL:
    """The loaded libbpf, checked for version >= 1.0. Raises LibbpfMissing."""
    global _lib, _print_fn
    if _lib is not None:
        return _lib
    path = os.environ.get("KTRACE_LIBBPF") or ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(path, use_errno=True)
    except OSError as exc:
        raise LibbpfMissing(
            f"libbpf not found ({path}: {exc}); install it: apt-get install libbpf1 (or dnf install libbpf)"
        ) from None
    try:
        _declare(lib)
    except AttributeError as exc:
        raise LibbpfMissing(f"libbpf at {path} is too old (missing {exc}); ktrace needs libbpf >= 1.0") from None
    version = (lib.libbpf_major_version(), lib.libbpf_minor_version())
    if version < LIBBPF_MIN:
        raise LibbpfMissing(f"libbpf {version[0]}.{version[1]} is too old; ktrace needs libbpf >= 1.0")
    _print_fn = _print_fn_type(_on_libbpf_print)
    lib.libbpf_set_print(_print_fn)
    _lib = lib
    return lib


def version() -> str:
    return library().libbpf_version_string().decode()


def possible_cpus() -> int:
    n = library().libbpf_num_possible_cpus()
    if n <= 0:
        raise BpfError("cannot read the number of possible CPUs", -n)
    return n


def recent_log(lines: int = 20) -> list[str]:
    """The last lines libbpf logged (the verifier's verdict after a failed load)."""
    return list(_recent_log)[-lines:]


def clear_log() -> None:
    _recent_log.clear()


def _errno() -> int:
    return ctypes.get_errno()


def strerror(err: int) -> str:
    err = abs(err)
    name = errno_mod.errorcode.get(err, str(err))
    return f"{name}: {os.strerror(err)}" if err else "unknown error"


class Link:
    """An attached program; destroy() detaches it."""

    def __init__(self, ptr: int, program: str) -> None:
        self._ptr = ptr
        self.program = program

    def run_iter(self) -> None:
        """Run an iterator program to completion (its output, if any, is discarded)."""
        lib = library()
        fd = lib.bpf_iter_create(lib.bpf_link__fd(self._ptr))
        if fd < 0:
            raise BpfError(f"{self.program}: bpf_iter_create failed ({strerror(fd)})", -fd, program=self.program)
        try:
            while os.read(fd, 65536):
                pass
        finally:
            os.close(fd)

    def destroy(self) -> None:
        if self._ptr:
            library().bpf_link__destroy(self._ptr)
            self._ptr = 0


class Program:
    def __init__(self, ptr: int) -> None:
        self._ptr = ptr
        lib = library()
        self.name: str = lib.bpf_program__name(ptr).decode()
        self.section: str = lib.bpf_program__section_name(ptr).decode()

    @property
    def autoload(self) -> bool:
        return bool(library().bpf_program__autoload(self._ptr))

    def set_autoload(self, on: bool) -> None:
        rc = library().bpf_program__set_autoload(self._ptr, on)
        if rc:
            raise BpfError(f"{self.name}: set_autoload failed ({strerror(rc)})", -rc, program=self.name)

    @property
    def fd(self) -> int:
        return library().bpf_program__fd(self._ptr)

    def recursion_misses(self) -> int | None:
        """Runs of this loaded program the kernel skipped because a BPF program was already running on that CPU
        (bpf_prog_info.recursion_misses); None on kernels before 5.12, which do not count them."""
        info = ctypes.create_string_buffer(_PROG_INFO_SIZE)  # zeroed: the kernel refuses non-zero bytes it lacks
        length = ctypes.c_uint32(_PROG_INFO_SIZE)
        rc = library().bpf_obj_get_info_by_fd(self.fd, info, ctypes.byref(length))
        if rc:
            raise BpfError(f"{self.name}: reading its program info failed ({strerror(rc)})", -rc, program=self.name)
        if length.value < _RECURSION_MISSES_OFF + 8:
            return None
        return int.from_bytes(info.raw[_RECURSION_MISSES_OFF:_RECURSION_MISSES_OFF + 8], "little")

    def attach(self) -> Link:
        """Attach by section name (tracepoint, tp_btf, raw_tp, kprobe, fentry, uprobe)."""
        ptr = library().bpf_program__attach(self._ptr)
        if not ptr:
            err = _errno()
            raise BpfError(f"{self.name}: attach {self.section} failed ({strerror(err)})", err, program=self.name)
        return Link(ptr, self.name)

    def attach_iter(self) -> Link:
        ptr = library().bpf_program__attach_iter(self._ptr, None)
        if not ptr:
            err = _errno()
            raise BpfError(f"{self.name}: attach {self.section} failed ({strerror(err)})", err, program=self.name)
        return Link(ptr, self.name)

    def attach_cgroup(self, cgroup_fd: int) -> Link:
        ptr = library().bpf_program__attach_cgroup(self._ptr, cgroup_fd)
        if not ptr:
            err = _errno()
            raise BpfError(f"{self.name}: attach to cgroup failed ({strerror(err)})", err, program=self.name)
        return Link(ptr, self.name)


    def attach_uprobe(self, binary_path: str, func_name: str, retprobe: bool) -> Link:
        """Attach to a function of an ELF file (found by its symbol), in every process that maps the file."""
        opts = _UprobeOpts(sz=ctypes.sizeof(_UprobeOpts), retprobe=retprobe, func_name=func_name.encode())
        kind = "uretprobe" if retprobe else "uprobe"
        ptr = library().bpf_program__attach_uprobe_opts(self._ptr, -1, binary_path.encode(), 0, ctypes.byref(opts))
        if not ptr:
            err = _errno()
            raise BpfError(f"{self.name}: attach {kind} {binary_path}:{func_name} failed ({strerror(err)})", err,
                           program=self.name)
        return Link(ptr, self.name)


class Map:
    def __init__(self, ptr: int, name: str) -> None:
        self._ptr = ptr
        self.name = name

    @property
    def fd(self) -> int:
        return library().bpf_map__fd(self._ptr)

    @property
    def max_entries(self) -> int:
        return library().bpf_map__max_entries(self._ptr)

    @property
    def key_size(self) -> int:
        return library().bpf_map__key_size(self._ptr)

    @property
    def value_size(self) -> int:
        return library().bpf_map__value_size(self._ptr)

    def set_max_entries(self, n: int) -> None:
        rc = library().bpf_map__set_max_entries(self._ptr, n)
        if rc:
            raise BpfError(f"map {self.name}: set_max_entries({n}) failed ({strerror(rc)})", -rc)

    def reuse_fd(self, fd: int) -> None:
        """Share an already created map (of the same definition) with this object."""
        rc = library().bpf_map__reuse_fd(self._ptr, fd)
        if rc:
            raise BpfError(f"map {self.name}: reuse_fd failed ({strerror(rc)})", -rc)

    def initial_value(self) -> ctypes.Array[ctypes.c_char]:
        """The writable initial contents of a global data map (.rodata) before load."""
        size = ctypes.c_size_t(0)
        ptr = library().bpf_map__initial_value(self._ptr, ctypes.byref(size))
        if not ptr:
            raise BpfError(f"map {self.name}: no initial value")
        return (ctypes.c_char * size.value).from_address(ptr)

    def lookup(self, key: bytes, value_size: int | None = None) -> bytes | None:
        size = value_size if value_size is not None else self.value_size
        kbuf = ctypes.create_string_buffer(key, len(key))
        vbuf = ctypes.create_string_buffer(size)
        rc = library().bpf_map_lookup_elem(self.fd, kbuf, vbuf)
        if rc:
            err = _errno()
            if err == errno_mod.ENOENT:
                return None
            raise BpfError(f"map {self.name}: lookup failed ({strerror(err)})", err)
        return vbuf.raw

    def lookup_percpu(self, key: bytes) -> list[bytes]:
        """One value per possible CPU (per-CPU maps round each value up to 8 bytes)."""
        stride = (self.value_size + 7) & ~7
        ncpu = possible_cpus()
        raw = self.lookup(key, stride * ncpu)
        if raw is None:
            return []
        return [raw[i * stride : i * stride + self.value_size] for i in range(ncpu)]

    def update(self, key: bytes, value: bytes) -> None:
        kbuf = ctypes.create_string_buffer(key, len(key))
        vbuf = ctypes.create_string_buffer(value, len(value))
        if library().bpf_map_update_elem(self.fd, kbuf, vbuf, 0):
            err = _errno()
            raise BpfError(f"map {self.name}: update failed ({strerror(err)})", err)

    def delete(self, key: bytes) -> bool:
        """Delete one entry; False if it was not there."""
        kbuf = ctypes.create_string_buffer(key, len(key))
        if library().bpf_map_delete_elem(self.fd, kbuf):
            err = _errno()
            if err == errno_mod.ENOENT:
                return False
            raise BpfError(f"map {self.name}: delete failed ({strerror(err)})", err)
        return True

    def keys(self) -> Iterator[bytes]:
        lib = library()
        size = self.key_size
        cur = None
        nxt = ctypes.create_string_buffer(size)
        while True:
            rc = lib.bpf_map_get_next_key(self.fd, cur, nxt)
            if rc:
                return
            key = nxt.raw
            yield key
            cur = ctypes.create_string_buffer(key, size)


class BpfObject:
    """One BPF ELF object through its lifecycle: open → configure → load → attach → close."""

    def __init__(self, path: str) -> None:
        lib = library()
        self.path = path
        self.name = os.path.basename(path)
        clear_log()
        ptr = lib.bpf_object__open_file(path.encode(), None)
        if not ptr:
            err = _errno()
            raise BpfError(f"cannot open {self.name} ({strerror(err)})", err, detail="\n".join(recent_log()))
        self._ptr = ptr
        self.loaded = False

    def __enter__(self) -> BpfObject:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._ptr:
            library().bpf_object__close(self._ptr)
            self._ptr = 0

    def programs(self) -> list[Program]:
        lib = library()
        out = []
        prog = lib.bpf_object__next_program(self._ptr, None)
        while prog:
            out.append(Program(prog))
            prog = lib.bpf_object__next_program(self._ptr, prog)
        return out

    def program(self, name: str) -> Program:
        ptr = library().bpf_object__find_program_by_name(self._ptr, name.encode())
        if not ptr:
            raise BpfError(f"{self.name} has no program {name}")
        return Program(ptr)

    def map(self, name: str) -> Map:
        ptr = library().bpf_object__find_map_by_name(self._ptr, name.encode())
        if not ptr:
            raise BpfError(f"{self.name} has no map {name}")
        return Map(ptr, name)

    def btf(self) -> Btf:
        ptr = library().bpf_object__btf(self._ptr)
        if not ptr:
            raise BpfError(f"{self.name} has no BTF")
        return Btf(ptr, owned=False)

    def rodata_variables(self) -> set[str]:
        return set(self.btf().datasec(".rodata"))

    def set_rodata(self, values: dict[str, int | bytes]) -> None:
        """Write `const volatile` globals by name, before load (arrays as their bytes)."""
        section = self.btf().datasec(".rodata")
        data = self.map(".rodata").initial_value()
        for name, value in values.items():
            if name not in section:
                raise BpfError(f"{self.name} has no rodata variable {name}")
            offset, size = section[name]
            if isinstance(value, bytes):
                if len(value) != size:
                    raise BpfError(f"{self.name}: rodata {name} is {size} bytes, got {len(value)}")
                data[offset : offset + size] = value
            else:
                data[offset : offset + size] = int(value).to_bytes(size, "little")

    def load(self) -> None:
        clear_log()
        rc = library().bpf_object__load(self._ptr)
        if rc:
            lines = recent_log(40)
            program = _failed_program(lines)
            where = f"program {program}" if program else self.name
            raise BpfError(
                f"loading {where} failed ({strerror(rc)})", -rc, program=program, detail="\n".join(lines[-15:])
            )
        self.loaded = True


def _failed_program(lines: list[str]) -> str:
    """The program libbpf blamed for a failed load, from its log ("prog 'x': ...")."""
    for line in reversed(lines):
        start = line.find("prog '")
        if start >= 0 and ("fail" in line or "error" in line.lower() or "refused" in line):
            end = line.find("'", start + 6)
            if end > start:
                return line[start + 6 : end]
    return ""


class BtfTypeInfo:
    """One decoded BTF type."""

    __slots__ = ("id", "kind", "name", "size", "type", "vlen", "kind_flag", "members", "values", "array",
                 "signed")

    def __init__(self) -> None:
        self.id = 0
        self.kind = 0
        self.name = ""
        self.size = 0  # size for INT/STRUCT/UNION/ENUM/DATASEC
        self.type = 0  # referenced type for PTR/TYPEDEF/CONST/VOLATILE/VAR/...
        self.vlen = 0
        self.kind_flag = False
        self.members: list[tuple[str, int, int, int]] = []  # (name, type id, bit offset, bitfield size)
        self.values: list[tuple[str, int]] = []  # enum (name, value)
        self.array: tuple[int, int] = (0, 0)  # (element type id, nelems)
        self.signed = False  # INT encoding


class Btf:
    """Read-only access to a BTF blob (a BPF object's or the kernel's)."""

    def __init__(self, ptr: int, owned: bool) -> None:
        self._ptr = ptr
        self._owned = owned

    @classmethod
    def from_file(cls, path: str) -> Btf:
        ptr = library().btf__parse(path.encode(), None)
        if not ptr:
            err = _errno()
            raise BpfError(f"cannot read BTF from {path} ({strerror(err)})", err)
        return cls(ptr, owned=True)

    @classmethod
    def vmlinux(cls) -> Btf:
        ptr = library().btf__load_vmlinux_btf()
        if not ptr:
            err = _errno()
            raise BpfError(f"cannot read the kernel's BTF ({strerror(err)})", err)
        return cls(ptr, owned=True)

    def close(self) -> None:
        if self._owned and self._ptr:
            library().btf__free(self._ptr)
        self._ptr = 0

    def __enter__(self) -> Btf:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def count(self) -> int:
        return library().btf__type_cnt(self._ptr)

    def _name(self, off: int) -> str:
        raw = library().btf__name_by_offset(self._ptr, off)
        return raw.decode() if raw else ""

    def find(self, name: str, kind: int) -> int:
        """Type id of a named type of the given kind, or -1."""
        rc = library().btf__find_by_name_kind(self._ptr, name.encode(), kind)
        return rc if rc > 0 else -1

    def type(self, type_id: int) -> BtfTypeInfo:
        raw = library().btf__type_by_id(self._ptr, type_id)
        if not raw:
            raise BpfError(f"no BTF type {type_id}")
        t = raw.contents
        info = BtfTypeInfo()
        info.id = type_id
        info.kind = (t.info >> 24) & 0x1F
        info.vlen = t.info & 0xFFFF
        info.kind_flag = bool(t.info >> 31)
        info.name = self._name(t.name_off)
        after = ctypes.addressof(t) + ctypes.sizeof(_BtfType)
        if info.kind in (BTF_KIND_INT, BTF_KIND_STRUCT, BTF_KIND_UNION, BTF_KIND_ENUM, BTF_KIND_ENUM64,
                         BTF_KIND_DATASEC, BTF_KIND_FLOAT):
            info.size = t.size_or_type
        else:
            info.type = t.size_or_type
        if info.kind == BTF_KIND_INT:
            info.signed = bool((ctypes.c_uint32.from_address(after).value >> 24) & 1)
        elif info.kind in (BTF_KIND_STRUCT, BTF_KIND_UNION):
            members = (_BtfMember * info.vlen).from_address(after)
            for m in members:
                if info.kind_flag:
                    bit_offset, bitfield = m.offset & 0xFFFFFF, m.offset >> 24
                else:
                    bit_offset, bitfield = m.offset, 0
                info.members.append((self._name(m.name_off), m.type, bit_offset, bitfield))
        elif info.kind == BTF_KIND_ENUM:
            for e in (_BtfEnum * info.vlen).from_address(after):
                info.values.append((self._name(e.name_off), e.val))
        elif info.kind == BTF_KIND_ENUM64:
            for e in (_BtfEnum64 * info.vlen).from_address(after):
                info.values.append((self._name(e.name_off), (e.val_hi32 << 32) | e.val_lo32))
        elif info.kind == BTF_KIND_ARRAY:
            a = _BtfArray.from_address(after)
            info.array = (a.type, a.nelems)
        elif info.kind == BTF_KIND_DATASEC:
            for v in (_BtfVarSecinfo * info.vlen).from_address(after):
                info.members.append((self._name(self.type_name_off(v.type)), v.type, v.offset, v.size))
        return info

    def type_name_off(self, type_id: int) -> int:
        raw = library().btf__type_by_id(self._ptr, type_id)
        return raw.contents.name_off if raw else 0

    def datasec(self, name: str) -> dict[str, tuple[int, int]]:
        """Variables of a data section: name → (byte offset, size)."""
        sec_id = self.find(name, BTF_KIND_DATASEC)
        if sec_id < 0:
            return {}
        return {var: (offset, size) for var, _tid, offset, size in self.type(sec_id).members}

    def enum(self, name: str) -> dict[int, str]:
        """An enum's values → names, or {} when the type is absent."""
        for kind in (BTF_KIND_ENUM, BTF_KIND_ENUM64):
            tid = self.find(name, kind)
            if tid > 0:
                return {value: label for label, value in self.type(tid).values}
        return {}

    def has(self, name: str, kind: int) -> bool:
        return self.find(name, kind) > 0
