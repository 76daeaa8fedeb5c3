"""ktrace.analyze.lookups.LookupAnalysis: counts, latency and findings over dns_lookup events (--with-dns-names).

The events are the recorded golden dns_lookup events (tests/fixtures/records/dns_lookup_*.json), replayed with
other names, processes, results and latencies.
"""

from __future__ import annotations

import json

import pytest

from ktrace import schemas
from ktrace.analyze import lookups
from ktrace.analyze.lookups import LookupAnalysis
from ktrace.analyze.pods import PodAnalysis
from tests.unit.conftest import RECORDS, fixture_events, load_record

GAI_OK = load_record("dns_lookup_getaddrinfo_ok")["expected"]


def lookup(name: str = "web.test", result: str = "ok", ms: float = 1.0, pid: int = 100, comm: str = "kt-gai",
           **fields) -> dict:
    ret = {"ok": 0, "EAI_NONAME": -2, "EAI_AGAIN": -3}.get(result, -1)
    return {**GAI_OK, "name": name, "result": result, "ret": ret, "latency_ms": ms, "pid": pid, "tid": pid,
            "comm": comm, "process": comm, **fields}


def feed(events: list[dict]) -> LookupAnalysis:
    analysis = LookupAnalysis()
    for line, event in enumerate(events, 1):
        analysis.add(event, line)
    return analysis


def test_counts_lookups_failures_and_nearest_rank_latency():
    a = feed([lookup(ms=ms) for ms in (1.0, 2.0, 3.0, 4.0)] + [lookup("gone.test", "EAI_NONAME", ms=10.0)])
    s = a.summary()
    assert (s["lookups"], s["failed"]) == (5, 1)
    assert s["latency_ms"] == {"count": 5, "p50": 3.0, "p99": 10.0, "max": 10.0}
    assert s["by_result"] == {"ok": 4, "EAI_NONAME": 1}
    assert s["by_function"] == {"getaddrinfo": 5}


def test_an_empty_window_has_no_latency_and_no_findings():
    a = LookupAnalysis()
    assert a.summary()["latency_ms"] == {"count": 0, "p50": None, "p99": None, "max": None}
    assert a.findings() == []


def test_other_event_types_are_ignored():
    a = feed(fixture_events())
    assert a.summary()["lookups"] == 0


def test_erange_is_a_retry_with_a_bigger_buffer_not_a_failure():
    erange = load_record("dns_lookup_gethostbyname2_r_erange")["expected"]
    a = feed([erange, erange, erange])
    assert a.summary()["failed"] == 0 and a.findings() == []


def test_top_lists_are_sorted_by_count_then_name_and_name_the_processes():
    a = feed([lookup("b.test"), lookup("a.test"), lookup("b.test", "EAI_AGAIN", pid=7, comm="curl"),
              lookup("c.test", "EAI_NONAME")])
    s = a.summary()
    assert [(n["name"], n["lookups"], n["failed"]) for n in s["top_names"]] == [
        ("b.test", 2, 1), ("a.test", 1, 0), ("c.test", 1, 1)]
    assert [(n["name"], n["failed"]) for n in s["failing_names"]] == [("b.test", 1), ("c.test", 1)]
    assert [(p["pid"], p["comm"], p["lookups"], p["failed"]) for p in s["top_processes"]] == [
        (100, "kt-gai", 3, 1), (7, "curl", 1, 1)]


def test_a_name_failing_three_times_for_one_process_is_a_finding_naming_both():
    a = feed([lookup("api.test", "EAI_AGAIN", ms=1000.0)] * 3 + [lookup("api.test")])
    (finding,) = a.findings()
    assert finding["rule"] == "dns_lookup_failed" and finding["severity"] == "warning"
    assert finding["subject"] == {"pid": 100, "comm": "kt-gai", "name": "api.test", "function": "getaddrinfo",
                                  "results": {"EAI_AGAIN": 3}, "processes": 1, "pids": [{"pid": 100, "count": 3}],
                                  "pids_omitted": 0}
    assert finding["evidence"]["count"] == 3 and finding["evidence"]["lines"] == [1, 2, 3]
    assert finding["evidence"]["first"] == finding["evidence"]["last"] == GAI_OK["time"]
    assert "api.test" in finding["title"] and "kt-gai (100)" in finding["title"]
    assert "answer" in finding["hint"]


def test_two_failures_are_no_finding():
    assert feed([lookup("api.test", "EAI_AGAIN")] * 2).findings() == []


def test_failures_spread_over_processes_of_one_command_are_one_finding_for_them_all():
    (finding,) = feed([lookup("api.test", "EAI_AGAIN", pid=pid) for pid in (1, 2, 3)]).findings()
    assert finding["evidence"]["count"] == 3 and finding["subject"]["processes"] == 3
    assert [p["pid"] for p in finding["subject"]["pids"]] == [1, 2, 3]
    assert feed([lookup("api.test", "EAI_AGAIN", pid=pid, comm=f"c{pid}") for pid in (1, 2, 3)]).findings() == []


def test_a_name_that_does_not_exist_gets_the_nxdomain_hint():
    (finding,) = feed([lookup("typo.test", "EAI_NONAME")] * 4).findings()
    assert finding["severity"] == "warning" and "does not exist" in finding["hint"]
    assert finding["subject"]["results"] == {"EAI_NONAME": 4}


def test_gethostbyname_failures_count_like_getaddrinfo_ones():
    not_found = load_record("dns_lookup_gethostbyname2_not_found")["expected"]
    (finding,) = feed([not_found] * 3).findings()
    assert finding["subject"]["function"] == "gethostbyname2"
    assert finding["subject"]["results"] == {"HOST_NOT_FOUND": 3}


def test_ten_unanswered_lookups_are_critical():
    (finding,) = feed([lookup("api.test", "EAI_AGAIN")] * lookups.CRITICAL_NO_ANSWER).findings()
    assert finding["severity"] == "critical"


def test_a_slow_lookup_that_succeeds_is_a_finding_of_its_own():
    a = feed([lookup("slow.test", ms=1500.0), lookup("slow.test", ms=5.0), lookup("fast.test", ms=2.0)])
    (finding,) = a.findings()
    assert finding["rule"] == "dns_lookup_slow" and finding["evidence"]["count"] == 1
    assert finding["subject"] == {"pid": 100, "comm": "kt-gai", "name": "slow.test", "function": "getaddrinfo",
                                  "processes": 1, "pids": [{"pid": 100, "count": 1}], "pids_omitted": 0}
    assert finding["evidence"]["lines"] == [1]


def test_events_without_a_line_number_count_but_give_no_line():
    a = LookupAnalysis()
    for _ in range(3):
        a.add(lookup("api.test", "EAI_AGAIN"), None)
    (finding,) = a.findings()
    assert finding["evidence"]["count"] == 3 and finding["evidence"]["lines"] == []


def test_memory_is_bounded_and_what_was_not_tracked_is_reported(monkeypatch):
    monkeypatch.setattr(lookups, "MAX_NAMES", 2)
    monkeypatch.setattr(lookups, "MAX_PROCESSES", 1)
    monkeypatch.setattr(lookups, "MAX_PAIRS", 1)
    monkeypatch.setattr(lookups, "MAX_SAMPLES", 3)
    a = feed([lookup(f"n{i}.test", "EAI_NONAME", pid=i) for i in range(5)])
    s = a.summary()
    assert s["lookups"] == 5 and s["failed"] == 5 and s["latency_ms"]["count"] == 3
    assert len(s["top_names"]) == 2 and len(s["top_processes"]) == 1 and len(a.pairs) == 1
    assert s["not_tracked"] == {"names": 3, "processes": 4, "pairs": 4}


def test_recorded_lookups_of_every_function_are_summarized():
    events = [json.loads(p.read_text())["expected"] for p in RECORDS if p.stem.startswith("dns_lookup_")]
    s = feed(events).summary()
    assert s["lookups"] == len(events) == 6
    assert s["by_function"] == {"getaddrinfo": 3, "gethostbyname2": 1, "gethostbyname2_r": 1, "gethostbyname_r": 1}
    assert s["failed"] == 3  # EAI_AGAIN, EAI_NONAME, HOST_NOT_FOUND; ERANGE is a retry


def test_findings_have_the_summary_schemas_finding_shape():
    jsonschema = pytest.importorskip("jsonschema")
    defs = schemas.load_schema("summary")["$defs"]
    validator = jsonschema.Draft202012Validator({"$ref": "#/$defs/finding", "$defs": defs},
                                                format_checker=jsonschema.FormatChecker())
    a = feed([lookup("api.test", "EAI_AGAIN")] * 3 + [lookup("slow.test", ms=2000.0)])
    findings = a.findings()
    assert {f["rule"] for f in findings} == {"dns_lookup_failed", "dns_lookup_slow"}
    for finding in findings:
        # as summary.json holds them: Summary.build names the pods of their evidence lines (none here)
        finding["pods"] = PodAnalysis().pods_of(finding["evidence"]["lines"])
        assert list(validator.iter_errors(finding)) == []
