"""ktrace.spool: records framed as the ring frames them come back whole, in order, in batches."""

from __future__ import annotations

import struct

import pytest

from ktrace import spool
from ktrace.events import generated

KIND_OF = {name: kind for kind, name in generated.KIND.items()}


def _record(kind: str, ts: int, size: int) -> bytes:
    """A record as the kernel writes one: struct kt_hdr (ts_ns, kind, size, cpu), then the rest of the event."""
    return struct.pack("<QHHI", ts, KIND_OF[kind], size, 0) + bytes((ts + i) % 251 for i in range(size - 16))


def _ring_chunk(records: list[tuple[bytes, bool]]) -> bytes:
    """Records framed with their 8-byte ring header; discarded ones carry BPF_RINGBUF_DISCARD_BIT."""
    out = b""
    for record, discarded in records:
        length = len(record) | (spool.DISCARD_BIT if discarded else 0)
        out += struct.pack("<II", length, 0) + record + bytes(-len(record) % 8)
    return out


_OPEN: list[spool.Spool] = []


@pytest.fixture(autouse=True)
def _close_spools():
    # a spool's writer thread left running would take process-directed signals meant for other tests
    yield
    while _OPEN:
        _OPEN.pop().close()


def _spool(tmp_path, limit: int | None = None) -> spool.Spool:
    s = spool.Spool(tmp_path, limit=limit)
    _OPEN.append(s)
    return s


def test_a_closed_spool_stops_its_writer(tmp_path):
    s = _spool(tmp_path)
    s.append(_ring_chunk([(_record("exec", 1, 632), False)]), [0] * spool.MAX_KIND)
    s.close()
    assert not s._thread.is_alive()


def test_the_spool_file_is_gone_from_the_directory_at_once(tmp_path):
    s = _spool(tmp_path)
    assert list(tmp_path.iterdir()) == []
    s.close()


def test_records_come_back_in_order_without_their_ring_headers(tmp_path):
    records = [_record("tcp_state", ts, 176) for ts in range(1, 50)] + [_record("exec", 99, 632)]
    s = _spool(tmp_path)
    s.append(_ring_chunk([(r, False) for r in records]), [0] * spool.MAX_KIND)
    s.flush()
    got = [r for batch in spool.SpoolReader(s).batches() for r in batch]
    assert got == records


def test_discarded_records_are_skipped(tmp_path):
    kept, dropped = _record("tcp_state", 1, 176), _record("tcp_state", 2, 176)
    s = _spool(tmp_path)
    s.append(_ring_chunk([(kept, False), (dropped, True), (kept, False), (dropped, True)]), [0] * spool.MAX_KIND)
    s.flush()
    assert [r for batch in spool.SpoolReader(s).batches() for r in batch] == [kept, kept]


def test_a_record_split_across_two_reads_is_read_whole(tmp_path, monkeypatch):
    # sizes that are not multiples of 8 make the reads end inside a record
    records = [_record("connect", ts, 170 + ts % 7) for ts in range(200)]
    monkeypatch.setattr(spool, "READ_CHUNK", 1000)
    s = _spool(tmp_path)
    s.append(_ring_chunk([(r, False) for r in records]), [0] * spool.MAX_KIND)
    s.flush()
    batches = list(spool.SpoolReader(s).batches())
    assert len(batches) > 10
    assert [r for batch in batches for r in batch] == records


def test_a_reader_takes_up_where_it_stopped(tmp_path):
    first, second = _record("fork", 1, 120), _record("exit", 2, 128)
    s = _spool(tmp_path)
    reader = spool.SpoolReader(s)
    s.append(_ring_chunk([(first, False)]), [0] * spool.MAX_KIND)
    s.flush()
    assert [r for b in reader.batches() for r in b] == [first]
    s.append(_ring_chunk([(second, False)]), [0] * spool.MAX_KIND)
    s.flush()
    assert [r for b in reader.batches() for r in b] == [second]


def test_records_read_from_maps_are_framed_like_ring_records(tmp_path):
    held = [_record("tcp_state", ts, 176) for ts in (5, 6)]
    s = _spool(tmp_path)
    s.append_records(held)
    s.flush()
    assert [r for b in spool.SpoolReader(s).batches() for r in b] == held
    assert s.records[KIND_OF["tcp_state"]] == 2


def test_records_past_the_limit_are_counted_by_family_not_kept(tmp_path):
    fits = _ring_chunk([(_record("tcp_state", 1, 176), False)])
    s = _spool(tmp_path, limit=len(fits))
    kinds = [0] * spool.MAX_KIND
    kinds[KIND_OF["tcp_state"]] = 1
    s.append(fits, kinds)
    s.flush()
    late = [0] * spool.MAX_KIND
    late[KIND_OF["exec"]], late[KIND_OF["udp_flow"]] = 3, 2
    s.append(_ring_chunk([(_record("exec", 2, 632), False)] * 3 + [(_record("udp_flow", 3, 192), False)] * 2), late)
    s.flush()
    assert s.length == len(fits)
    assert s.lost_by_family() == {"process": 3, "udp": 2}
    assert "spool limit" in s.full
    assert [r for b in spool.SpoolReader(s).batches() for r in b] == [_record("tcp_state", 1, 176)]


def test_every_kind_maps_to_a_probe_family():
    assert set(spool.FAMILY_OF_KIND) == set(generated.KIND)
    assert set(spool.FAMILY_OF_KIND.values()) <= set(generated.FAMILY.values())


def test_a_corrupt_spool_is_an_error_not_a_hang(tmp_path, monkeypatch):
    monkeypatch.setattr(spool, "READ_CHUNK", 64)
    s = _spool(tmp_path)
    s.append(_ring_chunk([(_record("exec", 1, 632), False)]), [0] * spool.MAX_KIND)
    s.flush()
    with pytest.raises(ValueError, match="no whole record"):
        list(spool.SpoolReader(s).batches())
