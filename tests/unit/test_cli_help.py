"""`ktrace --help`, misspelt commands, the defaults shown, and what -q leaves on stdout (click's CliRunner)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from click.testing import CliRunner

from ktrace import cli, snapshot
from ktrace.errors import ExitStatus
from tests.unit.conftest import fixture_summary


def _help(*argv: str) -> str:
    result = CliRunner().invoke(cli.cli, list(argv), prog_name="ktrace", terminal_width=200)
    assert result.exit_code == 0, result.output
    return result.output


def test_top_level_help_lists_every_snapshot_option():
    text = _help("--help")
    assert "Snapshot options (ktrace alone is ktrace snapshot):" in text
    for param in cli.snapshot.params:
        for name in param.opts:
            assert name in text, name
    assert "Usage: ktrace [SNAPSHOT OPTIONS]" in text and "Commands:" in text and "doctor" in text


def test_top_level_help_shows_the_exit_statuses():
    text = _help("--help")
    for status in ExitStatus:
        assert f"{status.value:>3}  {status.name.lower().replace('_', ' ')}" in text


def test_the_caps_show_their_defaults():
    for text in (_help("--help"), _help("snapshot", "--help")):
        rows = {option: " ".join(text[text.index(f"  {option} "):].split("\n  -", 1)[0].split())
                for option in ("--max-events", "--max-bytes")}
        assert "[default: no limit]" in rows["--max-events"]
        assert "[default: 1G, or a quarter of --out-dir's free space when that is less]" in rows["--max-bytes"]


def test_a_misspelt_command_is_a_usage_error_that_suggests_the_right_one(capsys):
    assert cli.main(["doctr"]) == ExitStatus.USAGE
    out, err = capsys.readouterr()
    assert out == ""
    assert err == "ktrace: error: no such command 'doctr'; did you mean 'doctor'? (see ktrace --help)\n"


def test_an_unknown_command_lists_the_commands(capsys):
    assert cli.main(["frobnicate"]) == ExitStatus.USAGE
    assert "no such command 'frobnicate'; commands: snapshot, doctor" in capsys.readouterr().err


def test_options_first_still_run_a_snapshot(options):
    assert options("--duration=5s").duration_s == 5.0


def _fake_run(monkeypatch, tmp_path: Path) -> Path:
    """snapshot.run replaced by one that returns a finished result: only the CLI's output is under test here
    (tests/e2e/test_cli_runs.py runs the real one)."""
    tgz = tmp_path / "ktrace.node.20261122T000000.000Z-1.bundle.tgz"
    summary = fixture_summary()
    monkeypatch.setattr(snapshot, "run", lambda opts: SimpleNamespace(
        status=ExitStatus.SUCCESS, paths={"bundle.tgz": tgz}, summary=summary))
    return tgz


def test_quiet_prints_only_the_bundle_path_on_stdout_and_nothing_on_stderr(monkeypatch, tmp_path):
    tgz = _fake_run(monkeypatch, tmp_path)
    result = CliRunner().invoke(cli.cli, ["-q", f"--out-dir={tmp_path}"], prog_name="ktrace")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{tgz}\n"
    assert result.stderr == ""


def test_without_quiet_stdout_is_still_only_the_bundle_path_and_the_status_goes_to_stderr(monkeypatch, tmp_path):
    tgz = _fake_run(monkeypatch, tmp_path)
    result = CliRunner().invoke(cli.cli, [f"--out-dir={tmp_path}"], prog_name="ktrace")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{tgz}\n"
    assert result.stderr.startswith("ktrace: ") and "findings" in result.stderr
