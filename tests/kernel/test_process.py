"""The process and oom families on the real kernel: a real OOM kill in a memory cgroup, a fork storm, and
exec arguments only with --with-args."""

from __future__ import annotations

import subprocess
import tarfile
import uuid

import pytest

from tests.helpers import record_during
from tests.prockit import MemoryCgroup, fork_storm, killed_line, oom_hog

PROBES = "--probes=process,oom"


@pytest.mark.parametrize("skip", [None, "tp_btf/mark_victim"], ids=["tp_btf", "tracepoint"])
def test_an_oom_kill_in_a_memory_cgroup_names_the_victim_its_sizes_and_its_cgroup(tmp_path, skip):
    hog: dict = {}
    with MemoryCgroup() as cgroup:
        def work() -> None:
            hog["pid"], hog["returncode"] = oom_hog(cgroup)
            hog["oom_kills"] = cgroup.oom_kills()

        args = [PROBES] + ([f"--skip-hook={skip}"] if skip else [])
        bundle = record_during(tmp_path, work, *args)
    assert hog["returncode"] == -9 and hog["oom_kills"] == 1
    row = next(r for r in bundle.summary["probes"] if r["family"] == "oom")
    assert row["chosen"] == ("tracepoint/oom/mark_victim" if skip else "tp_btf/mark_victim")

    [oom] = [e for e in bundle.of_type("oom_kill") if e["pid"] == hog["pid"]]
    assert oom["comm"] == "kt-hog"
    # the hog was allocating itself when the OOM hit
    assert (oom["trigger_pid"], oom["trigger_comm"]) == (hog["pid"], "kt-hog")
    assert oom["memcg_path"] == cgroup.shown
    assert oom["source"] == ("tracepoint" if skip else "task")
    killed = killed_line(hog["pid"])
    if killed is not None:  # the kernel's own report of the same kill
        for key in ("total_vm_kb", "anon_rss_kb", "file_rss_kb", "shmem_rss_kb", "pgtables_kb", "oom_score_adj",
                    "uid"):
            assert oom[key] == killed[key], key
    else:  # a 64 MB limit: the victim held most of it, in 4 MB chunks
        assert 32 << 10 <= oom["anon_rss_kb"] <= 64 << 10 and oom["total_vm_kb"] > oom["anon_rss_kb"]

    [finding] = [f for f in bundle.summary["findings"] if f["rule"] == "oom_kill" and f["subject"]["pid"] == hog["pid"]]
    assert finding["severity"] == "critical"
    assert finding["subject"]["memcg_path"] == cgroup.shown and "kt-hog" in finding["title"]
    assert cgroup.shown in finding["title"]
    victim = next(v for v in bundle.summary["oom"]["victims"] if v["pid"] == hog["pid"])
    assert victim["memcg_path"] == cgroup.shown
    # and the process family saw it die of the signal
    [end] = [e for e in bundle.of_type("exit") if e["pid"] == hog["pid"]]
    assert end["signal"] == "SIGKILL" and end["exit_status"] is None
    assert bundle.summary["losses"]["balanced"]


def test_a_fork_storm_is_events_with_exit_codes_and_a_finding_naming_the_parent(tmp_path):
    result: dict = {}
    bundle = record_during(tmp_path, lambda: result.update(fork_storm(500)), PROBES)
    parent, children = result["pid"], result["children"]
    assert len(children) == 500

    forks = [e for e in bundle.of_type("fork") if e["pid"] == parent]
    assert sorted(e["child_pid"] for e in forks) == sorted(children)
    assert all(e["comm"] == "kt-forker" and e["child_ppid"] == parent for e in forks)
    execs = {e["pid"]: e for e in bundle.of_type("exec") if e["pid"] in children}
    assert len(execs) == 500
    assert {execs[p]["filename"] for p in children} == {"/bin/true", "/bin/sh"}
    assert all("args" not in e for e in execs.values())
    exits = {e["pid"]: e for e in bundle.of_type("exit") if e["pid"] in children}
    assert len(exits) == 500
    for pid, code in children.items():
        assert exits[pid]["exit_status"] == code and exits[pid]["signal"] is None
        assert exits[pid]["ppid"] == parent and exits[pid]["runtime_ms"] >= 0
        assert execs[pid]["filename"] == ("/bin/sh" if code == 3 else "/bin/true")
    assert sum(1 for code in children.values() if code == 3) == 50

    [storm] = [f for f in bundle.summary["findings"] if f["rule"] == "fork_storm" and f["subject"]["pid"] == parent]
    assert storm["subject"]["comm"] == "kt-forker" and storm["subject"]["scope"] == "parent"
    assert storm["subject"]["forks"] == 500 and storm["subject"]["max_in_window"] >= 200
    assert storm["subject"]["rate_per_s"] > 0 and "kt-forker" in storm["title"]
    crash = [f for f in bundle.summary["findings"]
             if f["rule"] == "crash_loop" and f["subject"]["filename"] == "/bin/sh"]
    assert crash and crash[0]["subject"]["reasons"]["exit 3"] >= 50

    processes = bundle.summary["processes"]
    top = next(p for p in processes["top_forking_parents"] if p["pid"] == parent)
    assert top["forks"] == 500 and top["comm"] == "kt-forker"
    sh = next(r for r in processes["nonzero_exits_by_comm"] if r["comm"] == "sh")
    assert sh["reasons"]["exit 3"] >= 50
    assert processes["execs"] >= 500 and processes["forks"] >= 500 and processes["exits"] >= 500
    assert isinstance(processes["threads_created"], int)
    process = bundle.summary["losses"]["by_family"]["process"]
    assert process["ringbuf_full"] == 0 and process["written"] == process["seen"] >= 1500
    assert bundle.summary["losses"]["balanced"]


def _bundle_text(bundle) -> str:
    texts = [bundle.paths[k].read_text() for k in ("events.jsonl", "summary.json", "node.json")]
    with tarfile.open(bundle.paths["bundle.tgz"]) as tar:
        texts += [tar.extractfile(m).read().decode() for m in tar.getmembers()]
    return "\n".join(texts)


@pytest.mark.parametrize("with_args", [False, True], ids=["default", "with-args"])
def test_exec_arguments_reach_the_bundle_only_with_with_args(tmp_path, with_args):
    secret = f"kt-secret-{uuid.uuid4().hex}"

    def work() -> None:
        proc = subprocess.run(["/bin/echo", "--token", secret], capture_output=True, check=True)
        assert secret in proc.stdout.decode()

    args = [PROBES] + (["--with-args"] if with_args else [])
    bundle = record_during(tmp_path, work, *args)
    echo = [e for e in bundle.of_type("exec") if e["filename"] == "/bin/echo"]
    assert echo
    text = _bundle_text(bundle)
    if with_args:
        mine = [e for e in echo if secret in e.get("args", "")]
        assert mine and mine[0]["args"] == f"/bin/echo --token {secret}" and mine[0]["args_truncated"] is False
        assert bundle.summary["options"]["with_args"] is True
    else:
        assert secret not in text
        assert all("args" not in e for e in bundle.of_type("exec"))
        assert bundle.summary["options"]["with_args"] is False
