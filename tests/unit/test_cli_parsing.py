"""The command line rejects bad values with one line and exit status 2, before anything is loaded."""

from __future__ import annotations

import click
import pytest

from ktrace import cli
from ktrace.errors import ExitStatus


def _usage_error(capsys, *argv: str) -> str:
    """Runs ktrace with argv; asserts exit status 2 and a one-line message without a traceback; returns it."""
    assert cli.main(list(argv)) == ExitStatus.USAGE == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    assert err.startswith("ktrace: error: ")
    return err


def test_duration_that_is_not_a_duration_is_a_usage_error(capsys):
    assert "'abc' is not a duration" in _usage_error(capsys, "--duration=abc")


def test_duration_of_zero_is_a_usage_error(capsys):
    assert "must be longer than 0" in _usage_error(capsys, "--duration=0s")


def test_port_above_65535_is_a_usage_error(capsys):
    assert "'70000' is not a port (1-65535)" in _usage_error(capsys, "--ports=70000")


def test_port_zero_is_a_usage_error(capsys):
    assert "'0' is not a port (1-65535)" in _usage_error(capsys, "--ports=0")


def test_port_that_is_not_a_number_is_a_usage_error(capsys):
    assert "'http' is not a port" in _usage_error(capsys, "--ports=80,http")


def test_sample_of_zero_is_a_usage_error(capsys):
    assert "--sample" in _usage_error(capsys, "--sample=0")


def test_size_that_is_not_a_size_is_a_usage_error(capsys):
    assert "is not a size" in _usage_error(capsys, "--max-bytes=lots")


def test_unknown_probe_family_is_a_usage_error(capsys):
    assert "unknown probe family nope" in _usage_error(capsys, "--probes=tcp_state,nope")


def test_unknown_hook_label_is_a_usage_error_that_lists_the_known_ones(capsys):
    err = _usage_error(capsys, "--skip-hook=bogus")
    assert "unknown hook bogus; known: tp_btf/inet_sock_set_state, " in err
    assert "tracepoint/syscalls/sys_{enter,exit}_{send,recv}{to,msg,mmsg}" in err


def test_unknown_option_is_a_usage_error(capsys):
    _usage_error(capsys, "--no-such-option")


def test_snapshot_subcommand_parses_the_same_options(capsys):
    assert "'abc' is not a duration" in _usage_error(capsys, "snapshot", "--duration=abc")


@pytest.mark.parametrize(("text", "seconds"), [
    ("60", 60.0), ("60s", 60.0), ("2m", 120.0), ("1h", 3600.0), ("500ms", 0.5), ("1.5s", 1.5), (" 90s ", 90.0),
])
def test_duration_parses(text, seconds):
    assert cli.Duration().convert(text, None, None) == seconds


@pytest.mark.parametrize("text", ["abc", "-5s", "5d", "s", "1e3"])
def test_duration_rejects(text):
    with pytest.raises(click.BadParameter):
        cli.Duration().convert(text, None, None)


@pytest.mark.parametrize(("text", "size"), [
    ("500k", 500 << 10), ("20M", 20 << 20), ("1G", 1 << 30), ("5000000", 5_000_000), ("64KiB", 64 << 10),
    ("8m", 8 << 20), ("100b", 100),
])
def test_size_parses(text, size):
    assert cli.Size().convert(text, None, None) == size


@pytest.mark.parametrize("text", ["lots", "1.5M", "-1k", "5T"])
def test_size_rejects(text):
    with pytest.raises(click.BadParameter):
        cli.Size().convert(text, None, None)


def test_ports_are_sorted_and_deduplicated():
    assert cli.PortList().convert("443, 80,443,6443", None, None) == (80, 443, 6443)


def test_more_than_64_ports_are_rejected():
    with pytest.raises(click.BadParameter, match="at most 64 ports"):
        cli.PortList().convert(",".join(str(p) for p in range(1000, 1065)), None, None)


def test_ring_size_that_is_not_a_power_of_two_is_a_usage_error(capsys):
    assert "must be a power of two" in _usage_error(capsys, "--ring-size=5000")


def test_rare_ring_size_that_is_not_a_power_of_two_is_a_usage_error(capsys):
    error = _usage_error(capsys, "--rare-ring-size=5000")
    assert "must be a power of two" in error and "--rare-ring-size" in error


def test_hook_labels_split_on_commas_outside_braces():
    labels = "tp_btf/sock_{send,recv}_length, tracepoint/sock/sock_{send,recv}_length"
    assert cli.HookList().convert(labels, None, None) == (
        "tp_btf/sock_{send,recv}_length", "tracepoint/sock/sock_{send,recv}_length")


def test_hook_list_names_only_the_unknown_labels():
    with pytest.raises(click.BadParameter, match="unknown hook kprobe/nope; known: "):
        cli.HookList().convert("tp_btf/inet_sock_set_state,kprobe/nope", None, None)


def test_every_hook_label_of_the_probe_table_is_accepted():
    from ktrace import probes

    assert cli.HookList().convert(",".join(probes.HOOK_LABELS), None, None) == probes.HOOK_LABELS
