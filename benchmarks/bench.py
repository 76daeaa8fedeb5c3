"""Overhead benchmark: a loopback socket workload alone, under ktrace, under tcpstates (TCP) or under ktrace on its
syscall-tracepoint fallback (UDP); and, paced, the highest offered event rate ktrace records without a loss.

    python -m benchmarks.bench [--mode tcp|udp|both] [--n 30000] [--reps 3] [--json FILE]
    python -m benchmarks.bench --mode paced [--rates 50k,200k,600k] [--n 30000] [--reps 3]

`make bench` installs libbpf-tools (for /usr/sbin/tcpstates) when it is missing and runs the TCP and UDP modes;
`make bench-paced` runs the paced mode.

Overhead (tcp, udp). Each rep runs every config once, in an order rotated each rep, after one discarded warm-up
run of each. The workload is pinned to one CPU and the tracer to another (when there are two), so the in-kernel
cost of the probes lands on the workload's CPU and the tracer's user-space cost on its own. Throughput is only
compared within a rep (the per-rep ratio to the workload alone) and medians are reported: machines are noisy.

ktrace runs as a user runs it, `ktrace --duration=60s`, and its window is ended by SIGINT once the workload is
done. For each ktrace run the report shows:

- the events seen and written and every loss kind of summary.json's `losses.total`;
- the TCP state changes of the workload's connections found in events.jsonl against the ones it made (a churn
  cycle is ten: connect, accept and both ends' close);
- ktrace's CPU (utime+stime, its children included) while attached before SIGINT ("window") and from SIGINT to
  its exit ("after"), each per event seen;
- the time from SIGINT to bundle.tgz in place and to ktrace's exit, and its peak RSS (wait4's ru_maxrss).

The TCP report ends with the acceptance check of the default window on the saturating churn: 0 for every loss
kind in every run, events.jsonl holding >= 99% of the state changes, and a median speed ratio >= 0.90.

Paced. The churn offers a fixed rate (events/s, ten per cycle) for --n cycles under ktrace, --reps times per
rate, and the report gives the highest offered rate that the workload reached with no loss in any run.

Nothing is asserted. Needs root (ktrace loads BPF programs). Every process started here is ended by its PID, and
every temporary directory is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Callable, Optional

import orjson
import psutil

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKLOAD_C = HERE / "workload.c"
BUILD_DIR = HERE / "build"
TCPSTATES = Path("/usr/sbin/tcpstates")

KTRACE_WINDOW = "60s"  # the window of the acceptance check; SIGINT ends it early
WORKLOAD_CAP_S = 50  # the workload's own time cap (-t): under the window, so SIGINT always ends it
READY_TIMEOUT_S = 60  # how long a tracer may take to attach
EXIT_TIMEOUT_S = 300  # how long a tracer may take to drain and exit after SIGINT
KILL_TIMEOUT_S = 10
POLL_S = 0.01  # how often a stopping ktrace is checked for its bundle and its exit

KTRACE_OK = (0, 3)  # success, degraded (some probe family not attached): the bundle is still whole
COUNTS = ("seen", "written", "aggregated")  # losses.total keys that are not loss kinds

# connect: client CLOSE→SYN_SENT→ESTABLISHED, server LISTEN→SYN_RECV→ESTABLISHED; the server closes first:
# ESTABLISHED→FIN_WAIT1→FIN_WAIT2→CLOSE (TIME_WAIT lives on in a timewait socket), client
# ESTABLISHED→CLOSE_WAIT→LAST_ACK→CLOSE
STATE_CHANGES_PER_CYCLE = 10

# the acceptance check (issue 11): the default window on the saturating churn
MIN_STATE_FRACTION = 0.99
MIN_SPEED_RATIO = 0.90
REACHED = 0.97  # a paced run reached its offered rate when it ran at this fraction of it or more
# the loss kinds that are what ktrace chose not to record rather than lost on the way: the port allowlist,
# --sample, and sched's switch-ins with no start time to measure from (queued before the window, the idle task)
NOT_RECORDED = ("filtered", "sampled_out")

ALONE, KTRACE, TCPSTATES_CFG = "alone", "ktrace", "tcpstates"
KTRACE_SYSCALLS = "ktrace-syscalls"
KTRACE_NO_SCHED = "ktrace-no-sched"
PACED = "ktrace-paced"
SOCK_LENGTH = ("tp_btf/sock_{send,recv}_length", "tracepoint/sock/sock_{send,recv}_length")
DEFAULT_RATES = "50k,200k,600k"


@dataclass
class Run:
    """One run of one config."""

    kind: str  # tcp or udp
    config: str  # alone, ktrace, tcpstates, ...
    rep: int  # -1 for the warm-up
    ops_per_s: float  # cycles or round trips per second, as the workload measured them
    done: int  # operations the workload completed
    offered_ops_per_s: Optional[float] = None  # paced runs: the rate the workload was asked for
    cpu_at_ready_s: Optional[float] = None  # tracer CPU (utime+stime, children included) once attached
    cpu_at_stop_s: Optional[float] = None  # ... just before SIGINT
    cpu_total_s: Optional[float] = None  # ... at exit (wait4 rusage), drain and bundle included
    stop_to_bundle_s: Optional[float] = None  # SIGINT → bundle.tgz in place
    stop_to_exit_s: Optional[float] = None  # SIGINT → exit
    max_rss_kib: Optional[int] = None  # wait4 ru_maxrss
    seen: Optional[int] = None  # ktrace losses.total
    written: Optional[int] = None
    losses: dict[str, int] = field(default_factory=dict)  # every loss kind of losses.total
    lossy_families: dict[str, dict[str, int]] = field(default_factory=dict)  # losses.by_family, non-zero kinds only
    state_changes: Optional[int] = None  # the workload's tcp_state lines in events.jsonl
    expected_state_changes: Optional[int] = None  # ... as many as the workload made

    @property
    def cpu_window_s(self) -> Optional[float]:
        """Tracer CPU while attached, up to SIGINT."""
        return _diff(self.cpu_at_stop_s, self.cpu_at_ready_s)

    @property
    def cpu_after_s(self) -> Optional[float]:
        """Tracer CPU from SIGINT to exit: drain, decode, bundle."""
        return _diff(self.cpu_total_s, self.cpu_at_stop_s)

    @property
    def us_per_event_window(self) -> Optional[float]:
        return _per_event(self.cpu_window_s, self.seen)

    @property
    def us_per_event_after(self) -> Optional[float]:
        return _per_event(self.cpu_after_s, self.seen)

    @property
    def lost(self) -> int:
        return sum(self.losses.values())

    @property
    def state_fraction(self) -> Optional[float]:
        if self.state_changes is None or not self.expected_state_changes:
            return None
        return self.state_changes / self.expected_state_changes

    @property
    def offered_events_per_s(self) -> Optional[float]:
        return None if self.offered_ops_per_s is None else self.offered_ops_per_s * STATE_CHANGES_PER_CYCLE

    @property
    def events_per_s(self) -> float:
        """The state changes offered per second of the run (TCP churn)."""
        return self.ops_per_s * STATE_CHANGES_PER_CYCLE

    def lost_except(self, ignore: Collection[str]) -> int:
        return sum(v for k, v in self.losses.items() if k not in ignore)

    def lossless(self, ignore: Collection[str] = ()) -> bool:
        """No loss counted (of the kinds not ignored), and every state change the workload made is in events.jsonl."""
        complete = self.state_changes is None or self.state_changes >= (self.expected_state_changes or 0)
        return complete and self.lost_except(ignore) == 0

    def as_json(self) -> dict[str, object]:
        derived = ("cpu_window_s", "cpu_after_s", "us_per_event_window", "us_per_event_after", "lost",
                   "state_fraction")
        return asdict(self) | {name: getattr(self, name) for name in derived}


def _diff(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return None if a is None or b is None else a - b


def _per_event(cpu_s: Optional[float], events: Optional[int]) -> Optional[float]:
    return None if cpu_s is None or not events else cpu_s / events * 1e6


@dataclass
class Pinning:
    workload: Optional[int]
    tracer: Optional[int]


@dataclass
class Context:
    """What every run of a mode shares."""

    kind: str
    n: int
    wl: list[str]
    pin: Pinning
    tmp: Path


@dataclass
class WorkloadResult:
    ops_per_s: float
    done: int
    port: int  # the server's port: every TCP state change of the run has it at one end


@dataclass
class Exit:
    cpu_at_stop_s: float
    cpu_total_s: float
    stop_to_bundle_s: Optional[float]
    stop_to_exit_s: float
    max_rss_kib: int


# --- processes ---------------------------------------------------------------


def _pin(cpu: Optional[int]) -> Optional[Callable[[], None]]:
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


@contextlib.contextmanager
def started(
    argv: Sequence[str], cpu: Optional[int], stdout: int | IO[bytes] | None = None, env: Optional[dict] = None
) -> Iterator[subprocess.Popen]:
    """Start argv pinned to cpu; on the way out, make sure that PID is gone."""
    proc = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            preexec_fn=_pin(cpu), env=env)
    try:
        yield proc
    finally:
        _end(proc)


def _end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(KILL_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stderr:
        proc.stderr.close()
    if proc.stdout:
        proc.stdout.close()


def cpu_seconds(pid: int) -> float:
    """utime+stime of pid and of the children it has waited for, as wait4 will count them at its exit."""
    t = psutil.Process(pid).cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def stop(proc: subprocess.Popen, bundle_ready: Optional[Callable[[], bool]] = None) -> Exit:
    """SIGINT a tracer and reap it: its CPU just before the signal and at exit, how long it took to put its
    bundle in place (bundle_ready) and to exit, its peak RSS."""
    before = cpu_seconds(proc.pid)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGINT)
    deadline = signalled + EXIT_TIMEOUT_S
    to_bundle: Optional[float] = None
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        now = time.monotonic()
        if bundle_ready is not None and to_bundle is None and bundle_ready():
            to_bundle = now - signalled  # seen at exit at the latest: within POLL_S of the rename
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return Exit(before, usage.ru_utime + usage.ru_stime, to_bundle, now - signalled, usage.ru_maxrss)
        if now > deadline:
            raise TimeoutError(f"{proc.args[0]} (pid {proc.pid}) did not exit within {EXIT_TIMEOUT_S} s of SIGINT")
        time.sleep(POLL_S)


def fail(proc: subprocess.Popen, what: str) -> RuntimeError:
    err = proc.stderr.read().decode(errors="replace").strip() if proc.stderr and proc.poll() is not None else ""
    return RuntimeError(f"{what} (exit {proc.returncode}): {err[-2000:]}")


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen, what: str) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not ready():
        if proc.poll() is not None:
            raise fail(proc, f"{what} exited before it was attached")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not attached after {READY_TIMEOUT_S} s")
        time.sleep(0.05)


# --- workload ----------------------------------------------------------------


def workload_command() -> list[str]:
    """The compiled workload (rebuilt when workload.c is newer), else the Python fallback."""
    binary = BUILD_DIR / "wl"
    if binary.exists() and binary.stat().st_mtime >= WORKLOAD_C.stat().st_mtime:
        return [str(binary)]
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc):
        BUILD_DIR.mkdir(exist_ok=True)
        tmp = binary.with_suffix(".tmp")
        result = subprocess.run([cc, "-O2", "-Wall", "-o", str(tmp), str(WORKLOAD_C)], capture_output=True, text=True)
        if result.returncode == 0:
            tmp.replace(binary)
            return [str(binary)]
        print(f"warning: {cc} failed, using the Python workload:\n{result.stderr}", file=sys.stderr)
    else:
        print(f"warning: no C compiler ({cc}), using the Python workload", file=sys.stderr)
    return [sys.executable, "-m", "benchmarks.workload"]


def parse_workload(out: str) -> WorkloadResult:
    """The workload's last line: ops_per_s=R done=D port=P elapsed_s=T."""
    lines = out.strip().splitlines()
    if not lines:
        raise ValueError("the workload printed nothing")
    fields = dict(item.split("=", 1) for item in lines[-1].split())
    try:
        return WorkloadResult(float(fields["ops_per_s"]), int(fields["done"]), int(fields["port"]))
    except KeyError as exc:
        raise ValueError(f"the workload's last line has no {exc.args[0]}: {lines[-1]!r}") from None


def run_workload(ctx: Context, rate: Optional[float] = None) -> WorkloadResult:
    """Run the workload to completion (offering rate operations per second when given)."""
    argv = [*ctx.wl, ctx.kind, str(ctx.n), "-t", str(WORKLOAD_CAP_S)]
    if rate is not None:
        argv += ["-r", f"{rate:g}"]
    with started(argv, ctx.pin.workload, stdout=subprocess.PIPE) as proc:
        out, err = proc.communicate(timeout=WORKLOAD_CAP_S + 30)
    if proc.returncode != 0:
        raise RuntimeError(f"workload failed (exit {proc.returncode}): {err.decode(errors='replace')}")
    return parse_workload(out.decode())


# --- reading a bundle ----------------------------------------------------------


def bundle_file(out_dir: Path, suffix: str) -> Optional[Path]:
    found = list(out_dir.glob(f"ktrace.*.{suffix}"))
    if len(found) > 1:
        raise RuntimeError(f"expected one {suffix} in {out_dir}, found {len(found)}")
    return found[0] if found else None


def read_losses(out_dir: Path) -> dict:
    """summary.json's losses: by_family and total."""
    summary = bundle_file(out_dir, "summary.json")
    if summary is None:
        raise RuntimeError(f"no summary.json in {out_dir}")
    return json.loads(summary.read_text())["losses"]


def loss_kinds(counters: dict[str, int]) -> dict[str, int]:
    """A losses entry less its counts (seen, written, aggregated): every kind of loss, whatever the version."""
    return {kind: value for kind, value in counters.items() if kind not in COUNTS}


def lossy_families(by_family: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """The families that lost something, with their non-zero loss kinds: where a total came from."""
    found = {family: {k: v for k, v in loss_kinds(counters).items() if v} for family, counters in by_family.items()}
    return {family: kinds for family, kinds in found.items() if kinds}


def workload_state_changes(lines: Iterable[bytes], port: int) -> int:
    """The tcp_state lines of the workload's connections: those with its server port at one end, less the
    listener's own open (→LISTEN) and close (LISTEN→CLOSE), which happen once a run, not once a cycle."""
    count = 0
    for line in lines:
        if b"tcp_state" not in line:  # most lines: skip the parse
            continue
        event = orjson.loads(line)
        if event.get("type") != "tcp_state" or port not in (event.get("sport"), event.get("dport")):
            continue
        old, new = event.get("old_state"), event.get("new_state")
        if new == "LISTEN" or (old == "LISTEN" and new == "CLOSE"):
            continue
        count += 1
    return count


def count_state_changes(out_dir: Path, port: int) -> int:
    events = bundle_file(out_dir, "events.jsonl")
    if events is None:
        raise RuntimeError(f"no events.jsonl in {out_dir}")
    with open(events, "rb") as f:
        return workload_state_changes(f, port)


# --- configs -----------------------------------------------------------------


def ktrace_command() -> tuple[list[str], dict[str, str]]:
    """This tree's ktrace (not whichever one is installed), and the environment that imports it."""
    path = os.environ.get("PYTHONPATH")
    env = os.environ | {"PYTHONPATH": f"{REPO}{os.pathsep}{path}" if path else str(REPO)}
    return [sys.executable, "-m", "ktrace"], env


def run_alone(ctx: Context, rep: int) -> Run:
    result = run_workload(ctx)
    return Run(ctx.kind, ALONE, rep, result.ops_per_s, result.done)


def run_ktrace(ctx: Context, rep: int, config: str = KTRACE, extra: Sequence[str] = (),
               rate: Optional[float] = None) -> Run:
    out_dir = Path(tempfile.mkdtemp(prefix="ktrace-out-", dir=ctx.tmp))
    ready = out_dir / "ready"
    cmd, env = ktrace_command()
    argv = [*cmd, f"--duration={KTRACE_WINDOW}", f"--out-dir={out_dir}", f"--ready-file={ready}", "-q", *extra]
    try:
        with started(argv, ctx.pin.tracer, stdout=subprocess.DEVNULL, env=env) as proc:
            wait_until(ready.exists, proc, "ktrace")
            at_ready = cpu_seconds(proc.pid)
            result = run_workload(ctx, rate)
            ended = stop(proc, lambda: bundle_file(out_dir, "bundle.tgz") is not None)
            if proc.returncode not in KTRACE_OK:
                raise fail(proc, "ktrace failed")
        losses = read_losses(out_dir)
        total = losses["total"]
        tcp = ctx.kind == "tcp"
        state_changes = count_state_changes(out_dir, result.port) if tcp else None
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return Run(
        ctx.kind,
        config,
        rep,
        result.ops_per_s,
        result.done,
        offered_ops_per_s=rate,
        cpu_at_ready_s=at_ready,
        cpu_at_stop_s=ended.cpu_at_stop_s,
        cpu_total_s=ended.cpu_total_s,
        stop_to_bundle_s=ended.stop_to_bundle_s,
        stop_to_exit_s=ended.stop_to_exit_s,
        max_rss_kib=ended.max_rss_kib,
        seen=total["seen"],
        written=total["written"],
        losses=loss_kinds(total),
        lossy_families=lossy_families(losses["by_family"]),
        state_changes=state_changes,
        expected_state_changes=result.done * STATE_CHANGES_PER_CYCLE if tcp else None,
    )


def tcpstates_attached(pid: int) -> bool:
    """True once `bpftool perf list` shows a tracepoint program held by pid."""
    result = subprocess.run(["bpftool", "perf", "list", "-j"], capture_output=True, text=True)
    if result.returncode != 0 or not result.stdout.strip():
        return False
    return any(entry.get("pid") == pid for entry in json.loads(result.stdout))


def wait_tcpstates(proc: subprocess.Popen) -> None:
    if shutil.which("bpftool"):
        wait_until(lambda: tcpstates_attached(proc.pid), proc, "tcpstates")
    else:  # no way to see the attachment: give it time
        time.sleep(2)
        if proc.poll() is not None:
            raise fail(proc, "tcpstates exited early")


def run_tcpstates(ctx: Context, rep: int) -> Run:
    with started([str(TCPSTATES)], ctx.pin.tracer, stdout=subprocess.DEVNULL) as proc:
        wait_tcpstates(proc)
        at_ready = cpu_seconds(proc.pid)
        result = run_workload(ctx)
        ended = stop(proc)
    return Run(ctx.kind, TCPSTATES_CFG, rep, result.ops_per_s, result.done, cpu_at_ready_s=at_ready,
               cpu_at_stop_s=ended.cpu_at_stop_s, cpu_total_s=ended.cpu_total_s,
               stop_to_exit_s=ended.stop_to_exit_s, max_rss_kib=ended.max_rss_kib)


def run_ktrace_syscalls(ctx: Context, rep: int) -> Run:
    """ktrace forced onto the udp/dns alternative of kernels before 6.3: the send/receive syscall tracepoints."""
    return run_ktrace(ctx, rep, KTRACE_SYSCALLS, [f"--skip-hook={hook}" for hook in SOCK_LENGTH])


def run_ktrace_no_sched(ctx: Context, rep: int) -> Run:
    """ktrace with its default families less sched, whose hooks run on every context switch of the node."""
    from ktrace import probes

    families = ",".join(f.name for f in probes.FAMILIES if f.default and f.name != "sched")
    return run_ktrace(ctx, rep, KTRACE_NO_SCHED, [f"--probes={families}"])


Runner = Callable[[Context, int], Run]


def configs(kind: str) -> dict[str, Runner]:
    found: dict[str, Runner] = {ALONE: run_alone, KTRACE: run_ktrace}
    if kind == "udp":
        # tcpstates traces no UDP; the comparison that matters is ktrace's own fallback
        found[KTRACE_SYSCALLS] = run_ktrace_syscalls
        return found
    # the TCP churn switches contexts on every round trip: what sched's hooks cost shows here
    found[KTRACE_NO_SCHED] = run_ktrace_no_sched
    if TCPSTATES.exists():
        found[TCPSTATES_CFG] = run_tcpstates
    else:
        print(f"note: {TCPSTATES} not found (make bench installs libbpf-tools), skipping the tcpstates config",
              file=sys.stderr)
    return found


def rotated(items: Sequence, rep: int) -> list:
    k = rep % len(items)
    return [*items[k:], *items[:k]]


def progress(run: Run, label: str) -> str:
    line = f"    {label:<15} {run.ops_per_s:>10.0f} ops/s"
    if run.seen is not None:
        line += f"  seen {run.seen}  written {run.written}  lost {run.lost}"
    if run.state_changes is not None:
        line += f"  state changes {run.state_changes}/{run.expected_state_changes}"
    return line


def bench_kind(ctx: Context, reps: int) -> list[Run]:
    runners = configs(ctx.kind)
    names = list(runners)
    runs: list[Run] = []
    for rep in range(-1, reps):  # -1: warm-up, discarded
        order = names if rep < 0 else rotated(names, rep)
        label = "warm-up" if rep < 0 else f"rep {rep + 1}/{reps}"
        print(f"[{ctx.kind}] {label}: {', '.join(order)}", file=sys.stderr, flush=True)
        for name in order:
            run = runners[name](ctx, rep)
            print(progress(run, name), file=sys.stderr, flush=True)
            runs.append(run)
    return runs


def bench_paced(ctx: Context, reps: int, rates: Sequence[float]) -> list[Run]:
    """rates in events/s; each rep runs every rate once, in an order rotated each rep."""
    runs: list[Run] = []
    for rep in range(reps):
        order = rotated(list(rates), rep)
        print(f"[paced] rep {rep + 1}/{reps}: {', '.join(fmt_rate(r) for r in order)} events/s", file=sys.stderr,
              flush=True)
        for rate in order:
            run = run_ktrace(ctx, rep, PACED, rate=rate / STATE_CHANGES_PER_CYCLE)
            label = f"{fmt_rate(rate)} events/s"
            print(progress(run, label) + f" (reached {fmt_rate(run.events_per_s)} events/s)", file=sys.stderr,
                  flush=True)
            runs.append(run)
    return runs


# --- report ------------------------------------------------------------------


def median(values: Iterable[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def per_rep_ratios(runs: list[Run], numerator: str, denominator: str) -> list[float]:
    by_rep: dict[int, dict[str, float]] = {}
    for r in runs:
        if r.rep >= 0:
            by_rep.setdefault(r.rep, {})[r.config] = r.ops_per_s
    return [ops[numerator] / ops[denominator] for ops in by_rep.values() if numerator in ops and denominator in ops]


def ratio_of(run: Run, runs: list[Run]) -> Optional[float]:
    """run's speed over the workload alone in the same rep."""
    alone = [r.ops_per_s for r in runs if r.rep == run.rep and r.config == ALONE]
    return run.ops_per_s / alone[0] if alone else None


def fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def pct_floor(fraction: float) -> str:
    """0.989997 → '98.9%': rounded down, so that a fraction short of a threshold never prints as reaching it."""
    return f"{math.floor(fraction * 1000) / 10:.1f}%"


def fmt_rate(events_per_s: float) -> str:
    """50000 → 50k, 1200000 → 1.2M."""
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if events_per_s >= scale:
            return f"{events_per_s / scale:.3g}{unit}"
    return f"{events_per_s:.0f}"


def parse_rates(text: str) -> list[float]:
    """'50k,200k,1.5M' → [50000.0, 200000.0, 1500000.0], sorted, each > 0."""
    rates = []
    for item in text.split(","):
        item = item.strip()
        scale = {"k": 1e3, "m": 1e6}.get(item[-1:].lower(), 1.0)
        number = item[:-1] if scale != 1.0 else item
        try:
            rate = float(number) * scale
        except ValueError:
            raise ValueError(f"not a rate: {item!r}") from None
        if rate <= 0:
            raise ValueError(f"not a positive rate: {item!r}")
        rates.append(rate)
    return sorted(set(rates))


def spread(values: Sequence[float], spec: str) -> str:
    return f"{format(statistics.median(values), spec)} ({format(min(values), spec)}–{format(max(values), spec)})"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def mib(kib: Optional[float]) -> str:
    return fmt(None if kib is None else kib / 1024, ".0f")


def throughput_table(runs: list[Run]) -> str:
    rows = []
    for config in dict.fromkeys(r.config for r in runs):
        mine = [r for r in runs if r.config == config and r.rep >= 0]
        ratios = per_rep_ratios(runs, config, ALONE)
        rows.append([
            config,
            spread([r.ops_per_s for r in mine], ".0f"),
            spread(ratios, ".3f") if ratios else "-",
            fmt(median(r.cpu_total_s for r in mine), ".2f"),
            mib(median(r.max_rss_kib for r in mine)),
        ])
    return table(["config", "ops/s median (min–max)", "ratio vs alone", "tracer CPU s/run", "peak RSS MiB"], rows)


def kinds_of(runs: Sequence[Run]) -> list[str]:
    return list(dict.fromkeys(kind for r in runs for kind in r.losses))


def state_cell(run: Run) -> str:
    if run.state_changes is None:
        return "-"
    counts = f"{run.state_changes}/{run.expected_state_changes}"
    return counts if run.state_fraction is None else f"{counts} ({pct_floor(run.state_fraction)})"


def lossy_cell(run: Run) -> str:
    """Which families the non-zero loss kinds came from: 'sched filtered 129; tcp_state ringbuf_full 7'."""
    return "; ".join(f"{family} " + ", ".join(f"{k} {v}" for k, v in kinds.items())
                     for family, kinds in run.lossy_families.items()) or "-"


def losses_table(runs: Sequence[Run], first: Callable[[Run], str], first_header: str) -> str:
    kinds = kinds_of(runs)
    rows = [[str(r.rep + 1), r.config, first(r), str(r.seen), str(r.written), *(str(r.losses.get(k, 0)) for k in kinds),
             state_cell(r), lossy_cell(r)] for r in runs]
    header = ["rep", "config", first_header, "seen", "written", *kinds, "state changes in events.jsonl", "losses of"]
    return table(header, rows)


def cost_table(runs: Sequence[Run]) -> str:
    rows = [
        [str(r.rep + 1), r.config, fmt(r.cpu_at_ready_s, ".2f"), fmt(r.cpu_window_s, ".2f"), fmt(r.cpu_after_s, ".2f"),
         fmt(r.us_per_event_window, ".2f"), fmt(r.us_per_event_after, ".2f"), fmt(r.stop_to_bundle_s, ".2f"),
         fmt(r.stop_to_exit_s, ".2f"), mib(r.max_rss_kib)]
        for r in runs
    ]
    header = ["rep", "config", "CPU s start", "CPU s window", "CPU s after", "µs/event window", "µs/event after",
              "SIGINT→bundle s", "SIGINT→exit s", "peak RSS MiB"]
    return table(header, rows)


COST_LEGEND = (
    "seen, written and the loss kinds: summary.json losses.total. state changes: the workload's tcp_state lines in "
    f"events.jsonl / the {STATE_CHANGES_PER_CYCLE} per cycle it made.\n"
    "CPU: ktrace utime+stime, children included. start: to attached; window: attached to SIGINT; after: SIGINT to "
    "exit (drain, decode, bundle). µs/event: that CPU / events seen. SIGINT→bundle: until bundle.tgz is in place."
)


@dataclass
class Check:
    what: str
    passed: bool
    measured: str


def acceptance(runs: list[Run], config: str = KTRACE) -> list[Check]:
    """The acceptance check of the default window on the saturating churn, over the measured runs of config."""
    mine = [r for r in runs if r.config == config and r.rep >= 0]
    if not mine:
        return []
    worst_kind = {k: max(r.losses.get(k, 0) for r in mine) for k in kinds_of(mine)}
    nonzero = {k: v for k, v in worst_kind.items() if v}
    families = {k: sorted({f for r in mine for f, kinds in r.lossy_families.items() if k in kinds}) for k in nonzero}
    fractions = [r.state_fraction for r in mine if r.state_fraction is not None]
    ratios = per_rep_ratios(runs, config, ALONE)
    checks = [Check("0 for every loss kind in every run", not nonzero,
                    "all 0" if not nonzero else ", ".join(f"{k} up to {v} ({', '.join(families[k])})"
                                                          for k, v in nonzero.items()))]
    if fractions:
        checks.append(Check(f"events.jsonl holds >= {MIN_STATE_FRACTION:.0%} of the state changes",
                            min(fractions) >= MIN_STATE_FRACTION, f"lowest {pct_floor(min(fractions))}"))
    if ratios:
        ratio = statistics.median(ratios)
        checks.append(Check(f"median speed ratio >= {MIN_SPEED_RATIO:.2f}", ratio >= MIN_SPEED_RATIO,
                            f"{ratio:.3f} over {len(ratios)} reps"))
    return checks


def report(kind: str, n: int, runs: list[Run]) -> dict[str, object]:
    names = list(dict.fromkeys(r.config for r in runs))
    measured = [r for r in runs if r.rep >= 0]
    traced = [r for r in measured if r.seen is not None]
    reps = len({r.rep for r in measured})
    print(f"\n{kind}: {n} {'cycles' if kind == 'tcp' else 'round trips'} per run, {reps} reps (medians)")
    print(throughput_table(runs))
    summary: dict[str, object] = {
        f"{name}_ratio": statistics.median(per_rep_ratios(runs, name, ALONE)) for name in names if name != ALONE
    }
    # pairs of configs compared rep by rep: (numerator, denominator, summary key, what the ratio says)
    comparisons = (
        (KTRACE, TCPSTATES_CFG, "ktrace_vs_tcpstates", "ktrace ratio / tcpstates ratio"),
        (KTRACE_SYSCALLS, KTRACE, "syscalls_vs_sock_length", "ktrace on the syscall tracepoints / on sock_*_length"),
        (KTRACE, KTRACE_NO_SCHED, "with_vs_without_sched", "ktrace with sched / without sched"),
    )
    for numerator, denominator, key, label in comparisons:
        if numerator not in names or denominator not in names:
            continue
        vs = per_rep_ratios(runs, numerator, denominator)
        summary[key] = statistics.median(vs)
        print(f"{label} (per rep, median): {spread(vs, '.3f')}")

    if traced:
        print(f"\n{kind}: every ktrace run (--duration={KTRACE_WINDOW}, ended by SIGINT)")
        print(losses_table(traced, lambda r: fmt(ratio_of(r, runs), ".3f"), "ratio"))
        print()
        print(cost_table(traced))
        print(COST_LEGEND)
        for name in dict.fromkeys(r.config for r in traced):
            mine = [r for r in traced if r.config == name]
            summary[name] = {
                "lost_max": max(r.lost for r in mine),
                "state_fraction_min": min((r.state_fraction for r in mine if r.state_fraction is not None),
                                          default=None),
                "us_per_event_window": median(r.us_per_event_window for r in mine),
                "us_per_event_after": median(r.us_per_event_after for r in mine),
                "stop_to_bundle_s": median(r.stop_to_bundle_s for r in mine),
                "max_rss_kib": max(r.max_rss_kib or 0 for r in mine),
            }
    if kind == "tcp":
        checks = acceptance(runs)
        if checks:
            print(f"\nacceptance, ktrace --duration={KTRACE_WINDOW} on the churn "
                  f"({n} cycles, {reps} interleaved reps):")
            for check in checks:
                print(f"  {'PASS' if check.passed else 'FAIL'}  {check.what}: {check.measured}")
            summary["acceptance"] = [asdict(c) for c in checks]
    return summary


def highest_lossless(runs: Sequence[Run], ignore: Collection[str] = ()) -> Optional[float]:
    """The highest offered rate (events/s) whose every run reached it and lost nothing (of the kinds not
    ignored); None if there is none."""
    by_rate: dict[float, list[Run]] = {}
    for r in runs:
        if r.offered_events_per_s is not None:
            by_rate.setdefault(r.offered_events_per_s, []).append(r)
    good = [rate for rate, mine in by_rate.items()
            if all(r.lossless(ignore) and r.events_per_s >= REACHED * rate for r in mine)]
    return max(good, default=None)


def verdict(runs: Sequence[Run], ignore: Collection[str]) -> str:
    """'0 lost', or how many runs lost (or missed state changes) and the most one lost."""
    failed = sum(not r.lossless(ignore) for r in runs)
    if not failed:
        return "0 lost"
    worst = max(r.lost_except(ignore) for r in runs)
    return f"{failed} of {len(runs)} runs " + (f"lost, up to {worst}" if worst else "short of state changes")


def report_paced(n: int, runs: list[Run]) -> dict[str, object]:
    rates = sorted({r.offered_events_per_s for r in runs if r.offered_events_per_s is not None})
    print(f"\npaced: {n} cycles ({n * STATE_CHANGES_PER_CYCLE} state changes) per run under ktrace "
          f"--duration={KTRACE_WINDOW}, ended by SIGINT")
    ordered = sorted(runs, key=lambda r: (r.offered_ops_per_s or 0, r.rep))
    print(losses_table(ordered, lambda r: f"{fmt_rate(r.offered_events_per_s or 0)}→{fmt_rate(r.events_per_s)}",
                       "events/s offered→reached"))
    print()
    print(cost_table(ordered))
    print(COST_LEGEND)
    per_rate = {}
    print()
    for rate in rates:
        mine = [r for r in runs if r.offered_events_per_s == rate]
        reached = min(r.events_per_s for r in mine)
        notes = [f"reached {fmt_rate(reached)}/s" + ("" if reached >= REACHED * rate else " (not the offered rate)"),
                 f"every loss kind: {verdict(mine, ())}",
                 f"less {', '.join(NOT_RECORDED)}: {verdict(mine, NOT_RECORDED)}"]
        print(f"  {fmt_rate(rate):>5} events/s offered, {len(mine)} runs: {'; '.join(notes)}")
        per_rate[fmt_rate(rate)] = {"reached_min": reached, "lost_max": max(r.lost for r in mine),
                                    "lossless": all(r.lossless() for r in mine),
                                    "lossless_less_not_recorded": all(r.lossless(NOT_RECORDED) for r in mine)}
    best = highest_lossless(runs)
    best_recorded = highest_lossless(runs, NOT_RECORDED)
    tested = ", ".join(fmt_rate(r) for r in rates)
    print(f"highest offered rate reached with zero loss (of {tested} events/s):")
    print(f"  every loss kind 0: {'none' if best is None else fmt_rate(best) + ' events/s'}")
    print(f"  every loss kind but {', '.join(NOT_RECORDED)} 0: "
          f"{'none' if best_recorded is None else fmt_rate(best_recorded) + ' events/s'}")
    return {"per_rate": per_rate, "highest_lossless_events_per_s": best,
            "highest_lossless_less_not_recorded_events_per_s": best_recorded}


# --- main --------------------------------------------------------------------


def pinning() -> Pinning:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return Pinning(None, None)
    return Pinning(workload=cpus[0], tracer=cpus[1])


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("tcp", "udp", "both", "paced"), default="tcp",
                        help="workload, or the paced TCP churn under ktrace (default tcp)")
    parser.add_argument("--n", type=int, default=30000,
                        help="workload cycles (tcp, paced) or round trips (udp) per run (default 30000)")
    parser.add_argument("--reps", type=int, default=3, help="measured reps (after a warm-up, unpaced) (default 3)")
    parser.add_argument("--rates", default=DEFAULT_RATES,
                        help=f"paced: offered TCP state changes per second, k and M allowed (default {DEFAULT_RATES})")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every run and the medians here")
    args = parser.parse_args(argv)
    if args.n <= 0 or args.reps <= 0:
        parser.error("--n and --reps must be positive")
    try:
        args.rates = parse_rates(args.rates)
    except ValueError as exc:
        parser.error(f"--rates: {exc}")
    return args


def _raise_exit(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (ktrace loads BPF programs)", file=sys.stderr)
        return 5
    signal.signal(signal.SIGTERM, _raise_exit)  # so cleanup runs on SIGTERM too
    pin = pinning()
    if pin.tracer is not None:
        os.sched_setaffinity(0, {pin.tracer})  # keep this script off the workload's CPU
    wl = workload_command()
    print(
        f"kernel {platform.release()}, {os.cpu_count()} CPUs, workload on CPU {pin.workload}, "
        f"tracers on CPU {pin.tracer}, workload: {' '.join(wl)}, ktrace: {REPO / 'ktrace'}"
    )

    results: dict[str, object] = {"args": {k: str(v) for k, v in vars(args).items()}, "kernel": platform.release()}
    tmp = Path(tempfile.mkdtemp(prefix="ktrace-bench-"))
    try:
        if args.mode == "paced":
            runs = bench_paced(Context("tcp", args.n, wl, pin, tmp), args.reps, args.rates)
            results["paced"] = {"summary": report_paced(args.n, runs), "runs": [r.as_json() for r in runs]}
        for kind in {"both": ["tcp", "udp"], "paced": []}.get(args.mode, [args.mode]):
            runs = bench_kind(Context(kind, args.n, wl, pin, tmp), args.reps)
            results[kind] = {"summary": report(kind, args.n, runs), "runs": [r.as_json() for r in runs]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
