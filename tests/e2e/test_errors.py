"""Bad input and hostile conditions: one line on stderr, a documented exit status, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ktrace.errors import ExitStatus
from tests.helpers import Ktrace, Server, closed_port, read_bundle, start_client


def ktrace(*args: str, prefix: tuple[str, ...] = (), env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "ktrace", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def assert_one_line_error(result: subprocess.CompletedProcess, status: ExitStatus) -> None:
    assert result.returncode == status, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("ktrace: error: ")
    assert "Traceback" not in result.stderr


def test_without_bpf_capabilities_it_says_so(tmp_path):
    result = ktrace("--duration=1s", f"--out-dir={tmp_path}",
                    prefix=("setpriv", "--bounding-set=-sys_admin,-bpf,-perfmon", "--"))
    assert_one_line_error(result, ExitStatus.NOT_PRIVILEGED)
    assert "CAP_BPF" in result.stderr
    assert not list(tmp_path.iterdir())


def tmpfs(target: Path, options: str):
    """A small tmpfs the test mounts and unmounts: a read-only or a full disk."""
    target.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", options, "ktrace-test", str(target)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


@pytest.fixture
def read_only_dir(tmp_path: Path):
    yield from tmpfs(tmp_path / "ro", "ro,size=1m")


def test_unwritable_out_dir_fails_before_probing(read_only_dir):
    result = ktrace("--duration=1s", f"--out-dir={read_only_dir / 'out'}")
    assert_one_line_error(result, ExitStatus.OUTPUT)
    assert "--out-dir" in result.stderr


def test_out_dir_that_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    result = ktrace("--duration=1s", f"--out-dir={tmp_path / 'file'}")
    assert_one_line_error(result, ExitStatus.OUTPUT)


@pytest.fixture
def full_disk(tmp_path: Path):
    yield from tmpfs(tmp_path / "full", "size=1m")


def test_missing_libbpf(tmp_path):
    result = ktrace("--duration=1s", f"--out-dir={tmp_path}", env={"KTRACE_LIBBPF": "/nonexistent/libbpf.so.1"})
    assert_one_line_error(result, ExitStatus.NO_LIBBPF)
    assert "libbpf" in result.stderr


@pytest.mark.parametrize("args", [["--duration=abc"], ["--ports=70000"], ["--ports=80,x"], ["--sample=0"],
                                  ["--max-bytes=lots"], ["--probes=nope"], ["--ring-size=1000"], ["--bogus"]])
def test_bad_flags_are_usage_errors(args, tmp_path):
    result = ktrace(*args, f"--out-dir={tmp_path}")
    assert_one_line_error(result, ExitStatus.USAGE)


def _busy_run_on_a_full_disk(tmp_path: Path, full_disk: Path, *args: str):
    server = Server(tmp_path)
    run = Ktrace(tmp_path, *args, duration="4s", out_dir=full_disk).started()
    try:
        # about 10 events of 600 bytes per connection: far more than the 1 MiB disk holds
        assert start_client(server.port, 1500, 0, 0, closed_port()).wait(timeout=120) == 0
        status = run.finish()
    finally:
        run.kill()
        server.stop()
    assert status == ExitStatus.DEGRADED, run.stderr
    assert "Traceback" not in run.stderr
    return read_bundle(full_disk)


def test_full_disk_keeps_what_fit_and_marks_the_bundle_truncated(full_disk, tmp_path):
    # a cap above what the disk holds: the spool (records during the window) or events.jsonl (after it) runs
    # into the full disk, whichever fills it first
    bundle = _busy_run_on_a_full_disk(tmp_path, full_disk, "--max-bytes=100M")
    degraded = bundle.summary["degraded"]
    if bundle.summary["files"]["events"]["truncated"]:
        assert any("truncated" in reason for reason in degraded)
    else:
        assert any(reason.startswith("records not kept") for reason in degraded), degraded
    assert len(bundle.events) == bundle.summary["files"]["events"]["lines"] > 0
    total = bundle.summary["losses"]["total"]
    assert total["disk_full"] > 0 and bundle.summary["losses"]["balanced"]
    assert "disk full" in bundle.summary["console"]["lines"][0]
    assert [cut["by"] for cut in bundle.summary["coverage"]["cuts"]] == ["disk_full"] * len(
        bundle.summary["coverage"]["cuts"])


def test_a_default_run_on_a_small_disk_keeps_within_it_and_counts_the_rest(full_disk, tmp_path):
    # the default --max-bytes is a quarter of the free space, the spool at most half: the bundle fits
    bundle = _busy_run_on_a_full_disk(tmp_path, full_disk)
    assert bundle.summary["options"]["max_bytes"] <= (1 << 20) // 4
    total = bundle.summary["losses"]["total"]
    assert total["capped"] + total["disk_full"] > 0 and bundle.summary["losses"]["balanced"]
    assert bundle.summary["coverage"]["per_event_lines"]["whole_window"] is False
