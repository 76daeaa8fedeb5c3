"""ktrace doctor on the running kernel: every alternative gets a real verdict."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import orjson

from ktrace import probes


def doctor() -> dict:
    result = subprocess.run([sys.executable, "-m", "ktrace", "doctor", "--json"], capture_output=True, timeout=120)
    assert result.returncode in (0, 3), result.stderr
    return orjson.loads(result.stdout)


def test_doctor_reports_every_family_and_every_alternative():
    report = doctor()
    assert [f["family"] for f in report["families"]] == [f.name for f in probes.FAMILIES]
    for fam, family in zip(report["families"], probes.FAMILIES):
        assert [a["hook"] for a in fam["alternatives"]] == [h.label for h in family.chain]
        assert all(a["status"] in ("chosen", "available", "refused", "unsupported") for a in fam["alternatives"])
        assert fam["status"] == "ok" and fam["chosen"]


def test_doctor_on_a_kernel_without_kprobes_or_trampolines_chooses_tracepoints():
    report = {f["family"]: f for f in doctor()["families"]}
    assert report["tcp_state"]["chosen"].startswith(("tp_btf/", "tracepoint/"))
    alternatives = [a for f in report.values() for a in f["alternatives"]]
    kprobes = [a for a in alternatives if a["hook"].startswith("kprobe/")]
    fentries = [a for a in alternatives if a["hook"].startswith("fentry")]
    if not Path("/sys/bus/event_source/devices/kprobe").exists():
        assert all(a["status"] == "unsupported" and "kprobe" in a["reason"] for a in kprobes)
    # whichever way this kernel decides on trampolines, the verdict comes from a real load
    assert all(a["status"] in ("refused", "available") for a in fentries)
    assert all(a["reason"] for a in fentries if a["status"] == "refused")


def test_human_doctor_table_marks_the_chosen_hook():
    result = subprocess.run([sys.executable, "-m", "ktrace", "doctor"], capture_output=True, text=True, timeout=120)
    assert "→ tp_btf/inet_sock_set_state" in result.stdout or "→ tracepoint/sock/inet_sock_set_state" in result.stdout
