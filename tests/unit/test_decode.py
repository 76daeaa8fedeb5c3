"""ktrace.events.decode.Decoder turns ring buffer records into event dicts and their events.jsonl lines.

The golden records in tests/fixtures/records/ are raw records captured from the
real probes (tests/fixtures/record.py), with the dict the decoder made of them
at the time and the boot-to-wall offset and reset reasons it used.
"""

from __future__ import annotations

import json

import orjson
import pytest

from ktrace.events import decode, generated
from ktrace.events.decode import Decoder, errno_name, kernel_reset_reasons
from tests.unit.conftest import RECORDS, load_record


def _decoder(fixture: dict, reasons: dict[int, str] | None = None) -> Decoder:
    if reasons is None:
        reasons = {int(k): v for k, v in fixture["reset_reasons"].items()}
    drop_reasons = {int(k): v for k, v in fixture.get("drop_reasons", {}).items()}
    return Decoder(fixture["boot_to_wall_offset_ns"], reasons, drop_reasons)


def _event(decoder: Decoder, raw: bytes) -> dict:
    decoded = decoder.decode(raw)
    assert decoded is not None
    return decoded[0]


def _record(name: str) -> tuple[dict, bytes]:
    fixture = load_record(name)
    return fixture, bytes.fromhex(fixture["hex"])


def _offset(layout: generated.Layout, field: str) -> int:
    return next(f.offset for f in layout.fields if f.name == field)


@pytest.mark.parametrize("path", RECORDS, ids=lambda p: p.stem)
def test_recorded_record_decodes_exactly_to_the_recorded_event(path):
    fixture = json.loads(path.read_text())
    assert _event(_decoder(fixture), bytes.fromhex(fixture["hex"])) == fixture["expected"]


@pytest.mark.parametrize("path", RECORDS, ids=lambda p: p.stem)
def test_line_is_the_event_serialized_compactly_with_a_newline(path):
    fixture = json.loads(path.read_text())
    event, line = _decoder(fixture).decode(bytes.fromhex(fixture["hex"]))
    assert line == orjson.dumps(event) + b"\n"


def test_line_is_right_for_a_process_whose_task_block_is_cached():
    decoder = Decoder(0)
    names = ("tcp_state_syn_sent", "connect_ok", "tcp_state_syn_sent", "connect_ok")
    for name in names:
        event, line = decoder.decode(bytes.fromhex(load_record(name)["hex"]))
        assert line == orjson.dumps(event) + b"\n"


def test_golden_records_cover_every_event_kind():
    kinds = {json.loads(path.read_text())["expected"]["type"] for path in RECORDS}
    assert kinds == {t for kind in generated.KIND.values() for t in decode.TYPES_OF_KIND.get(kind, (kind,))}


def test_golden_records_are_as_long_as_their_layout():
    for path in RECORDS:
        fixture = json.loads(path.read_text())
        kind = generated.LAYOUTS[int.from_bytes(bytes.fromhex(fixture["hex"])[8:10], "little")]
        assert len(fixture["hex"]) // 2 == kind.size, path.name


def test_type_is_the_first_key():
    fixture, raw = _record("tcp_state_refused")
    event, line = _decoder(fixture).decode(raw)
    assert next(iter(event)) == "type"
    assert line.startswith(b'{"type":"tcp_state",')


def test_unknown_kind_decodes_to_none_and_is_counted():
    fixture, raw = _record("tcp_state_syn_sent")
    decoder = _decoder(fixture)
    assert decoder.decode(raw[:8] + (99).to_bytes(2, "little") + raw[10:]) is None
    assert decoder.unknown_kinds == 1


def test_record_shorter_than_its_layout_decodes_to_none_and_is_counted():
    fixture, raw = _record("connect_ok")
    decoder = _decoder(fixture)
    assert decoder.decode(raw[:-1]) is None
    assert decoder.unknown_kinds == 1


def test_known_records_are_not_counted_as_unknown():
    decoder = Decoder(0)
    for path in RECORDS:
        decoder.decode(bytes.fromhex(json.loads(path.read_text())["hex"]))
    assert decoder.unknown_kinds == 0


def test_time_is_boot_time_plus_the_offset_in_utc_with_milliseconds():
    assert Decoder(0).wall_time(1_500_999_999) == "1970-01-01T00:00:01.500Z"
    assert Decoder(1_795_305_600 * 10**9).wall_time(0) == "2026-11-22T00:00:00.000Z"


def test_time_follows_the_offset_it_was_given():
    fixture, raw = _record("tcp_state_syn_sent")
    fixture["boot_to_wall_offset_ns"] += 60 * 10**9
    later = _event(_decoder(fixture), raw)
    expected = fixture["expected"]
    assert later["ts_ns"] == expected["ts_ns"]
    assert later["time"][:14] == expected["time"][:14] and later["time"][17:] == expected["time"][17:]
    assert int(later["time"][14:16]) == (int(expected["time"][14:16]) + 1) % 60


def test_sent_reset_reason_is_the_kernels_name():
    fixture, raw = _record("reset_sent_no_socket")
    assert _event(_decoder(fixture), raw)["reason"] == "NO_SOCKET"


def test_sent_reset_reason_unknown_to_the_kernel_btf_is_its_number_in_text():
    fixture, raw = _record("reset_sent_no_socket")
    number = int.from_bytes(raw[_offset(generated.RESET_EVENT, "reason"):][:4], "little")
    assert _event(_decoder(fixture, reasons={}), raw)["reason"] == str(number)


def test_received_reset_has_no_reason():
    fixture, raw = _record("reset_received")
    assert _event(_decoder(fixture), raw)["reason"] is None


def test_unknown_tcp_state_is_its_number_in_text():
    fixture, raw = _record("tcp_state_syn_sent")
    at = _offset(generated.TCP_STATE_EVENT, "newstate")
    event = _event(_decoder(fixture), raw[:at] + bytes([99]) + raw[at + 1:])
    assert event["new_state"] == "99"


def test_handshake_time_only_when_leaving_syn_sent():
    decoder = Decoder(0)
    events = [_event(decoder, bytes.fromhex(load_record(name)["hex"]))
              for name in ("tcp_state_syn_sent", "tcp_state_established", "tcp_state_close_wait")]
    assert ["handshake_ms" in e for e in events] == [False, True, False]


def test_ipv6_addresses_are_compressed_text():
    fixture, raw = _record("tcp_state_ipv6")
    event = _event(_decoder(fixture), raw)
    assert (event["family"], event["saddr"], event["daddr"]) == ("ipv6", "::1", "::1")


def test_connect_errno_is_named_only_for_failures():
    decoder = Decoder(0)
    errnos = [_event(decoder, bytes.fromhex(load_record(name)["hex"]))["errno"]
              for name in ("connect_refused", "connect_inprogress", "connect_ok")]
    assert errnos == ["ECONNREFUSED", "EINPROGRESS", None]


def test_errno_name_takes_either_sign_and_falls_back_to_the_number():
    assert errno_name(111) == errno_name(-111) == "ECONNREFUSED"
    assert errno_name(0) is None
    assert errno_name(-4095) == "4095"


class _FakeBtf:
    def enum(self, name: str) -> dict[int, str]:
        assert name == "sk_rst_reason"
        return {2: "SK_RST_REASON_NO_SOCKET", 7: "SK_RST_REASON_TCP_STATE"}


def test_kernel_reset_reasons_drop_the_enum_prefix():
    assert kernel_reset_reasons(_FakeBtf()) == {2: "NO_SOCKET", 7: "TCP_STATE"}


def test_kernel_reset_reasons_without_btf_are_empty():
    assert kernel_reset_reasons(None) == {}
