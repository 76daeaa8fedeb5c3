"""What summary.json says about --sample."""

from __future__ import annotations

from ktrace.analyze.summary import sampling

PROBES = [{"family": f, "status": "ok"} for f in ("tcp_state", "connect", "udp", "dns", "process")] + [
    {"family": "retransmit", "status": "missing"}]


def test_without_sampling_nothing_is_listed():
    assert sampling(1, PROBES) == {"every": 1, "families": []}


def test_sampling_lists_the_families_that_ran_and_what_each_decides_on():
    assert sampling(10, PROBES) == {"every": 10, "families": [
        {"family": "tcp_state", "decision": "ports"}, {"family": "connect", "decision": "ports"},
        {"family": "udp", "decision": "ports"}, {"family": "dns", "decision": "ports"}]}
