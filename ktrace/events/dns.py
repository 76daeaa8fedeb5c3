"""DNS messages → queries paired with their replies, and queries that got none.

The kernel reports every DNS message a local socket sends or receives, without
reading a byte of it, so there is no DNS id to pair by. A reply answers the
oldest unanswered query of the same socket with the same remote end: the same
local and remote address and port, network namespace and socket (its address
and inode number, since the kernel hands a closed socket's memory and port to
new ones). glibc sends A and AAAA on one socket and reads two replies; any
order within that pair changes an RTT by microseconds. A query with no reply
after the timeout, or when the window ends, becomes a dns_timeout event; a reply
that comes later is still paired with it, marked late, and its RTT counts.

DNS over TCP frames each message with a 2-byte length. Many readers (unbound,
for one) take the length first and the message in a second read, and some
writers send them apart: a TCP read or write of at most 2 bytes is that length
alone (length_prefix), part of the message that follows, never a message itself.
A TCP read soon after a reply, with no query waiting, is the rest of that reply
(continuation). Neither counts as a message, and RTTs run between messages.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

DNS_TIMEOUT_S = 5.0  # --dns-timeout's default: glibc's resolver waits 5 s for a reply (RES_TIMEOUT, resolv.conf(5))
MAX_PENDING = 65536  # unanswered queries tracked at once
MAX_EXPIRED = 16384  # sockets whose timed-out queries are remembered for late replies
MAX_EXPIRED_PER_KEY = 64
LATE_REPLY_NS = 30_000_000_000  # how long a timed-out query can still be answered
TCP_CONTINUATION_NS = 1_000_000_000  # a TCP read this soon after a reply is the rest of it
TCP_LENGTH_PREFIX = 2  # bytes of the length that frames every DNS message over TCP (RFC 1035 4.2.2)

# The fields of a query that its timeout event repeats: who asked whom.
_TIMEOUT_FIELDS = ("pid", "tid", "ppid", "comm", "process", "uid", "gid", "attribution", "cgroup_id", "memcg_id",
                   "netns", "mntns", "pidns", "userns", "seccomp", "cap_eff", "cgroup_path", "k8s", "family", "saddr",
                   "sport", "daddr", "dport", "sk", "sk_ino", "netns_sk", "protocol", "role")


@dataclass
class _Query:
    ts_ns: int
    line: int | None
    event: dict


def _key(event: dict) -> tuple:
    """The socket and both ends: never a reused socket address or port alone."""
    return (event["netns_sk"], event["sk"], event["sk_ino"], event["saddr"], event["sport"], event["daddr"],
            event["dport"])


def _length_prefix(event: dict) -> bool:
    """A TCP read or write of the 2-byte length (or one byte of it) alone."""
    return event["protocol"] == "tcp" and event["bytes"] is not None and event["bytes"] <= TCP_LENGTH_PREFIX


class DnsPairer:
    """Feeds dns_query/dns_reply events through `write` (which returns the line number or None) in order,
    adding rtt_ms to replies and writing dns_timeout events for queries left unanswered."""

    def __init__(self, write: Callable[[dict], int | None], timeout_ns: int,
                 wall_time: Callable[[int], str]) -> None:
        self.write = write
        self.timeout_ns = timeout_ns
        self.wall_time = wall_time
        self.pending: dict[tuple, deque[_Query]] = {}
        self.pending_count = 0
        self.expired: OrderedDict[tuple, deque[_Query]] = OrderedDict()
        self.last_reply_ns: dict[tuple, int] = {}
        self.not_tracked = 0  # queries beyond MAX_PENDING: written, never paired

    def add(self, event: dict) -> None:
        if _length_prefix(event):
            event["length_prefix"] = True  # the message it frames is the next read or write
            if event["type"] == "dns_reply":
                event["rtt_ms"] = None
                event["query_line"] = None
            self.write(event)
        elif event["type"] == "dns_query":
            self._query(event)
        else:
            self._reply(event)

    def _query(self, event: dict) -> None:
        line = self.write(event)
        if event["error"]:
            return  # the send failed: no reply can come
        if self.pending_count >= MAX_PENDING:
            self.not_tracked += 1
            return
        self.pending.setdefault(_key(event), deque()).append(_Query(event["ts_ns"], line, event))
        self.pending_count += 1

    def _reply(self, event: dict) -> None:
        key = _key(event)
        queue = self.pending.get(key)
        query = None
        # queries of this key whose timeout fell due before the reply came time out first, whenever expire() runs:
        # events are paired by their own clock, during the window or after it
        while queue and event["ts_ns"] - queue[0].ts_ns >= self.timeout_ns:
            stale = queue.popleft()
            self.pending_count -= 1
            self._timeout(key, stale, stale.ts_ns + self.timeout_ns, False)
        if queue is not None and not queue:
            del self.pending[key]
            queue = None
        # a failed receive (ECONNREFUSED after an ICMP port unreachable) answers the query too
        if queue:
            query = queue.popleft()
            self.pending_count -= 1
            if not queue:
                del self.pending[key]
        else:
            late = self.expired.get(key)
            if late and event["ts_ns"] - late[0].ts_ns <= LATE_REPLY_NS:
                query = late.popleft()
                if not late:
                    del self.expired[key]
                event["late"] = True
        if query is not None:
            event["rtt_ms"] = round((event["ts_ns"] - query.ts_ns) / 1e6, 3)
            event["query_line"] = query.line
        else:
            event["rtt_ms"] = None
            event["query_line"] = None
            last = self.last_reply_ns.get(key)
            if event["protocol"] == "tcp" and last is not None and event["ts_ns"] - last <= TCP_CONTINUATION_NS:
                # DNS over TCP: the reader took the length prefix and the message in two reads
                event["continuation"] = True
        if event["protocol"] == "tcp":
            self.last_reply_ns[key] = event["ts_ns"]
            if len(self.last_reply_ns) > MAX_PENDING:
                self.last_reply_ns.clear()
        self.write(event)

    def expire(self, now_ns: int, window_end: bool = False) -> None:
        """Write a dns_timeout for every query older than the timeout (every query, when the window ends)."""
        for key in list(self.pending):
            queue = self.pending[key]
            while queue and (window_end or now_ns - queue[0].ts_ns >= self.timeout_ns):
                query = queue.popleft()
                self.pending_count -= 1
                # due at its timeout, however late the caller looks (after the window, batch by batch)
                self._timeout(key, query, now_ns if window_end else query.ts_ns + self.timeout_ns, window_end)
            if not queue:
                del self.pending[key]

    def _timeout(self, key: tuple, query: _Query, now_ns: int, window_end: bool) -> None:
        waited = now_ns - query.ts_ns
        declared = query.ts_ns + min(waited, self.timeout_ns)
        q = query.event
        event = {"type": "dns_timeout", "time": self.wall_time(declared), "ts_ns": declared, "cpu": q["cpu"],
                 **{f: q[f] for f in _TIMEOUT_FIELDS}, "query_time": q["time"], "query_line": query.line,
                 "waited_ms": round(waited / 1e6, 3), "window_end": window_end and waited < self.timeout_ns}
        self.write(event)
        late = self.expired.setdefault(key, deque(maxlen=MAX_EXPIRED_PER_KEY))
        late.append(query)
        self.expired.move_to_end(key)
        while len(self.expired) > MAX_EXPIRED:
            self.expired.popitem(last=False)
