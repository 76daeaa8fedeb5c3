"""The bundle: events.jsonl, summary.json, node.json and a tgz of the three.

Every file is written under a temporary name with mode 0600, fsynced, then
renamed, so a reader never sees half a file. events.jsonl is written as the
window runs, under exact caps on lines and bytes; a full disk stops it and
marks the bundle truncated instead of losing what was already saved.

Names are ktrace.<node>.<UTC start to the millisecond>-<pid>.<kind>, and a run
claims its name by creating its events file with O_EXCL: runs started at once
into one directory (a DaemonSet and a Job on one hostPath, two SREs on one node)
each get their own bundle. Should the name be taken after all (the same pid in
another pid namespace, in the same millisecond), a counter is added.
"""

from __future__ import annotations

import errno
import hashlib
import io
import os
import tarfile
import tempfile
import time
from pathlib import Path

import orjson

from ktrace.errors import OutputError

MODE = 0o600
# On a full disk, events.jsonl gives back this much so summary.json, node.json and the tgz still fit.
DISK_FULL_RESERVE = 256 << 10
KINDS = ("events.jsonl", "summary.json", "node.json", "bundle.tgz")
MAX_NAME_TRIES = 100  # names tried (a counter added) before giving up on a directory


def _open_private(path: Path, exclusive: bool = False) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
    return os.open(path, flags, MODE)


def check_out_dir(out_dir: Path) -> None:
    """Create out_dir if needed and prove it is writable, before any probe is loaded."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create --out-dir {out_dir}: {exc.strerror}") from None
    if not out_dir.is_dir():
        raise OutputError(f"--out-dir {out_dir} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(prefix=".ktrace-write-test.", dir=out_dir)  # a unique name: runs may overlap
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"--out-dir {out_dir} is not writable: {exc.strerror}") from None


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = _open_private(tmp)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, MODE)
    os.replace(tmp, path)


class Bundle:
    """One bundle being written: write_line() for each event, then close_events(), write_json() and write_tgz()."""

    def __init__(self, out_dir: Path, node: str, started: float, max_events: int | None,
                 max_bytes: int | None, pid: int | None = None) -> None:
        self.out_dir = out_dir
        self.prefix, self._fd = _claim(out_dir, f"ktrace.{_safe(node)}.{_stamp(started)}-{pid or os.getpid()}")
        self.paths = _paths(out_dir, self.prefix)
        self._events_tmp = _events_tmp(out_dir, self.prefix)
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.lines = 0
        self.bytes = 0
        self.event_lines = self.event_bytes = 0  # per-event lines, which the caps bound
        self.capped = ""  # the cap that was reached (max_events, max_bytes): no per-event line is written after
        self.truncated = ""  # why writing stopped early (disk full), if it did
        self._buffer: list[bytes] = []
        self._buffered = 0
        self._sha = hashlib.sha256()

    def write_event(self, event: dict) -> int | None:
        return self.write_line(orjson.dumps(event) + b"\n")

    def write_line(self, line: bytes, aggregate: bool = False) -> int | None:
        """Append one JSON line; returns its 1-based line number, or None when a cap or a full disk stopped it.

        The caps bound the per-event lines and keep them a prefix of the window: writing stops at the first
        line that does not fit. Aggregate lines (a count that stands for the whole window, bounded by the
        kernel map it was read from) are written whatever the caps, so the file always holds them.
        """
        if self.truncated:
            return None
        if not aggregate:
            if self.capped:
                return None
            if self.max_events is not None and self.event_lines >= self.max_events:
                self.capped = "max_events"
                return None
            if self.max_bytes is not None and self.event_bytes + len(line) > self.max_bytes:
                self.capped = "max_bytes"
                return None
            self.event_lines += 1
            self.event_bytes += len(line)
        self.lines += 1
        self.bytes += len(line)
        self._buffer.append(line)
        self._buffered += len(line)
        if self._buffered >= 1 << 20:
            self.flush()
        return self.lines

    def flush(self) -> None:
        if not self._buffer:
            return
        data = b"".join(self._buffer)
        self._buffer, self._buffered = [], 0
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            self._sha.update(data)
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise OutputError(f"writing {self._events_tmp.name} failed: {exc.strerror}") from None
            # keep what reached the disk, less room for the rest of the bundle; the summary says so
            written = os.lseek(self._fd, 0, os.SEEK_CUR)
            cut = self._last_good_offset(max(written - DISK_FULL_RESERVE, 0))
            os.ftruncate(self._fd, cut)
            os.lseek(self._fd, cut, os.SEEK_SET)
            self.truncated = f"disk full after {self.lines} lines"

    def _last_good_offset(self, limit: int) -> int:
        # cut back to the last complete line so every line stays valid JSON
        if limit == 0:
            self._sha = hashlib.sha256()
            self.lines = self.bytes = 0
            return 0
        with open(self._events_tmp, "rb") as f:
            data = f.read(limit)
        cut = data.rfind(b"\n") + 1
        self._sha = hashlib.sha256(data[:cut])
        self.lines = data[:cut].count(b"\n")
        self.bytes = cut
        return cut

    def close_events(self) -> dict:
        """Flush, fsync and publish events.jsonl; returns its file entry for the summary."""
        self.flush()
        try:
            os.fsync(self._fd)
        except OSError:
            pass
        os.close(self._fd)
        os.replace(self._events_tmp, self.paths["events.jsonl"])
        return {"name": self.paths["events.jsonl"].name, "sha256": self._sha.hexdigest(), "bytes": self.bytes,
                "lines": self.lines, "truncated": bool(self.truncated)}

    def write_json(self, kind: str, document: dict) -> dict:
        data = orjson.dumps(document, option=orjson.OPT_INDENT_2) + b"\n"
        try:
            _write_atomic(self.paths[kind], data)
        except OSError as exc:
            raise OutputError(f"writing {self.paths[kind].name} failed: {exc.strerror}") from None
        return {"name": self.paths[kind].name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}

    def write_tgz(self) -> Path:
        """The three files in one tgz, for the incident ticket."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for kind in ("events.jsonl", "summary.json", "node.json"):
                path = self.paths[kind]
                info = tar.gettarinfo(str(path), arcname=path.name)
                info.mode = MODE
                info.uid = info.gid = 0
                info.uname = info.gname = ""
                with open(path, "rb") as f:
                    tar.addfile(info, f)
        try:
            _write_atomic(self.paths["bundle.tgz"], buf.getvalue())
        except OSError as exc:
            raise OutputError(f"writing {self.paths['bundle.tgz'].name} failed: {exc.strerror}") from None
        return self.paths["bundle.tgz"]

    def abandon(self) -> None:
        """Remove the temporary events file after a failure before the window ran."""
        try:
            os.close(self._fd)
        except OSError:
            pass
        self._events_tmp.unlink(missing_ok=True)


def _stamp(started: float) -> str:
    """The UTC start to the millisecond: 20261122T000000.123Z."""
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(started)) + f".{int(started * 1000) % 1000:03d}Z"


def _paths(out_dir: Path, prefix: str) -> dict[str, Path]:
    return {kind: out_dir / f"{prefix}.{kind}" for kind in KINDS}


def _events_tmp(out_dir: Path, prefix: str) -> Path:
    return out_dir / f"{prefix}.events.jsonl.tmp"


def _claim(out_dir: Path, base: str) -> tuple[str, int]:
    """A prefix no other bundle in out_dir has, and the events file opened under it (O_EXCL: the claim)."""
    for n in range(MAX_NAME_TRIES):
        prefix = base if n == 0 else f"{base}-{n + 1}"
        if any(path.exists() for path in _paths(out_dir, prefix).values()):
            continue  # a finished bundle of that name
        try:
            return prefix, _open_private(_events_tmp(out_dir, prefix), exclusive=True)
        except FileExistsError:
            continue  # a running one
        except OSError as exc:
            raise OutputError(f"cannot write to {out_dir}: {exc.strerror}") from None
    raise OutputError(f"cannot find a free bundle name in {out_dir} after {MAX_NAME_TRIES} tries ({base}...)")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name) or "node"
