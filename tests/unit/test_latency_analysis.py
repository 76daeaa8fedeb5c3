"""Histogram buckets and percentiles, histogram lines from kernel map values, and the sched/blockio summary."""

from __future__ import annotations

import struct

import pytest

from ktrace.analyze.latency import LatencyAnalysis, bucket_percentile
from ktrace.analyze.summary import Summary
from ktrace.events import generated, latency
from tests.unit.conftest import load_record


def _buckets(*pairs: tuple[int, int]) -> list[dict]:
    """(slot, count) → buckets as the histogram lines hold them."""
    return latency.buckets([dict(pairs).get(slot, 0) for slot in range(latency.SLOTS)])


# --- buckets ---


def test_bucket_bounds_are_log2_microseconds_with_an_open_last_bucket():
    assert latency.slot_bounds(0) == (0, 1)
    assert latency.slot_bounds(1) == (1, 2)
    assert latency.slot_bounds(13) == (4096, 8192)
    assert latency.slot_bounds(latency.SLOTS - 1) == (1 << (latency.SLOTS - 2), None)


def test_only_non_empty_buckets_are_listed_shortest_first():
    assert _buckets((3, 2), (1, 5)) == [{"from_us": 1, "to_us": 2, "count": 5}, {"from_us": 4, "to_us": 8, "count": 2}]


# --- percentiles ---


def test_percentile_is_the_upper_bound_of_the_bucket_that_holds_the_rank():
    buckets = _buckets((4, 98), (12, 2))  # 98 waits of 8-16 us, 2 of 2048-4096 us
    assert bucket_percentile(buckets, 0.50, max_ms=3.0) == 0.016
    assert bucket_percentile(buckets, 0.98, max_ms=3.0) == 0.016
    assert bucket_percentile(buckets, 0.99, max_ms=3.0) == 3.0  # 4.096 capped at the longest wait


def test_percentile_of_one_wait_is_that_wait_capped():
    assert bucket_percentile(_buckets((5, 1)), 0.99, max_ms=0.020) == 0.020


def test_percentile_in_the_open_last_bucket_is_the_longest_wait():
    assert bucket_percentile(_buckets((latency.SLOTS - 1, 1)), 0.5, max_ms=4000_000.0) == 4000_000.0


def test_percentile_of_an_empty_histogram_is_none():
    assert bucket_percentile([], 0.5, max_ms=0.0) is None


# --- histogram lines from the kernel maps ---


def _hist_value(slots: dict[int, int], sum_ns: int, max_ns: int) -> bytes:
    values = [slots.get(i, 0) for i in range(latency.SLOTS)] + [sum_ns, max_ns]
    raw = struct.pack(f"<{latency.SLOTS + 2}Q", *values)
    assert len(raw) == generated.HIST.size
    return raw


def test_per_cpu_values_add_up_and_the_max_is_the_largest():
    key = struct.pack("<QQ", 1, 4242)
    per_cpu = [_hist_value({4: 3}, 30_000, 12_000), _hist_value({4: 1, 14: 1}, 20_000_000, 9_000_000)]
    names = latency.CgroupNames(v2_root=None, v1_memory=None)
    [line] = latency.runq_histogram_lines([(key, per_cpu)], "2026-11-22T00:00:00.000Z", 5, names)
    assert line["count"] == 5 and line["max_ms"] == 9.0 and line["sum_ms"] == 20.03
    assert line["buckets"] == [{"from_us": 8, "to_us": 16, "count": 4}, {"from_us": 8192, "to_us": 16384, "count": 1}]
    assert (line["cgroup_id"], line["memcg_id"], line["overflow"]) == (1, 4242, False)


def test_a_task_in_a_non_root_cgroup2_is_named_by_its_cgroup2_id(tmp_path):
    (tmp_path / "v2" / "pod").mkdir(parents=True)
    (tmp_path / "v1").mkdir()
    names = latency.CgroupNames(v2_root=tmp_path / "v2", v1_memory=tmp_path / "v1")
    ino = (tmp_path / "v2" / "pod").stat().st_ino
    assert names.name(ino, 77) == {"cgroup_hierarchy": "cgroup2", "cgroup": ino, "cgroup_path": "/pod"}


def test_a_task_in_the_cgroup2_root_is_named_by_its_v1_memory_cgroup(tmp_path):
    (tmp_path / "v1" / "kube" / "pod1").mkdir(parents=True)
    ino = (tmp_path / "v1" / "kube" / "pod1").stat().st_ino
    names = latency.CgroupNames(v2_root=tmp_path, v1_memory=tmp_path / "v1")
    assert names.name(1, ino) == {"cgroup_hierarchy": "memory", "cgroup": ino, "cgroup_path": "/kube/pod1"}
    assert names.name(1, 999_999_999)["cgroup_path"] is None  # gone by the end of the window


def test_the_all_zero_key_is_the_overflow_line():
    line = latency.runq_histogram_lines([(bytes(16), [_hist_value({1: 1}, 1500, 1500)])], "t", 0,
                                        latency.CgroupNames(v2_root=None, v1_memory=None))[0]
    assert line["overflow"] and line["cgroup"] is None and line["cgroup_path"] is None


def test_empty_histograms_are_left_out():
    names = latency.CgroupNames(v2_root=None, v1_memory=None)
    assert latency.runq_histogram_lines([(struct.pack("<QQ", 1, 2), [_hist_value({}, 0, 0)])], "t", 0, names) == []


def test_block_histogram_lines_name_the_disk_and_op():
    key = struct.pack("<IB3x", 7 << 20 | 3, 2)
    value = _hist_value({7: 4}, 400_000, 120_000) + struct.pack("<Q", 4 * 65536)
    [line] = latency.bio_histogram_lines([(key, [value])], "t", 0)
    assert (line["dev"], line["op"], line["count"], line["bytes"]) == ("7:3", "write", 4, 262144)


# --- the summary sections and findings ---


def _runq_line(cgroup: int, path: str | None, slots: dict[int, int], max_ms: float) -> dict:
    return {"type": "runq_histogram", "time": "2026-11-22T00:00:10.000Z", "ts_ns": 10, "cgroup_id": 1,
            "memcg_id": cgroup, "cgroup_hierarchy": "memory", "cgroup": cgroup, "cgroup_path": path,
            "overflow": False, "count": sum(slots.values()), "sum_ms": 1.0, "max_ms": max_ms,
            "buckets": _buckets(*slots.items())}


def test_a_cgroup_with_p99_over_the_threshold_is_a_runq_latency_finding_with_its_outliers():
    outlier = load_record("runq_latency_behind_hogs")["expected"]
    memcg = outlier["memcg_id"]
    s = Summary()
    s.add(outlier, 7)
    s.add(_runq_line(memcg, "/kt-runq", {13: 50, 14: 50}, max_ms=outlier["wait_ms"]), 9)
    s.add(_runq_line(memcg + 1, "/quiet", {3: 1000}, max_ms=0.008), 10)
    doc = s.build(meta={"options": {"sched_warn_ms": 5.0}}, losses={}, probes=[], files={}, warnings=[])
    [f] = [f for f in doc["findings"] if f["rule"] == "runq_latency"]
    assert f["subject"]["cgroup"] == memcg and f["subject"]["cgroup_path"] == "/kt-runq"
    assert f["evidence"]["lines"] == [7] and f["evidence"]["count"] == 1
    rows = doc["sched"]["cgroups"]
    assert [r["cgroup_path"] for r in rows] == ["/kt-runq", "/quiet"]  # highest p99 first
    assert rows[0]["worst"][0]["comm"] == outlier["comm"] and rows[0]["outliers"] == 1
    assert rows[1]["p99_ms"] == 0.008 and rows[1]["outliers"] == 0
    assert doc["sched"]["waits"] == 1100 and doc["sched"]["threshold_ms"] == 5.0


def test_below_the_threshold_there_is_no_finding():
    s = Summary()
    s.add(_runq_line(5, "/ok", {10: 100}, max_ms=0.9), 1)
    doc = s.build(meta={"options": {"sched_warn_ms": 10.0}}, losses={}, probes=[], files={}, warnings=[])
    assert not [f for f in doc["findings"] if f["rule"] == "runq_latency"]


@pytest.mark.parametrize("warn_ms, expected", [(0.001, {"write"}), (1000.0, set())])
def test_a_disk_with_p99_over_the_threshold_is_slow_disk(warn_ms, expected):
    outlier = load_record("bio_latency_loop_write")["expected"]
    line = {"type": "bio_histogram", "time": "t", "ts_ns": 0, "dev": outlier["dev"], "disk": "loop9", "op": "write",
            "overflow": False, "count": 2, "sum_ms": 0.4, "max_ms": 0.3, "buckets": _buckets((8, 2)),
            "bytes": 131072}
    analysis = LatencyAnalysis()
    analysis.add(outlier, 3)
    analysis.add(line, 4)
    found = analysis.blockio_findings(warn_ms)
    assert {f["subject"]["op"] for f in found} == expected
    row = analysis.blockio_summary(warn_ms)["devices"][0]
    assert (row["disk"], row["count"], row["bytes"], row["p50_ms"]) == ("loop9", 2, 131072, 0.256)
