"""Ring buffer records → JSON-ready event dicts.

The binary layouts come from generated.py (BTF of the objects); this module only
names and formats values: addresses, TCP states, errnos, the kernel's reset
reasons, wall-clock time. It runs once per event, so lookups are cached.
"""

from __future__ import annotations

import errno
import ipaddress
import operator
import signal
import time
from collections.abc import Callable

import orjson

from ktrace.events import drops, generated

# include/net/tcp_states.h
TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
    7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING", 12: "NEW_SYN_RECV",
    13: "BOUND_INACTIVE",
}
ADDRESS_FAMILIES = {2: "ipv4", 10: "ipv6"}
# getaddrinfo's return codes (glibc netdb.h; musl uses the same values for the ones it has)
EAI_NAMES = {
    -1: "EAI_BADFLAGS", -2: "EAI_NONAME", -3: "EAI_AGAIN", -4: "EAI_FAIL", -5: "EAI_NODATA", -6: "EAI_FAMILY",
    -7: "EAI_SOCKTYPE", -8: "EAI_SERVICE", -9: "EAI_ADDRFAMILY", -10: "EAI_MEMORY", -11: "EAI_SYSTEM",
    -12: "EAI_OVERFLOW", -100: "EAI_INPROGRESS", -101: "EAI_CANCELED", -102: "EAI_NOTCANCELED",
    -103: "EAI_ALLDONE", -104: "EAI_INTR", -105: "EAI_IDN_ENCODE",
}
# h_errno of the gethostbyname family (netdb.h)
H_ERRNO_NAMES = {-1: "NETDB_INTERNAL", 1: "HOST_NOT_FOUND", 2: "TRY_AGAIN", 3: "NO_RECOVERY", 4: "NO_DATA"}
LOOKUP_FAMILIES = {0: "any", 2: "ipv4", 10: "ipv6"}
PROTOCOLS = {6: "tcp", 17: "udp"}
SCHEMA_VERSION = 5  # 2: UDP, DNS, process, OOM, drops, sched and blockio events; 3: cgroup_path, k8s, cgroup_mkdir;
# 4: image in k8s; 5: process (the thread group leader's comm) next to comm, sk_ino and length_prefix in DNS
# events, conntrack.matched and conntrack.netns, retransmit kind and segments, reset netns_pkt, tcp_state
# syn_retransmits


def errno_name(value: int) -> str | None:
    """'ECONNREFUSED' for 111 or -111; None for 0."""
    if not value:
        return None
    return errno.errorcode.get(abs(value), str(abs(value)))


def _comm(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


TASK_FIELDS = ("task.tgid", "task.pid", "task.ppid", "task.comm", "task.pcomm", "task.uid", "task.gid",
               "task.cgroup_id", "task.memcg_id", "task.netns", "task.mntns", "task.pidns", "task.userns",
               "task.seccomp_mode", "task.cap_effective")
# Kinds with a socket tuple have these fields; they are formatted the same way for every kind.
FLOW_FIELDS = ("family", "saddr", "sport", "daddr", "dport")
# The fields each kind's formatter reads, in the order it unpacks them.
KIND_FIELDS = {
    "tcp_state": ("skaddr", "oldstate", "newstate", "handshake_ns", "sk_err", "syn_retransmits"),
    "connect": ("skaddr", "protocol", "fd", "ret", "duration_ns"),
    "retransmit": ("skaddr", "state", "total_retrans", "snd_cwnd", "srtt_us", "err", "segments", "kind"),
    "reset": ("skaddr", "direction", "state", "reason", "netns"),
    "udp_flow": ("direction", "netns", "packets", "bytes", "errors", "last_error", "last_ns"),
    "dns": ("skaddr", "sk_ino", "netns", "protocol", "message", "role", "ret"),
    "dns_lookup": ("function", "name", "family", "ret", "h_errno", "latency_ns"),
    "oom": ("total_vm_kb", "anon_rss_kb", "file_rss_kb", "shmem_rss_kb", "pgtables_kb", "oom_score_adj", "source",
            "trigger_pid", "trigger_tid", "trigger_comm"),
    "exec": ("filename", "old_tid", "args", "args_len", "args_truncated"),
    "fork": ("child_pid", "child_ppid"),
    "exit": ("exit_code", "runtime_ns"),
    "drop": ("reason", "protocol", "ip_proto", "location", "skaddr", "sk_cgroup_id", "sk_ino", "sk_uid", "netns"),
    "runq_latency": ("wait_ns", "prev_pid", "prev_tgid", "prev_comm"),
    "bio_latency": ("latency_ns", "sector", "dev", "bytes", "error", "op"),
    "cgroup_mkdir": ("id", "hierarchy_id", "level", "path"),
}
# The event types a kind decodes to, where they are not just the kind's name.
TYPES_OF_KIND = {"dns": ("dns_query", "dns_reply"), "oom": ("oom_kill",)}
# The probe family an event type is counted against in the loss table; user-space types have none.
FAMILY_OF_TYPE = {
    "tcp_state": "tcp_state", "connect": "connect", "retransmit": "retransmit", "reset": "reset",
    "udp_flow": "udp", "dns_query": "dns", "dns_reply": "dns", "dns_lookup": "dns_names",
    "oom_kill": "oom", "exec": "process", "fork": "process", "exit": "process",
    "drop": "drops", "drop_count": "drops",
    "runq_histogram": "sched", "runq_latency": "sched", "bio_histogram": "blockio", "bio_latency": "blockio",
    "cgroup_mkdir": "cgroups",
}
_TASK_BLOCK = slice(16, 96)  # struct kt_task inside every record, after struct kt_hdr


def family_and_weight(event: dict) -> tuple[str | None, int]:
    """The family an event is counted against, and how many kernel events it stands for."""
    kind = event["type"]
    if kind == "udp_flow":
        return "udp", event["packets"] + event["errors"]
    if kind == "drop_count":
        return "drops", event["count"]
    if kind in ("runq_histogram", "bio_histogram"):  # every wait the kernel counted into it
        return FAMILY_OF_TYPE[kind], event["count"]
    if kind in ("runq_latency", "bio_latency"):  # an outlier: also a sample of its histogram
        return FAMILY_OF_TYPE[kind], 0
    return FAMILY_OF_TYPE.get(kind), 1


class _Kind:
    """How to read one kind: the task block (cached per process) apart from the rest of the record."""

    __slots__ = ("name", "size", "struct", "task_struct", "ts", "cpu", "attribution", "task", "flow", "fields",
                 "format")

    def __init__(self, name: str, layout: generated.Layout, fmt: Callable) -> None:
        has_flow = "saddr" in layout.names
        own = ("hdr.ts_ns", "hdr.cpu", *(FLOW_FIELDS if has_flow else ()), *KIND_FIELDS[name])
        if "attribution" in layout.names:
            own += ("attribution",)
        self.struct = layout.subset(own)
        self.task_struct = layout.subset(TASK_FIELDS)
        read = [f.name for f in sorted(layout.fields, key=lambda f: f.offset) if f.name in own]
        index = {n: i for i, n in enumerate(read)}
        task_read = [f.name for f in sorted(layout.fields, key=lambda f: f.offset) if f.name in TASK_FIELDS]
        self.name = name
        self.size = layout.size
        self.ts, self.cpu = index["hdr.ts_ns"], index["hdr.cpu"]
        self.attribution = index.get("attribution")
        self.task = operator.itemgetter(*(task_read.index(f) for f in TASK_FIELDS))
        self.flow = operator.itemgetter(*(index[f] for f in FLOW_FIELDS)) if has_flow else None
        self.fields = operator.itemgetter(*(index[f] for f in KIND_FIELDS[name]))
        self.format = fmt


class Decoder:
    """Decodes records of every kind into (event dict, JSON line); "type" is always the first key.

    The task block of a record repeats for every event of the same process, so its
    formatted dict and JSON are cached by its raw bytes.
    """

    def __init__(self, boot_to_wall_ns: int, reset_reasons: dict[int, str] | None = None,
                 drop_reasons: dict[int, str] | None = None,
                 identity: Callable[[int, int], dict] | None = None) -> None:
        self.boot_to_wall_ns = boot_to_wall_ns
        # (cgroup_id, memcg_id) → {"cgroup_path", "k8s"} (ktrace.enrich.identity): resolved once per task block
        self.identity = identity
        self.reset_reasons = reset_reasons or {}
        self.drop_reasons = drop_reasons or {}
        self._addr_cache: dict[tuple[int, bytes], str] = {}
        self._task_cache: dict[tuple[bytes, int], tuple[dict, bytes]] = {}
        self._second = self._ms = -1
        self._second_text = self._ms_text = ""
        self.unknown_kinds = 0
        self._kinds = {kind: _Kind(name, generated.LAYOUTS[kind], getattr(self, f"_fmt_{name}"))
                       for kind, name in generated.KIND.items()}

    def wall_time(self, boot_ns: int) -> str:
        ms = (boot_ns + self.boot_to_wall_ns) // 1_000_000
        if ms != self._ms:  # events come in bursts: most share the millisecond of the one before
            self._ms = ms
            second, rest = divmod(ms, 1000)
            if second != self._second:
                self._second = second
                self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._ms_text = f"{self._second_text}.{rest:03d}Z"
        return self._ms_text

    def addr(self, family: int, raw: bytes) -> str:
        key = (family, raw)
        text = self._addr_cache.get(key)
        if text is None:
            if family == 10:
                text = str(ipaddress.IPv6Address(raw))
            else:
                text = str(ipaddress.IPv4Address(raw[:4]))
            if len(self._addr_cache) > 65536:
                self._addr_cache.clear()
            self._addr_cache[key] = text
        return text

    def _task(self, k: _Kind, record: bytes, attribution: int) -> tuple[dict, bytes]:
        (tgid, pid, ppid, comm, pcomm, uid, gid, cgroup_id, memcg_id, netns, mntns, pidns, userns, seccomp,
         caps) = k.task(k.task_struct.unpack_from(record))
        thread = _comm(comm)
        task = {
            # comm: the thread's name; process: its process's (the thread group leader's), which rows keyed by
            # process use. A task block the kernel filled only in part has no leader's name: the thread's stands in.
            "pid": tgid, "tid": pid, "ppid": ppid, "comm": thread, "process": _comm(pcomm) or thread,
            "uid": uid, "gid": gid,
            "attribution": generated.ATTRIBUTION.get(attribution, str(attribution)),
            "cgroup_id": cgroup_id, "memcg_id": memcg_id, "netns": netns, "mntns": mntns, "pidns": pidns,
            "userns": userns, "seccomp": seccomp, "cap_eff": f"{caps:#x}",
        }
        if self.identity is not None:
            task.update(self.identity(cgroup_id, memcg_id))
        else:
            task["cgroup_path"] = task["k8s"] = None
        return task, orjson.dumps(task)[1:-1]

    def decode(self, record: bytes) -> tuple[dict, bytes] | None:
        """One record → (event, its events.jsonl line), or None for a record of an unknown kind."""
        k = self._kinds.get(record[8] | record[9] << 8)
        if k is None or len(record) < k.size:
            self.unknown_kinds += 1
            return None
        v = k.struct.unpack_from(record)
        attribution = v[k.attribution] if k.attribution is not None else 1
        key = (record[_TASK_BLOCK], attribution)
        cached = self._task_cache.get(key)
        if cached is None:
            if len(self._task_cache) > 16384:
                self._task_cache.clear()
            cached = self._task_cache[key] = self._task(k, record, attribution)
        task, task_json = cached
        ts = v[k.ts]
        when = self.wall_time(ts)
        specific: dict = {}
        if k.flow is not None:
            family, saddr, sport, daddr, dport = k.flow(v)
            specific["family"] = ADDRESS_FAMILIES.get(family, str(family))
            specific["saddr"] = self.addr(family, saddr)
            specific["sport"] = sport
            specific["daddr"] = self.addr(family, daddr)
            specific["dport"] = dport
        kind = k.format(specific, k.fields(v))
        event = {"type": kind, "time": when, "ts_ns": ts, "cpu": v[k.cpu], **task, **specific}
        line = b'{"type":"%s","time":"%s","ts_ns":%d,"cpu":%d,%s,%s\n' % (
            kind.encode(), when.encode(), ts, v[k.cpu], task_json, orjson.dumps(specific)[1:])
        return event, line

    # --- one formatter per kind, _fmt_<kind name>: adds the kind's own fields, returns the event type ---

    def _fmt_tcp_state(self, event: dict, f: tuple) -> str:
        skaddr, oldstate, newstate, handshake_ns, sk_err, syn_retransmits = f
        event["sk"] = f"{skaddr:#x}"
        event["old_state"] = TCP_STATES.get(oldstate, str(oldstate))
        event["new_state"] = TCP_STATES.get(newstate, str(newstate))
        if oldstate == 2:
            if handshake_ns:
                event["handshake_ms"] = round(handshake_ns / 1e6, 3)
            event["syn_retransmits"] = syn_retransmits
        if sk_err:
            event["error"] = errno_name(sk_err)
        return "tcp_state"

    def _fmt_connect(self, event: dict, f: tuple) -> str:
        skaddr, protocol, fd, ret, duration_ns = f
        event["sk"] = f"{skaddr:#x}"
        event["protocol"] = PROTOCOLS.get(protocol, str(protocol))
        event["fd"] = fd
        event["ret"] = ret
        event["errno"] = errno_name(ret) if ret < 0 else None
        event["duration_ms"] = round(duration_ns / 1e6, 3)
        return "connect"

    def _fmt_retransmit(self, event: dict, f: tuple) -> str:
        skaddr, state, total_retrans, snd_cwnd, srtt_us, err, segments, retransmit_kind = f
        event["sk"] = f"{skaddr:#x}"
        event["kind"] = generated.RETRANSMIT_KIND.get(retransmit_kind, str(retransmit_kind))
        event["segments"] = segments
        event["state"] = TCP_STATES.get(state, str(state))
        event["total_retrans"] = total_retrans
        event["snd_cwnd"] = snd_cwnd
        event["srtt_us"] = srtt_us
        event["err"] = err
        return "retransmit"

    def _fmt_reset(self, event: dict, f: tuple) -> str:
        skaddr, direction, state, reason, netns = f
        event["sk"] = f"{skaddr:#x}"
        # the namespace the reset was sent or received in: with no socket (a closed port), the packet's,
        # which differs from the task block's (whoever was on the CPU)
        event["netns_pkt"] = netns
        event["direction"] = generated.RESET_DIRECTION.get(direction, str(direction))
        event["state"] = TCP_STATES.get(state) if state else None
        event["reason"] = self.reset_reasons.get(reason, str(reason)) if direction == 1 else None
        return "reset"

    def _fmt_udp_flow(self, event: dict, f: tuple) -> str:
        direction, netns, packets, nbytes, errors, last_error, last_ns = f
        event["direction"] = generated.DIRECTION.get(direction, str(direction))
        event["netns_sk"] = netns
        event["packets"] = packets
        event["bytes"] = nbytes
        event["errors"] = errors
        event["last_error"] = errno_name(last_error)
        event["last_time"] = self.wall_time(last_ns)
        event["last_ts_ns"] = last_ns
        return "udp_flow"

    def _fmt_dns(self, event: dict, f: tuple) -> str:
        skaddr, sk_ino, netns, protocol, message, role, ret = f
        event["sk"] = f"{skaddr:#x}"
        event["sk_ino"] = sk_ino
        event["netns_sk"] = netns
        event["protocol"] = PROTOCOLS.get(protocol, str(protocol))
        event["role"] = generated.DNS_ROLE.get(role, str(role))
        event["bytes"] = ret if ret >= 0 else None
        event["error"] = errno_name(ret) if ret < 0 else None
        return "dns_query" if message == 1 else "dns_reply"

    def _fmt_dns_lookup(self, event: dict, f: tuple) -> str:
        function, name, family, ret, h_errno, latency_ns = f
        fn = generated.LOOKUP_FUNCTION.get(function, str(function))
        event["function"] = fn
        event["name"] = name.split(b"\0", 1)[0].decode("utf-8", "replace")
        event["family"] = LOOKUP_FAMILIES.get(family, str(family))
        event["result"] = lookup_result(fn, ret, h_errno)
        event["ret"] = ret
        event["latency_ms"] = round(latency_ns / 1e6, 3)
        return "dns_lookup"

    def _fmt_oom(self, event: dict, f: tuple) -> str:
        total_vm, anon, file, shmem, pgtables, adj, source, trigger_pid, trigger_tid, trigger_comm = f
        event["total_vm_kb"] = total_vm
        event["anon_rss_kb"] = anon
        event["file_rss_kb"] = file
        event["shmem_rss_kb"] = shmem
        event["pgtables_kb"] = pgtables
        event["oom_score_adj"] = adj
        event["trigger_pid"] = trigger_pid
        event["trigger_tid"] = trigger_tid
        event["trigger_comm"] = _comm(trigger_comm)
        event["source"] = generated.OOM_SOURCE.get(source, str(source))
        # filled by the recorder from the live cgroup hierarchies (ktrace.enrich.cgroup); cgroup_path, from the
        # task block, becomes the cgroup2 path there
        event["memcg_path"] = None
        return "oom_kill"

    def _fmt_exec(self, event: dict, f: tuple) -> str:
        filename, old_tid, args, args_len, truncated = f
        event["filename"] = _comm(filename)
        event["old_tid"] = old_tid
        if args_len:  # only with --with-args: otherwise no argument ever reaches the bundle
            event["args"] = exec_args(args[:args_len])
            event["args_truncated"] = bool(truncated)
        return "exec"

    def _fmt_fork(self, event: dict, f: tuple) -> str:
        child_pid, child_ppid = f
        event["child_pid"] = child_pid
        event["child_ppid"] = child_ppid
        return "fork"

    def _fmt_exit(self, event: dict, f: tuple) -> str:
        code, runtime_ns = f
        event.update(exit_status(code))
        event["runtime_ms"] = round(runtime_ns / 1e6, 3)
        return "exit"

    def _fmt_drop(self, event: dict, f: tuple) -> str:
        reason, protocol, ip_proto, location, skaddr, sk_cgroup_id, sk_ino, sk_uid, netns = f
        if not ip_proto:  # the IP header was not read (not IP, or not set yet): no addresses
            event.update(family=None, saddr=None, daddr=None)
        if ip_proto not in PROTOCOLS:
            event.update(sport=None, dport=None)
        event["reason"] = drops.reason_name(self.drop_reasons, reason)
        event["reason_code"] = reason
        event["protocol"] = drops.protocol_label(protocol, ip_proto)
        event["location"] = f"{location:#x}"
        event["sk"] = f"{skaddr:#x}"
        event["sk_cgroup_id"] = sk_cgroup_id
        event["sk_ino"] = sk_ino
        event["sk_uid"] = sk_uid if skaddr else None
        event["netns_pkt"] = netns
        return "drop"


    def _fmt_runq_latency(self, event: dict, f: tuple) -> str:
        wait_ns, prev_pid, prev_tgid, prev_comm = f
        event["wait_ms"] = round(wait_ns / 1e6, 3)
        event["prev_pid"] = prev_tgid
        event["prev_tid"] = prev_pid
        event["prev_comm"] = _comm(prev_comm)
        return "runq_latency"

    def _fmt_bio_latency(self, event: dict, f: tuple) -> str:
        latency_ns, sector, dev, nbytes, error, op = f
        event["latency_ms"] = round(latency_ns / 1e6, 3)
        event["dev"] = f"{dev >> 20}:{dev & 0xFFFFF}"
        event["op"] = generated.BIO_OP.get(op, str(op))
        event["sector"] = sector
        event["bytes"] = nbytes
        event["error"] = error
        return "bio_latency"

    def _fmt_cgroup_mkdir(self, event: dict, f: tuple) -> str:
        ident, hierarchy_id, level, path = f
        event["new_cgroup_id"] = ident
        event["hierarchy_id"] = hierarchy_id
        event["level"] = level
        event["new_cgroup_path"] = path.split(b"\0", 1)[0].decode("utf-8", "replace") or "/"
        return "cgroup_mkdir"


def exec_args(raw: bytes) -> str:
    """argv as the kernel lays it out (NUL after each argument) → one line, arguments separated by spaces."""
    return raw.rstrip(b"\0").replace(b"\0", b" ").decode("utf-8", "replace")


def exit_status(code: int) -> dict:
    """The kernel's raw wait status → exit_code, exit_status (a normal exit), signal and core_dump (a kill)."""
    sig = code & 0x7F
    name = None
    if sig:
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
    return {"exit_code": code, "exit_status": None if sig else code >> 8 & 0xFF, "signal": name,
            "core_dump": bool(code & 0x80)}


def lookup_result(function: str, ret: int, h_errno: int) -> str:
    """"ok", or why a lookup failed: an EAI_* name (getaddrinfo), an errno name (a failed _r call), an h_errno
    name (the gethostbyname family found nothing), "failed" (gethostbyname returned NULL, reason unknown)."""
    if function == "getaddrinfo":
        return "ok" if ret == 0 else EAI_NAMES.get(ret, str(ret))
    if function.endswith("_r") and ret != 0:
        return errno_name(ret) or str(ret)
    if ret == 0 and h_errno == 0:
        return "ok"
    return H_ERRNO_NAMES.get(h_errno, str(h_errno)) if h_errno else "failed"


def kernel_reset_reasons(btf: object | None) -> dict[int, str]:
    """enum sk_rst_reason of the running kernel: value → 'NO_SOCKET'."""
    if btf is None:
        return {}
    values = btf.enum("sk_rst_reason")  # type: ignore[attr-defined]
    return {v: n.removeprefix("SK_RST_REASON_") for v, n in values.items()}
