"""ktrace/schemas/*.schema.json describe the bundle exactly, and ktrace.schemas.validate_bundle enforces them."""

from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path

import pytest

from ktrace import probes, schemas
from ktrace.events import decode, generated
from ktrace.events.dns import DnsPairer
from tests.unit.conftest import KINDS, PREFIX, RECORDS, fixture_path

jsonschema = pytest.importorskip("jsonschema")


def _rewrite_events(path: Path, edit, line: int = 1) -> None:
    """Apply edit(event) to one line of events.jsonl, written compactly like ktrace writes it."""
    lines = path.read_text().splitlines()
    event = json.loads(lines[line - 1])
    edit(event)
    lines[line - 1] = json.dumps(event, separators=(",", ":"))
    path.write_text("\n".join(lines) + "\n")


def _rewrite_json(path: Path, edit) -> None:
    document = json.loads(path.read_text())
    edit(document)
    path.write_text(json.dumps(document, indent=2) + "\n")


def _line_of(kind: str, **match) -> int:
    for number, line in enumerate(fixture_path("events.jsonl").read_text().splitlines(), 1):
        event = json.loads(line)
        if event["type"] == kind and all(event.get(k) == v for k, v in match.items()):
            return number
    raise AssertionError(f"no {kind} line with {match} in the fixture")


# --- the schemas themselves ---


@pytest.mark.parametrize("name", schemas.NAMES)
def test_schema_is_valid_draft_2020_12(name):
    schema = schemas.load_schema(name)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(schema)


def _fields(node, path="$"):
    """(path, schema) of every property of every closed object (additionalProperties false) in a schema:
    the fields a document can hold, as opposed to constraints on them in if/then."""
    if isinstance(node, dict):
        if node.get("additionalProperties") is False:
            for name, sub in node.get("properties", {}).items():
                yield f"{path}.{name}", sub
        for key, sub in node.items():
            yield from _fields(sub, f"{path}/{key}")
    elif isinstance(node, list):
        for i, sub in enumerate(node):
            yield from _fields(sub, f"{path}[{i}]")


def _resolve(schema: dict, sub: dict) -> dict:
    while "$ref" in sub and "description" not in sub:
        target = schema
        for part in sub["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        sub = target
    return sub


@pytest.mark.parametrize("name", schemas.NAMES)
def test_every_field_is_documented_with_a_description(name):
    schema = schemas.load_schema(name)
    fields = list(_fields(schema))
    undocumented = [path for path, sub in fields if "const" not in sub and not _resolve(schema, sub).get("description")]
    assert len(fields) > 20
    assert undocumented == []


def test_event_types_in_the_schema_are_the_decoders_kinds_and_the_user_space_types():
    schema = schemas.load_schema("events")
    decoded = [t for kind in generated.KIND.values() for t in decode.TYPES_OF_KIND.get(kind, (kind,))]
    user_space = ["dns_timeout", "drop_count", "runq_histogram", "bio_histogram"]
    assert schema["properties"]["type"]["enum"] == [*decoded, *user_space]
    assert [rule["then"]["$ref"].rsplit("/", 1)[1] for rule in schema["allOf"]] == [*decoded, *user_space]


def test_summary_counts_accept_every_event_type():
    types = schemas.load_schema("events")["properties"]["type"]["enum"]
    counted = schemas.load_schema("summary")["properties"]["counts"]["propertyNames"]["enum"]
    assert sorted(counted) == sorted(types)


def test_probe_families_in_the_schemas_are_the_registrys():
    for name in ("summary", "node"):
        defs = schemas.load_schema(name)["$defs"]
        assert defs["options"]["properties"]["probes"]["items"]["enum"] == list(probes.FAMILY_BY_NAME)
        assert defs["probe_row"]["properties"]["family"]["enum"] == list(probes.FAMILY_BY_NAME)


def test_summary_and_node_describe_options_and_probe_rows_identically():
    summary, node = schemas.load_schema("summary")["$defs"], schemas.load_schema("node")["$defs"]
    assert summary["options"] == node["options"]
    assert summary["probe_row"] == node["probe_row"]


def test_load_schema_accepts_file_names():
    assert schemas.load_schema("events.jsonl") == schemas.load_schema("events")
    assert schemas.load_schema("summary.schema.json") == schemas.load_schema("summary")


def test_load_schema_rejects_unknown_names():
    with pytest.raises(ValueError, match="no schema"):
        schemas.load_schema("bundle")


# --- the recorded bundle validates, however it is named ---


def test_recorded_bundle_validates_by_prefix():
    assert schemas.validate_bundle(fixture_path("events.jsonl").parent / PREFIX) == []


def test_recorded_bundle_validates_by_the_path_of_any_one_file():
    for kind in KINDS:
        assert schemas.validate_bundle(fixture_path(kind)) == []


def test_recorded_bundle_validates_by_list_and_mapping_of_paths():
    assert schemas.validate_bundle([fixture_path(kind) for kind in KINDS]) == []
    assert schemas.validate_bundle({kind: fixture_path(kind) for kind in KINDS}) == []


def test_recorded_bundle_validates_inside_a_tgz(tmp_path):
    tgz = tmp_path / f"{PREFIX}.bundle.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        for kind in KINDS:
            tar.add(fixture_path(kind), arcname=fixture_path(kind).name)
    assert schemas.validate_bundle(tgz) == []


@pytest.mark.parametrize("record", RECORDS, ids=lambda p: p.stem)
def test_recorded_event_of_every_kind_validates(record):
    event = json.loads(record.read_text())["expected"]
    if event["type"] == "dns_reply":
        # a reply is written once the pairer has looked for its query
        written: list[dict] = []
        DnsPairer(lambda e: written.append(e) or len(written), 10**9, str).add(event)
        event = written[0]
    assert schemas.validate("events", event) == []


# --- broken copies fail, with the file, line and field named ---


def test_extra_field_in_an_event_fails(bundle_copy):
    _rewrite_events(bundle_copy["events.jsonl"], lambda e: e.update(extra=1), line=1)
    errors = schemas.validate_bundle(bundle_copy["summary.json"])
    assert any(e.startswith("events.jsonl:1: $:") and "'extra' was unexpected" in e for e in errors)


def test_missing_field_in_an_event_fails(bundle_copy):
    line = _line_of("connect")
    _rewrite_events(bundle_copy["events.jsonl"], lambda e: e.pop("duration_ms"), line=line)
    errors = schemas.validate_bundle(bundle_copy["summary.json"])
    assert any(e.startswith(f"events.jsonl:{line}:") and "'duration_ms' is a required property" in e for e in errors)


def test_field_of_the_wrong_type_fails(bundle_copy):
    line = _line_of("tcp_state")
    _rewrite_events(bundle_copy["events.jsonl"], lambda e: e.update(sport="47001"), line=line)
    errors = schemas.validate_bundle(bundle_copy["summary.json"])
    assert any(e.startswith(f"events.jsonl:{line}: $.sport:") for e in errors)


def test_port_out_of_range_fails(bundle_copy):
    line = _line_of("tcp_state")
    _rewrite_events(bundle_copy["events.jsonl"], lambda e: e.update(dport=70000), line=line)
    errors = schemas.validate_bundle(bundle_copy["summary.json"])
    assert any(e.startswith(f"events.jsonl:{line}: $.dport:") and "70000" in e for e in errors)


def test_unknown_event_type_fails(bundle_copy):
    _rewrite_events(bundle_copy["events.jsonl"], lambda e: e.update(type="udp_state"), line=1)
    errors = schemas.validate_bundle(bundle_copy["summary.json"])
    assert any(e.startswith("events.jsonl:1: $.type:") for e in errors)


def test_field_of_another_event_type_fails(bundle_copy):
    line = _line_of("tcp_state")
    _rewrite_events(bundle_copy["events.jsonl"], lambda e: e.update(direction="sent"), line=line)
    errors = schemas.validate_bundle(bundle_copy["summary.json"])
    assert any(e.startswith(f"events.jsonl:{line}: $:") and "'direction' was unexpected" in e for e in errors)


def test_ipv6_address_on_an_ipv4_event_fails(bundle_copy):
    line = _line_of("tcp_state", family="ipv4")
    _rewrite_events(bundle_copy["events.jsonl"], lambda e: e.update(daddr="::1"), line=line)
    errors = schemas.validate_bundle(bundle_copy["summary.json"])
    assert any(e.startswith(f"events.jsonl:{line}: $.daddr:") and "ipv4" in e for e in errors)


def test_handshake_time_outside_syn_sent_fails(bundle_copy):
    line = _line_of("tcp_state", old_state="ESTABLISHED")
    _rewrite_events(bundle_copy["events.jsonl"], lambda e: e.update(handshake_ms=1.0), line=line)
    errors = schemas.validate_bundle(bundle_copy["summary.json"])
    assert any(e.startswith(f"events.jsonl:{line}: $.old_state:") for e in errors)


def test_connect_errno_without_a_failed_return_fails(bundle_copy):
    line = _line_of("connect", ret=0)
    _rewrite_events(bundle_copy["events.jsonl"], lambda e: e.update(errno="ECONNREFUSED"), line=line)
    errors = schemas.validate_bundle(bundle_copy["summary.json"])
    assert any(e.startswith(f"events.jsonl:{line}: $.errno:") for e in errors)


def test_event_whose_first_key_is_not_type_fails(bundle_copy):
    def move_type_last(event: dict) -> None:
        event["type"] = event.pop("type")

    _rewrite_events(bundle_copy["events.jsonl"], move_type_last, line=1)
    assert 'events.jsonl:1: "type" is not the first key' in schemas.validate_bundle(bundle_copy["summary.json"])


def test_line_that_is_not_json_fails(bundle_copy):
    path = bundle_copy["events.jsonl"]
    path.write_bytes(path.read_bytes() + b'{"type":"tcp_state",\n')
    errors = schemas.validate_bundle(bundle_copy["summary.json"])
    lines = len(fixture_path("events.jsonl").read_bytes().splitlines())
    assert any(e.startswith(f"events.jsonl:{lines + 1}: not JSON") for e in errors)


def test_events_edited_after_the_summary_was_written_fail_the_checksum(bundle_copy):
    _rewrite_events(bundle_copy["events.jsonl"], lambda e: e.update(cpu=e["cpu"] + 1), line=1)
    errors = schemas.validate_bundle(bundle_copy["summary.json"])
    assert len(errors) == 1 and errors[0].startswith("summary.json: files.events.sha256 is ")


def test_events_removed_after_the_summary_was_written_fail_the_counts(bundle_copy):
    path = bundle_copy["events.jsonl"]
    lines = path.read_bytes().splitlines(keepends=True)
    last_tcp_state = max(i for i, line in enumerate(lines) if line.startswith(b'{"type":"tcp_state"'))
    path.write_bytes(b"".join(lines[:last_tcp_state] + lines[last_tcp_state + 1:]))
    errors = schemas.validate_bundle(bundle_copy["summary.json"])
    assert any(e.startswith("summary.json: files.events.lines is ") for e in errors)
    assert any(e.startswith("summary.json: losses.by_family.tcp_state.written is ") for e in errors)


def test_node_edited_after_the_summary_was_written_fails_the_checksum(bundle_copy):
    _rewrite_json(bundle_copy["node.json"], lambda d: d.update(hostname="elsewhere"))
    errors = schemas.validate_bundle(bundle_copy["summary.json"])
    assert any(e.startswith("summary.json: files.node.sha256 is ") for e in errors)


def test_summary_without_a_required_key_fails(bundle_copy):
    _rewrite_json(bundle_copy["summary.json"], lambda d: d.pop("findings"))
    assert "summary.json: $: 'findings' is a required property" in schemas.validate_bundle(bundle_copy["node.json"])


def test_summary_with_an_unknown_finding_rule_fails(bundle_copy):
    _rewrite_json(bundle_copy["summary.json"], lambda d: d["findings"][0].update(rule="made_up"))
    errors = schemas.validate_bundle(bundle_copy["node.json"])
    assert any(e.startswith("summary.json: $.findings[0].rule:") for e in errors)


def test_finding_subject_of_the_wrong_shape_fails(bundle_copy):
    def edit(summary: dict) -> None:
        finding = next(f for f in summary["findings"] if f["rule"] == "close_wait")
        finding["subject"].pop("remotes")

    _rewrite_json(bundle_copy["summary.json"], edit)
    errors = schemas.validate_bundle(bundle_copy["node.json"])
    assert any("'remotes' is a required property" in e for e in errors)


def test_node_with_a_field_of_the_wrong_type_fails(bundle_copy):
    _rewrite_json(bundle_copy["node.json"], lambda d: d.update(cpus="4"))
    errors = schemas.validate_bundle({"node.json": bundle_copy["node.json"]})
    assert "node.json: $.cpus: '4' is not of type 'integer', 'null'" in errors


def test_missing_files_are_reported(bundle_copy):
    bundle_copy["node.json"].unlink()
    assert schemas.validate_bundle(bundle_copy["summary.json"]) == ["node.json: missing"]


def test_error_list_is_capped(bundle_copy):
    path = bundle_copy["events.jsonl"]
    path.write_text("".join('{"type":"nothing"}\n' for _ in range(200)))
    errors = schemas.validate_bundle(bundle_copy["summary.json"], max_errors=10)
    assert len(errors) == 11 and errors[-1].startswith("... and ")


# --- jsonschema is a test extra ---


def test_load_schema_needs_no_jsonschema(monkeypatch):
    monkeypatch.setitem(sys.modules, "jsonschema", None)
    assert schemas.load_schema("node")["title"] == "ktrace node.json"


def test_validating_without_jsonschema_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "jsonschema", None)
    schemas.validator.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"needs the jsonschema package: pip install"):
            schemas.validate_bundle(fixture_path("summary.json"))
        with pytest.raises(schemas.SchemaToolMissing):
            schemas.validate("events", {})
    finally:
        schemas.validator.cache_clear()


def test_unreadable_tgz_is_reported_not_raised(tmp_path):
    tgz = tmp_path / "x.bundle.tgz"
    tgz.write_bytes(b"not a tarball")
    errors = schemas.validate_bundle(tgz)
    assert len(errors) == 1 and errors[0].startswith("cannot read the bundle:")
