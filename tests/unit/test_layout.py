"""ktrace.events.layout.Layout: a BTF struct (name, size, fields at offsets) as a struct.Struct."""

from __future__ import annotations

import struct

import pytest

from ktrace.events import generated
from ktrace.events.layout import Field, Layout


def _layout(size: int, *fields: Field) -> Layout:
    return Layout("kt_test", size, fields)


def test_gap_between_fields_becomes_pad_bytes():
    layout = _layout(8, Field("a", 0, "B", "__u8"), Field("b", 4, "I", "__u32"))
    assert layout.struct.format == "<B3xI"


def test_gap_after_the_last_field_becomes_pad_bytes():
    layout = _layout(16, Field("a", 0, "Q", "__u64"), Field("b", 8, "H", "__u16"))
    assert layout.struct.format == "<QH6x"
    assert layout.struct.size == 16


def test_pad_bytes_are_skipped_when_unpacking():
    layout = _layout(8, Field("a", 0, "B", "__u8"), Field("b", 4, "I", "__u32"))
    assert layout.unpack(b"\x07\xff\xff\xff" + (1234).to_bytes(4, "little")) == (7, 1234)


def test_fields_are_little_endian():
    layout = _layout(2, Field("port", 0, "H", "__u16"))
    assert layout.unpack(b"\x01\x02") == (0x0201,)


def test_unpack_reads_at_an_offset():
    layout = _layout(4, Field("a", 0, "I", "__u32"))
    assert layout.unpack(b"\0\0" + (5).to_bytes(4, "little"), 2) == (5,)


def test_as_dict_names_each_value_by_its_dotted_field_name():
    layout = _layout(8, Field("hdr.kind", 0, "H", "__u16"), Field("task.pid", 4, "I", "__u32"))
    assert layout.as_dict(struct.pack("<H2xI", 2, 42)) == {"hdr.kind": 2, "task.pid": 42}


def test_fields_larger_than_the_btf_size_raise():
    with pytest.raises(ValueError, match="kt_test: layout is 12 bytes, BTF says 8"):
        _layout(8, Field("a", 0, "Q", "__u64"), Field("b", 8, "I", "__u32"))


def test_overlapping_fields_raise():
    with pytest.raises(ValueError, match=r"kt_test\.b: overlapping field at offset 4"):
        _layout(16, Field("a", 0, "Q", "__u64"), Field("b", 4, "I", "__u32"))


def test_subset_reads_only_the_named_fields_and_skips_the_rest():
    layout = _layout(16, Field("a", 0, "Q", "__u64"), Field("b", 8, "I", "__u32"), Field("c", 12, "I", "__u32"))
    assert layout.subset(("c", "a")).unpack(struct.pack("<QII", 1, 2, 3)) == (1, 3)


def test_subset_of_an_unknown_field_raises():
    layout = _layout(8, Field("a", 0, "Q", "__u64"))
    with pytest.raises(ValueError, match="kt_test has no field nope"):
        layout.subset(("a", "nope"))


@pytest.mark.parametrize("layout", generated.LAYOUTS.values(), ids=lambda layout: layout.name)
def test_every_generated_event_starts_with_the_common_header(layout):
    # the decoder finds the kind at bytes 8-9 of any record before it knows the layout
    assert layout.fields[:4] == (
        Field("hdr.ts_ns", 0, "Q", "__u64"), Field("hdr.kind", 8, "H", "__u16"),
        Field("hdr.size", 10, "H", "__u16"), Field("hdr.cpu", 12, "I", "__u32"),
    )


@pytest.mark.parametrize("layout", generated.LAYOUTS.values(), ids=lambda layout: layout.name)
def test_every_generated_event_has_the_task_block_at_16_to_112(layout):
    task = [f for f in layout.fields if f.name.startswith("task.")]
    assert min(f.offset for f in task) == 16
    assert max(f.offset + struct.calcsize("<" + f.code) for f in task) == 112
