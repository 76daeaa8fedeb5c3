"""Packet drops: the kernel's drop reason names, protocol labels, and the drop_count lines.

The drops family counts every drop in a kernel map keyed by (reason, ethertype,
IP protocol). When the window ends that map becomes one `drop_count` line per
key in events.jsonl, so that the summary can be rebuilt from the events alone.
"""

from __future__ import annotations

from ktrace.events import generated

# include/uapi/linux/if_ether.h: the ethertypes a node sees
ETHERTYPES = {0x0800: "ipv4", 0x86DD: "ipv6", 0x0806: "arp", 0x8100: "vlan", 0x88A8: "qinq", 0x88CC: "lldp",
              0x8847: "mpls", 0x8035: "rarp", 0x0004: "802.2", 0x0003: "all", 0x0000: "none"}
# include/uapi/linux/in.h
IP_PROTOCOLS = {1: "icmp", 2: "igmp", 4: "ipip", 6: "tcp", 17: "udp", 41: "ipv6", 47: "gre", 50: "esp",
                58: "icmpv6", 103: "pim", 112: "vrrp", 132: "sctp", 136: "udplite"}
# enum skb_drop_reason has a few entries that are not reasons
_NOT_REASONS = ("_MAX", "_MASK", "_SHIFT")


def kernel_drop_reasons(btf: object | None) -> dict[int, str]:
    """enum skb_drop_reason of the running kernel: value → 'NO_SOCKET' (SKB_CONSUMED → 'CONSUMED')."""
    if btf is None:
        return {}
    values = btf.enum("skb_drop_reason")  # type: ignore[attr-defined]
    return {v: n.removeprefix("SKB_DROP_REASON_").removeprefix("SKB_") for v, n in values.items()
            if not n.endswith(_NOT_REASONS)}


def reason_name(reasons: dict[int, str], value: int) -> str:
    """The reason's name; a subsystem's own reason (mac80211, openvswitch: the high 16 bits) or one this
    kernel does not name, as its number."""
    name = reasons.get(value)
    if name is not None:
        return name
    if value >> 16:
        return f"SUBSYS_{value >> 16}:{value & 0xFFFF}"
    return str(value)


def protocol_label(ethertype: int, ip_proto: int) -> str:
    """'ipv4/udp', 'ipv6', 'arp', '0x88e5': the L3 protocol, and the L4 one when the IP header was read."""
    l3 = ETHERTYPES.get(ethertype, f"{ethertype:#06x}")
    if not ip_proto:
        return l3
    return f"{l3}/{IP_PROTOCOLS.get(ip_proto, str(ip_proto))}"


def count_events(counts: list[tuple[bytes, int]], reasons: dict[int, str], when: str, ts_ns: int) -> list[dict]:
    """The kernel's drop_counts map as drop_count events, the most drops first."""
    layout = generated.DROP_KEY
    events = []
    for raw, count in counts:
        key = layout.as_dict(raw)
        events.append({
            "type": "drop_count", "time": when, "ts_ns": ts_ns,
            "reason": reason_name(reasons, key["reason"]), "reason_code": key["reason"],
            "protocol": protocol_label(key["protocol"], key["ip_proto"]),
            "ethertype": key["protocol"], "ip_proto": key["ip_proto"], "count": count,
        })
    events.sort(key=lambda e: (-e["count"], e["reason_code"], e["ethertype"], e["ip_proto"]))
    return events
