"""Recorded fixtures (tests/fixtures/, made by tests/fixtures/record.py from real runs) for the unit tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from ktrace import cli, snapshot

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
BUNDLE_DIR = FIXTURES / "bundle"
PREFIX = "ktrace.fixture.20261122T000000Z"
KINDS = ("events.jsonl", "summary.json", "node.json")
RECORDS = sorted((FIXTURES / "records").glob("*.json"))


def fixture_path(kind: str) -> Path:
    return BUNDLE_DIR / f"{PREFIX}.{kind}"


def fixture_events() -> list[dict]:
    """The recorded events.jsonl, one dict per line, in file order (line n is index n - 1)."""
    return [json.loads(line) for line in fixture_path("events.jsonl").read_text().splitlines()]


def fixture_summary() -> dict:
    return json.loads(fixture_path("summary.json").read_text())


def load_record(name: str) -> dict:
    return json.loads((FIXTURES / "records" / f"{name}.json").read_text())


@pytest.fixture
def bundle_copy(tmp_path: Path) -> dict[str, Path]:
    """A writable copy of the recorded bundle: {"events.jsonl": path, "summary.json": path, "node.json": path}."""
    paths = {}
    for kind in KINDS:
        paths[kind] = tmp_path / f"{PREFIX}.{kind}"
        shutil.copyfile(fixture_path(kind), paths[kind])
    return paths


@pytest.fixture
def options(monkeypatch):
    """The SnapshotOptions `ktrace` would run with; nothing is loaded."""
    seen = []

    def run(opts):
        seen.append(opts)
        return SimpleNamespace(status=0, paths={"bundle.tgz": opts.out_dir / "ktrace.bundle.tgz"})

    monkeypatch.setattr(snapshot, "run", run)

    def parse(*argv: str) -> snapshot.SnapshotOptions:
        assert cli.main(["--quiet", *argv]) == 0
        return seen.pop()

    return parse
