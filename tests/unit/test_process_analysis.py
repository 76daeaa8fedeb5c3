"""ktrace.analyze.process: OOM victims, fork storms and crash loops, replayed from the recorded golden events
(tests/fixtures/record_process.py) with their pids and times moved; and the small pieces around them."""

from __future__ import annotations

import copy
import os

import pytest

from ktrace.analyze.process import CRASH_LOOP_FAILURES, FORK_STORM_FORKS, OomAnalysis, ProcessAnalysis
from ktrace.analyze.summary import Summary
from ktrace.enrich.cgroup import CgroupPaths, annotate_oom
from ktrace.events.decode import exec_args, exit_status
from tests.unit.conftest import load_record

FORK = load_record("fork_tp_btf")["expected"]
EXEC = load_record("exec_tp_btf")["expected"]
EXIT_3 = load_record("exit_status_tp_btf")["expected"]
EXIT_KILLED = load_record("exit_signal_tp_btf")["expected"]
OOM = load_record("oom_kill_tp_btf")["expected"]
MS = 1_000_000


def _at(event: dict, ts_ns: int, **changes) -> dict:
    moved = copy.deepcopy(event)
    moved.update(ts_ns=ts_ns, **changes)
    return moved


def _forks(parent: int, n: int, every_ns: int, start_ns: int = 10**12, first_child: int = 100_000) -> list[dict]:
    return [_at(FORK, start_ns + i * every_ns, pid=parent, tid=parent, child_pid=first_child + i) for i in range(n)]


def _replay(events: list[dict]) -> ProcessAnalysis:
    analysis = ProcessAnalysis()
    for number, event in enumerate(events, 1):
        analysis.add(event, number)
    return analysis


def _rules(analysis, rule: str) -> list[dict]:
    return [f for f in analysis.findings() if f["rule"] == rule]


def test_recorded_events_are_what_the_tests_assume():
    assert FORK["comm"] == "kt-forker" and EXEC["filename"] == "/bin/sh" and EXEC["pid"] == FORK["child_pid"]
    assert EXIT_3["pid"] == EXEC["pid"] and EXIT_3["exit_status"] == 3
    assert EXIT_KILLED["signal"] == "SIGKILL" and OOM["pid"] == EXIT_KILLED["pid"] and OOM["comm"] == "kt-hog"


# --- fork_storm ---


def test_a_parent_forking_200_times_within_2_s_is_a_fork_storm_naming_it():
    analysis = _replay(_forks(4242, FORK_STORM_FORKS, 5 * MS))
    [storm] = _rules(analysis, "fork_storm")
    assert storm["subject"] == {"pid": 4242, "comm": "kt-forker", "scope": "parent", "forks": 200,
                                "max_in_window": 200, "window_s": 2.0, "rate_per_s": 201.0}
    assert storm["severity"] == "warning" and "kt-forker (4242)" in storm["title"]
    assert storm["evidence"]["count"] == 200 and storm["evidence"]["lines"] == [1, 2, 3, 4, 5]


def test_199_forks_within_2_s_are_not_a_storm():
    assert _rules(_replay(_forks(4242, FORK_STORM_FORKS - 1, 5 * MS)), "fork_storm") == []


def test_the_same_forks_spread_over_a_longer_time_are_not_a_storm():
    analysis = _replay(_forks(4242, 400, 20 * MS))  # 50/s for 8 s: at most 100 in any 2 s
    assert _rules(analysis, "fork_storm") == []
    assert analysis.summary()["top_forking_parents"][0]["max_in_window"] == 100


def test_a_process_tree_forking_together_is_a_storm_of_its_oldest_ancestor():
    events = _forks(10, 10, MS, first_child=1000)  # the root starts 10 children ...
    for i in range(10):  # ... which start 25 each, none of them 200 alone
        events += _forks(1000 + i, 25, MS, start_ns=10**12 + 20 * MS + i * 25 * MS, first_child=5000 + 100 * i)
    analysis = _replay(events)
    [storm] = _rules(analysis, "fork_storm")
    assert storm["subject"]["pid"] == 10 and storm["subject"]["scope"] == "tree"
    assert storm["subject"]["forks"] == 250 and "descendants" in storm["title"]


# --- crash_loop ---


def _runs(n: int, end: dict, first_pid: int = 7000) -> list[dict]:
    events = []
    for i in range(n):
        pid = first_pid + i
        events += [_at(EXEC, 10**12 + i * 10 * MS, pid=pid, tid=pid),
                   _at(end, 10**12 + i * 10 * MS + MS, pid=pid, tid=pid)]
    return events


def test_an_executable_failing_5_times_is_a_crash_loop():
    analysis = _replay(_runs(CRASH_LOOP_FAILURES, EXIT_3))
    [crash] = _rules(analysis, "crash_loop")
    assert crash["subject"] == {"filename": "/bin/sh", "comm": "sh", "failures": 5, "execs": 5,
                                "reasons": {"exit 3": 5}}
    assert crash["evidence"]["lines"] == [2, 4, 6, 8, 10]


def test_failures_that_are_all_exit_1_are_only_info():
    [crash] = _rules(_replay(_runs(CRASH_LOOP_FAILURES, {**EXIT_3, "exit_code": 1 << 8, "exit_status": 1})),
                     "crash_loop")
    assert crash["subject"]["reasons"] == {"exit 1": 5} and crash["severity"] == "info"
    [crash] = _rules(_replay(_runs(CRASH_LOOP_FAILURES, EXIT_3)), "crash_loop")
    assert crash["severity"] == "warning"


def test_killed_runs_count_as_failures_with_the_signal_as_reason():
    events = _runs(3, EXIT_3) + _runs(2, EXIT_KILLED, first_pid=8000)
    [crash] = _rules(_replay(events), "crash_loop")
    assert crash["subject"]["reasons"] == {"exit 3": 3, "SIGKILL": 2}


def test_four_failures_or_clean_exits_are_not_a_crash_loop():
    assert _rules(_replay(_runs(CRASH_LOOP_FAILURES - 1, EXIT_3)), "crash_loop") == []
    clean = dict(EXIT_3, exit_code=0, exit_status=0)
    assert _rules(_replay(_runs(10, clean)), "crash_loop") == []


def test_failures_of_processes_not_started_in_the_window_are_not_a_crash_loop():
    exits = [_at(EXIT_3, 10**12 + i, pid=9000 + i) for i in range(10)]
    analysis = _replay(exits)
    assert _rules(analysis, "crash_loop") == []
    # but they are in the table of failed exits
    assert analysis.summary()["nonzero_exits_by_comm"] == [
        {"comm": "sh", "exits": 10, "failed": 10, "reasons": {"exit 3": 10}}]


def test_summary_counts_and_tops():
    analysis = _replay(_forks(4242, 3, MS) + _runs(2, EXIT_3))
    summary = analysis.summary({"threads_created": 7})
    assert (summary["execs"], summary["forks"], summary["exits"], summary["threads_created"]) == (2, 3, 2, 7)
    assert summary["top_forking_parents"] == [
        {"pid": 4242, "comm": "kt-forker", "forks": 3, "max_in_window": 3, "window_s": 2.0}]
    assert summary["top_executables"] == [{"filename": "/bin/sh", "execs": 2}]
    assert analysis.summary()["threads_created"] is None  # offline: the kernel's count is not in events.jsonl


# --- oom_kill ---


def test_an_oom_kill_is_a_critical_finding_naming_the_victim_and_its_cgroup():
    event = dict(OOM, memcg_path="/kt-oom-1", cgroup_path="/")
    analysis = OomAnalysis()
    analysis.add(event, 12)
    [finding] = analysis.findings()
    assert finding["rule"] == "oom_kill" and finding["severity"] == "critical"
    assert finding["subject"] == {"pid": OOM["pid"], "comm": "kt-hog", "memcg_path": "/kt-oom-1",
                                  "memcg_id": OOM["memcg_id"], "cgroup_path": "/", "trigger_pid": OOM["pid"],
                                  "trigger_comm": "kt-hog", "processes": 1,
                                  "pids": [{"pid": OOM["pid"], "count": 1}], "pids_omitted": 0}
    assert "kt-hog" in finding["title"] and "/kt-oom-1" in finding["title"]
    assert "while" not in finding["title"]  # the victim was the one allocating
    assert finding["evidence"]["lines"] == [12]
    [victim] = analysis.summary()["victims"]
    assert victim["anon_rss_kb"] == OOM["anon_rss_kb"] and victim["line"] == 12


def test_an_oom_victim_other_than_the_allocating_task_names_both():
    analysis = OomAnalysis()
    analysis.add(dict(OOM, trigger_pid=1, trigger_comm="kt-alloc"), None)
    assert "while kt-alloc (1) was allocating" in analysis.findings()[0]["title"]


def test_the_summary_has_oom_and_processes_sections_and_their_findings():
    summary = Summary()
    for number, event in enumerate([FORK, EXEC, EXIT_3, OOM, EXIT_KILLED], 1):
        summary.add(event, number)
    doc = summary.build(meta={}, losses={}, probes=[], files={}, warnings=[], process_counts={"threads_created": 0})
    assert doc["oom"]["kills"] == 1 and doc["processes"]["forks"] == 1
    assert [f["rule"] for f in doc["findings"]] == ["oom_kill"]


# --- decoding helpers ---


@pytest.mark.parametrize(("code", "expected"), [
    (3 << 8, {"exit_code": 768, "exit_status": 3, "signal": None, "core_dump": False}),
    (0, {"exit_code": 0, "exit_status": 0, "signal": None, "core_dump": False}),
    (9, {"exit_code": 9, "exit_status": None, "signal": "SIGKILL", "core_dump": False}),
    (0x80 | 11, {"exit_code": 139, "exit_status": None, "signal": "SIGSEGV", "core_dump": True}),
    (100, {"exit_code": 100, "exit_status": None, "signal": "100", "core_dump": False}),
])
def test_exit_status_splits_the_wait_status(code, expected):
    assert exit_status(code) == expected


def test_exec_args_turns_the_nuls_between_arguments_into_spaces():
    assert exec_args(b"sh\0-c\0exit 3\0") == "sh -c exit 3"
    assert exec_args(b"cut-in-the-mid") == "cut-in-the-mid"


def test_exec_without_with_args_has_no_args_field():
    assert "args" not in load_record("exec_tracepoint")["expected"]
    assert EXEC["args"] == "sh -c exit 3"


# --- cgroup paths ---


def test_cgroup_paths_are_found_by_inode_below_the_hierarchy_root(tmp_path):
    (tmp_path / "kubepods" / "pod1" / "c1").mkdir(parents=True)
    paths = CgroupPaths({"memory": tmp_path, "unified": None})
    assert paths.path("memory", os.stat(tmp_path).st_ino) == "/"
    assert paths.path("memory", os.stat(tmp_path / "kubepods/pod1/c1").st_ino) == "/kubepods/pod1/c1"
    assert paths.path("unified", 1) is None and paths.path("memory", 0) is None


def test_a_cgroup_made_after_a_walk_is_found_by_the_next_one(tmp_path):
    paths = CgroupPaths({"memory": tmp_path})
    assert paths.path("memory", os.stat(tmp_path).st_ino) == "/"
    (tmp_path / "late").mkdir()
    assert paths.path("memory", os.stat(tmp_path / "late").st_ino) == "/late"


def test_the_cache_is_bounded(tmp_path):
    for i in range(20):
        (tmp_path / f"d{i}").mkdir()
    paths = CgroupPaths({"memory": tmp_path}, max_entries=8)
    assert paths.path("memory", os.stat(tmp_path / "d3").st_ino) == "/d3"
    assert len(paths._paths) <= 8


def test_annotate_oom_fills_both_paths(tmp_path):
    (tmp_path / "kt-oom").mkdir()
    paths = CgroupPaths({"memory": tmp_path / "kt-oom", "unified": tmp_path})
    event = annotate_oom(dict(OOM, memcg_id=os.stat(tmp_path / "kt-oom").st_ino, cgroup_id=os.stat(tmp_path).st_ino),
                         paths)
    assert (event["memcg_path"], event["cgroup_path"]) == ("/", "/")
