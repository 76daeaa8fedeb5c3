"""dns_lookup records (--with-dns-names) decode to the function, the name, the family asked for and a named result."""

from __future__ import annotations

import pytest

from ktrace.events import generated
from ktrace.events.decode import Decoder, lookup_result
from tests.unit.conftest import load_record

LAYOUT = generated.DNS_LOOKUP_EVENT


def _field(name: str):
    return next(f for f in LAYOUT.fields if f.name == name)


def _decode(raw: bytes) -> dict:
    decoded = Decoder(0).decode(raw)
    assert decoded is not None
    return decoded[0]


def _with(record: str, **values) -> bytes:
    """The golden record with some fields replaced (ints, or bytes for the name)."""
    raw = bytearray(bytes.fromhex(load_record(record)["hex"]))
    for name, value in values.items():
        f = _field(name)
        if isinstance(value, bytes):
            raw[f.offset:f.offset + len(value)] = value
        else:
            size = {"i": 4, "I": 4, "H": 2, "B": 1, "Q": 8}[f.code]
            raw[f.offset:f.offset + size] = value.to_bytes(size, "little", signed=f.code == "i")
    return bytes(raw)


@pytest.mark.parametrize(("function", "ret", "h_errno", "result"), [
    ("getaddrinfo", 0, 0, "ok"),
    ("getaddrinfo", -2, 0, "EAI_NONAME"),
    ("getaddrinfo", -3, 0, "EAI_AGAIN"),
    ("getaddrinfo", -5, 0, "EAI_NODATA"),
    ("getaddrinfo", -999, 0, "-999"),
    ("gethostbyname2_r", 34, -1, "ERANGE"),
    ("gethostbyname_r", 11, 2, "EAGAIN"),
    ("gethostbyname_r", 0, 0, "ok"),
    ("gethostbyname_r", 0, 1, "HOST_NOT_FOUND"),
    ("gethostbyname2_r", 0, 4, "NO_DATA"),
    ("gethostbyname2", 0, 0, "ok"),
    ("gethostbyname2", -1, 2, "TRY_AGAIN"),
    ("gethostbyname", -1, -1, "NETDB_INTERNAL"),
    ("gethostbyname", -1, 0, "failed"),
    ("gethostbyname", -1, 77, "77"),
])
def test_result_names_the_code_each_function_reports(function, ret, h_errno, result):
    assert lookup_result(function, ret, h_errno) == result


def test_recorded_lookup_has_the_fields_of_the_contract():
    event = _decode(bytes.fromhex(load_record("dns_lookup_getaddrinfo_eai_again")["hex"]))
    assert list(event)[-6:] == ["function", "name", "family", "result", "ret", "latency_ms"]
    assert (event["function"], event["name"], event["family"], event["result"], event["ret"]) == (
        "getaddrinfo", "slow.test", "ipv4", "EAI_AGAIN", -3)
    assert event["latency_ms"] >= 1000


def test_family_any_ipv4_ipv6_and_unknown_in_text():
    for value, text in ((0, "any"), (2, "ipv4"), (10, "ipv6"), (17, "17")):
        assert _decode(_with("dns_lookup_getaddrinfo_ok", family=value))["family"] == text


def test_unknown_function_is_its_number_in_text():
    event = _decode(_with("dns_lookup_getaddrinfo_ok", function=9))
    assert event["function"] == "9"


def test_name_is_cut_at_its_nul_and_invalid_utf8_is_replaced():
    event = _decode(_with("dns_lookup_getaddrinfo_ok", name=b"caf\xe9.test\0junk"))
    assert event["name"] == "caf\ufffd.test"


def test_longest_name_the_kernel_copies_is_255_bytes():
    # bpf_probe_read_user_str cuts a longer name and always ends it with a NUL
    event = _decode(_with("dns_lookup_getaddrinfo_ok", name=b"a" * 255 + b"\0"))
    assert event["name"] == "a" * 255


def test_latency_is_milliseconds_with_three_decimals():
    event = _decode(_with("dns_lookup_getaddrinfo_ok", latency_ns=1_234_567))
    assert event["latency_ms"] == 1.235
