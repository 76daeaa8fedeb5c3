"""The window's hot path: the kernel's records go from the ring buffers to a spool file, undecoded.

While the window is open ktrace only moves bytes, the way `perf record` and
`trace-cmd record` do: each BPF ring buffer is read through its mmap'ed pages
(the layout of kernel/bpf/ringbuf.c, as libbpf's ring_buffer__consume and
cilium/ebpf's ringbuf.Reader read it), every committed record from the consumer
position up to the first one still being written is appended to the spool in
one write, and the consumer position moves past them. No foreign call and no
Python object per record: the only per-record work is reading the 8-byte
headers, to find the first busy record and to count records by kind for the
status line.

The spool holds the records as the ring held them, 8-byte header included
(length with the busy and discard bits, page offset), padded to 8 bytes, so
`SpoolReader` walks it exactly like a ring. Decoding reads it afterwards (or
follows it as it grows, with --stream), in batches.

The file is created in the output directory, mode 0600, and unlinked at once:
it never outlives the run, whatever ends it.
"""

from __future__ import annotations

import errno
import mmap
import os
import select
import struct
import threading
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from ktrace.events import generated
from ktrace.events.decode import FAMILY_OF_TYPE, TYPES_OF_KIND

# include/uapi/linux/bpf.h: BPF_RINGBUF_BUSY_BIT, BPF_RINGBUF_DISCARD_BIT, BPF_RINGBUF_HDR_SZ
BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
LENGTH_MASK = ~(BUSY_BIT | DISCARD_BIT) & 0xFFFFFFFF
RINGBUF_HDR = 8
KIND_OFFSET = RINGBUF_HDR + 8  # struct kt_hdr's kind, after ts_ns
MAX_KIND = max(generated.KIND) + 1
READ_CHUNK = 4 << 20  # bytes of spool decoded per batch
MAX_BACKLOG = 256 << 20  # bytes taken from the rings and not yet written that the reader may queue

_u32 = struct.Struct("<I")
_u64 = struct.Struct("<Q")

# enum kt_kind → the probe family it is counted against (disk_full losses are known by kind only)
FAMILY_OF_KIND = {kind: FAMILY_OF_TYPE[TYPES_OF_KIND.get(name, (name,))[0]] for kind, name in generated.KIND.items()}


def _round8(n: int) -> int:
    return (n + 7) & ~7


class MappedRing:
    """One BPF_MAP_TYPE_RINGBUF read through its pages: the consumer page (read-write) at offset 0, then the
    producer page and the data pages, which the kernel maps twice in a row so a record never wraps."""

    def __init__(self, map_fd: int, size: int) -> None:
        page = mmap.PAGESIZE
        self.fd = map_fd
        self.size = size
        self._mask = size - 1
        self._base = page  # the data start inside the second mapping
        self._consumer = mmap.mmap(map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        try:
            self._data = mmap.mmap(map_fd, page + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        except BaseException:
            self._consumer.close()
            raise

    def take(self, kinds: list[int]) -> bytes:
        """The committed records from the consumer position on, as one bytes object (consumed: the kernel may
        reuse their space); kinds[k] counts the records of each kind among them."""
        data, base, mask = self._data, self._base, self._mask
        start = _u64.unpack_from(self._consumer)[0]
        producer = _u64.unpack_from(data)[0]
        # x86-64 keeps loads in order, so a header read after the producer position sees the record's
        # state at least as new as that position, and the copy below, made after the headers, sees data
        # at least as new as its header's commit (the kernel commits with a store-release)
        pos = start
        unpack = _u32.unpack_from
        while pos < producer:
            off = base + (pos & mask)
            length = unpack(data, off)[0]
            if length & BUSY_BIT:
                break  # still being written: it and whatever follows wait for the next round
            if not length & DISCARD_BIT:
                kind = data[off + KIND_OFFSET] | data[off + KIND_OFFSET + 1] << 8
                kinds[kind if kind < MAX_KIND else 0] += 1
            pos += (length & LENGTH_MASK) + RINGBUF_HDR + 7 & ~7
        if pos == start:
            return b""
        offset = base + (start & mask)
        chunk = data[offset:offset + (pos - start)]
        _u64.pack_into(self._consumer, 0, pos)  # a plain store is a release on x86-64
        return chunk

    def close(self) -> None:
        self._data.close()
        self._consumer.close()


def frame(records: list[bytes]) -> bytes:
    """Records read from maps (not from a ring), framed as a ring frames them, for the spool."""
    out = bytearray()
    for record in records:
        out += _u32.pack(len(record)) + b"\0\0\0\0" + record + bytes(_round8(len(record)) - len(record))
    return bytes(out)


def split(chunk: bytes, kinds: frozenset[int] | None = None) -> tuple[list[bytes], int]:
    """The data of the committed records in a chunk of framed records (only those of these kinds, if given), and
    where the whole records end: a chunk read from a file may end inside one."""
    out, pos, end = [], 0, len(chunk)
    unpack = _u32.unpack_from
    while pos + RINGBUF_HDR <= end:
        length = unpack(chunk, pos)[0]
        size = length & LENGTH_MASK
        record_end = pos + _round8(size + RINGBUF_HDR)
        if record_end > end:
            break
        if not length & DISCARD_BIT and (
                kinds is None or chunk[pos + KIND_OFFSET] | chunk[pos + KIND_OFFSET + 1] << 8 in kinds):
            out.append(chunk[pos + RINGBUF_HDR:pos + RINGBUF_HDR + size])
        pos = record_end
    return out, pos


class Spool:
    """The unlinked spool file the window's records are appended to; bounded by the room on its filesystem."""

    def __init__(self, out_dir: Path, limit: int | None = None) -> None:
        fd = -1
        for attempt in range(100):
            path = out_dir / f".ktrace-spool-{os.getpid()}-{attempt}"
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            path.unlink()
            break
        if fd < 0:
            raise FileExistsError(errno.EEXIST, "no free spool name", str(out_dir))
        self.fd = fd
        if limit is None:
            st = os.statvfs(out_dir)
            # half the free space: the default --max-bytes takes at most a quarter, the rest of the bundle less
            limit = st.f_bavail * st.f_frsize // 2
        self.limit = limit
        self.length = 0  # bytes written: whole records only
        self.records = [0] * MAX_KIND  # records spooled, by kind
        self.disk_full = [0] * MAX_KIND  # records that did not fit, by kind
        self.full = ""  # why the spool stopped taking records, if it did
        self.grew = threading.Condition()  # notified when length grows
        self._queue: deque[tuple[bytes, list[int]]] = deque()
        self._queued = 0
        self._writing = self._closing = False
        self._error: BaseException | None = None
        self._queue_changed = threading.Condition()
        self._thread = threading.Thread(target=self._writer, name="ktrace-spool", daemon=True)
        self._thread.start()

    def append(self, chunk: bytes, kinds: list[int]) -> None:
        """Queue whole records (kinds: their count per kind) for the writer thread, so that a disk that stalls
        (writeback throttling) never stalls the reading of the rings; waits only when MAX_BACKLOG is queued."""
        if not chunk:
            return
        with self._queue_changed:
            while self._queued > MAX_BACKLOG and self._error is None:
                self._queue_changed.wait()
            self._queue.append((chunk, kinds))
            self._queued += len(chunk)
            self._queue_changed.notify_all()

    def flush(self) -> None:
        """Wait until every queued record is written (or counted as not kept)."""
        with self._queue_changed:
            while (self._queue or self._writing) and self._error is None:
                self._queue_changed.wait()
        if self._error is not None:
            raise self._error

    def _writer(self) -> None:
        while True:
            with self._queue_changed:
                while not self._queue and not self._closing:
                    self._queue_changed.wait()
                if not self._queue:
                    return
                chunk, kinds = self._queue.popleft()
                self._writing = True
            try:
                self._write(chunk, kinds)
            except BaseException as exc:  # noqa: BLE001 - raised again by flush() in the capture's thread
                self._error = exc
            with self._queue_changed:
                self._writing = False
                self._queued -= len(chunk)
                self._queue_changed.notify_all()

    def _write(self, chunk: bytes, kinds: list[int]) -> None:
        """Append whole records; on a full disk they are counted, not kept."""
        if not self.full and self.length + len(chunk) > self.limit:
            self.full = f"spool limit of {self.limit:,} bytes reached (half the free space of the output directory)"
        if not self.full:
            try:
                written = 0
                while written < len(chunk):
                    written += os.pwrite(self.fd, memoryview(chunk)[written:], self.length + written)
            except OSError as exc:
                if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                    raise
                self.full = f"disk full after {self.length:,} bytes"
                os.ftruncate(self.fd, self.length)  # keep the spool whole records
        if self.full:
            for kind, n in enumerate(kinds):
                self.disk_full[kind] += n
            return
        for kind, n in enumerate(kinds):
            self.records[kind] += n
        with self.grew:
            self.length += len(chunk)
            self.grew.notify_all()

    def append_records(self, records: list[bytes]) -> None:
        """Records read from maps after the window (held state changes, UDP flows)."""
        kinds = [0] * MAX_KIND
        for record in records:
            kind = record[8] | record[9] << 8
            kinds[kind if kind < MAX_KIND else 0] += 1
        self.append(frame(records), kinds)

    def lost_by_family(self) -> dict[str, int]:
        """Records that the disk had no room for, per probe family."""
        out: dict[str, int] = {}
        for kind, n in enumerate(self.disk_full):
            if n:
                family = FAMILY_OF_KIND.get(kind, "unknown")
                out[family] = out.get(family, 0) + n
        return out

    def close(self) -> None:
        with self._queue_changed:
            self._closing = True
            self._queue.clear()
            self._queue_changed.notify_all()
        self._thread.join()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SpoolReader:
    """Reads a spool's records back in order, in batches, from where the last read stopped."""

    def __init__(self, spool: Spool) -> None:
        self.spool = spool
        self.offset = 0

    def batches(self, end: int | None = None) -> Iterator[list[bytes]]:
        """Batches of record data (ring header stripped) up to end (default: what the spool holds now)."""
        end = self.spool.length if end is None else end
        while self.offset < end:
            batch, whole = split(os.pread(self.spool.fd, min(READ_CHUNK, end - self.offset), self.offset))
            if not whole:
                # the rings' records are a few KiB at most: a record longer than a read is a corrupt spool
                raise ValueError(f"spool: no whole record at offset {self.offset}")
            self.offset += whole
            yield batch


class RingPoller:
    """Waits on the rings' fds (the kernel wakes them past kt_wake_bytes), then moves what they hold to the spool.

    The rings are read in the order given, each as far as it goes: the rare ring first, so a cgroup_mkdir mostly
    comes before the busy families' events of tasks in the new cgroup (the two rings have no order between them).
    """

    def __init__(self, rings: list[MappedRing], spool: Spool) -> None:
        self.rings = rings
        self.spool = spool
        self._epoll = select.epoll()
        for ring in rings:
            self._epoll.register(ring.fd, select.EPOLLIN)

    def poll(self, timeout_s: float) -> list[tuple[MappedRing, bytes]]:
        """Wait up to timeout_s, then take every ring's committed records; returns (ring, chunk) pairs taken."""
        try:
            self._epoll.poll(timeout_s)
        except InterruptedError:
            pass
        return self.take()

    def take(self) -> list[tuple[MappedRing, bytes]]:
        out = []
        for ring in self.rings:
            kinds = [0] * MAX_KIND
            chunk = ring.take(kinds)
            if chunk:
                self.spool.append(chunk, kinds)
                out.append((ring, chunk))
        return out

    def close(self) -> None:
        self._epoll.close()  # the rings belong to the capture
