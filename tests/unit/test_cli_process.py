"""process and oom are default families; --with-args is off by default and recorded; --dns-only leaves them out."""

from __future__ import annotations

from ktrace import cli, probes


def test_process_and_oom_are_on_by_default_without_arguments(options):
    opts = options()
    assert {"process", "oom"} <= set(opts.families)
    assert probes.FAMILY_BY_NAME["process"].default and probes.FAMILY_BY_NAME["oom"].default
    assert opts.with_args is False and opts.args()["with_args"] is False


def test_with_args_is_recorded_in_the_options(options):
    opts = options("--with-args")
    assert opts.with_args is True and opts.args()["with_args"] is True


def test_dns_only_leaves_process_and_oom_out_unless_named(options):
    assert not {"process", "oom"} & set(options("--dns-only").families)
    assert "oom" in options("--dns-only", "--probes=oom").families


def test_help_says_arguments_hold_secrets(capsys):
    assert cli.main(["snapshot", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--with-args" in text and "passwords and tokens" in text
