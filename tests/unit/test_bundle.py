"""ktrace.bundle.Bundle: private files, exact caps, a tgz of the rest, checksums that match."""

from __future__ import annotations

import hashlib
import stat
import tarfile

import orjson
import pytest

from ktrace.bundle import Bundle
from tests.unit.conftest import fixture_events

STARTED = 1_795_305_600.0  # 2026-11-22T00:00:00Z
EVENTS = fixture_events()[:20]
LINES = [orjson.dumps(e) + b"\n" for e in EVENTS]


def _bundle(tmp_path, max_events=None, max_bytes=None) -> Bundle:
    return Bundle(tmp_path, "node-1", STARTED, max_events, max_bytes, pid=4242)


def _finish(bundle: Bundle) -> dict:
    results = {"events.jsonl": bundle.close_events(),
               "node.json": bundle.write_json("node.json", {"schema": "ktrace.node/1"}),
               "summary.json": bundle.write_json("summary.json", {"schema": "ktrace.summary/1"})}
    bundle.write_tgz()
    return results


def test_files_are_named_after_the_node_the_utc_start_to_the_millisecond_and_the_pid(tmp_path):
    bundle = Bundle(tmp_path, "node-1", STARTED + 0.25, None, None, pid=4242)
    assert bundle.paths["summary.json"] == tmp_path / "ktrace.node-1.20261122T000000.250Z-4242.summary.json"


def test_node_name_is_made_safe_for_a_file_name(tmp_path):
    assert Bundle(tmp_path, "../a b", STARTED, None, None, pid=1).prefix == "ktrace..._a_b.20261122T000000.000Z-1"


def test_runs_started_in_the_same_millisecond_by_different_processes_get_different_names(tmp_path):
    assert _bundle(tmp_path).prefix != Bundle(tmp_path, "node-1", STARTED, None, None, pid=4243).prefix


def test_a_name_already_taken_by_a_running_or_a_finished_bundle_gets_a_counter(tmp_path):
    # the same pid in the same millisecond: another pid namespace writing to the same hostPath
    running = _bundle(tmp_path)
    second = _bundle(tmp_path)
    assert (running.prefix, second.prefix) == ("ktrace.node-1.20261122T000000.000Z-4242",
                                               "ktrace.node-1.20261122T000000.000Z-4242-2")
    _finish(running)
    _finish(second)
    assert _bundle(tmp_path).prefix == "ktrace.node-1.20261122T000000.000Z-4242-3"


def test_two_bundles_written_at_once_into_one_directory_each_match_their_own_hashes(tmp_path):
    first, second = _bundle(tmp_path), _bundle(tmp_path)
    for event in EVENTS:  # interleaved, as two concurrent runs write
        first.write_event(event)
        second.write_event({**event, "comm": "other"})
    results = {"first": _finish(first), "second": _finish(second)}
    for bundle, result in ((first, results["first"]), (second, results["second"])):
        for kind in ("events.jsonl", "node.json"):
            assert result[kind]["sha256"] == hashlib.sha256(bundle.paths[kind].read_bytes()).hexdigest()
    assert first.paths["events.jsonl"].read_bytes() == b"".join(LINES)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for b in (first, second) for p in b.paths.values())


def test_every_file_is_readable_by_its_owner_only(tmp_path):
    bundle = _bundle(tmp_path)
    for event in EVENTS:
        bundle.write_event(event)
    _finish(bundle)
    modes = {kind: stat.S_IMODE(path.stat().st_mode) for kind, path in bundle.paths.items()}
    assert modes == dict.fromkeys(("events.jsonl", "summary.json", "node.json", "bundle.tgz"), 0o600)


def test_events_file_appears_only_once_closed(tmp_path):
    bundle = _bundle(tmp_path)
    bundle.write_event(EVENTS[0])
    assert not bundle.paths["events.jsonl"].exists()
    bundle.close_events()
    assert bundle.paths["events.jsonl"].read_bytes() == LINES[0]


def test_write_event_returns_1_based_line_numbers(tmp_path):
    bundle = _bundle(tmp_path)
    assert [bundle.write_event(e) for e in EVENTS[:3]] == [1, 2, 3]


def test_event_written_as_a_line_is_the_event_serialized(tmp_path):
    bundle = _bundle(tmp_path)
    bundle.write_event(EVENTS[0])
    bundle.write_line(LINES[1])
    bundle.close_events()
    assert bundle.paths["events.jsonl"].read_bytes() == LINES[0] + LINES[1]


def test_max_events_writes_exactly_that_many(tmp_path):
    bundle = _bundle(tmp_path, max_events=7)
    numbers = [bundle.write_event(e) for e in EVENTS]
    entry = bundle.close_events()
    assert numbers == [*range(1, 8), *[None] * 13]
    assert entry["lines"] == 7
    assert bundle.paths["events.jsonl"].read_bytes() == b"".join(LINES[:7])
    assert bundle.capped


def test_max_events_zero_writes_an_empty_file(tmp_path):
    bundle = _bundle(tmp_path, max_events=0)
    assert bundle.write_event(EVENTS[0]) is None
    assert bundle.close_events()["lines"] == 0
    assert bundle.paths["events.jsonl"].read_bytes() == b""


def test_max_bytes_is_exact_when_lines_fill_it(tmp_path):
    limit = sum(len(line) for line in LINES[:5])
    bundle = _bundle(tmp_path, max_bytes=limit)
    for event in EVENTS:
        bundle.write_event(event)
    entry = bundle.close_events()
    assert bundle.paths["events.jsonl"].stat().st_size == entry["bytes"] == limit
    assert entry["lines"] == 5


def test_max_bytes_is_never_exceeded_by_a_partial_line(tmp_path):
    limit = sum(len(line) for line in LINES[:5]) + len(LINES[5]) - 1
    bundle = _bundle(tmp_path, max_bytes=limit)
    for event in EVENTS:
        bundle.write_event(event)
    bundle.close_events()
    assert bundle.paths["events.jsonl"].read_bytes() == b"".join(LINES[:5])


def test_max_bytes_stops_at_the_first_line_that_does_not_fit(tmp_path):
    short, long = b'{"type":"x"}\n', b'{"type":"x","pad":"' + b"y" * 100 + b'"}\n'
    bundle = _bundle(tmp_path, max_bytes=3 * len(short))
    # the long line does not fit; a third short one would, but the file stays a prefix of the window
    assert [bundle.write_line(line) for line in (short, short, long, short)] == [1, 2, None, None]
    bundle.close_events()
    assert bundle.paths["events.jsonl"].read_bytes() == short * 2


def test_tgz_holds_the_other_three_files(tmp_path):
    bundle = _bundle(tmp_path)
    for event in EVENTS:
        bundle.write_event(event)
    _finish(bundle)
    with tarfile.open(bundle.paths["bundle.tgz"]) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {bundle.paths[kind].name for kind in ("events.jsonl", "summary.json", "node.json")}
        for kind in ("events.jsonl", "summary.json", "node.json"):
            assert tar.extractfile(bundle.paths[kind].name).read() == bundle.paths[kind].read_bytes()


def test_tgz_members_are_private_and_carry_no_owner_names(tmp_path):
    bundle = _bundle(tmp_path)
    _finish(bundle)
    with tarfile.open(bundle.paths["bundle.tgz"]) as tar:
        for member in tar.getmembers():
            assert (member.mode, member.uid, member.gid, member.uname, member.gname) == (0o600, 0, 0, "", "")


@pytest.mark.parametrize("kind", ["events.jsonl", "summary.json", "node.json"])
def test_sha256_and_size_in_the_write_results_match_the_file(tmp_path, kind):
    bundle = _bundle(tmp_path)
    for event in EVENTS:
        bundle.write_event(event)
    result = _finish(bundle)[kind]
    data = bundle.paths[kind].read_bytes()
    assert result["name"] == bundle.paths[kind].name
    assert result["sha256"] == hashlib.sha256(data).hexdigest()
    assert result["bytes"] == len(data)


def test_sha256_covers_only_the_lines_written_under_a_cap(tmp_path):
    bundle = _bundle(tmp_path, max_events=3)
    for event in EVENTS:
        bundle.write_event(event)
    assert bundle.close_events()["sha256"] == hashlib.sha256(b"".join(LINES[:3])).hexdigest()


def test_json_documents_are_indented_and_end_with_a_newline(tmp_path):
    bundle = _bundle(tmp_path)
    bundle.write_json("node.json", {"schema": "ktrace.node/1", "cpus": 4})
    assert bundle.paths["node.json"].read_bytes() == b'{\n  "schema": "ktrace.node/1",\n  "cpus": 4\n}\n'


def test_abandon_leaves_no_file_behind(tmp_path):
    bundle = _bundle(tmp_path)
    bundle.write_event(EVENTS[0])
    bundle.abandon()
    assert list(tmp_path.iterdir()) == []
