"""One capture session: resolve probe chains → open → configure → load → attach → drain → detach.

The loader keeps, for each selected family, the first alternative of its chain
whose check passes and that loads and attaches on this kernel. A program the
kernel refuses is switched off and the next alternative is tried, so a hardened
kernel (no kprobes, no trampolines) still gets every family it can.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import time
from dataclasses import dataclass, field

from ktrace import libbpf, libc, probes, spool
from ktrace.errors import BpfError, KtraceError
from ktrace.events import generated

log = logging.getLogger("ktrace.capture")

# Maps that every object declares identically and that the session shares.
SHARED_MAPS = ("events", "rare", "counters", "ports")

DEFAULT_MAP_SIZES = {
    "sk_owner": 65536,  # sockets remembered with their owner
    "listeners": 4096,  # listening (netns, port) pairs
    "connects": 8192,  # connect() calls in flight
    "held_states": 8192,  # accepted sockets waiting for accept() to name the owner; --sample: SYN_SENTs for a port
    "udp_flows": 16384,  # UDP flows counted in the kernel; idle ones are drained when it fills
    "lookups": 4096,  # threads inside a libc resolver call (dns_names)
    "udp_calls": 8192,  # send/receive syscalls in flight on UDP sockets (the syscall alternative of udp/dns)
    "proc_counts": len(generated.PROC_COUNTER),  # per-CPU counters of the process family (new threads)
    "drop_counts": 4096,  # (drop reason, ethertype, IP protocol) keys counted in the kernel (drops)
    "runq_queued": 16384,  # runnable tasks waiting for a CPU (sched)
    "runq_hist": 4096,  # cgroups with a run-queue latency histogram (sched)
    "bio_inflight": 8192,  # block requests between issue and completion (blockio)
    "bio_hist": 1024,  # (disk, kind of request) pairs with a latency histogram (blockio)
}
SCHED_WARN_S = 0.010  # --sched-warn: a run-queue wait longer than this is an event
BIO_WARN_S = 0.100  # --bio-warn: a block request slower than this is an event
DNS_PORTS = (53,)
MAX_DNS_PORTS = next(v for v, name in generated.UDP_SIZES.items() if name == "max_dns_ports")
# Drain idle UDP flows from the kernel map once it is this full, so new flows still fit.
FLOW_DRAIN_FILL = 0.5
FLOW_IDLE_NS = 2_000_000_000


@dataclass
class CaptureConfig:
    families: tuple[str, ...] = tuple(f.name for f in probes.FAMILIES if f.default)
    ports: tuple[int, ...] = ()
    dns_ports: tuple[int, ...] = DNS_PORTS
    dns_only: bool = False
    sample_every: int = 1
    ring_bytes: int = 8 << 20  # the busy families' ring (events)
    rare_ring_bytes: int = 1 << 20  # the rare families' ring (rare): oom, process, cgroups, dns, dns_names
    wake_bytes: int = 256 << 10
    map_sizes: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_MAP_SIZES))
    self_tgid: int = field(default_factory=os.getpid)
    # alternatives (hook labels) treated as unavailable, so that a later one in their chain is used
    skip_hooks: frozenset[str] = frozenset()
    with_args: bool = False  # --with-args: exec events carry argv (arguments hold secrets)
    sched_warn_ns: int = int(SCHED_WARN_S * 1e9)
    bio_warn_ns: int = int(BIO_WARN_S * 1e9)


class Capture:
    """Loaded and attached objects of one session, and the two ring buffers they write to (mapped, not read)."""

    def __init__(self, objects: dict[str, libbpf.BpfObject], links: list[libbpf.Link],
                 table: list[probes.FamilyStatus], config: CaptureConfig) -> None:
        self.objects = objects
        self.links = links
        self.table = table
        self.config = config
        first = next(iter(objects.values()))
        self._counters = first.map("counters")
        # the rare ring first: see spool.RingPoller
        self.rings = [spool.MappedRing(first.map(name).fd, first.map(name).max_entries) for name in ("rare", "events")]
        self.map_report = _map_report(objects)
        self.notes: dict[str, str] = {}  # family → how its hook was attached, for the probe table
        self._flows = self._flows_inserted = None
        if "udp.bpf.o" in objects:
            self._flows = objects["udp.bpf.o"].map("udp_flows")
            self._flows_inserted = objects["udp.bpf.o"].map("udp_flows_inserted")
        self._flows_deleted = 0
        self._held = objects["tcp.bpf.o"].map("held_states") if "tcp.bpf.o" in objects else None
        self._drop_counts = objects["drops.bpf.o"].map("drop_counts") if "drops.bpf.o" in objects else None
        self._latency = objects.get("latency.bpf.o")
        if self._latency is not None:
            self._add_overflow_entries(self._latency)

    def read(self, timeout_s: float = 0.0) -> list[bytes]:
        """The records in the rings now, after waiting up to timeout_s for a wakeup, rare ring first: for tools
        that want records one by one (the fixture recorders). A snapshot spools the rings' bytes instead."""
        if timeout_s > 0:
            with select.epoll() as ep:
                for ring in self.rings:
                    ep.register(ring.fd, select.EPOLLIN)
                ep.poll(timeout_s)
        out: list[bytes] = []
        for ring in self.rings:
            out += spool.split(ring.take([0] * spool.MAX_KIND))[0]
        return out

    def flows(self, idle_before_ns: int | None = None) -> list[bytes]:
        """Records of the UDP flows counted in the kernel.

        With idle_before_ns, only flows with no datagram since then, and they are
        deleted from the map (their next datagram starts a new entry, which user
        space adds to the same flow). Without it, every flow, left in place.
        """
        if self._flows is None:
            return []
        out = []
        last = {f.name: f.offset for f in generated.UDP_FLOW_EVENT.fields}["last_ns"]
        for key in list(self._flows.keys()):
            value = self._flows.lookup(key)
            if value is None:
                continue
            if idle_before_ns is not None:
                if int.from_bytes(value[last:last + 8], "little") >= idle_before_ns:
                    continue
                if self._flows.delete(key):
                    self._flows_deleted += 1
            out.append(value)
        return out

    def held_states(self) -> list[bytes]:
        """tcp_state records the kernel still holds (struct kt_held_states): of accepted sockets no process accepted
        in the window (with their listener), and with --sample, SYN_SENTs whose local port was not known yet (with
        port 0). Read after the probes are detached, in the order they happened."""
        if self._held is None:
            return []
        size = generated.TCP_STATE_EVENT.size
        slots = next(v for v, name in generated.HELD_SIZES.items() if name == "held_states")
        out = []
        for key in list(self._held.keys()):
            value = self._held.lookup(key)
            if value is None:
                continue
            count = int.from_bytes(value[slots * size:slots * size + 4], "little")
            out += [value[i * size:(i + 1) * size] for i in range(min(count, slots))]
        out.sort(key=lambda record: int.from_bytes(record[:8], "little"))
        return out

    def flows_report(self) -> dict | None:
        """The kernel's flow map: its size and how many flows were read out of it early."""
        if self._flows is None:
            return None
        return {"max_entries": self._flows.max_entries, "read_early": self._flows_deleted}

    def flows_fill(self) -> float:
        """How full the kernel's flow map is, from 0 to 1."""
        if self._flows is None:
            return 0.0
        raw = self._flows_inserted.lookup(b"\0\0\0\0")
        inserted = int.from_bytes(raw, "little") if raw else 0
        return (inserted - self._flows_deleted) / max(self._flows.max_entries, 1)

    def drain_idle_flows(self, now_ns: int) -> list[bytes]:
        """Idle flows, taken out of a kernel map that is filling up; nothing while it has room."""
        if self.flows_fill() < FLOW_DRAIN_FILL:
            return []
        return self.flows(idle_before_ns=now_ns - FLOW_IDLE_NS)

    def process_counts(self) -> dict[str, int] | None:
        """What the process family counted without events (new threads), summed over CPUs; None without it."""
        obj = self.objects.get("process.bpf.o")
        if obj is None:
            return None
        counts = obj.map("proc_counts")
        return {name: sum(int.from_bytes(v[:8], "little") for v in counts.lookup_percpu(index.to_bytes(4, "little")))
                for index, name in generated.PROC_COUNTER.items()}

    def drop_counts(self) -> list[tuple[bytes, int]] | None:
        """The drops counted in the kernel: (struct kt_drop_key, drops summed over CPUs); None without drops."""
        if self._drop_counts is None:
            return None
        out = []
        for key in list(self._drop_counts.keys()):
            count = sum(int.from_bytes(v[:8], "little") for v in self._drop_counts.lookup_percpu(key))
            if count:
                out.append((key, count))
        return out

    def drop_counts_size(self) -> int:
        return self._drop_counts.max_entries if self._drop_counts is not None else 0

    @staticmethod
    def _add_overflow_entries(obj: libbpf.BpfObject) -> None:
        """The all-zero key of each latency histogram map, where waits go once the map is full."""
        for name in ("runq_hist", "bio_hist"):
            m = obj.map(name)
            stride = (m.value_size + 7) & ~7
            m.update(bytes(m.key_size), bytes(stride * libbpf.possible_cpus()))

    def latency_histograms(self) -> dict[str, list[tuple[bytes, list[bytes]]]]:
        """The kernel's run-queue and block I/O histograms: map name → [(key, one value per CPU)]."""
        out: dict[str, list[tuple[bytes, list[bytes]]]] = {"runq_hist": [], "bio_hist": []}
        if self._latency is None:
            return out
        for name in out:
            m = self._latency.map(name)
            out[name] = [(key, m.lookup_percpu(key)) for key in list(m.keys())]
        return out

    def latency_losses(self) -> dict[str, dict[str, int] | None]:
        """Losses of the latency families that the per-family counters do not tell apart (enum kt_latency_loss),
        per summary section: {"sched": {"queued_full": n, "outlier": n}, "blockio": {...}}."""
        out: dict[str, dict[str, int] | None] = {"sched": None, "blockio": None}
        if self._latency is None:
            return out
        m = self._latency.map("lat_losses")
        for index, name in generated.LATENCY_LOSS.items():
            count = sum(int.from_bytes(v[:8], "little") for v in m.lookup_percpu(index.to_bytes(4, "little")))
            section, _, loss = name.partition("_")
            section = "sched" if section == "runq" else "blockio"
            out[section] = {**(out[section] or {}), loss: count}
        return out

    def missed(self) -> dict[str, int | None]:
        """Per loss family: runs of its attached programs that the kernel skipped (bpf_prog_info.recursion_misses),
        summed; None when this kernel does not count them (before 5.12). A skipped run saw nothing, so its event, if
        it would have made one, is missing from seen. A program two families share (udp and dns) counts for the
        first. Programs with no loss row (accept, socket_owners, udp_peers) name owners or peers, not events."""
        family_of: dict[str, str] = {}
        for fam in probes.FAMILIES:
            if fam.name in generated.FAMILY.values():
                for name in fam.programs():
                    family_of.setdefault(name, fam.name)
        out: dict[str, int | None] = {}
        for obj in self.objects.values():
            for prog in obj.programs():
                family = family_of.get(prog.name)
                if family is None or not prog.autoload or prog.section.startswith("iter/"):
                    continue
                misses = prog.recursion_misses()
                if misses is None:
                    out.setdefault(family, None)
                elif out.get(family, 0) is not None:
                    out[family] = out.get(family, 0) + misses
        return out

    def detach(self) -> None:
        for link in self.links:
            link.destroy()
        self.links = []

    def counters(self) -> dict[str, dict[str, int]]:
        """In-kernel loss accounting per family, summed over CPUs."""
        layout = generated.COUNTERS
        out: dict[str, dict[str, int]] = {}
        for index, family in generated.FAMILY.items():
            totals = dict.fromkeys(layout.names, 0)
            for raw in self._counters.lookup_percpu(index.to_bytes(4, "little")):
                for name, value in zip(layout.names, layout.unpack(raw)):
                    totals[name] += value
            out[family] = totals
        return out

    def close(self) -> None:
        self.detach()
        for ring in self.rings:
            ring.close()
        self.rings = []
        for obj in self.objects.values():
            obj.close()
        self.objects = {}


def _map_report(objects: dict[str, libbpf.BpfObject]) -> list[dict]:
    report = []
    seen: set[str] = set()
    for obj in objects.values():
        for name in (*SHARED_MAPS, *DEFAULT_MAP_SIZES):
            if name in seen:
                continue
            try:
                m = obj.map(name)
            except BpfError:
                continue
            seen.add(name)
            report.append({"map": name, "max_entries": m.max_entries, "key_size": m.key_size,
                           "value_size": m.value_size})
    return report


def _selected(config: CaptureConfig) -> list[probes.Family]:
    unknown = set(config.families) - set(probes.FAMILY_BY_NAME)
    if unknown:
        raise KtraceError(f"unknown probe family: {', '.join(sorted(unknown))}")
    return [f for f in probes.FAMILIES if f.name in config.families]


def check_skip_hooks(labels: frozenset[str] | set[str]) -> None:
    unknown = set(labels) - set(probes.HOOK_LABELS)
    if unknown:
        raise KtraceError(f"unknown hook {', '.join(sorted(unknown))}; known: {', '.join(probes.HOOK_LABELS)}")


def _configure(obj: libbpf.BpfObject, config: CaptureConfig, shared: dict[str, int], enabled: set[str]) -> None:
    for prog in obj.programs():
        prog.set_autoload(prog.name in enabled)
    settings: dict[str, int | bytes] = {
        "kt_self_tgid": config.self_tgid,
        "kt_sample_every": max(config.sample_every, 1),
        "kt_filter_ports": 1 if config.ports else 0,
        "kt_wake_bytes": config.wake_bytes,
    }
    # settings of one object only
    own: dict[str, int | bytes] = {
        "kt_want_udp": "udp" in config.families,
        "kt_want_dns": "dns" in config.families,
        "kt_dns_only": config.dns_only,
        "kt_dns_ports": b"".join(p.to_bytes(2, "little") for p in config.dns_ports).ljust(2 * MAX_DNS_PORTS, b"\0"),
        "kt_with_args": config.with_args,
        "kt_page_shift": (os.sysconf("SC_PAGE_SIZE") - 1).bit_length(),
        "kt_sched_warn_ns": config.sched_warn_ns,
        "kt_bio_warn_ns": config.bio_warn_ns,
    }
    present = obj.rodata_variables()
    settings.update({name: value if isinstance(value, bytes) else int(value)
                     for name, value in own.items() if name in present})
    obj.set_rodata(settings)
    obj.map("events").set_max_entries(config.ring_bytes)
    obj.map("rare").set_max_entries(config.rare_ring_bytes)
    for name, size in config.map_sizes.items():
        try:
            m = obj.map(name)
        except BpfError:
            continue
        m.set_max_entries(size)
    for name, fd in shared.items():
        obj.map(name).reuse_fd(fd)


def _fill_ports(m: libbpf.Map, ports: tuple[int, ...]) -> None:
    for port in ports:
        m.update(port.to_bytes(2, "little"), b"\x01")


def _attach_cgroup(prog: libbpf.Program) -> libbpf.Link:
    root = probes.cgroup2_root()
    if root is None:
        raise BpfError(f"{prog.name}: no cgroup2 hierarchy to attach to", program=prog.name)
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return prog.attach_cgroup(fd)
    finally:
        os.close(fd)


def _attach_libc(progs: list[libbpf.Program]) -> tuple[list[libbpf.Link], str]:
    """Attach each uprobe program to its function (probes.UPROBES) in every libc file found.

    A function missing from one file (another libc's symbol set) is left out there;
    only a family with nothing attached anywhere fails. Returns the links and one
    line for the probe table: which files were probed and which not, and why.
    """
    found = libc.discover()
    by_function: dict[str, list[libbpf.Program]] = {}
    # the return probe first: an entry probe without one would leave its lookups behind in the map
    for prog in sorted(progs, key=lambda p: not probes.UPROBES[p.name][1]):
        by_function.setdefault(probes.UPROBES[prog.name][0], []).append(prog)
    links: list[libbpf.Link] = []
    probed: list[str] = []
    problems: list[str] = [f"{shown}: {reason}" for shown, reason in found.skipped]
    first_error: BpfError | None = None
    try:
        for f in found.files:
            missing = []
            for function, pair in by_function.items():
                attached: list[libbpf.Link] = []
                try:
                    for prog in pair:
                        attached.append(prog.attach_uprobe(f.path, function, probes.UPROBES[prog.name][1]))
                except BpfError as exc:
                    for link in attached:
                        link.destroy()
                    first_error = first_error or exc
                    # ENOENT: libbpf found no such symbol in this file
                    why = "" if exc.errno == errno.ENOENT else f" ({libbpf.strerror(exc.errno)})"
                    missing.append(function + why)
                    continue
                links += attached
            if len(missing) < len(by_function):
                probed.append(f.shown)
            if missing:
                problems.append(f"{f.shown}: not probed: {', '.join(missing)}")
    except BaseException:
        for link in links:
            link.destroy()
        raise
    if not links:
        raise BpfError(f"{progs[0].name}: no libc function could be probed ({'; '.join(problems[:5])})",
                       first_error.errno if first_error else errno.ENOENT, program=progs[0].name)
    note = f"uprobes on {len(probed)} libc file(s): {', '.join(probed[:8])}"
    if len(probed) > 8:
        note += f" and {len(probed) - 8} more"
    if problems:
        note += f"; {len(problems)} problem(s): {'; '.join(problems[:8])}"
    if not found.complete:
        note += f"; /proc scan stopped after {found.processes} processes (time budget)"
    return links, note


def load(config: CaptureConfig) -> Capture:
    """Resolve every selected family's chain on this kernel and attach the winners."""
    families = _selected(config)
    check_skip_hooks(config.skip_hooks)
    table = {f.name: probes.FamilyStatus(
        f.name, alternatives=[probes.HookStatus(h.label, "not tried", min_kernel=h.min_kernel) for h in f.chain])
        for f in families}
    refused: dict[str, set[str]] = {f.name: set() for f in families}
    attempts = sum(len(f.chain) for f in families) + 1
    for _ in range(attempts):
        choice: dict[str, probes.Hook] = {}
        for fam in families:
            status = table[fam.name]
            for hook, row in zip(fam.chain, status.alternatives):
                if hook.label in refused[fam.name]:
                    continue
                if hook.label in config.skip_hooks:
                    row.status, row.reason = "skipped", "skipped by --skip-hook"
                    continue
                result = hook.check()
                if not result.ok:
                    row.status, row.reason = "unsupported", result.reason
                    continue
                choice[fam.name] = hook
                break
        by_object: dict[str, set[str]] = {}
        for fam in families:
            if fam.name in choice:
                by_object.setdefault(fam.obj, set()).update(choice[fam.name].programs)
        if not by_object:
            break
        try:
            capture = _load_and_attach(by_object, config, table)
        except BpfError as exc:
            blamed = [f for f in families if f.name in choice and exc.program in choice[f.name].programs]
            if not blamed:
                raise
            fam = blamed[0]
            hook = choice[fam.name]
            refused[fam.name].add(hook.label)
            row = table[fam.name].alternatives[fam.chain.index(hook)]
            row.status, row.reason = "refused", exc.message
            log.info("%s: %s refused (%s); trying the next alternative", fam.name, hook.label, row.reason)
            continue
        for fam in families:
            status = table[fam.name]
            if fam.name in choice:
                hook = choice[fam.name]
                status.chosen, status.status = hook.label, "ok"
                status.alternatives[fam.chain.index(hook)].status = "chosen"
                skipped = [a for a in status.alternatives if a.status in ("refused", "unsupported", "skipped")]
                status.reason = "; ".join([f"{a.hook}: {a.reason}" for a in skipped]
                                          + ([capture.notes[fam.name]] if fam.name in capture.notes else []))
            else:  # every alternative was unsupported, refused or skipped; the other families went ahead
                status.reason = _missing_reason(status)
        capture.table = [table[f.name] for f in families]
        return capture
    for fam in families:
        status = table[fam.name]
        status.status = "missing"
        status.reason = _missing_reason(status)
    missing = [f.name for f in families if f.required]
    raise KtraceError(
        f"no alternative of {', '.join(missing) or 'any family'} works on this kernel: "
        + " | ".join(table[name].reason for name in missing or table)
    )


def _missing_reason(status: probes.FamilyStatus) -> str:
    return "; ".join(f"{a.hook}: {a.status} ({a.reason})" for a in status.alternatives)


def _load_and_attach(by_object: dict[str, set[str]], config: CaptureConfig,
                     table: dict[str, probes.FamilyStatus]) -> Capture:
    objects: dict[str, libbpf.BpfObject] = {}
    links: list[libbpf.Link] = []
    shared: dict[str, int] = {}
    try:
        for obj_name, programs in by_object.items():
            obj = libbpf.BpfObject(probes.object_path(obj_name))
            objects[obj_name] = obj
            _configure(obj, config, shared, programs)
            obj.load()
            if not shared:
                shared = {name: obj.map(name).fd for name in SHARED_MAPS}
                _fill_ports(obj.map("ports"), config.ports)
        iterators, uprobes = [], []
        for obj_name, programs in by_object.items():
            for prog in objects[obj_name].programs():
                if prog.name not in programs:
                    continue
                if prog.section.startswith("iter/"):
                    iterators.append(prog)
                elif prog.section.startswith("cgroup/"):
                    links.append(_attach_cgroup(prog))
                elif prog.name in probes.UPROBES:
                    uprobes.append(prog)
                else:
                    links.append(prog.attach())
        notes = {}
        if uprobes:
            uprobe_links, note = _attach_libc(uprobes)
            links += uprobe_links
            names = {p.name for p in uprobes}
            notes = {f.name: note for f in probes.FAMILIES if f.programs() & names}
        # iterators see the state before the window; the probes attached above keep it current from here on
        for prog in iterators:
            link = prog.attach_iter()
            try:
                link.run_iter()
            finally:
                link.destroy()
        capture = Capture(objects, links, list(table.values()), config)
        capture.notes = notes
        return capture
    except BaseException:
        for link in links:
            link.destroy()
        for obj in objects.values():
            obj.close()
        raise


def trial(family: probes.Family, hook: probes.Hook) -> tuple[str, str]:
    """Load and attach one alternative on its own, then detach: (status, reason) for doctor."""
    result = hook.check()
    if not result.ok:
        return "unsupported", result.reason
    config = CaptureConfig(families=(family.name,), ring_bytes=64 << 10, rare_ring_bytes=64 << 10,
                           map_sizes=dict.fromkeys(DEFAULT_MAP_SIZES, 64))
    try:
        capture = _load_and_attach({family.obj: set(hook.programs)}, config, {})
    except BpfError as exc:
        return "refused", exc.message
    capture.close()
    return "available", ""


def boot_to_wall_offset_ns() -> int:
    """Add to a bpf_ktime_get_boot_ns() stamp to get Unix time in ns."""
    # bracket the boot-clock read with two wall-clock reads and take the midpoint
    before = time.time_ns()
    boot = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
    after = time.time_ns()
    return (before + after) // 2 - boot
