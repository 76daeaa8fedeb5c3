"""The JSON Schemas of a bundle's files (ktrace/schemas/*.schema.json) and a validator for whole bundles.

The schemas are the field-by-field documentation of events.jsonl, summary.json
and node.json. Validating needs the `jsonschema` package, which is a test extra
(`pip install 'ktrace[test]'`); loading a schema does not.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import tarfile
from collections import Counter
from collections.abc import Iterable, Mapping
from importlib import resources
from pathlib import Path
from typing import Any, Union

from ktrace.errors import KtraceError
from ktrace.events.decode import family_and_weight

NAMES = ("events", "summary", "node")
KINDS = {"events.jsonl": "events", "summary.json": "summary", "node.json": "node"}
MAX_ERRORS = 50
_TYPE_FIRST = re.compile(rb'^\s*\{\s*"type"\s*:')

BundleFiles = Union[str, Path, Iterable[Union[str, Path]], Mapping[str, Union[str, Path]]]


class SchemaToolMissing(KtraceError, ImportError):
    """Validation was asked for, but the jsonschema package is not installed."""


def load_schema(name: str) -> dict:
    """The schema of one file: "events", "summary" or "node" (or "events.schema.json", "summary.json", ...)."""
    key = name.removesuffix(".schema.json").removesuffix(".jsonl").removesuffix(".json")
    if key not in NAMES:
        raise ValueError(f"no schema {name!r}; known: {', '.join(NAMES)}")
    return json.loads(resources.files("ktrace").joinpath("schemas", f"{key}.schema.json").read_text())


def _jsonschema() -> Any:
    try:
        import jsonschema
    except ImportError:
        raise SchemaToolMissing(
            "validating against ktrace's schemas needs the jsonschema package: pip install 'ktrace[test]' "
            "(or pip install 'jsonschema>=4')"
        ) from None
    return jsonschema


@functools.cache
def validator(name: str) -> Any:
    """A Draft 2020-12 validator for one schema, checking formats (ipv4, ipv6, date-time) too."""
    jsonschema = _jsonschema()
    schema = load_schema(name)
    cls = jsonschema.Draft202012Validator
    cls.check_schema(schema)
    return cls(schema, format_checker=jsonschema.FormatChecker())


def validate(name: str, document: object, where: str = "") -> list[str]:
    """Errors of one document (an event dict, a summary, a node document); [] when it is valid."""
    errors = sorted(validator(name).iter_errors(document), key=lambda e: (e.json_path, e.message))
    prefix = f"{where}: " if where else ""
    return [f"{prefix}{e.json_path}: {e.message}" for e in errors]


def validate_bundle(prefix_or_paths: BundleFiles, max_errors: int = MAX_ERRORS) -> list[str]:
    """Every problem of a bundle, as one line each ("file:line: $.path: message"); [] when it is whole and valid.

    Accepts the common prefix ("out/ktrace.node1.20261122T000000Z"), the path of any one of the bundle's
    files (the others are found next to it), a bundle.tgz, or the paths themselves (a list, or a mapping
    {"events.jsonl": path, "summary.json": path, "node.json": path}). Checks each file against its schema,
    that every event line starts with its "type", and that summary.json agrees with the other two files
    (sha256, size and line count of events.jsonl, events written per type, sha256 of node.json).
    """
    _jsonschema()
    try:
        contents = _read(prefix_or_paths)
    except (OSError, tarfile.TarError) as exc:
        return [f"cannot read the bundle: {exc}"]
    errors: list[str] = []
    for kind in KINDS:
        if kind not in contents:
            errors.append(f"{kind}: missing")
    events = _check_events(contents["events.jsonl"], errors, max_errors) if "events.jsonl" in contents else None
    documents = {}
    for kind in ("summary.json", "node.json"):
        if kind not in contents:
            continue
        try:
            documents[kind] = json.loads(contents[kind])
        except ValueError as exc:
            errors.append(f"{kind}: not JSON: {exc}")
            continue
        errors += validate(KINDS[kind], documents[kind], kind)
    summary = documents.get("summary.json")
    if isinstance(summary, dict):
        _check_consistency(summary, contents, events, errors)
    if len(errors) > max_errors:
        errors = [*errors[:max_errors], f"... and {len(errors) - max_errors} more"]
    return errors


def _read(spec: BundleFiles) -> dict[str, bytes]:
    """{"events.jsonl": bytes, ...} for the files of the bundle that exist."""
    if isinstance(spec, Mapping):
        return {kind: Path(spec[kind]).read_bytes() for kind in KINDS if kind in spec}
    if not isinstance(spec, (str, Path)):
        found: dict[str, bytes] = {}
        for path in map(Path, spec):
            kind = _kind_of(path.name)
            if kind is None:
                raise OSError(f"{path}: not a file of a bundle (expected *.events.jsonl, *.summary.json, *.node.json)")
            found[kind] = path.read_bytes()
        return found
    path = Path(spec)
    if path.name.endswith(".bundle.tgz"):
        found = {}
        with tarfile.open(path, "r:gz") as tar:
            for member in tar.getmembers():
                kind = _kind_of(member.name)
                f = tar.extractfile(member) if kind else None
                if f is not None:
                    found[kind] = f.read()  # type: ignore[index]
        return found
    kind = _kind_of(path.name)
    prefix = str(path)[: -len(kind) - 1] if kind else str(path).rstrip(".")
    found = {}
    for kind in KINDS:
        candidate = Path(f"{prefix}.{kind}")
        if candidate.exists():
            found[kind] = candidate.read_bytes()
    return found


def _kind_of(name: str) -> str | None:
    return next((kind for kind in KINDS if name.endswith("." + kind)), None)


def _check_events(data: bytes, errors: list[str], max_errors: int) -> Counter[str]:
    """Validate the lines of events.jsonl (until max_errors are found); returns the kernel events per family."""
    families: Counter[str] = Counter()
    if data and not data.endswith(b"\n"):
        errors.append("events.jsonl: the last line is not terminated (a cut file?)")
    for number, line in enumerate(data.splitlines(), 1):
        where = f"events.jsonl:{number}"
        if len(errors) > max_errors:
            _count_family(families, _event_of(line))  # keep counting for the cross-checks, stop validating
            continue
        try:
            event = json.loads(line)
        except ValueError as exc:
            errors.append(f"{where}: not JSON: {exc}")
            continue
        if isinstance(event, dict):
            _count_family(families, event)
            if not _TYPE_FIRST.match(line):
                errors.append(f'{where}: "type" is not the first key')
        errors += validate("events", event, where)
    return families


def _event_of(line: bytes) -> object:
    try:
        return json.loads(line)
    except ValueError:
        return None


def _count_family(families: Counter[str], event: object) -> None:
    """Add the kernel events a line stands for to its probe family, as the summary counts them."""
    if not isinstance(event, dict):
        return
    try:
        family, weight = family_and_weight(event)
    except (KeyError, TypeError):
        family, weight = str(event.get("type")), 1
    if family is not None:
        families[family] += weight


def _check_consistency(summary: dict, contents: dict[str, bytes], families: Counter[str] | None,
                       errors: list[str]) -> None:
    files = summary.get("files")
    if not isinstance(files, dict):
        return
    events_entry, node_entry = files.get("events") or {}, files.get("node") or {}
    data = contents.get("events.jsonl")
    if data is not None and isinstance(events_entry, dict):
        expected = {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "lines": data.count(b"\n")}
        for key, actual in expected.items():
            if key in events_entry and events_entry[key] != actual:
                errors.append(f"summary.json: files.events.{key} is {events_entry[key]!r}, "
                              f"events.jsonl has {actual!r}")
    node = contents.get("node.json")
    if node is not None and isinstance(node_entry, dict):
        expected = {"sha256": hashlib.sha256(node).hexdigest(), "bytes": len(node)}
        for key, actual in expected.items():
            if key in node_entry and node_entry[key] != actual:
                errors.append(f"summary.json: files.node.{key} is {node_entry[key]!r}, node.json has {actual!r}")
    by_family = (summary.get("losses") or {}).get("by_family")
    if families is not None and isinstance(by_family, dict):
        for family, row in by_family.items():
            if isinstance(row, dict) and row.get("written", 0) != families.get(family, 0):
                errors.append(f"summary.json: losses.by_family.{family}.written is {row.get('written')!r}, "
                              f"events.jsonl holds {families.get(family, 0)} {family} events")
