"""Packet drops of a window: totals per kernel reason and protocol, per-flow detail, packet_drops findings.

Built from `drop_count` lines (the kernel's counts, written when the window ends)
and `drop` events (single drops: TCP/UDP on --ports, or drops whose key did not
fit the kernel map). Both add to the same totals.
"""

from __future__ import annotations

from collections import Counter

from ktrace.analyze.common import MAX_LINES, Examples, capped, endpoint, finding

TOP = 10
TOP_REASONS = 5
WARNING_AT = 100  # drops of one reason in the window
CRITICAL_AT = 10_000
# Reasons a healthy node gives all the time, none of them a packet the network or a receiver lost: an info finding
# however many, still counted everywhere (enum skb_drop_reason, include/net/dropreason-core.h, says what each is).
ROUTINE = frozenset({
    # the end of a socket: what was still queued is freed in bulk (the FIN of every connection that reaches
    # TIME_WAIT, tcp_done → skb_queue_purge) or with the socket that close()d
    "QUEUE_PURGE", "SOCKET_CLOSE", "TCP_CLOSE",
    # duplicates: data, ACKs or fragments already received (a spurious retransmit; the original got through)
    "TCP_OLD_DATA", "TCP_OLD_SEQUENCE", "TCP_OLD_ACK", "TCP_TOO_OLD_ACK", "TCP_OFOMERGE", "DUP_FRAG",
    # a reset received (it is the reset that is counted, in reset events), a TIME_WAIT PAWS check
    "TCP_RESET", "TCP_RFC7323_TW_PAWS",
    # not for this host or this socket: another host's frame, a packet socket's or socket filter's choice,
    # a protocol nobody registered, IPv6 neighbour discovery chatter
    "OTHERHOST", "SOCKET_FILTER", "PKT_TOO_SMALL", "UNHANDLED_PROTO", "IP_NOPROTO", "IPV6DISABLED",
    "IPV6_NDISC_FRAG", "IPV6_NDISC_HOP_LIMIT", "IPV6_NDISC_BAD_CODE", "IPV6_NDISC_BAD_OPTIONS",
    "IPV6_NDISC_NS_OTHERHOST", "UNICAST_IN_L2_MULTICAST",
    # kfree_skb() without a reason: on 6.x kernels mostly the cleanup of packets that were already handled; the
    # drop events' location says where, and loss shows under a reason of its own
    "NOT_SPECIFIED",
})
HINTS = {
    "NO_SOCKET": "Nothing listens on the destination port (in that network namespace): a closed port, a crashed or "
                 "not yet started server, a stale Service endpoint. TCP answers with a reset, UDP with ICMP port "
                 "unreachable.",
    "SOCKET_RCVBUFF": "A receiver is too slow or its buffer too small: the socket's receive queue was full. Read "
                      "faster, or raise SO_RCVBUF (capped by net.core.rmem_max).",
    "SOCKET_BACKLOG": "A socket's backlog was full while its owner held the socket lock: the receiver is too slow.",
    "PROTO_MEM": "The protocol's memory limit was reached (net.ipv4.tcp_mem / udp_mem): the node is under socket "
                 "memory pressure.",
    "TCP_LISTEN_OVERFLOW": "A listener's accept queue was full: the server accepts too slowly, or its listen() "
                           "backlog (capped by net.core.somaxconn) is too small.",
    "NETFILTER_DROP": "A firewall rule dropped it: iptables/nftables (kube-proxy, a NetworkPolicy, a host firewall).",
    "TC_INGRESS": "A tc ingress filter dropped it: usually the CNI's eBPF program (a policy or a missing endpoint).",
    "TC_EGRESS": "A tc egress filter dropped it: usually the CNI's eBPF program (a policy or a missing endpoint).",
    "XDP": "An XDP program dropped it.",
    "CPU_BACKLOG": "A CPU's input backlog was full: raise net.core.netdev_max_backlog, or spread receive work (RPS).",
    "QDISC_DROP": "An egress queue (qdisc) was full: the interface is saturated or shaped.",
    "QDISC_OVERLIMIT": "An egress queue (qdisc) was over its limit: the interface is saturated or shaped.",
    "QDISC_CONGESTED": "An egress queue (qdisc) was congested: the interface is saturated or shaped.",
    "FULL_RING": "A device's ring was full: the receiver (a veth peer, a tun reader) does not keep up.",
    "NEIGH_FAILED": "ARP/neighbour resolution failed: the next hop does not answer.",
    "NEIGH_QUEUEFULL": "Too many packets waited for ARP/neighbour resolution: the next hop does not answer.",
    "IP_RPFILTER": "Reverse path filtering (rp_filter) rejected it: asymmetric routing, or a spoofed source.",
    "IP_INNOROUTES": "No route for an incoming packet.",
    "IP_OUTNOROUTES": "No route to the destination.",
    "TCP_CSUM": "Bad TCP checksums: a faulty NIC, offload setting or path.",
    "UDP_CSUM": "Bad UDP checksums: a faulty NIC, offload setting or path.",
    "IP_CSUM": "Bad IP header checksums: a faulty NIC, offload setting or path.",
    "OTHERHOST": "Packets for another host's address (promiscuous mode, a bridge): usually harmless.",
    "QUEUE_PURGE": "Packets still queued on a socket that ended, freed in bulk: one per connection that closes "
                   "normally (its FIN, when the socket goes to TIME_WAIT). Routine, not loss.",
    "SOCKET_CLOSE": "Data left unread on a socket its application closed: routine unless the peer expected an answer.",
    "TCP_OLD_DATA": "Data received twice (a spurious or early retransmit): the first copy got through. Not loss.",
    "NOT_SPECIFIED": "The kernel gave no reason: the drop events' location (a kernel address, see /proc/kallsyms) "
                     "says where.",
}
DEFAULT_HINT = ("See enum skb_drop_reason (include/net/dropreason-core.h) for this reason; a drop event's location "
                "(a kernel address, see /proc/kallsyms) says where it happened.")


def _endpoint(addr: str | None, port: int | None) -> str:
    """address:port; the address alone for a packet without ports, - when its IP header was not read."""
    if addr is None:
        return "-"
    return endpoint(addr, port) if port is not None else addr


class DropAnalysis:
    def __init__(self) -> None:
        self.by_reason: Counter[str] = Counter()
        self.by_protocol: Counter[str] = Counter()
        self.by_pair: Counter[tuple[str, str]] = Counter()
        self.protocols_of: dict[str, Counter[str]] = {}
        self.counted = 0  # drops counted in the kernel map (drop_count lines)
        self.single = 0  # drops that crossed the ring one by one (drop events)
        self.examples: dict[str, Examples] = {}  # reason → its single drops
        self.count_lines: dict[str, list[int]] = {}  # reason → its drop_count lines
        self.flows: dict[tuple, dict] = {}

    def _add(self, reason: str, protocol: str, n: int) -> None:
        self.by_reason[reason] += n
        self.by_protocol[protocol] += n
        self.by_pair[(reason, protocol)] += n
        self.protocols_of.setdefault(reason, Counter())[protocol] += n

    def add(self, event: dict, line: int | None) -> None:
        kind = event["type"]
        if kind == "drop_count":
            self.counted += event["count"]
            self._add(event["reason"], event["protocol"], event["count"])
            lines = self.count_lines.setdefault(event["reason"], [])
            if line is not None and len(lines) < MAX_LINES:
                lines.append(line)
        elif kind == "drop":
            self.single += 1
            self._add(event["reason"], event["protocol"], 1)
            self.examples.setdefault(event["reason"], Examples()).add(event, line)
            key = (event["reason"], event["protocol"], _endpoint(event["saddr"], event["sport"]),
                   _endpoint(event["daddr"], event["dport"]), event["sk_ino"])
            flow = self.flows.get(key)
            if flow is None:
                flow = self.flows[key] = {
                    "reason": key[0], "protocol": key[1], "source": key[2], "destination": key[3], "count": 0,
                    "first": event["time"], "last": event["time"], "sk": event["sk"], "sk_ino": event["sk_ino"],
                    "sk_cgroup_id": event["sk_cgroup_id"], "lines": [],
                }
            flow["count"] += 1
            flow["last"] = event["time"]
            if line is not None and len(flow["lines"]) < 5:
                flow["lines"].append(line)

    def summary(self, kernel_map: dict | None = None) -> dict:
        """kernel_map: the kernel count map's size and use, when the drops family ran (not known offline)."""
        ranked = sorted(self.by_reason.items(), key=lambda item: (-item[1], item[0]))
        pairs = sorted(self.by_pair.items(), key=lambda item: (-item[1], item[0]))
        flows = sorted(self.flows.values(), key=lambda f: (-f["count"], f["reason"], f["source"]))
        return {
            "total": sum(self.by_reason.values()),
            "routine": sum(n for r, n in ranked if r in ROUTINE),
            "counted_in_kernel": self.counted,
            "single": self.single,
            "by_reason": [{"reason": r, "count": n, "routine": r in ROUTINE} for r, n in ranked],
            "by_protocol": [{"protocol": p, "count": n}
                            for p, n in sorted(self.by_protocol.items(), key=lambda item: (-item[1], item[0]))],
            **capped("top_reasons", [r for r, _ in ranked], TOP_REASONS),
            **capped("top", [{"reason": r, "protocol": p, "count": n} for (r, p), n in pairs], TOP),
            **capped("flows", flows, TOP),
            "kernel_map": kernel_map,
        }

    def findings(self) -> list[dict]:
        """One finding per reason: routine ones (ROUTINE) info however many, others by how many."""
        out = []
        ranked = sorted(self.by_reason.items(), key=lambda item: (item[0] in ROUTINE, -item[1], item[0]))
        for reason, count in ranked:
            routine = reason in ROUTINE
            if routine or count < WARNING_AT:
                severity = "info"
            else:
                severity = "critical" if count >= CRITICAL_AT else "warning"
            protocols = [p for p, _ in self.protocols_of[reason].most_common(3)]
            singles = self.examples.get(reason, Examples())
            # the drops that crossed the ring one by one first, then the kernel's count lines
            lines = (singles.lines + self.count_lines.get(reason, []))[:MAX_LINES]
            e = Examples(count=count, lines=lines, first=singles.first, last=singles.last)
            out.append(finding("packet_drops", severity,
                               f"{count} packets dropped: {reason} ({', '.join(protocols)})"
                               + (", routine" if routine else ""),
                               {"reason": reason, "protocols": protocols, "routine": routine}, e,
                               HINTS.get(reason, DEFAULT_HINT)))
        return out
