"""One snapshot: preflight → load probes → record the window → write the bundle.

SIGINT and SIGTERM end the window early; the bundle is still written whole. A
signal that comes before the window (during preflight, loading or attaching)
is kept until the probes are attached: the window then ends at once, and the
bundle, short as it is, is complete.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import orjson

from ktrace import __version__, capture, interrupt, libbpf, node, probes
from ktrace.analyze.summary import LOSS_KINDS, Summary
from ktrace.bundle import Bundle, check_out_dir
from ktrace.enrich.cgroup import CgroupPaths, annotate_oom
from ktrace.enrich.conntrack import ANNOTATED_TYPES, Annotator, ConntrackReader
from ktrace.enrich.containers import POD_LOGS_DIR, ContainerNames, find_socket
from ktrace.enrich.identity import ContainerLookup, Identity
from ktrace.errors import ExitStatus, NoBTF, NotPrivileged
from ktrace.events import generated, latency
from ktrace.events.decode import SCHEMA_VERSION, Decoder, family_and_weight, kernel_reset_reasons
from ktrace.events.dns import DNS_TIMEOUT_S, DnsPairer
from ktrace.events.drops import count_events, kernel_drop_reasons
from ktrace.events.flows import UdpFlows

# Linux capability numbers (include/uapi/linux/capability.h)
CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 21, 38, 39
POLL_MS = 50  # the reader's timer; the kernel also wakes it when 256 KiB are waiting
STATUS_EVERY_S = 0.5
FLOW_CHECK_S = 1.0  # how often the kernel's UDP flow map is checked for room


@dataclass
class SnapshotOptions:
    duration_s: float = 60.0
    out_dir: Path = Path(".")
    node: str = ""
    ports: tuple[int, ...] = ()
    dns_ports: tuple[int, ...] = capture.DNS_PORTS
    dns_only: bool = False
    dns_timeout_s: float = DNS_TIMEOUT_S
    udp_flows: int = capture.DEFAULT_MAP_SIZES["udp_flows"]
    sample: int = 1
    max_events: int | None = None
    max_bytes: int | None = None
    families: tuple[str, ...] = tuple(f.name for f in probes.FAMILIES if f.default)
    ring_bytes: int = 8 << 20
    rare_ring_bytes: int = 1 << 20
    skip_hooks: frozenset[str] = frozenset()  # --skip-hook: alternatives treated as unavailable
    with_args: bool = False  # --with-args: exec events carry the arguments
    with_conntrack: bool = False  # --with-conntrack: TCP and UDP flow events carry their conntrack entry
    with_cri: bool | None = None  # --with-cri/--without-cri: ask the runtime for pod names; None: when a socket exists
    cri_socket: Path | None = None  # --cri-socket: the runtime's CRI socket instead of the auto-detected one
    pod_logs_dir: Path = POD_LOGS_DIR  # --pod-logs-dir: kubelet's podLogsDir, for names without the runtime
    sched_warn_s: float = capture.SCHED_WARN_S
    bio_warn_s: float = capture.BIO_WARN_S
    quiet: bool = False
    ready_file: Path | None = None
    status: TextIO = field(default_factory=lambda: sys.stderr)

    def args(self) -> dict:
        """The options as recorded in node.json and summary.json."""
        return {
            "duration_s": self.duration_s, "out_dir": str(self.out_dir), "node": self.node,
            "ports": list(self.ports), "dns_ports": list(self.dns_ports), "dns_only": self.dns_only,
            "dns_timeout_s": self.dns_timeout_s, "udp_flows": self.udp_flows, "sample": self.sample,
            "max_events": self.max_events, "max_bytes": self.max_bytes, "probes": list(self.families),
            "ring_bytes": self.ring_bytes, "rare_ring_bytes": self.rare_ring_bytes,
            "with_dns_names": "dns_names" in self.families,
            "skip_hooks": sorted(self.skip_hooks), "with_args": self.with_args,
            "sched_warn_ms": round(self.sched_warn_s * 1e3, 3), "bio_warn_ms": round(self.bio_warn_s * 1e3, 3),
            "with_conntrack": self.with_conntrack, "with_cri": self.with_cri,
            "cri_socket": str(self.cri_socket) if self.cri_socket else None, "pod_logs_dir": str(self.pod_logs_dir),
        }


@dataclass
class SnapshotResult:
    status: ExitStatus
    paths: dict[str, Path]
    summary: dict


def effective_caps() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def check_privileges() -> None:
    # capabilities, not the uid: root in an unprivileged container cannot load BPF either
    caps = effective_caps()
    has = lambda cap: bool(caps >> cap & 1)  # noqa: E731
    if has(CAP_SYS_ADMIN) or (has(CAP_BPF) and has(CAP_PERFMON)):
        return
    raise NotPrivileged("ktrace needs root or CAP_BPF and CAP_PERFMON to load BPF programs; run it with sudo")


def check_btf() -> None:
    if not node.BTF_PATH.exists():
        raise NoBTF(
            f"the kernel exposes no BTF ({node.BTF_PATH} is missing); ktrace's CO-RE probes need a kernel "
            "built with CONFIG_DEBUG_INFO_BTF=y (most distributions since 2020)"
        )


class _Recorder:
    """Decode → pair and merge → summarize → write, for every record of the window."""

    def __init__(self, decoder: Decoder, bundle: Bundle, summary: Summary, dns_timeout_ns: int,
                 conntrack: Annotator | None = None, containers: ContainerLookup | None = None) -> None:
        self.decoder = decoder
        self.bundle = bundle
        self.summary = summary
        self.written: Counter[str] = Counter()  # kernel events written, per family
        self.capped: Counter[str] = Counter()
        self.lines: Counter[str] = Counter()  # lines written or capped, per event type
        self.undecodable = 0
        self.dns = DnsPairer(self.write_event, dns_timeout_ns, decoder.wall_time)
        self.flows = UdpFlows()
        self.cgroups = CgroupPaths()
        # every task block gets its cgroup path and pod: resolved once per block, cached with it by the decoder
        self.identity = Identity(self.cgroups, containers=containers)
        decoder.identity = self.identity.of
        self.conntrack = conntrack

    def _account(self, event: dict, number: int | None) -> None:
        family, weight = family_and_weight(event)
        self.lines[event["type"]] += 1
        if family is not None:
            (self.capped if number is None else self.written)[family] += weight
        self.summary.add(event, number)

    def write_event(self, event: dict) -> int | None:
        number = self.bundle.write_line(orjson.dumps(event, option=orjson.OPT_APPEND_NEWLINE))
        self._account(event, number)
        return number

    def records(self, batch: list[bytes]) -> None:
        decode, write, account = self.decoder.decode, self.bundle.write_line, self._account
        for record in batch:
            decoded = decode(record)
            if decoded is None:
                self.undecodable += 1
                continue
            event, line = decoded
            kind = event["type"]
            if kind == "udp_flow":
                self.add_flow(event)
            elif self.conntrack is not None and kind in ANNOTATED_TYPES:
                self.write_annotated(event)
            elif kind == "dns_query" or kind == "dns_reply":
                self.dns.add(event)
            elif kind == "cgroup_mkdir":  # the rare ring is read first: mostly before the new cgroup's tasks' events
                self.identity.add_mkdir(event)
                account(event, write(line))
            elif kind == "oom_kill":  # rare: resolved while its memory cgroup most likely still exists
                self.write_event(annotate_oom(event, self.cgroups))
            else:
                account(event, write(line))

    def write_annotated(self, event: dict) -> None:
        """--with-conntrack: a TCP event with its conntrack entry, or held back until the reader's next round."""
        assert self.conntrack is not None
        if self.conntrack.annotate(event):
            self.write_event(event)
        else:
            for held in self.conntrack.hold(event):
                self.write_event(held)

    def write_conntrack_ready(self, window_end: bool = False) -> None:
        if self.conntrack is not None:
            for event in self.conntrack.ready(window_end):
                self.write_event(event)

    def add_flow(self, event: dict) -> None:
        if self.conntrack is not None:
            self.conntrack.note(event)  # its namespace's table is read before the flow is written
        self.flows.add(event)
        if self.flows.full:
            self.write_flows()

    def write_flows(self) -> None:
        for flow in self.flows.take():
            if self.conntrack is not None:
                self.conntrack.annotate(flow, final=True)  # flows are written late: their entry has been read
            self.write_event(flow)

    def write_histograms(self, raw: dict[str, list], now_boot_ns: int) -> None:
        """The kernel's latency histograms, one line each: they stand for every wait they counted."""
        when = self.decoder.wall_time(now_boot_ns)
        for event in (latency.runq_histogram_lines(raw["runq_hist"], when, now_boot_ns)
                      + latency.bio_histogram_lines(raw["bio_hist"], when, now_boot_ns)):
            self.write_event(event)

    def tick(self, now_boot_ns: int) -> None:
        self.dns.expire(now_boot_ns)
        self.write_conntrack_ready()

    @property
    def events(self) -> int:
        return sum(self.lines.values())


def _status_line(stream: TextIO, left: float, recorder: _Recorder, lost: int) -> None:
    stream.write(f"\rktrace: {max(left, 0):4.0f}s left · {recorder.events:,} events · {lost:,} lost   ")
    stream.flush()


def run(opts: SnapshotOptions) -> SnapshotResult:
    interrupt.defer()  # from here a signal ends the window (at once, if it has not started): no exception
    check_privileges()
    check_btf()
    libbpf.library()
    check_out_dir(opts.out_dir)
    node_name = node.node_name(opts.node)

    # --dns-only keeps TCP and UDP flows on DNS ports only, filtered in the kernel like --ports
    ports = opts.dns_ports if opts.dns_only else opts.ports
    config = capture.CaptureConfig(families=opts.families, ports=ports, dns_ports=opts.dns_ports,
                                   dns_only=opts.dns_only, sample_every=opts.sample, ring_bytes=opts.ring_bytes,
                                   rare_ring_bytes=opts.rare_ring_bytes,
                                   map_sizes={**capture.DEFAULT_MAP_SIZES, "udp_flows": opts.udp_flows},
                                   skip_hooks=opts.skip_hooks, with_args=opts.with_args,
                                   sched_warn_ns=int(opts.sched_warn_s * 1e9), bio_warn_ns=int(opts.bio_warn_s * 1e9))
    names = _container_names(opts)
    names.start()  # the runtime is asked while the probes load
    try:
        cap = capture.load(config)
    finally:
        names.wait()
    warnings = [f"{row.family}: no working probe ({row.reason})" for row in cap.table if row.status != "ok"]
    warnings += names.warnings
    names_warned = len(names.warnings)
    for warning in warnings:
        opts.status.write(f"ktrace: warning: {warning}\n")

    offset_start = capture.boot_to_wall_offset_ns()
    started = time.time()
    bundle = Bundle(opts.out_dir, node_name, started, opts.max_events, opts.max_bytes)
    decoder = Decoder(offset_start, kernel_reset_reasons(probes.vmlinux_btf()),
                      kernel_drop_reasons(probes.vmlinux_btf()))
    summary = Summary()
    reader = ConntrackReader() if opts.with_conntrack else None
    annotator = Annotator(reader) if reader is not None else None
    recorder = _Recorder(decoder, bundle, summary, int(opts.dns_timeout_s * 1e9), annotator, names.lookup)
    live = opts.status.isatty() and not opts.quiet
    ended_by = "duration"
    try:
        if reader is not None:
            reader.start()  # the first read is synchronous: entries that predate the window are known at once
        if opts.ready_file:
            opts.ready_file.write_text(f"{os.getpid()}\n")
        deadline = time.monotonic() + opts.duration_s
        next_status = next_flow_check = 0.0
        while True:
            now = time.monotonic()
            if interrupt.received():
                ended_by = interrupt.received()
                break
            if now >= deadline:
                break
            recorder.records(cap.poll(int(min(POLL_MS, (deadline - now) * 1000)) or 1))
            boot_now = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
            recorder.tick(boot_now)
            if now >= next_flow_check:
                for raw in cap.drain_idle_flows(boot_now):
                    recorder.records([raw])
                next_flow_check = now + FLOW_CHECK_S
            if live and now >= next_status:
                kernel_lost = sum(c["ringbuf_full"] for c in cap.counters().values())
                _status_line(opts.status, deadline - now, recorder, kernel_lost + recorder.undecodable)
                next_status = now + STATUS_EVERY_S
        ended = time.time()
        # stop the probes, let programs still running on other CPUs finish, then take the rest
        cap.detach()
        time.sleep(0.02)
        recorder.records(cap.drain())
        counters = cap.counters()
        missed = cap.missed()
        process_counts = cap.process_counts()
        recorder.records(cap.drain())
        recorder.records(cap.held_states())  # what still waits in the kernel: written, never lost
        recorder.records(cap.flows())  # before conntrack's last read, which then covers the flows' namespaces
        if reader is not None:
            reader.stop()  # joins the thread and reads once more: the window's last connections
            recorder.write_conntrack_ready(window_end=True)
        recorder.write_flows()
        drop_counts = cap.drop_counts()
        boot_end = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        for event in count_events(drop_counts or [], decoder.drop_reasons, decoder.wall_time(boot_end), boot_end):
            recorder.write_event(event)
        recorder.write_histograms(cap.latency_histograms(), time.clock_gettime_ns(time.CLOCK_BOOTTIME))
        latency_losses = cap.latency_losses()
        recorder.dns.expire(time.clock_gettime_ns(time.CLOCK_BOOTTIME), window_end=True)
        if live:
            opts.status.write("\n")
        probe_table = [row.as_dict() for row in cap.table]
        maps = cap.map_report
        udp_map = cap.flows_report()
        drops_map = None
        if drop_counts is not None:
            drops_map = {"max_entries": cap.drop_counts_size(), "keys": len(drop_counts),
                         "full": len(drop_counts) >= cap.drop_counts_size()}
    except BaseException:
        bundle.abandon()
        raise
    finally:
        if reader is not None:
            reader.stop_thread()
        cap.close()
        cri = names.report()
        names.close()

    for warning in names.warnings[names_warned:]:
        opts.status.write(f"ktrace: warning: {warning}\n")  # the runtime stopped answering during the window
        warnings.append(warning)
    if reader is not None:
        for warning in reader.warnings:
            opts.status.write(f"ktrace: warning: {warning}\n")
        warnings += reader.warnings
    events_file = bundle.close_events()
    written, disk_full = recorder.written, Counter()
    if bundle.truncated:
        written = _count_families(bundle.paths["events.jsonl"])
        disk_full = recorder.written - written
    losses = {}
    for family in generated.FAMILY.values():
        k = counters.get(family, {})
        losses[family] = {
            "seen": k.get("seen", 0),
            "written": written[family],
            "filtered": k.get("filtered", 0),
            "sampled_out": k.get("sampled_out", 0),
            "ringbuf_full": k.get("ringbuf_full", 0),
            "aggregated": k.get("aggregated", 0),
            "capped": recorder.capped[family],
            "disk_full": disk_full[family],
            "undecodable": 0,
            # runs the kernel skipped: not in seen (the hook never ran), so outside the sum above
            "missed": missed.get(family, 0),
        }
    if recorder.undecodable:
        losses.setdefault("unknown", dict.fromkeys(("seen", "written", "aggregated", *LOSS_KINDS), 0))
        losses["unknown"]["undecodable"] = recorder.undecodable
        losses["unknown"]["seen"] = recorder.undecodable

    missing = [row["family"] for row in probe_table if row["status"] != "ok"]
    degraded = []
    if missing:
        degraded.append(f"probe families missing: {', '.join(missing)}")
    lost = sum(f["ringbuf_full"] + f["undecodable"] for f in losses.values())
    if lost:
        degraded.append(f"{lost} events lost in transit")
    skipped = sum(f.get("missed") or 0 for f in losses.values())
    if skipped:
        degraded.append(f"{skipped} runs of ktrace's hooks skipped by the kernel (recursion_misses)")
    if bundle.truncated:
        degraded.append(f"events.jsonl truncated: {bundle.truncated}")
        warnings.append(f"events.jsonl truncated: {bundle.truncated}")
    clock = {"boot_to_wall_offset_ns": offset_start, "boot_to_wall_offset_ns_at_end": capture.boot_to_wall_offset_ns(),
             "clock": "CLOCK_BOOTTIME"}
    meta = {
        "ktrace_version": __version__,
        "events_schema": SCHEMA_VERSION,
        "node": node_name,
        "window": {
            "start": _rfc3339(started), "end": _rfc3339(ended), "requested_s": opts.duration_s,
            "actual_s": round(ended - started, 3), "ended_by": ended_by,
        },
        "options": opts.args(),
        "degraded": degraded,
    }
    node_doc = node.collect(node_name, opts.args(), clock, probe_table, maps)
    node_file = bundle.write_json("node.json", node_doc)
    if udp_map is not None:
        k = counters.get("udp", {})
        udp_map["datagrams_via_ring"] = k.get("seen", 0) - k.get("aggregated", 0) - k.get("filtered", 0) - k.get(
            "sampled_out", 0) - k.get("ringbuf_full", 0)
    nat = annotator.nat_summary(reader.reads, len(reader.table), reader.pressure()) if annotator else None
    doc = summary.build(meta=meta, losses=losses, probes=probe_table, udp_map=udp_map, process_counts=process_counts,
                        drops_map=drops_map, latency_losses=latency_losses,
                        nat=nat, cri=cri,
                        files={"events": events_file, "node": node_file}, warnings=warnings)
    bundle.write_json("summary.json", doc)
    bundle.write_tgz()
    status = ExitStatus.DEGRADED if degraded else ExitStatus.SUCCESS
    return SnapshotResult(status, dict(bundle.paths), doc)


def _container_names(opts: SnapshotOptions) -> ContainerNames:
    """Where pod and container names come from: the CRI socket given, found, or none (kubelet's files only)."""
    if opts.with_cri is False:
        return ContainerNames(None, pod_logs_dir=opts.pod_logs_dir)
    socket = opts.cri_socket or find_socket()
    names = ContainerNames(socket, pod_logs_dir=opts.pod_logs_dir)
    if socket is None and opts.with_cri:
        names.warnings.append("--with-cri: no CRI socket found (give --cri-socket); pod names from kubelet's log "
                              "files only")
    return names


def _rfc3339(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t * 1000) % 1000:03d}Z"


def _count_families(path: Path) -> Counter:
    """Kernel events per family in an events.jsonl that a full disk cut short (every line kept is whole)."""
    counts: Counter[str] = Counter()
    with open(path, "rb") as f:
        for line in f:
            family, weight = family_and_weight(orjson.loads(line))
            if family is not None:
                counts[family] += weight
    return counts
