"""The probe registry: every family, its ordered chain of alternatives, and their checks.

All alternatives of a family are compiled into the same BPF object. The loader
keeps the first alternative whose check passes and that loads and attaches, and
switches the rest off before load. This file is the one table of fallback chains.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from ktrace import libbpf, libc

TRACEFS_CANDIDATES = ("/sys/kernel/tracing", "/sys/kernel/debug/tracing")
KPROBE_PMU = Path("/sys/bus/event_source/devices/kprobe/type")
UPROBE_PMU = Path("/sys/bus/event_source/devices/uprobe/type")
KALLSYMS = Path("/proc/kallsyms")


class Verdict(str, Enum):
    SUPPORTED = "supported"
    UNSUPPORTED = "unsupported"
    INCONCLUSIVE = "inconclusive"


@dataclass(frozen=True)
class CheckResult:
    verdict: Verdict
    reason: str = ""

    @property
    def ok(self) -> bool:
        # An inconclusive check does not rule an alternative out: loading it decides.
        return self.verdict != Verdict.UNSUPPORTED


SUPPORTED = CheckResult(Verdict.SUPPORTED)


@dataclass(frozen=True)
class Hook:
    """One alternative of a family: the programs that implement it and its precondition."""

    label: str  # e.g. "tp_btf/inet_sock_set_state"
    programs: tuple[str, ...]
    check: Callable[[], CheckResult]
    min_kernel: str


@dataclass(frozen=True)
class Family:
    name: str
    obj: str  # the BPF object under ktrace/bpf/
    chain: tuple[Hook, ...]
    description: str
    required: bool = False
    default: bool = True

    def programs(self) -> set[str]:
        return {p for hook in self.chain for p in hook.programs}


# --- feature checks (cached; each answers for the running kernel) ---


@functools.cache
def tracefs() -> Path | None:
    """The tracefs mount, mounting it at /sys/kernel/tracing when it is missing."""
    for candidate in TRACEFS_CANDIDATES:
        if Path(candidate, "events").is_dir():
            return Path(candidate)
    target = TRACEFS_CANDIDATES[0]
    if os.path.isdir(target) and os.geteuid() == 0:
        # tracepoint attachment needs the event ids that only tracefs exposes
        os.system(f"mount -t tracefs nodev {target} >/dev/null 2>&1")
        if Path(target, "events").is_dir():
            return Path(target)
    return None


@functools.cache
def vmlinux_btf() -> libbpf.Btf | None:
    if not Path("/sys/kernel/btf/vmlinux").exists():
        return None
    try:
        return libbpf.Btf.vmlinux()
    except libbpf.BpfError:
        return None


@functools.cache
def _kallsyms() -> frozenset[str]:
    try:
        return frozenset(line.split()[2] for line in KALLSYMS.read_text().splitlines() if len(line.split()) >= 3)
    except OSError:
        return frozenset()


def tracepoint(category: str, name: str) -> Callable[[], CheckResult]:
    @functools.cache
    def check() -> CheckResult:
        root = tracefs()
        if root is None:
            return CheckResult(Verdict.UNSUPPORTED, "tracefs is not mounted and cannot be mounted")
        if not (root / "events" / category / name).is_dir():
            return CheckResult(Verdict.UNSUPPORTED, f"no tracepoint {category}/{name} in this kernel")
        return SUPPORTED

    return check


def _btf_type(name: str, kind: int, missing: str, found: CheckResult = SUPPORTED) -> Callable[[], CheckResult]:
    """A check that passes when the kernel's BTF has this named type."""

    @functools.cache
    def check() -> CheckResult:
        btf = vmlinux_btf()
        if btf is None:
            return CheckResult(Verdict.UNSUPPORTED, "the kernel exposes no BTF")
        if not btf.has(name, kind):
            return CheckResult(Verdict.UNSUPPORTED, missing)
        return found

    return check


def tp_btf(name: str) -> Callable[[], CheckResult]:
    return _btf_type(f"btf_trace_{name}", libbpf.BTF_KIND_TYPEDEF, f"no BTF tracepoint {name} in this kernel")


def fentry(function: str) -> Callable[[], CheckResult]:
    # whether trampolines are allowed is only known by loading one
    return _btf_type(function, libbpf.BTF_KIND_FUNC, f"no BTF for function {function}",
                     CheckResult(Verdict.INCONCLUSIVE, "trampolines are decided at load"))


def iterator(target: str) -> Callable[[], CheckResult]:
    return _btf_type(f"bpf_iter__{target}", libbpf.BTF_KIND_STRUCT, f"no BPF iterator {target} in this kernel")


def kprobe(function: str) -> Callable[[], CheckResult]:
    @functools.cache
    def check() -> CheckResult:
        if not KPROBE_PMU.exists():
            return CheckResult(Verdict.UNSUPPORTED, "no kprobe PMU (kernel built without CONFIG_KPROBES)")
        symbols = _kallsyms()
        if symbols and function not in symbols:
            return CheckResult(Verdict.UNSUPPORTED, f"no kernel function {function}")
        return SUPPORTED

    return check


ROOT_CGROUP_INO = 1  # the root of the cgroup2 hierarchy is kernfs node 1


@functools.cache
def cgroup2_root() -> Path | None:
    """The root of the node's cgroup2 hierarchy (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts).

    In a container with its own cgroup namespace, the /sys/fs/cgroup it sees is its
    own cgroup, and programs attached there would see only the container. The real
    root is recognised by its inode number; it is reachable through PID 1's root
    (hostPID) or a hostPath mount of the node's /sys/fs/cgroup (deploy/).
    """
    candidates: list[Path] = []
    for proc_root, mounts in ((Path("/proc/1/root"), Path("/proc/1/mounts")), (Path("/"), Path("/proc/self/mounts"))):
        try:
            lines = mounts.read_text().splitlines()
        except OSError:
            continue
        points = sorted((f[1] for f in map(str.split, lines) if len(f) > 2 and f[2] == "cgroup2"), key=len)
        candidates += [proc_root / point.lstrip("/") for point in points]
    for path in candidates:
        try:
            if path.stat().st_ino == ROOT_CGROUP_INO:
                return path
        except OSError:  # PID 1's root is not ours to read (no hostPID, or no CAP_SYS_PTRACE)
            continue
    return None


def cgroup_hook(attach: str) -> Callable[[], CheckResult]:
    """cgroup sock_addr programs, attached to the cgroup2 root so they see every process."""

    @functools.cache
    def check() -> CheckResult:
        if cgroup2_root() is None:
            return CheckResult(Verdict.UNSUPPORTED, "the root of the cgroup2 hierarchy is not reachable (not mounted, "
                                                    "or only a container's own cgroup is)")
        return _btf_type("bpf_sock_addr", libbpf.BTF_KIND_STRUCT, f"no cgroup/{attach} hook in this kernel")()

    return check


def libc_uprobes() -> Callable[[], CheckResult]:
    """uprobes through the perf PMU, on at least one libc file of this node."""

    @functools.cache
    def check() -> CheckResult:
        if not UPROBE_PMU.exists():
            return CheckResult(Verdict.UNSUPPORTED, "no uprobe PMU (kernel built without CONFIG_UPROBE_EVENTS)")
        found = libc.discover()
        if not found.files:
            why = "; ".join(f"{shown}: {reason}" for shown, reason in found.skipped[:5])
            return CheckResult(Verdict.UNSUPPORTED, "no libc file found" + (f" ({why})" if why else ""))
        return SUPPORTED

    return check


def all_of(*checks: Callable[[], CheckResult]) -> Callable[[], CheckResult]:
    def check() -> CheckResult:
        results = [c() for c in checks]
        for r in results:
            if not r.ok:
                return r
        for r in results:
            if r.verdict == Verdict.INCONCLUSIVE:
                return r
        return SUPPORTED

    return check


# --- the table ---

# udp and dns share their hooks: the programs look at rodata flags to know which of the two are on.
_UDP_SYSCALLS = ("sendto", "sendmsg", "sendmmsg", "recvfrom", "recvmsg", "recvmmsg")
UDP_DNS_CHAIN = (
    Hook("tp_btf/sock_{send,recv}_length", ("kt_udp_send_btf", "kt_udp_recv_btf"),
         all_of(tp_btf("sock_send_length"), tp_btf("sock_recv_length")), "6.3"),
    Hook("tracepoint/sock/sock_{send,recv}_length", ("kt_udp_send_tp", "kt_udp_recv_tp"),
         all_of(tracepoint("sock", "sock_send_length"), tracepoint("sock", "sock_recv_length")), "6.3"),
    # older kernels: the six send and receive syscalls, the remote end read from the caller's memory;
    # write()/read() on a connected UDP socket, io_uring and 32-bit syscalls are not seen
    Hook("tracepoint/syscalls/sys_{enter,exit}_{send,recv}{to,msg,mmsg}",
         tuple(f"kt_{call}_{end}" for call in _UDP_SYSCALLS for end in ("in", "out")),
         all_of(*(tracepoint("syscalls", f"sys_{end}_{call}") for call in _UDP_SYSCALLS for end in ("enter", "exit"))),
         "4.7"),
)


# dns_names: program → (libc function, whether it is the return probe). The sections are generic
# (SEC("uprobe"), SEC("uretprobe")): capture.py attaches each program to its function in every libc file.
UPROBES = {
    "kt_gai_enter": ("getaddrinfo", False),
    "kt_gai_exit": ("getaddrinfo", True),
    "kt_ghbn_enter": ("gethostbyname", False),
    "kt_ghbn_exit": ("gethostbyname", True),
    "kt_ghbn2_enter": ("gethostbyname2", False),
    "kt_ghbn2_exit": ("gethostbyname2", True),
    "kt_ghbn_r_enter": ("gethostbyname_r", False),
    "kt_ghbn_r_exit": ("gethostbyname_r", True),
    "kt_ghbn2_r_enter": ("gethostbyname2_r", False),
    "kt_ghbn2_r_exit": ("gethostbyname2_r", True),
}

FAMILIES: tuple[Family, ...] = (
    Family(
        "tcp_state",
        "tcp.bpf.o",
        description="TCP state changes, handshake time, owner of each socket",
        required=True,
        chain=(
            Hook("tp_btf/inet_sock_set_state", ("kt_tcp_st_btf",), tp_btf("inet_sock_set_state"), "5.5"),
            Hook("tracepoint/sock/inet_sock_set_state", ("kt_tcp_st_tp",),
                 tracepoint("sock", "inet_sock_set_state"), "4.16"),
            Hook("fentry/tcp_set_state", ("kt_tcp_st_fe",), fentry("tcp_set_state"), "5.5"),
            Hook("kprobe/tcp_set_state", ("kt_tcp_st_kp",), kprobe("tcp_set_state"), "4.1"),
        ),
    ),
    Family(
        "socket_owners",
        "tcp.bpf.o",
        description="owners of TCP sockets opened before the window (listeners, long-lived connections)",
        chain=(
            Hook("iter/task_file", ("kt_iter_socks",), iterator("task_file"), "5.8"),
        ),
    ),
    Family(
        "connect",
        "tcp.bpf.o",
        description="connect(2) calls: errno and time in the syscall",
        chain=(
            Hook("tracepoint/syscalls/sys_{enter,exit}_connect", ("kt_conn_enter_tp", "kt_conn_exit_tp"),
                 all_of(tracepoint("syscalls", "sys_enter_connect"), tracepoint("syscalls", "sys_exit_connect")),
                 "4.7"),
            Hook("fentry+fexit/__sys_connect", ("kt_conn_enter_fe", "kt_conn_exit_fe"), fentry("__sys_connect"),
                 "5.5"),
        ),
    ),
    Family(
        "accept",
        "tcp.bpf.o",
        description="accept(2) calls: the process that accepts a connection owns it from then on (the worker of "
                    "a pre-fork server, not the master that listens)",
        chain=(
            Hook("tracepoint/syscalls/sys_exit_accept{,4}", ("kt_accept4_tp", "kt_accept_tp"),
                 all_of(tracepoint("syscalls", "sys_exit_accept4"), tracepoint("syscalls", "sys_exit_accept")),
                 "4.7"),
            Hook("fexit/__sys_accept4", ("kt_accept_fe",), fentry("__sys_accept4"), "5.5"),
        ),
    ),
    Family(
        "retransmit",
        "tcp.bpf.o",
        description="TCP retransmits (skbs with their segment count, and SYN-ACKs), attributed to the socket's "
                    "owner",
        chain=(
            Hook("tp_btf/tcp_retransmit_{skb,synack}", ("kt_retx_btf", "kt_synack_btf"),
                 all_of(tp_btf("tcp_retransmit_skb"), tp_btf("tcp_retransmit_synack")), "5.5"),
            Hook("tracepoint/tcp/tcp_retransmit_{skb,synack}", ("kt_retx_tp", "kt_synack_tp"),
                 all_of(tracepoint("tcp", "tcp_retransmit_skb"), tracepoint("tcp", "tcp_retransmit_synack")),
                 "4.16"),
            # SYN-ACKs are not seen on this one
            Hook("kprobe/__tcp_retransmit_skb", ("kt_retx_kp",), kprobe("__tcp_retransmit_skb"), "4.1"),
        ),
    ),
    Family(
        "reset",
        "tcp.bpf.o",
        description="TCP resets sent and received, with the kernel's reason",
        chain=(
            Hook("tracepoint/tcp/tcp_{send,receive}_reset", ("kt_rst_send_tp", "kt_rst_recv_tp"),
                 all_of(tracepoint("tcp", "tcp_send_reset"), tracepoint("tcp", "tcp_receive_reset")), "5.5"),
        ),
    ),
    Family(
        "udp",
        "udp.bpf.o",
        description="UDP flows: datagrams and bytes per direction and process, counted in the kernel",
        chain=UDP_DNS_CHAIN,
    ),
    Family(
        "udp_peers",
        "udp.bpf.o",
        description="the remote address of datagrams on unconnected UDP sockets (sendto, recvfrom)",
        chain=(
            Hook("cgroup/{sendmsg,recvmsg}{4,6}", ("kt_peer_send4", "kt_peer_send6", "kt_peer_recv4",
                                                   "kt_peer_recv6"), cgroup_hook("recvmsg4"), "5.2"),
        ),
    ),
    Family(
        "dns",
        "udp.bpf.o",
        description="DNS queries and replies (UDP and TCP) to and from --dns-ports, paired with their replies",
        chain=UDP_DNS_CHAIN,
    ),
    Family(
        "dns_names",
        "dns_names.bpf.o",
        description="host names looked up through libc (getaddrinfo, gethostbyname*): name, result and latency "
                    "per process; opt-in (--with-dns-names) because it records the names",
        default=False,
        chain=(
            Hook("uprobe/libc:{getaddrinfo,gethostbyname{,2}{,_r}}", tuple(UPROBES), libc_uprobes(), "4.17"),
        ),
    ),
    Family(
        "oom",
        "process.bpf.o",
        description="OOM kills: the victim, its memory sizes and memory cgroup, and the task that was allocating",
        chain=(
            Hook("tp_btf/mark_victim", ("kt_oom_btf",), tp_btf("mark_victim"), "5.5"),
            # sizes come in kB from the record; the victim's task block only when it is the allocating task
            Hook("tracepoint/oom/mark_victim", ("kt_oom_tp",), tracepoint("oom", "mark_victim"), "4.19"),
        ),
    ),
    Family(
        "process",
        "process.bpf.o",
        description="processes started (exec), created (fork, clone without CLONE_THREAD) and ended (exit), "
                    "with exit codes; new threads are counted",
        chain=(
            Hook("tp_btf/sched_process_{exec,fork,exit}", ("kt_exec_btf", "kt_fork_btf", "kt_exit_btf"),
                 all_of(*(tp_btf(f"sched_process_{t}") for t in ("exec", "fork", "exit"))), "5.5"),
            Hook("tracepoint/sched/sched_process_{exec,fork,exit}", ("kt_exec_tp", "kt_fork_tp", "kt_exit_tp"),
                 all_of(*(tracepoint("sched", f"sched_process_{t}") for t in ("exec", "fork", "exit"))), "4.4"),
        ),
    ),
    Family(
        "drops",
        "drops.bpf.o",
        description="packets the kernel dropped, counted in the kernel by reason and protocol; "
                    "TCP/UDP drops on --ports also one by one",
        chain=(
            # with the receiving socket (rx_sk, 6.11+); on 5.17-6.10 the tracepoint has 3 arguments and the
            # verifier refuses the program, so the classic tracepoint below takes over
            Hook("tp_btf/kfree_skb", ("kt_drop_btf",), tp_btf("kfree_skb"), "6.11"),
            Hook("tracepoint/skb/kfree_skb", ("kt_drop_tp",),
                 all_of(tracepoint("skb", "kfree_skb"),
                        _btf_type("skb_drop_reason", libbpf.BTF_KIND_ENUM, "no enum skb_drop_reason (drop reasons "
                                  "arrived in Linux 5.17)")), "5.17"),
        ),
    ),
    Family(
        "sched",
        "latency.bpf.o",
        description="run-queue latency: a histogram per cgroup counted in the kernel, an event per wait over "
                    "--sched-warn",
        chain=(
            Hook("tp_btf/sched_{wakeup,wakeup_new,switch}",
                 ("kt_runq_wakeup_btf", "kt_runq_wakeup_new_btf", "kt_runq_switch_btf"),
                 all_of(tp_btf("sched_wakeup"), tp_btf("sched_wakeup_new"), tp_btf("sched_switch")), "5.5"),
            Hook("raw_tp/sched_{wakeup,wakeup_new,switch}",
                 ("kt_runq_wakeup_raw", "kt_runq_wakeup_new_raw", "kt_runq_switch_raw"),
                 all_of(tracepoint("sched", "sched_wakeup"), tracepoint("sched", "sched_wakeup_new"),
                        tracepoint("sched", "sched_switch")), "4.17"),
        ),
    ),
    Family(
        "blockio",
        "latency.bpf.o",
        description="block I/O latency from issue to completion: a histogram per disk and direction counted in "
                    "the kernel, an event per request over --bio-warn",
        chain=(
            Hook("tp_btf/block_rq_{issue,complete}", ("kt_bio_issue_btf", "kt_bio_done_btf"),
                 all_of(tp_btf("block_rq_issue"), tp_btf("block_rq_complete")), "5.5"),
            # the classic tracepoints have no request pointer to pair an issue with its completion
            Hook("raw_tp/block_rq_{issue,complete}", ("kt_bio_issue_raw", "kt_bio_done_raw"),
                 all_of(tracepoint("block", "block_rq_issue"), tracepoint("block", "block_rq_complete")), "4.17"),
        ),
    ),
    Family(
        "cgroups",
        "cgroups.bpf.o",
        description="cgroups created during the window (id, hierarchy, path), so that the cgroups of short-lived "
                    "containers still resolve to paths and pods",
        chain=(
            Hook("tp_btf/cgroup_mkdir", ("kt_cgroup_mkdir_btf",), tp_btf("cgroup_mkdir"), "5.5"),
            Hook("tracepoint/cgroup/cgroup_mkdir", ("kt_cgroup_mkdir_tp",), tracepoint("cgroup", "cgroup_mkdir"),
                 "4.19"),
        ),
    ),
)

FAMILY_BY_NAME = {f.name: f for f in FAMILIES}
# Every alternative's label, in table order (a shared chain once): what --skip-hook accepts.
HOOK_LABELS = tuple(dict.fromkeys(h.label for f in FAMILIES for h in f.chain))


def object_path(obj: str) -> str:
    return str(Path(__file__).resolve().parent / "bpf" / obj)


# --- the outcome of resolving chains, as it goes into doctor, node.json and summary.json ---


@dataclass
class HookStatus:
    hook: str
    status: str  # chosen | available | refused | unsupported | skipped | not tried
    reason: str = ""
    min_kernel: str = ""


@dataclass
class FamilyStatus:
    family: str
    chosen: str | None = None
    status: str = "missing"  # ok | missing | disabled
    reason: str = ""
    alternatives: list[HookStatus] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {
            "family": self.family,
            "chosen": self.chosen,
            "status": self.status,
            "reason": self.reason,
            "alternatives": [vars(a) for a in self.alternatives],
        }
