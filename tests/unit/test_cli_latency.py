"""--sched-warn and --bio-warn reach the loader and the bundle's options; sched and blockio are on by default."""

from __future__ import annotations

from ktrace import capture, cli
from ktrace.errors import ExitStatus


def test_latency_families_and_thresholds_by_default(options):
    opts = options()
    assert {"sched", "blockio"} <= set(opts.families)
    assert (opts.sched_warn_s, opts.bio_warn_s) == (capture.SCHED_WARN_S, capture.BIO_WARN_S) == (0.010, 0.100)
    assert (opts.args()["sched_warn_ms"], opts.args()["bio_warn_ms"]) == (10.0, 100.0)


def test_thresholds_parse_as_durations(options):
    opts = options("--sched-warn=5ms", "--bio-warn=0.25s")
    assert opts.args()["sched_warn_ms"] == 5.0 and opts.args()["bio_warn_ms"] == 250.0


def test_dns_only_leaves_the_latency_families_out_unless_probes_names_them(options):
    assert not {"sched", "blockio"} & set(options("--dns-only").families)
    assert "sched" in options("--dns-only", "--probes=dns,sched").families


def test_a_threshold_that_is_not_a_duration_is_a_usage_error(capsys):
    assert cli.main(["--sched-warn=soon"]) == ExitStatus.USAGE
    assert "'soon' is not a duration" in capsys.readouterr().err
