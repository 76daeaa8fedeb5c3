"""The benchmark's pure parts: what it reads from the workload and the bundle, and the verdicts it prints.

tests/fixtures/bench/churn_2_cycles.events.jsonl is the events.jsonl of a real default `ktrace --duration=60s`
ended by SIGINT, during which `benchmarks/build/wl tcp 2` ran (its server port was 54433).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks import bench
from tests.unit.conftest import FIXTURES, fixture_summary

CHURN = FIXTURES / "bench" / "churn_2_cycles.events.jsonl"
CHURN_PORT = 54433


def run(config: str = bench.KTRACE, rep: int = 0, ops: float = 1000.0, **kw) -> bench.Run:
    return bench.Run("tcp", config, rep, ops, 100, **kw)


def test_the_workload_line_gives_its_rate_cycles_and_server_port():
    out = "tcp: 30000 of 30000 ops in 2.311 s\nops_per_s=12981.4 done=30000 port=41023 elapsed_s=2.311000\n"
    assert bench.parse_workload(out) == bench.WorkloadResult(12981.4, 30000, 41023)


def test_a_workload_line_without_its_port_is_an_error():
    with pytest.raises(ValueError, match="no port"):
        bench.parse_workload("ops_per_s=10.0 done=1\n")


def test_each_churn_cycle_puts_ten_state_changes_with_its_server_port_in_events_jsonl():
    with open(CHURN, "rb") as f:
        assert bench.workload_state_changes(f, CHURN_PORT) == 2 * bench.STATE_CHANGES_PER_CYCLE


def test_the_listeners_own_open_and_close_and_other_ports_are_not_the_workloads_state_changes():
    lines = [line for line in CHURN.read_bytes().splitlines() if b'"tcp_state"' in line]
    assert len(lines) == 2 * bench.STATE_CHANGES_PER_CYCLE + 2  # + the listener's CLOSE→LISTEN, LISTEN→CLOSE
    assert bench.workload_state_changes(lines, CHURN_PORT + 1) == 0


def test_loss_kinds_are_every_key_of_losses_total_but_the_counts():
    total = fixture_summary()["losses"]["total"]
    assert bench.loss_kinds(total) == {"filtered": 483, "sampled_out": 0, "ringbuf_full": 0, "capped": 0,
                                       "disk_full": 0, "undecodable": 0}


def test_lossy_families_name_where_each_nonzero_loss_came_from():
    by_family = fixture_summary()["losses"]["by_family"]
    assert bench.lossy_families(by_family) == {"tcp_state": {"filtered": 1}, "udp": {"filtered": 50},
                                               "sched": {"filtered": 431}, "blockio": {"filtered": 1}}


def test_rates_take_k_and_m_and_come_back_sorted_without_repeats():
    assert bench.parse_rates("600k, 50k,1.5M,50000") == [50_000.0, 600_000.0, 1_500_000.0]


@pytest.mark.parametrize("text", ["0", "-5k", "fast", ""])
def test_a_rate_that_is_not_a_positive_number_is_refused(text):
    with pytest.raises(ValueError):
        bench.parse_rates(text)


def test_rates_print_in_k_and_m():
    assert [bench.fmt_rate(r) for r in (950, 50_000, 200_000, 1_500_000)] == ["950", "50k", "200k", "1.5M"]


def test_cpu_per_event_splits_the_window_from_what_follows_sigint():
    r = run(cpu_at_ready_s=0.5, cpu_at_stop_s=2.5, cpu_total_s=8.5, seen=1_000_000)
    assert (r.cpu_window_s, r.cpu_after_s) == (2.0, 6.0)
    assert r.us_per_event_window == pytest.approx(2.0)
    assert r.us_per_event_after == pytest.approx(6.0)


def test_a_run_is_lossless_only_with_every_loss_kind_zero_and_every_state_change_written():
    assert run(losses={"ringbuf_full": 0}, state_changes=1000, expected_state_changes=1000).lossless()
    assert not run(losses={"ringbuf_full": 1}, state_changes=1000, expected_state_changes=1000).lossless()
    assert not run(losses={"ringbuf_full": 0}, state_changes=999, expected_state_changes=1000).lossless()
    assert run(losses={"filtered": 3}, state_changes=1000, expected_state_changes=1000).lossless(["filtered"])


def acceptance_runs(lost: int, written: int, ratios: list[float]) -> list[bench.Run]:
    runs = []
    for rep, ratio in enumerate(ratios):
        runs.append(run(bench.ALONE, rep, 1000.0))
        runs.append(run(bench.KTRACE, rep, 1000.0 * ratio, losses={"ringbuf_full": lost, "filtered": 0},
                        lossy_families={"tcp_state": {"ringbuf_full": lost}} if lost else {},
                        state_changes=written, expected_state_changes=300_000))
    runs.append(run(bench.KTRACE, -1, 10.0, losses={"ringbuf_full": 99}))  # the warm-up does not count
    return runs


def test_acceptance_passes_with_no_loss_99_percent_written_and_a_median_ratio_of_090():
    checks = bench.acceptance(acceptance_runs(0, 297_000, [0.95, 0.90, 0.80]))
    assert [c.passed for c in checks] == [True, True, True]
    assert checks[2].measured == "0.900 over 3 reps"


def test_acceptance_names_the_loss_kind_and_family_and_the_lowest_fraction_written():
    checks = bench.acceptance(acceptance_runs(7, 296_999, [0.95, 0.89, 0.80]))
    assert [c.passed for c in checks] == [False, False, False]
    assert checks[0].measured == "ringbuf_full up to 7 (tcp_state)"
    assert checks[1].measured == "lowest 98.9%"  # rounded down: short of 99% never prints as 99.0%


def paced(rate: float, reached: float, lost: int = 0, filtered: int = 0) -> bench.Run:
    return run(bench.PACED, 0, reached / bench.STATE_CHANGES_PER_CYCLE,
               offered_ops_per_s=rate / bench.STATE_CHANGES_PER_CYCLE,
               losses={"ringbuf_full": lost, "filtered": filtered}, state_changes=10, expected_state_changes=10)


def test_the_highest_lossless_rate_must_be_reached_and_lose_nothing_in_every_run():
    runs = [paced(50e3, 50e3), paced(50e3, 49.9e3), paced(200e3, 199e3), paced(200e3, 200e3, lost=1),
            paced(600e3, 130e3)]
    assert bench.highest_lossless(runs) == 50e3


def test_an_unreached_rate_is_never_the_highest_lossless_one():
    assert bench.highest_lossless([paced(600e3, 130e3)]) is None


def test_the_highest_lossless_rate_can_leave_out_what_ktrace_chose_not_to_record():
    runs = [paced(50e3, 50e3, filtered=700), paced(200e3, 200e3, filtered=100)]
    assert bench.highest_lossless(runs) is None
    assert bench.highest_lossless(runs, bench.NOT_RECORDED) == 200e3


def test_the_paced_verdict_says_how_many_runs_lost_and_the_most_one_lost():
    runs = [paced(50e3, 50e3, filtered=700), paced(50e3, 50e3, lost=45, filtered=600), paced(50e3, 50e3)]
    assert bench.verdict(runs, ()) == "2 of 3 runs lost, up to 700"
    assert bench.verdict(runs, bench.NOT_RECORDED) == "1 of 3 runs lost, up to 45"
    assert bench.verdict(runs[2:], ()) == "0 lost"


def test_reps_rotate_the_order_of_the_configs():
    assert [bench.rotated(["a", "b", "c"], rep) for rep in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]


def test_the_bench_runs_the_ktrace_of_its_own_tree():
    argv, env = bench.ktrace_command()
    assert argv[1:] == ["-m", "ktrace"]
    assert env["PYTHONPATH"].split(":")[0] == str(Path(bench.__file__).resolve().parent.parent)
