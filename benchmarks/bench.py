"""Overhead benchmark: a loopback socket workload alone, under ktrace, under tcpstates (TCP) or under ktrace on its
syscall-tracepoint fallback (UDP).

    python -m benchmarks.bench [--n 40000] [--reps 5] [--mode tcp|udp|both] [--json FILE]

Each rep runs every config once, in an order rotated each rep, after one
discarded warm-up run of each. The workload is pinned to one CPU and the
tracer to another (when there are two), so the in-kernel cost of the probes
lands on the workload's CPU and the tracer's user-space cost on its own.

Machines are noisy: throughput is only compared within a rep (the per-rep
ratio to the workload alone), and medians are reported. Nothing is asserted.

Needs root (ktrace loads BPF programs). Every process started here is ended
by its PID, and every temporary directory is removed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Callable, Optional

import psutil

HERE = Path(__file__).resolve().parent
WORKLOAD_C = HERE / "workload.c"
BUILD_DIR = HERE / "build"
TCPSTATES = Path("/usr/sbin/tcpstates")

WORKLOAD_CAP_S = 60  # the workload's own time cap (-t)
READY_TIMEOUT_S = 60  # how long a tracer may take to attach
EXIT_TIMEOUT_S = 300  # how long a tracer may take to drain and exit after SIGINT
KILL_TIMEOUT_S = 10

KTRACE_OK = (0, 3)  # success, degraded (some probe family not attached): the bundle is still whole

ALONE, KTRACE, TCPSTATES_CFG = "alone", "ktrace", "tcpstates"
KTRACE_SYSCALLS = "ktrace-syscalls"
KTRACE_NO_SCHED = "ktrace-no-sched"
SOCK_LENGTH = ("tp_btf/sock_{send,recv}_length", "tracepoint/sock/sock_{send,recv}_length")


@dataclass
class Run:
    """One run of one config."""

    kind: str  # tcp or udp
    config: str  # alone, ktrace, tcpstates
    rep: int  # -1 for the warm-up
    ops_per_s: float
    cpu_at_ready_s: Optional[float] = None  # tracer CPU (utime+stime) once attached
    cpu_at_stop_s: Optional[float] = None  # ... just before SIGINT
    cpu_total_s: Optional[float] = None  # ... at exit (wait4 rusage), drain included
    seen: Optional[int] = None  # ktrace losses.total
    written: Optional[int] = None
    ringbuf_full: Optional[int] = None

    @property
    def cpu_attached_s(self) -> Optional[float]:
        """Tracer CPU from attach to exit: the part that scales with events."""
        if self.cpu_total_s is None or self.cpu_at_ready_s is None:
            return None
        return self.cpu_total_s - self.cpu_at_ready_s


@dataclass
class Pinning:
    workload: Optional[int]
    tracer: Optional[int]


# --- processes ---------------------------------------------------------------


def _pin(cpu: Optional[int]) -> Optional[Callable[[], None]]:
    if cpu is None:
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


@contextlib.contextmanager
def started(
    argv: Sequence[str], cpu: Optional[int], stdout: int | IO[bytes] | None = None
) -> Iterator[subprocess.Popen]:
    """Start argv pinned to cpu; on the way out, make sure that PID is gone."""
    proc = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, preexec_fn=_pin(cpu))
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


def reap(proc: subprocess.Popen, timeout: float) -> float:
    """Wait for proc to exit; return its utime+stime (children it waited for included)."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return usage.ru_utime + usage.ru_stime
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.args[0]} (pid {proc.pid}) did not exit within {timeout:.0f} s")
        time.sleep(0.02)


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


def stop(proc: subprocess.Popen) -> tuple[float, float]:
    """SIGINT a tracer; return its CPU just before the signal and at exit."""
    before = cpu_seconds(proc.pid)
    proc.send_signal(signal.SIGINT)
    total = reap(proc, EXIT_TIMEOUT_S)
    return before, total


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


def run_workload(wl: list[str], kind: str, n: int, cpu: Optional[int]) -> float:
    """Run the workload to completion; return its ops/s (its last output line)."""
    argv = [*wl, kind, str(n), "-t", str(WORKLOAD_CAP_S)]
    with started(argv, cpu, stdout=subprocess.PIPE) as proc:
        out, err = proc.communicate(timeout=WORKLOAD_CAP_S + 30)
    if proc.returncode != 0:
        raise RuntimeError(f"workload failed (exit {proc.returncode}): {err.decode(errors='replace')}")
    return float(out.decode().strip().splitlines()[-1])


# --- configs -----------------------------------------------------------------


def ktrace_command() -> list[str]:
    exe = shutil.which("ktrace")
    return [exe] if exe else [sys.executable, "-m", "ktrace"]


def read_losses(out_dir: Path) -> dict[str, int]:
    summaries = list(out_dir.glob("ktrace.*.summary.json"))
    if len(summaries) != 1:
        raise RuntimeError(f"expected one summary.json in {out_dir}, found {len(summaries)}")
    return json.loads(summaries[0].read_text())["losses"]["total"]


def run_alone(kind: str, n: int, rep: int, wl: list[str], pin: Pinning, tmp: Path) -> Run:
    return Run(kind, ALONE, rep, run_workload(wl, kind, n, pin.workload))


def run_ktrace(kind: str, n: int, rep: int, wl: list[str], pin: Pinning, tmp: Path,
               config: str = KTRACE, extra: Sequence[str] = ()) -> Run:
    out_dir = Path(tempfile.mkdtemp(prefix="ktrace-out-", dir=tmp))
    ready = out_dir / "ready"
    argv = [*ktrace_command(), "--duration=600s", f"--out-dir={out_dir}", f"--ready-file={ready}", "-q", *extra]
    try:
        with started(argv, pin.tracer) as proc:
            wait_until(ready.exists, proc, "ktrace")
            at_ready = cpu_seconds(proc.pid)
            ops = run_workload(wl, kind, n, pin.workload)
            at_stop, total = stop(proc)
            if proc.returncode not in KTRACE_OK:
                raise fail(proc, "ktrace failed")
        losses = read_losses(out_dir)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    return Run(
        kind,
        config,
        rep,
        ops,
        cpu_at_ready_s=at_ready,
        cpu_at_stop_s=at_stop,
        cpu_total_s=total,
        seen=losses["seen"],
        written=losses["written"],
        ringbuf_full=losses["ringbuf_full"],
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


def run_tcpstates(kind: str, n: int, rep: int, wl: list[str], pin: Pinning, tmp: Path) -> Run:
    with started([str(TCPSTATES)], pin.tracer, stdout=subprocess.DEVNULL) as proc:
        wait_tcpstates(proc)
        at_ready = cpu_seconds(proc.pid)
        ops = run_workload(wl, kind, n, pin.workload)
        at_stop, total = stop(proc)
    return Run(kind, TCPSTATES_CFG, rep, ops, cpu_at_ready_s=at_ready, cpu_at_stop_s=at_stop, cpu_total_s=total)


def run_ktrace_syscalls(kind: str, n: int, rep: int, wl: list[str], pin: Pinning, tmp: Path) -> Run:
    """ktrace forced onto the udp/dns alternative of kernels before 6.3: the send/receive syscall tracepoints."""
    return run_ktrace(kind, n, rep, wl, pin, tmp, KTRACE_SYSCALLS, [f"--skip-hook={hook}" for hook in SOCK_LENGTH])


def run_ktrace_no_sched(kind: str, n: int, rep: int, wl: list[str], pin: Pinning, tmp: Path) -> Run:
    """ktrace with its default families less sched, whose hooks run on every context switch of the node."""
    from ktrace import probes

    families = ",".join(f.name for f in probes.FAMILIES if f.default and f.name != "sched")
    return run_ktrace(kind, n, rep, wl, pin, tmp, KTRACE_NO_SCHED, [f"--probes={families}"])


Runner = Callable[[str, int, int, list[str], Pinning, Path], Run]


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
        print(f"note: {TCPSTATES} not found, skipping the tcpstates config", file=sys.stderr)
    return found


def rotated(names: list[str], rep: int) -> list[str]:
    k = rep % len(names)
    return names[k:] + names[:k]


def bench_kind(kind: str, n: int, reps: int, wl: list[str], pin: Pinning, tmp: Path) -> list[Run]:
    runners = configs(kind)
    names = list(runners)
    runs: list[Run] = []
    for rep in range(-1, reps):  # -1: warm-up, discarded
        order = names if rep < 0 else rotated(names, rep)
        label = "warm-up" if rep < 0 else f"rep {rep + 1}/{reps}"
        print(f"[{kind}] {label}: {', '.join(order)}", file=sys.stderr, flush=True)
        for name in order:
            run = runners[name](kind, n, rep, wl, pin, tmp)
            print(f"    {name:<15} {run.ops_per_s:>10.0f} ops/s", file=sys.stderr, flush=True)
            runs.append(run)
    return runs


# --- report ------------------------------------------------------------------


def median(values: Sequence[Optional[float]]) -> Optional[float]:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def per_rep_ratios(runs: list[Run], numerator: str, denominator: str) -> list[float]:
    by_rep: dict[int, dict[str, float]] = {}
    for r in runs:
        if r.rep >= 0:
            by_rep.setdefault(r.rep, {})[r.config] = r.ops_per_s
    return [ops[numerator] / ops[denominator] for ops in by_rep.values() if numerator in ops and denominator in ops]


def fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def config_row(config: str, runs: list[Run]) -> list[str]:
    mine = [r for r in runs if r.config == config and r.rep >= 0]
    ops = [r.ops_per_s for r in mine]
    ratios = per_rep_ratios(runs, config, ALONE)
    written = median([r.written for r in mine])
    attached = median([r.cpu_attached_s for r in mine])
    us_per_event = median(
        [r.cpu_attached_s / r.written * 1e6 if r.written and r.cpu_attached_s is not None else None for r in mine]
    )
    return [
        config,
        f"{statistics.median(ops):.0f} ({min(ops):.0f}–{max(ops):.0f})",
        f"{statistics.median(ratios):.3f} ({min(ratios):.3f}–{max(ratios):.3f})",
        fmt(median([r.cpu_total_s for r in mine]), ".2f"),
        fmt(attached, ".2f"),
        fmt(written, ".0f"),
        fmt(median([r.ringbuf_full for r in mine]), ".0f"),
        fmt(us_per_event, ".2f"),
    ]


HEADER = [
    "config",
    "ops/s median (min–max)",
    "ratio vs alone",
    "CPU s/run",
    "CPU s attached",
    "events written",
    "lost (ringbuf_full)",
    "µs CPU/event",
]


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in [HEADER, *rows]) for i in range(len(HEADER))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [HEADER, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report(kind: str, n: int, runs: list[Run]) -> dict[str, object]:
    names = list(dict.fromkeys(r.config for r in runs))
    reps = len({r.rep for r in runs if r.rep >= 0})
    print(f"\n{kind}: {n} {'cycles' if kind == 'tcp' else 'round trips'} per run, {reps} reps (medians)")
    print(table([config_row(name, runs) for name in names]))
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
        print(f"{label} (per rep, median): {statistics.median(vs):.3f} ({min(vs):.3f}–{max(vs):.3f})")
    print(
        "CPU s/run: tracer utime+stime from start to exit; CPU s attached: from attach to exit "
        "(drain and bundle included); µs CPU/event = CPU attached / events written."
    )
    return summary


# --- main --------------------------------------------------------------------


def pinning() -> Pinning:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return Pinning(None, None)
    return Pinning(workload=cpus[0], tracer=cpus[1])


def parse_args(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=40000, help="workload cycles per run (default 40000)")
    parser.add_argument("--reps", type=int, default=5, help="measured reps after the warm-up (default 5)")
    parser.add_argument("--mode", choices=("tcp", "udp", "both"), default="tcp", help="workload (default tcp)")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write every run and the medians here")
    args = parser.parse_args(argv)
    if args.n <= 0 or args.reps <= 0:
        parser.error("--n and --reps must be positive")
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
    kinds = ["tcp", "udp"] if args.mode == "both" else [args.mode]
    print(
        f"kernel {platform.release()}, {os.cpu_count()} CPUs, workload on CPU {pin.workload}, "
        f"tracers on CPU {pin.tracer}, workload: {' '.join(wl)}"
    )

    results: dict[str, object] = {"args": {k: str(v) for k, v in vars(args).items()}, "kernel": platform.release()}
    tmp = Path(tempfile.mkdtemp(prefix="ktrace-bench-"))
    try:
        for kind in kinds:
            runs = bench_kind(kind, args.n, args.reps, wl, pin, tmp)
            results[kind] = {
                "summary": report(kind, args.n, runs),
                "runs": [asdict(r) | {"cpu_attached_s": r.cpu_attached_s} for r in runs],
            }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
