"""Ring buffer records → JSON-ready event dicts.

The binary layouts come from generated.py (BTF of the objects); this module only
names and formats values: addresses, TCP states, errnos, the kernel's reset
reasons, wall-clock time. It runs once per event, so lookups are cached.
"""

from __future__ import annotations

import errno
import ipaddress
import time
from collections.abc import Callable

from ktrace.events import generated

# include/net/tcp_states.h
TCP_STATES = {
    1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2", 6: "TIME_WAIT",
    7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING", 12: "NEW_SYN_RECV",
    13: "BOUND_INACTIVE",
}
ADDRESS_FAMILIES = {2: "ipv4", 10: "ipv6"}
PROTOCOLS = {6: "tcp", 17: "udp"}
SCHEMA_VERSION = 1


def errno_name(value: int) -> str | None:
    """'ECONNREFUSED' for 111 or -111; None for 0."""
    if not value:
        return None
    return errno.errorcode.get(abs(value), str(abs(value)))


def _comm(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "replace")


class Decoder:
    """Decodes records of every kind into dicts whose first key is "type"."""

    def __init__(self, boot_to_wall_ns: int, reset_reasons: dict[int, str] | None = None) -> None:
        self.boot_to_wall_ns = boot_to_wall_ns
        self.reset_reasons = reset_reasons or {}
        self._addr_cache: dict[tuple[int, bytes], str] = {}
        self._comm_cache: dict[bytes, str] = {}
        self._second = -1
        self._second_text = ""
        self.unknown_kinds = 0
        self._formatters: dict[int, tuple[str, generated.Layout, Callable[[dict, tuple], None]]] = {}
        for kind, name in generated.KIND.items():
            self._formatters[kind] = (name, generated.LAYOUTS[kind], getattr(self, f"_fmt_{name}"))

    # --- shared pieces ---

    def wall_time(self, boot_ns: int) -> str:
        wall = boot_ns + self.boot_to_wall_ns
        second, rest = divmod(wall, 1_000_000_000)
        if second != self._second:
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{rest // 1_000_000:03d}Z"

    def addr(self, family: int, raw: bytes) -> str:
        key = (family, raw)
        text = self._addr_cache.get(key)
        if text is None:
            if family == 10:
                text = str(ipaddress.IPv6Address(raw))
            else:
                text = str(ipaddress.IPv4Address(raw[:4]))
            if len(self._addr_cache) > 65536:
                self._addr_cache.clear()
            self._addr_cache[key] = text
        return text

    def comm(self, raw: bytes) -> str:
        text = self._comm_cache.get(raw)
        if text is None:
            text = _comm(raw)
            if len(self._comm_cache) > 65536:
                self._comm_cache.clear()
            self._comm_cache[raw] = text
        return text

    def decode(self, record: bytes) -> dict | None:
        kind = int.from_bytes(record[8:10], "little")
        entry = self._formatters.get(kind)
        if entry is None or len(record) < entry[1].size:
            self.unknown_kinds += 1
            return None
        name, layout, fmt = entry
        v = dict(zip(layout.names, layout.unpack(record)))
        event = {
            "type": name,
            "time": self.wall_time(v["hdr.ts_ns"]),
            "ts_ns": v["hdr.ts_ns"],
            "cpu": v["hdr.cpu"],
            "pid": v["task.tgid"],
            "tid": v["task.pid"],
            "ppid": v["task.ppid"],
            "comm": self.comm(v["task.comm"]),
            "uid": v["task.uid"],
            "gid": v["task.gid"],
            "attribution": generated.ATTRIBUTION.get(v.get("attribution", 1), "current"),
            "cgroup_id": v["task.cgroup_id"],
            "memcg_id": v["task.memcg_id"],
            "netns": v["task.netns"],
            "mntns": v["task.mntns"],
            "pidns": v["task.pidns"],
            "userns": v["task.userns"],
            "seccomp": v["task.seccomp_mode"],
            "cap_eff": f"{v['task.cap_effective']:#x}",
        }
        fmt(event, v)
        return event

    def _flow(self, event: dict, v: dict) -> None:
        family = v["family"]
        event["family"] = ADDRESS_FAMILIES.get(family, str(family))
        event["saddr"] = self.addr(family, v["saddr"])
        event["sport"] = v["sport"]
        event["daddr"] = self.addr(family, v["daddr"])
        event["dport"] = v["dport"]
        event["sk"] = f"{v['skaddr']:#x}"

    # --- one formatter per kind: _fmt_<kind name> ---

    def _fmt_tcp_state(self, event: dict, v: dict) -> None:
        self._flow(event, v)
        event["old_state"] = TCP_STATES.get(v["oldstate"], str(v["oldstate"]))
        event["new_state"] = TCP_STATES.get(v["newstate"], str(v["newstate"]))
        if v["oldstate"] == 2 and v["handshake_ns"]:
            event["handshake_ms"] = round(v["handshake_ns"] / 1e6, 3)
        if v["sk_err"]:
            event["error"] = errno_name(v["sk_err"])

    def _fmt_connect(self, event: dict, v: dict) -> None:
        self._flow(event, v)
        event["protocol"] = PROTOCOLS.get(v["protocol"], str(v["protocol"]))
        event["fd"] = v["fd"]
        event["ret"] = v["ret"]
        event["errno"] = errno_name(v["ret"]) if v["ret"] < 0 else None
        event["duration_ms"] = round(v["duration_ns"] / 1e6, 3)

    def _fmt_retransmit(self, event: dict, v: dict) -> None:
        self._flow(event, v)
        event["state"] = TCP_STATES.get(v["state"], str(v["state"]))
        event["total_retrans"] = v["total_retrans"]
        event["snd_cwnd"] = v["snd_cwnd"]
        event["srtt_us"] = v["srtt_us"]
        event["err"] = v["err"]

    def _fmt_reset(self, event: dict, v: dict) -> None:
        self._flow(event, v)
        event["direction"] = generated.RESET_DIRECTION.get(v["direction"], str(v["direction"]))
        event["state"] = TCP_STATES.get(v["state"], None) if v["state"] else None
        if v["direction"] == 1:
            event["reason"] = self.reset_reasons.get(v["reason"], str(v["reason"]))
        else:
            event["reason"] = None


def kernel_reset_reasons(btf: object | None) -> dict[int, str]:
    """enum sk_rst_reason of the running kernel: value → 'NO_SOCKET'."""
    if btf is None:
        return {}
    values = btf.enum("sk_rst_reason")  # type: ignore[attr-defined]
    return {v: n.removeprefix("SK_RST_REASON_") for v, n in values.items()}
