"""One snapshot: preflight → load probes → record the window → write the bundle.

SIGINT and SIGTERM end the window early; the bundle is still written whole. A
signal that comes before the window (during preflight, loading or attaching)
is kept until the probes are attached: the window then ends at once, and the
bundle, short as it is, is complete.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, TextIO

import orjson

from ktrace import __version__, capture, interrupt, libbpf, node, probes, spool
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
POLL_S = 0.05  # the reader's timer; the kernel also wakes it when 256 KiB are waiting
# kinds of the rare ring decoded during the window too, for what cannot wait (_Recorder.notice)
# lines that stand for the whole window (counted in the kernel, bounded by its maps): written whatever the caps
AGGREGATE_TYPES = frozenset(("udp_flow", "runq_histogram", "bio_histogram", "drop_count"))
LIVE_KINDS = frozenset(kind for kind, name in generated.KIND.items() if name in ("cgroup_mkdir", "oom"))
STATUS_EVERY_S = 0.5
DEFAULT_MAX_BYTES = 1 << 30
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
    stream: bool = False  # --stream: decode during the window, every line also on stdout
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
            "with_conntrack": self.with_conntrack, "with_cri": self.with_cri, "stream": self.stream,
            "cri_socket": str(self.cri_socket) if self.cri_socket else None, "pod_logs_dir": str(self.pod_logs_dir),
        }


@dataclass
class SnapshotResult:
    status: ExitStatus
    paths: dict[str, Path]
    summary: dict


def default_max_bytes(out_dir: Path) -> int:
    """--max-bytes when not given: 1 GiB, or a quarter of the output directory's free space when that is less,
    so a default run never fills a node's disk (the spool takes at most half of it, then is gone)."""
    st = os.statvfs(out_dir)
    return min(DEFAULT_MAX_BYTES, st.f_bavail * st.f_frsize // 4)


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
                 conntrack: Annotator | None = None, containers: ContainerLookup | None = None,
                 stream: BinaryIO | None = None) -> None:
        self.decoder = decoder
        self.stream = stream  # --stream: every line also goes here
        self.stream_gone = False
        self.bundle = bundle
        self.summary = summary
        self.written: Counter[str] = Counter()  # kernel events written, per family
        self.capped: Counter[str] = Counter()  # ... not written for a cap
        self.disk_full: Counter[str] = Counter()  # ... not written for a full disk
        self.lines: Counter[str] = Counter()  # lines written or not, per event type: the whole window
        self.in_file: Counter[str] = Counter()  # lines written, per event type
        self.per_event_span: list[int] = []  # [first, last] ts_ns of the per-event lines written
        self.first_cut_ns: int | None = None  # ts_ns of the first per-event line a cap or the disk left out
        self.undecodable = 0
        self.dns = DnsPairer(self.write_event, dns_timeout_ns, decoder.wall_time)
        self.flows = UdpFlows()
        self.cgroups = CgroupPaths()
        # every task block gets its cgroup path and pod: resolved once per block, cached with it by the decoder
        self.identity = Identity(self.cgroups, containers=containers)
        decoder.identity = self.identity.of
        self.conntrack = conntrack

    def _account(self, event: dict, number: int | None) -> None:
        kind = event["type"]
        family, weight = family_and_weight(event)
        self.lines[kind] += 1
        if number is not None:
            self.in_file[kind] += 1
            if family is not None:
                self.written[family] += weight
            if kind not in AGGREGATE_TYPES:
                span = self.per_event_span
                if span:
                    span[1] = max(span[1], event["ts_ns"])
                else:
                    span += [event["ts_ns"], event["ts_ns"]]
        else:
            if family is not None:
                (self.disk_full if self.bundle.truncated else self.capped)[family] += weight
            if self.first_cut_ns is None and kind not in AGGREGATE_TYPES:
                self.first_cut_ns = event["ts_ns"]
        self.summary.add(event, number)

    def write_line(self, line: bytes, aggregate: bool = False) -> int | None:
        if self.stream is not None:
            try:
                self.stream.write(line)
            except BrokenPipeError:
                self.stream_closed()
        return self.bundle.write_line(line, aggregate)

    def write_event(self, event: dict) -> int | None:
        number = self.write_line(orjson.dumps(event, option=orjson.OPT_APPEND_NEWLINE),
                                 event["type"] in AGGREGATE_TYPES)
        self._account(event, number)
        return number

    def flush_stream(self) -> None:
        if self.stream is not None:
            try:
                self.stream.flush()
            except BrokenPipeError:
                self.stream_closed()

    def stream_closed(self) -> None:
        """--stream: the reader of stdout went away (`| head`): stop streaming; the window ends, the bundle is
        written. stdout now points at /dev/null, so the interpreter's last flush does not fail either."""
        self.stream = None
        self.stream_gone = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)

    def records(self, batch: list[bytes]) -> None:
        decode, write, account = self.decoder.decode, self.write_line, self._account
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

    def notice(self, chunk: bytes) -> None:
        """What must happen while the window runs, for records decoded only after it (a chunk of the rare ring):
        a new cgroup's path, and its container named while the runtime still knows it; an OOM victim's memory
        cgroup path, read while the cgroup most likely still exists. Both are cached for the decode."""
        for record in spool.split(chunk, LIVE_KINDS)[0]:
            decoded = self.decoder.decode(record)
            if decoded is None:
                continue
            event = decoded[0]
            if event["type"] == "cgroup_mkdir":
                self.identity.add_mkdir(event)
            else:
                annotate_oom(event, self.cgroups)

    @property
    def events(self) -> int:
        return sum(self.lines.values())


def _status_line(stream: TextIO, left: float, records: spool.Spool, lost: int) -> None:
    """Records moved so far, by kind, from the ring headers: nothing is decoded while the window runs."""
    by_kind = sorted(((n, generated.KIND.get(kind, "?")) for kind, n in enumerate(records.records) if n),
                     reverse=True)
    kinds = " ".join(f"{name} {n:,}" for n, name in by_kind[:4])
    lost += sum(records.disk_full)
    stream.write(f"\rktrace: {max(left, 0):4.0f}s left · {sum(records.records):,} records ({kinds}) · "
                 f"{lost:,} lost   ")
    stream.flush()


def _take_last(poller: spool.RingPoller, recorder: _Recorder, notice: bool) -> None:
    for ring, chunk in poller.take():
        if notice and ring is poller.rings[0]:
            recorder.notice(chunk)


def _decode(reader: spool.SpoolReader, recorder: _Recorder) -> None:
    """Decode the spool from where the reader stands to its end, in batches, keeping time by the records'
    own clock: DNS timeouts fall due as they would have while the window ran."""
    for batch in reader.batches():
        recorder.records(batch)
        if batch:
            recorder.tick(int.from_bytes(batch[-1][:8], "little"))
        recorder.flush_stream()


class _Follower:
    """Decodes the spool as it grows, beside the capture (--stream, --with-conntrack)."""

    def __init__(self, records: spool.Spool, recorder: _Recorder) -> None:
        self.records = records
        self.recorder = recorder
        self.reader = spool.SpoolReader(records)
        self._stop = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ktrace-decode", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                with self.records.grew:
                    while not self._stop and self.reader.offset >= self.records.length:
                        self.records.grew.wait(POLL_S)
                    if self._stop:
                        return
                _decode(self.reader, self.recorder)
        except BaseException as exc:  # noqa: BLE001 - raised again in the main thread by finish()
            self._error = exc

    def stop(self) -> None:
        with self.records.grew:
            self._stop = True
            self.records.grew.notify_all()
        self._thread.join()

    def finish(self) -> None:
        """Stop following and decode what is left."""
        self.stop()
        if self._error is not None:
            raise self._error
        _decode(self.reader, self.recorder)


def run(opts: SnapshotOptions) -> SnapshotResult:
    interrupt.defer()  # from here a signal ends the window (at once, if it has not started): no exception
    check_privileges()
    check_btf()
    libbpf.library()
    check_out_dir(opts.out_dir)
    if opts.max_bytes is None:
        opts = dataclasses.replace(opts, max_bytes=default_max_bytes(opts.out_dir))
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
    stream = sys.stdout.buffer if opts.stream else None
    recorder = _Recorder(decoder, bundle, summary, int(opts.dns_timeout_s * 1e9), annotator, names.lookup, stream)
    live = opts.status.isatty() and not opts.quiet
    ended_by = "duration"
    records: spool.Spool | None = None
    poller: spool.RingPoller | None = None
    follower: _Follower | None = None
    try:
        records = spool.Spool(opts.out_dir)
        poller = spool.RingPoller(cap.rings, records)
        # cgroups that exist now are known before their tasks' events are decoded, even if removed meanwhile
        recorder.cgroups.prime()
        if reader is not None:
            reader.start()  # the first read is synchronous: entries that predate the window are known at once
        # --stream shows the events as they come; --with-conntrack reads the namespaces the events name while
        # their connections are still in the tables: both decode beside the capture, the rest after the window
        if opts.stream or reader is not None:
            follower = _Follower(records, recorder)
            follower.start()
        if opts.ready_file:
            opts.ready_file.write_text(f"{os.getpid()}\n")
        deadline = time.monotonic() + opts.duration_s
        next_status = next_flow_check = 0.0
        while True:
            now = time.monotonic()
            if interrupt.received():
                ended_by = interrupt.received()
                break
            if recorder.stream_gone:
                ended_by = "stdout closed"
                break
            if now >= deadline:
                break
            for ring, chunk in poller.poll(min(POLL_S, deadline - now)):
                if follower is None and ring is cap.rings[0]:
                    recorder.notice(chunk)
            if now >= next_flow_check:
                records.append_records(cap.drain_idle_flows(time.clock_gettime_ns(time.CLOCK_BOOTTIME)))
                next_flow_check = now + FLOW_CHECK_S
            if live and now >= next_status:
                kernel_lost = sum(c["ringbuf_full"] for c in cap.counters().values())
                _status_line(opts.status, deadline - now, records, kernel_lost)
                next_status = now + STATUS_EVERY_S
        ended, ended_mono = time.time(), time.monotonic()
        window_end_ns = time.clock_gettime_ns(time.CLOCK_BOOTTIME)
        # stop the probes, let programs still running on other CPUs finish, then take the rest
        cap.detach()
        time.sleep(0.02)
        _take_last(poller, recorder, follower is None)
        counters = cap.counters()
        missed = cap.missed()
        process_counts = cap.process_counts()
        _take_last(poller, recorder, follower is None)
        records.append_records(cap.held_states())  # what still waits in the kernel: written, never lost
        records.append_records(cap.flows())  # before conntrack's last read, which then covers the flows' namespaces
        records.flush()
        if live:
            opts.status.write("\n")
        if follower is not None:
            follower.finish()
        else:
            _decode(spool.SpoolReader(records), recorder)
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
        recorder.dns.expire(window_end_ns, window_end=True)
        recorder.flush_stream()
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
        if follower is not None:
            follower.stop()
        if reader is not None:
            reader.stop_thread()
        if poller is not None:
            poller.close()
        cap.close()
        if records is not None:
            records.close()
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
    written, disk_full = recorder.written, recorder.disk_full
    in_file, span = recorder.in_file, recorder.per_event_span
    if bundle.truncated:  # lines counted as written were cut back: count what the file holds
        written, in_file, span = _count_file(bundle.paths["events.jsonl"])
        disk_full = recorder.disk_full + (recorder.written - written)
    assert records is not None
    spool_lost = records.lost_by_family()
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
            "disk_full": disk_full[family] + spool_lost.get(family, 0),
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
    if records.full:
        degraded.append(f"records not kept: {records.full}")
        warnings.append(f"records not kept: {records.full}")
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
            # from the window's end to the events decoded and written: the spool's decode, the maps read
            "decode_s": round(time.monotonic() - ended_mono, 3),
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
    coverage = _coverage(bundle, opts, decoder, in_file, span, recorder.first_cut_ns, records)
    doc = summary.build(meta=meta, losses=losses, coverage=coverage, probes=probe_table, udp_map=udp_map,
                        process_counts=process_counts, drops_map=drops_map, latency_losses=latency_losses,
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


def _coverage(bundle: Bundle, opts: SnapshotOptions, decoder: Decoder, in_file: Counter, span: list[int],
              first_cut_ns: int | None, records: spool.Spool) -> dict:
    """What events.jsonl holds of the window: summary.json's counts and sections always cover all of it."""
    cuts = []
    if bundle.capped:
        limit = opts.max_events if bundle.capped == "max_events" else opts.max_bytes
        cuts.append({"by": bundle.capped, "limit": limit,
                     "from": decoder.wall_time(first_cut_ns) if first_cut_ns is not None else None})
    if bundle.truncated:
        cuts.append({"by": "disk_full", "limit": None,
                     "from": decoder.wall_time(span[1]) if span else None, "reason": bundle.truncated})
    if records.full:
        cuts.append({"by": "disk_full", "limit": records.limit, "from": None,
                     "reason": f"records not kept: {records.full}"})
    return {
        "counts": "whole_window",
        "counts_in_file": dict(sorted(in_file.items())),
        "per_event_lines": {"first": decoder.wall_time(span[0]) if span else None,
                            "last": decoder.wall_time(span[1]) if span else None,
                            "whole_window": not cuts},
        "aggregate_lines": "whole_window",
        "cuts": cuts,
    }


def _count_file(path: Path) -> tuple[Counter, Counter, list[int]]:
    """In an events.jsonl that a full disk cut short (every line kept is whole): kernel events per family, lines
    per type, and the [first, last] ts_ns of its per-event lines."""
    families: Counter[str] = Counter()
    types: Counter[str] = Counter()
    span: list[int] = []
    with open(path, "rb") as f:
        for line in f:
            event = orjson.loads(line)
            family, weight = family_and_weight(event)
            types[event["type"]] += 1
            if family is not None:
                families[family] += weight
            if event["type"] not in AGGREGATE_TYPES:
                span = [min(span[0], event["ts_ns"]), max(span[1], event["ts_ns"])] if span else [event["ts_ns"]] * 2
    return families, types, span
