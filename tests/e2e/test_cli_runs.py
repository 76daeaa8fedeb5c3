"""Runs as scripts and SREs make them: two at once into one directory, signals at any moment, -q in a pipeline."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from ktrace.errors import ExitStatus
from ktrace.schemas import validate_bundle
from tests.helpers import Ktrace, Server, closed_port, start_client

KINDS = ("events.jsonl", "summary.json", "node.json", "bundle.tgz")


def bundles_in(out_dir: Path) -> dict[str, dict[str, Path]]:
    """{prefix: {kind: path}} of every bundle in out_dir (names are ktrace.<node>.<start>-<pid>.<kind>)."""
    found: dict[str, dict[str, Path]] = {}
    for path in out_dir.iterdir():
        for kind in KINDS:
            if path.name.endswith(f".{kind}"):
                found.setdefault(path.name[: -len(kind) - 1], {})[kind] = path
    return found


def assert_valid_bundle(paths: dict[str, Path]) -> dict:
    """Every file there, valid against its schema, and the summary's hashes those of these very files."""
    assert set(paths) == set(KINDS), paths
    summary = orjson.loads(paths["summary.json"].read_bytes())
    for kind, entry in (("events.jsonl", "events"), ("node.json", "node")):
        assert summary["files"][entry]["name"] == paths[kind].name
        assert summary["files"][entry]["sha256"] == hashlib.sha256(paths[kind].read_bytes()).hexdigest(), kind
    assert validate_bundle({k: v for k, v in paths.items() if k != "bundle.tgz"}) == []
    assert validate_bundle(paths["bundle.tgz"]) == []
    return summary


def test_two_concurrent_runs_into_one_directory_both_leave_valid_bundles(tmp_path):
    out = tmp_path / "out"
    server = Server(tmp_path)
    runs = []
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        runs.append(Ktrace(tmp_path / name, duration="4s", out_dir=out))  # started together: the same second
    try:
        for run in runs:
            run.started()
        assert start_client(server.port, 20, 0, 0, closed_port()).wait(timeout=60) == 0
        statuses = [run.finish() for run in runs]
    finally:
        for run in runs:
            run.kill()
        server.stop()
    for run, status in zip(runs, statuses):
        assert status in (ExitStatus.SUCCESS, ExitStatus.DEGRADED), run.stderr
        assert "Traceback" not in run.stderr
    bundles = bundles_in(out)
    assert len(bundles) == 2, sorted(p.name for p in out.iterdir())
    assert sorted(run.stdout.strip() for run in runs) == sorted(str(b["bundle.tgz"]) for b in bundles.values())
    for prefix, paths in bundles.items():
        assert_valid_bundle(paths)
        assert prefix.endswith(f"-{_pid_of(runs, paths)}")
        # each run saw the client's 20 connections: neither wrote into the other's file
        events = [orjson.loads(line) for line in paths["events.jsonl"].read_bytes().splitlines()]
        assert sum(1 for e in events if e["type"] == "tcp_state" and e["comm"] == "kt-client"
                   and e["new_state"] == "SYN_SENT" and e["dport"] == server.port) == 20
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp") or p.name.startswith(".")]


def _pid_of(runs: list[Ktrace], paths: dict[str, Path]) -> int:
    """The pid of the run that printed this bundle's path."""
    (pid,) = [run.proc.pid for run in runs if run.stdout.strip() == str(paths["bundle.tgz"])]
    return pid


def _block_signals() -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})


def _run_and_signal(tmp_path: Path, signum: int, after: float,
                    held_until_ktrace_runs: bool) -> tuple[subprocess.CompletedProcess, Path]:
    """ktrace, signalled `after` seconds after its start. held_until_ktrace_runs: started with the signals blocked,
    so one sent during the interpreter's own start-up (before ktrace's first line) waits for ktrace to unblock it,
    instead of meeting Python's default handling."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "ktrace", "--duration=30s", f"--out-dir={out}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=_block_signals if held_until_ktrace_runs else None)
    try:
        time.sleep(after)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), out


def assert_signal_outcome(result: subprocess.CompletedProcess, out: Path, signum: int) -> str:
    """One of the three documented outcomes; returns which."""
    name = signal.Signals(signum).name
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr
    if result.returncode in (ExitStatus.SUCCESS, ExitStatus.DEGRADED):
        (paths,) = bundles_in(out).values()
        summary = assert_valid_bundle(paths)
        assert summary["window"]["ended_by"] == name
        assert result.stdout == f"{paths['bundle.tgz']}\n"
        return "bundle"
    status = {signal.SIGINT: ExitStatus.INTERRUPTED, signal.SIGTERM: ExitStatus.TERMINATED}[signum]
    if result.returncode == status:  # before the snapshot began: while Python imported ktrace or parsed flags
        assert result.stderr == f"ktrace: interrupted by {name} before the window started; nothing was recorded\n"
        assert result.stdout == ""
        assert not out.exists() or not bundles_in(out)
        return "interrupted"
    raise AssertionError(f"undocumented exit status {result.returncode}: {result.stderr}")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("after", [0, 0.05, 0.2, 0.5, 1.0])
def test_a_signal_at_any_moment_from_ktraces_first_line_ends_it_without_a_traceback(tmp_path, signum, after):
    result, out = _run_and_signal(tmp_path, signum, after, held_until_ktrace_runs=True)
    assert_signal_outcome(result, out, signum)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("after", [0.5, 1.0])
def test_a_signal_in_the_first_second_from_a_shell_ends_ktrace_without_a_traceback(tmp_path, signum, after):
    result, out = _run_and_signal(tmp_path, signum, after, held_until_ktrace_runs=False)
    assert_signal_outcome(result, out, signum)


def _has_bpf_programs(pid: int) -> bool:
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") == "anon_inode:bpf-prog":
                return True
        except OSError:
            pass
    return False


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_the_probes_load_still_writes_a_complete_bundle(tmp_path, signum):
    run = Ktrace(tmp_path, duration="30s")
    try:
        for _ in range(20000):  # bounded: until the first BPF program is loaded
            if run.proc.poll() is not None or _has_bpf_programs(run.proc.pid):
                break
            time.sleep(0.001)
        assert not run.ready.exists(), "the probes were all attached already: not a signal during load"
        run.signal(signum)
        status = run.finish()
    finally:
        run.kill()
    result = subprocess.CompletedProcess(run.cmd, status, run.stdout, run.stderr)
    assert assert_signal_outcome(result, run.out_dir, signum) == "bundle"


def test_quiet_prints_exactly_the_bundle_path_on_stdout(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "ktrace", "-q", "--duration=1s", f"--out-dir={out}"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode in (ExitStatus.SUCCESS, ExitStatus.DEGRADED), result.stderr
    (paths,) = bundles_in(out).values()
    assert result.stdout == f"{paths['bundle.tgz']}\n"
    assert_valid_bundle(paths)
    assert "lines written" not in result.stderr  # -q: no status line


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_while_doctor_loads_probes_ends_it_with_one_line(tmp_path, signum):
    proc = subprocess.Popen([sys.executable, "-m", "ktrace", "doctor"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(20000):  # bounded: until the first BPF program is loaded
            if proc.poll() is not None or _has_bpf_programs(proc.pid):
                break
            time.sleep(0.001)
        assert proc.poll() is None, "doctor finished before it loaded a program"
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    name = signal.Signals(signum).name
    status = {signal.SIGINT: ExitStatus.INTERRUPTED, signal.SIGTERM: ExitStatus.TERMINATED}[signum]
    assert (proc.returncode, stderr, stdout) == (status, f"ktrace: interrupted by {name} while examining the probes\n",
                                                 "")


def test_stream_writes_the_events_to_stdout_as_they_come_and_the_same_lines_to_the_bundle(tmp_path):
    out = tmp_path / "out"
    server = Server(tmp_path)
    run = Ktrace(tmp_path, "--stream", duration="120s", out_dir=out).started()
    try:
        assert start_client(server.port, 20, 2, 0, closed_port()).wait(timeout=120) == 0
        run.signal(signal.SIGINT)
        status = run.finish(timeout=120)
    finally:
        run.kill()
        server.stop()
    assert status in (ExitStatus.SUCCESS, ExitStatus.DEGRADED), run.stderr
    (paths,) = bundles_in(out).values()
    summary = assert_valid_bundle(paths)
    assert summary["options"]["stream"] is True
    assert run.stdout.encode() == paths["events.jsonl"].read_bytes()  # stdout holds the events and nothing else
    assert [orjson.loads(line)["type"] for line in run.stdout.splitlines()].count("connect") >= 22
    assert str(paths["bundle.tgz"]) in run.stderr


def test_stream_into_head_prints_three_lines_and_ends_cleanly(tmp_path):
    out = tmp_path / "out"
    server = Server(tmp_path)
    client = start_client(server.port, 2000, 0, 0, closed_port())  # events for head to read from the first moment
    try:
        result = subprocess.run(f"{sys.executable} -m ktrace --stream --duration=5s --out-dir={out} | head -3",
                                shell=True, capture_output=True, text=True, timeout=120)
    finally:
        client.kill()
        client.wait()
        server.stop()
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    assert all(orjson.loads(line)["type"] for line in lines)
    assert "Traceback" not in result.stderr and "Error" not in result.stderr, result.stderr
    (paths,) = bundles_in(out).values()
    summary = assert_valid_bundle(paths)
    assert summary["window"]["ended_by"] in ("stdout closed", "duration")
