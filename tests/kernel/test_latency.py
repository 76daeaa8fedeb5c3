"""Run-queue latency per cgroup and block I/O latency per disk, from the kernel's histograms and outliers."""

from __future__ import annotations

import os

import pytest

from ktrace import schemas
from tests.helpers import record_during
from tests.latencykit import LoopDevice, MemoryCgroup, contend


def _runq_of(bundle, cgroup: MemoryCgroup) -> list[dict]:
    return [h for h in bundle.of_type("runq_histogram") if h["memcg_id"] == cgroup.id]


SCHED_HOOKS = ("tp_btf/sched_{wakeup,wakeup_new,switch}", "raw_tp/sched_{wakeup,wakeup_new,switch}")
BLOCKIO_HOOKS = ("tp_btf/block_rq_{issue,complete}", "raw_tp/block_rq_{issue,complete}")


def _chosen(bundle, family: str) -> str:
    return next(row["chosen"] for row in bundle.summary["probes"] if row["family"] == family)


@pytest.mark.parametrize("hook", SCHED_HOOKS)
def test_tasks_queued_behind_cpu_hogs_show_long_waits_in_their_cgroup(tmp_path, hook):
    skip = [f"--skip-hook={h}" for h in SCHED_HOOKS[:SCHED_HOOKS.index(hook)]]
    with MemoryCgroup() as cgroup:
        victim = {}
        bundle = record_during(tmp_path, lambda: victim.update(pid=contend(cgroup, hogs=2)),
                               "--probes=sched", "--sched-warn=5ms", *skip)
    assert _chosen(bundle, "sched") == hook
    hist = _runq_of(bundle, cgroup)
    assert len(hist) == 1, hist
    assert hist[0]["cgroup_hierarchy"] == "memory" and hist[0]["cgroup"] == cgroup.id
    assert hist[0]["cgroup_path"] == f"/{cgroup.path.name}"
    # three busy tasks share one CPU: some waits last more than the threshold
    assert hist[0]["max_ms"] > 5
    assert sum(b["count"] for b in hist[0]["buckets"] if b["from_us"] >= 4096) > 0
    assert hist[0]["count"] == sum(b["count"] for b in hist[0]["buckets"])
    outliers = [e for e in bundle.of_type("runq_latency") if e["memcg_id"] == cgroup.id]
    mine = [e for e in outliers if e["pid"] == victim["pid"]]
    assert mine and all(e["comm"] == "kt-victim" and e["wait_ms"] > 5 and e["cpu"] == 0 for e in mine)
    # what ran before the victim got the CPU back: one of its hogs, mostly
    assert any(e["prev_comm"] == "kt-hog" for e in mine)
    row = next(r for r in bundle.summary["sched"]["cgroups"] if r["cgroup"] == cgroup.id)
    assert row["cgroup_path"] == f"/{cgroup.path.name}" and row["outliers"] == len(outliers)
    assert row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
    assert row["worst"][0]["wait_ms"] == max(e["wait_ms"] for e in outliers)
    assert {w["comm"] for w in row["worst"]} <= {"kt-hog", "kt-victim"}
    found = [f for f in bundle.summary["findings"] if f["rule"] == "runq_latency"
             and f["subject"]["cgroup"] == cgroup.id]
    assert found and found[0]["subject"]["cgroup_path"] == f"/{cgroup.path.name}"
    sched = bundle.summary["losses"]["by_family"]["sched"]
    # every switch-in is examined; each either had a wait to measure (in a histogram) or nothing to measure from
    assert sched["seen"] == sched["written"] + sched["filtered"] and sched["aggregated"] == sched["written"]
    assert bundle.summary["losses"]["balanced"]
    assert schemas.validate_bundle(bundle.paths["summary.json"]) == []


def test_a_task_alone_on_its_cpu_has_no_outliers(tmp_path):
    with MemoryCgroup() as cgroup:
        # no hogs: the victim alone, its waits short; a generous threshold keeps other load of the host out
        bundle = record_during(tmp_path, lambda: contend(cgroup, hogs=0, seconds=1.0),
                               "--probes=sched", "--sched-warn=50ms")
    hist = _runq_of(bundle, cgroup)
    assert len(hist) == 1 and hist[0]["count"] > 0
    assert [e for e in bundle.of_type("runq_latency") if e["memcg_id"] == cgroup.id] == []
    assert not [f for f in bundle.summary["findings"] if f["rule"] == "runq_latency"
                and f["subject"]["cgroup"] == cgroup.id]


@pytest.mark.parametrize("hook", BLOCKIO_HOOKS)
def test_direct_io_on_a_loop_device_is_one_histogram_sample_per_request(tmp_path, hook):
    writes, reads = 16, 24
    skip = [f"--skip-hook={h}" for h in BLOCKIO_HOOKS[:BLOCKIO_HOOKS.index(hook)]]
    with LoopDevice(tmp_path) as loop:
        dev, name = loop.dev, loop.name
        bundle = record_during(tmp_path, lambda: loop.direct_io(writes, 65536, reads, 4096),
                               "--probes=blockio", "--bio-warn=0.000001", *skip)
    assert _chosen(bundle, "blockio") == hook
    assert not os.path.exists(tmp_path / "kt-loop.img")
    hists = {h["op"]: h for h in bundle.of_type("bio_histogram") if h["dev"] == dev}
    assert hists["write"]["disk"] == name and hists["write"]["count"] == writes
    assert hists["write"]["bytes"] == writes * 65536
    assert hists["read"]["count"] == reads and hists["read"]["bytes"] == reads * 4096
    # --bio-warn of 1 us: every request is also an outlier event, issued by dd
    events = [e for e in bundle.of_type("bio_latency") if e["dev"] == dev]
    assert sorted(e["op"] for e in events) == ["read"] * reads + ["write"] * writes
    assert all(e["comm"] == "dd" and e["latency_ms"] > 0 and e["error"] == 0 for e in events)
    assert sorted(e["sector"] for e in events if e["op"] == "write") == [i * 128 for i in range(writes)]
    rows = {r["op"]: r for r in bundle.summary["blockio"]["devices"] if r["dev"] == dev}
    assert rows["write"]["count"] == writes and rows["write"]["disk"] == name
    assert rows["write"]["p50_ms"] <= rows["write"]["p99_ms"] <= rows["write"]["max_ms"]
    slow = [f for f in bundle.summary["findings"] if f["rule"] == "slow_disk" and f["subject"]["dev"] == dev]
    assert {f["subject"]["op"] for f in slow} == {"read", "write"}  # every p99 is over 1 us
    blockio = bundle.summary["losses"]["by_family"]["blockio"]
    assert blockio["seen"] == blockio["written"] + blockio["filtered"]
    assert schemas.validate_bundle(bundle.paths["summary.json"]) == []
