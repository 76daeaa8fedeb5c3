"""The kernel's conntrack table, read over netlink, to show what NAT did to a flow (--with-conntrack).

A Service VIP is a destination no socket ever reaches: iptables/nftables DNAT
rewrites it to a backend, and only conntrack remembers both. Entries are read
with pyroute2 (ctnetlink dump), or from /proc/net/nf_conntrack when netlink is
unavailable, at the start, every REFRESH_S in a background thread, and at the end.
Conntrack is per network namespace: the reader reads ktrace's own namespace and
every namespace that events show (a task's or a socket's netns inode), entering
it with setns(2) in its own thread (setns changes only the calling thread), found
through /run/netns/* or /proc/<pid>/ns/net. The thread only fills the table; the
capture loop annotates events from it with one dict lookup each and never waits.

An event is matched against the table of the namespace it happened in (the
socket's for udp_flow, else the task's), and, when that has no entry for it,
against the node's table only: PID 1's namespace and ktrace's own (run on the
node, or in a pod with hostPID or hostNetwork, one of them is the node's). A
pod's packets cross the node's namespace, where kube-proxy's Service DNAT
lives, and pod addresses are unique on a node. No other namespace's table is
searched, and loopback tuples never leave their namespace: the same tuple
elsewhere is another connection, or the client's side of a DNAT that the
backend's namespace never saw. The annotation names the namespace whose table
held the entry. Within a table, an entry matches in any of four directions,
and the annotation says which: a client's socket and its request flow are the
original tuple, the backend's accepted socket and its response flow the reply
tuple; a udp_flow runs from the datagrams' source to their destination, so the
response as the client receives it (from the VIP) is the original reversed,
and the request as the backend receives it is the reply reversed.
"""

from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ktrace.enrich.identity import owner_pod

MAX_ENTRIES = 65536  # entries kept (each indexed in four directions); a full table takes no new entries
MAX_NAMESPACES = 64  # network namespaces read besides ktrace's own
REFRESH_S = 2.0
READ_BUDGET_S = 1.0  # one round stops reading more namespaces after this long
RESCAN_S = 5.0  # a namespace with no known way in triggers a /proc walk at most this often
CLONE_NEWNET = 0x40000000
NODE_NETNS = "/proc/1/ns/net"
PROTOCOLS = {6: "tcp", 17: "udp"}
# include/uapi/linux/netfilter/nf_conntrack_common.h
IPS_SEEN_REPLY, IPS_ASSURED, IPS_SRC_NAT, IPS_DST_NAT = 1 << 1, 1 << 2, 1 << 4, 1 << 5
# include/uapi/linux/netfilter/nf_conntrack_tcp.h, enum tcp_conntrack
TCP_CT_STATES = ("NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT", "LAST_ACK", "TIME_WAIT",
                 "CLOSE", "SYN_SENT2")

Tuple = tuple[str, int, str, int]  # saddr, sport, daddr, dport
# /proc/net/stat/nf_conntrack: one row per CPU; "entries" is the namespace's count, the rest are per-CPU counters
STAT_COUNTERS = ("drop", "early_drop", "insert_failed")
CONNTRACK_MAX = "/proc/sys/net/netfilter/nf_conntrack_max"  # the limit every namespace's count is held to


@dataclass(frozen=True)
class Entry:
    proto: str  # "tcp" | "udp"
    orig: Tuple
    reply: Tuple
    state: str  # TCP: conntrack's TCP state; UDP: UNREPLIED | REPLIED | ASSURED
    mark: int | None
    zone: int | None
    netns: int  # the namespace's inode

    @property
    def nat(self) -> str | None:
        """What NAT changed: the destination (the reply comes from elsewhere), the source, both, or nothing."""
        dnat = (self.orig[2], self.orig[3]) != (self.reply[0], self.reply[1])
        snat = (self.orig[0], self.orig[1]) != (self.reply[2], self.reply[3])
        return "both" if dnat and snat else "dnat" if dnat else "snat" if snat else None

    def annotation(self, matched: str) -> dict:
        saddr, sport, daddr, dport = self.reply
        return {"state": self.state, "reply": {"saddr": saddr, "sport": sport, "daddr": daddr, "dport": dport},
                "nat": self.nat, "matched": matched, "netns": self.netns, "mark": self.mark, "zone": self.zone}


def _reversed(t: Tuple) -> Tuple:
    return (t[2], t[3], t[0], t[1])


def _udp_state(status: int) -> str:
    if status & IPS_ASSURED:
        return "ASSURED"
    return "REPLIED" if status & IPS_SEEN_REPLY else "UNREPLIED"


def _addr(text: str) -> str:
    return str(ipaddress.ip_address(text))  # one spelling for IPv6, as the decoder writes it


def parse_proc_line(line: str, netns: int = 0) -> Entry | None:
    """One line of /proc/net/nf_conntrack; None for protocols other than TCP and UDP."""
    fields = line.split()
    if len(fields) < 6 or fields[2] not in ("tcp", "udp"):
        return None
    keyed = [f.split("=", 1) for f in fields if "=" in f]
    src = [v for k, v in keyed if k == "src"]
    dst = [v for k, v in keyed if k == "dst"]
    sport = [int(v) for k, v in keyed if k == "sport"]
    dport = [int(v) for k, v in keyed if k == "dport"]
    if len(src) < 2 or len(dst) < 2 or len(sport) < 2 or len(dport) < 2:
        return None
    named = dict(keyed)
    # /proc shows the status bits as flags: [UNREPLIED] until a reply, [ASSURED] once both ways were seen
    status = (0 if "[UNREPLIED]" in fields else IPS_SEEN_REPLY) | (IPS_ASSURED if "[ASSURED]" in fields else 0)
    state = fields[5] if fields[2] == "tcp" else _udp_state(status)
    mark, zone = named.get("mark"), named.get("zone")
    return Entry(fields[2], (_addr(src[0]), sport[0], _addr(dst[0]), dport[0]),
                 (_addr(src[1]), sport[1], _addr(dst[1]), dport[1]), state,
                 int(mark) if mark is not None else None, int(zone) if zone is not None else None, netns)


def read_proc(path: str, netns: int = 0) -> list[Entry]:
    with open(path) as f:
        return [e for e in map(lambda line: parse_proc_line(line, netns), f) if e is not None]


def read_netlink(netns: int = 0) -> list[Entry]:
    """Every TCP and UDP entry of the calling thread's network namespace, over ctnetlink."""
    from pyroute2 import Conntrack  # imported only with --with-conntrack: nothing touches netlink otherwise

    entries = []
    for family in (socket.AF_INET, socket.AF_INET6):
        ct = Conntrack(nfgen_family=family)
        try:
            for e in ct.dump_entries():
                o, r = e.tuple_orig, e.tuple_reply
                proto = PROTOCOLS.get(o.proto)
                if proto is None:
                    continue
                if proto == "tcp" and e.protoinfo is not None:
                    state = TCP_CT_STATES[e.protoinfo.state] if e.protoinfo.state < len(TCP_CT_STATES) else str(
                        e.protoinfo.state)
                else:
                    state = _udp_state(e.status or 0) if proto == "udp" else "NONE"
                entries.append(Entry(proto, (_addr(o.saddr), o.sport, _addr(o.daddr), o.dport),
                                     (_addr(r.saddr), r.sport, _addr(r.daddr), r.dport), state, e.mark, e.zone, netns))
        finally:
            ct.close()
    return entries


class ConntrackTable:
    """Entries by (netns, proto, saddr, sport, daddr, dport) in each of their four directions; bounded."""

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._entries: dict[tuple, Entry] = {}  # by (netns, proto, *orig)
        self._literal: dict[tuple, tuple[Entry, str]] = {}  # the original and reply tuples
        self._reversed: dict[tuple, tuple[Entry, str]] = {}  # the same, read the other way
        self.full = False

    def __len__(self) -> int:
        return len(self._entries)

    def update(self, entries: Iterable[Entry]) -> None:
        # entries are kept after they leave the kernel's table: an event may be written after its entry expired
        for e in entries:
            key = (e.netns, e.proto, *e.orig)
            if key not in self._entries and len(self._entries) >= self.max_entries:
                self.full = True
                continue
            self._entries[key] = e
            for tup, literal, backwards in ((e.orig, "original", "original_reversed"),
                                            (e.reply, "reply", "reply_reversed")):
                self._literal[(e.netns, e.proto, *tup)] = (e, literal)
                self._reversed[(e.netns, e.proto, *_reversed(tup))] = (e, backwards)

    def lookup(self, proto: str, saddr: str, sport: int, daddr: str, dport: int,
               netns: int) -> tuple[Entry, str] | None:
        """The entry of this tuple in this namespace's table, and which of its directions the tuple is."""
        key = (netns, proto, saddr, sport, daddr, dport)
        return self._literal.get(key) or self._reversed.get(key)


def read_stats(path: str) -> dict[str, int]:
    """{"entries", "drop", "early_drop", "insert_failed"} of one namespace, summed over CPUs."""
    with open(path) as f:
        header = f.readline().split()
        rows = [line.split() for line in f if line.strip()]
    column = {name: header.index(name) for name in ("entries", *STAT_COUNTERS)}
    stats = {name: sum(int(row[column[name]], 16) for row in rows) for name in STAT_COUNTERS}
    stats["entries"] = int(rows[0][column["entries"]], 16) if rows else 0
    return stats


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def _netns_inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


@dataclass
class _TableStats:
    first: dict[str, int]  # read_stats() at the first read of the namespace
    last: dict[str, int]  # and at the latest
    entries_max: int


class ConntrackReader:
    """Reads conntrack of the namespaces asked for into a ConntrackTable, in a background thread."""

    def __init__(self, table: ConntrackTable | None = None, refresh_s: float = REFRESH_S) -> None:
        self.table = table or ConntrackTable()
        self.refresh_s = refresh_s
        self.own_netns = _netns_inode("/proc/self/ns/net") or 0
        # the node's namespace, where Service DNAT lives: PID 1's (ktrace in a pod runs with hostPID), always read,
        # and ktrace's own (run on the node, or with hostNetwork)
        self.node_netns = _netns_inode(NODE_NETNS) or self.own_netns
        self.warnings: list[str] = []
        self.rounds_started = self.rounds_done = 0
        self.reads: dict[str, int] = {"netlink": 0, "proc": 0, "failed": 0}
        self._lock = threading.Lock()  # guards the table and the namespace hints against the capture loop
        self._wanted: dict[int, set[int]] = {}  # netns inode → pids seen in it
        self._warned: set[str] = set()
        self._last_walk = -RESCAN_S
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.limit = _read_int(CONNTRACK_MAX)
        self._stats: dict[int, _TableStats] = {}  # by netns inode
        if self.node_netns != self.own_netns:
            self._wanted[self.node_netns] = {1}

    # --- capture loop side: cheap ---

    def note(self, netns: int, pid: int) -> None:
        """An event showed a process in this namespace: read that namespace's conntrack too."""
        if not netns or netns == self.own_netns:
            return
        pids = self._wanted.get(netns)
        if pids is None:
            if len(self._wanted) >= MAX_NAMESPACES:
                return
            pids = self._wanted[netns] = set()
        if pid and len(pids) < 8:
            pids.add(pid)

    def lookup(self, proto: str, saddr: str, sport: int, daddr: str, dport: int,
               netns: int) -> tuple[Entry, str] | None:
        """The entry in the event's namespace's table, else in the node's (never for loopback tuples)."""
        with self._lock:
            match = self.table.lookup(proto, saddr, sport, daddr, dport, netns)
            if match is None and not (_loopback(saddr) or _loopback(daddr)):
                for node in (self.node_netns, self.own_netns):
                    if match is None and node != netns:
                        match = self.table.lookup(proto, saddr, sport, daddr, dport, node)
            return match

    def start(self) -> None:
        self.refresh()
        self._thread = threading.Thread(target=self._loop, name="ktrace-conntrack", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread, then read once more: the entries of the window's last connections."""
        self.stop_thread()
        self.refresh()

    def stop_thread(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    # --- reader side ---

    def _loop(self) -> None:
        while not self._stop.wait(self.refresh_s):
            self.refresh()

    def refresh(self) -> None:
        self.rounds_started += 1
        deadline = time.monotonic() + READ_BUDGET_S
        self._store(self._read_here(self.own_netns, "/proc/self/net/nf_conntrack"))
        self._note_stats(self.own_netns, "/proc/self/net/stat/nf_conntrack")
        for netns, path in self._namespace_paths():
            if time.monotonic() > deadline:
                break
            self._store(self._read_in(netns, path))
        self.rounds_done += 1

    def _store(self, entries: list[Entry]) -> None:
        with self._lock:
            self.table.update(entries)

    def _warn(self, text: str) -> None:
        if text not in self._warned and len(self._warned) < 8:
            self._warned.add(text)
            self.warnings.append(text)

    def _read_here(self, netns: int, proc_path: str) -> list[Entry]:
        try:
            entries = read_netlink(netns)
            self.reads["netlink"] += 1
            return entries
        except Exception as exc:  # noqa: BLE001 - any netlink failure falls back to /proc, then to a warning
            netlink_error = f"{type(exc).__name__}: {exc}"
        try:
            entries = read_proc(proc_path, netns)
            self.reads["proc"] += 1
            return entries
        except OSError as exc:
            self.reads["failed"] += 1
            self._warn(f"conntrack: cannot read netns {netns} (netlink: {netlink_error}; "
                       f"{proc_path}: {exc.strerror or exc})")
            return []

    def _read_in(self, netns: int, path: str) -> list[Entry]:
        """Enter the namespace in this thread only, read it, come back."""
        try:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        except OSError as exc:
            self._warn(f"conntrack: cannot open this thread's netns ({exc.strerror})")
            return []
        try:
            target = os.open(path, os.O_RDONLY)
        except OSError:  # the process left or the namespace is gone: forget it next round
            os.close(own)
            return []
        try:
            if self._libc.setns(target, CLONE_NEWNET) != 0:
                self._warn(f"conntrack: setns into netns {netns} failed ({os.strerror(ctypes.get_errno())})")
                return []
            try:
                self._note_stats(netns, "/proc/thread-self/net/stat/nf_conntrack")
                return self._read_here(netns, "/proc/thread-self/net/nf_conntrack")
            finally:
                if self._libc.setns(own, CLONE_NEWNET) != 0:  # never expected; this thread must not stay inside
                    raise OSError(ctypes.get_errno(), "setns back to ktrace's netns failed")
        finally:
            os.close(target)
            os.close(own)

    def _note_stats(self, netns: int, path: str) -> None:
        try:
            now = read_stats(path)
        except (OSError, ValueError, IndexError):  # no conntrack module (nothing to fill up), or an unknown layout
            return
        seen = self._stats.get(netns)
        if seen is None:
            self._stats[netns] = _TableStats(now, now, now["entries"])
        else:
            seen.last = now
            seen.entries_max = max(seen.entries_max, now["entries"])

    def pressure(self) -> list[dict]:
        """Per namespace read: the most entries seen against the limit, and what the kernel refused meanwhile
        (new connections dropped for a full table, early drops to make room, insert races)."""
        rows = []
        for netns, seen in sorted(self._stats.items()):
            rows.append({"netns": netns, "entries_max": seen.entries_max, "limit": self.limit,
                         **{name: seen.last[name] - seen.first[name] for name in STAT_COUNTERS}})
        return rows

    def _namespace_paths(self) -> Iterator[tuple[int, str]]:
        """A way into each namespace wanted: a pid seen in it, a /run/netns name, or a /proc walk."""
        wanted = {ns: tuple(pids) for ns, pids in list(self._wanted.items())}
        found: dict[int, str] = {}
        for ns, pids in wanted.items():
            for pid in pids:
                path = f"/proc/{pid}/ns/net"
                if _netns_inode(path) == ns:
                    found[ns] = path
                    break
        missing = set(wanted) - set(found)
        if missing:
            for name in _listdir("/run/netns"):
                path = f"/run/netns/{name}"
                ns = _netns_inode(path)
                if ns in missing:
                    found[ns] = path
                    missing.discard(ns)
        if missing and time.monotonic() - self._last_walk >= RESCAN_S:
            self._last_walk = time.monotonic()
            for pid in _listdir("/proc"):
                if not pid.isdigit():
                    continue
                path = f"/proc/{pid}/ns/net"
                ns = _netns_inode(path)
                if ns in missing:
                    found[ns] = path
                    missing.discard(ns)
                    if not missing:
                        break
        yield from found.items()


def _loopback(addr: str) -> bool:
    try:
        return ipaddress.ip_address(addr).is_loopback
    except ValueError:
        return False


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


class NatAnalysis:
    """summary.json's nat section: each translation seen on an annotated event, with the processes and pods that
    used it."""

    MAX_TRANSLATIONS = 1000
    MAX_USERS = 20  # processes and pods listed per translation

    def __init__(self) -> None:
        self._translations: dict[tuple, dict] = {}
        self._omitted: set[tuple] = set()  # translations seen after MAX_TRANSLATIONS: counted, not listed

    def add(self, event: dict, entry: Entry) -> None:
        nat = entry.nat
        if nat is None:
            return
        key = (entry.proto, entry.orig[2], entry.orig[3], entry.reply[0], entry.reply[1], nat)
        row = self._translations.get(key)
        if row is None:
            if len(self._translations) >= self.MAX_TRANSLATIONS:
                self._omitted.add(key)
                return
            row = self._translations[key] = {"flows": set(), "events": 0, "processes": {}, "pods": {},
                                             "processes_omitted": set(), "pods_omitted": set()}
        row["flows"].add((entry.netns, entry.orig))
        row["events"] += 1
        pid = event.get("pid")
        if pid and (pid in row["processes"] or len(row["processes"]) < self.MAX_USERS):
            row["processes"].setdefault(pid, event.get("process") or event.get("comm"))
        elif pid:
            row["processes_omitted"].add(pid)
        pod = owner_pod(event)
        if pod is not None:
            users = row["pods"].get(pod["pod_uid"])
            if users is None and len(row["pods"]) < self.MAX_USERS:
                users = row["pods"][pod["pod_uid"]] = {"pod_uid": pod["pod_uid"], "namespace": pod["namespace"],
                                                       "pod": pod["pod"], "events": 0}
            if users is not None:
                users["events"] += 1
            else:
                row["pods_omitted"].add(pod["pod_uid"])

    def summary(self) -> dict:
        rows = []
        for (proto, odst, odport, rsrc, rsport, nat), row in self._translations.items():
            rows.append({
                "protocol": proto, "original": f"{_hostport(odst, odport)}", "translated": _hostport(rsrc, rsport),
                "nat": nat, "connections": len(row["flows"]), "events": row["events"],
                "processes": [{"pid": pid, "comm": comm} for pid, comm in sorted(row["processes"].items())],
                "processes_omitted": len(row["processes_omitted"]),
                "pods": sorted(row["pods"].values(), key=lambda p: (-p["events"], p["pod_uid"])),
                "pods_omitted": len(row["pods_omitted"]),
            })
        rows.sort(key=lambda r: (-r["connections"], r["original"], r["translated"]))
        return {"translations": rows, "translations_omitted": len(self._omitted)}


def _hostport(addr: str, port: int) -> str:
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


ANNOTATED_TYPES = frozenset(("tcp_state", "connect", "udp_flow"))
_UNSPECIFIED = frozenset(("0.0.0.0", "::"))


def event_key(event: dict) -> tuple[str, str, int, str, int, int] | None:
    """(proto, saddr, sport, daddr, dport, netns) of an event that conntrack could know, else None."""
    if event.get("daddr") in _UNSPECIFIED or not event.get("dport") or not event.get("sport"):
        return None
    kind = event["type"]
    if kind == "udp_flow":
        proto, netns = "udp", event.get("netns_sk") or event.get("netns", 0)
    elif kind == "connect":
        proto, netns = event.get("protocol"), event.get("netns", 0)
        if proto not in ("tcp", "udp"):
            return None
    else:
        proto, netns = "tcp", event.get("netns", 0)
    return proto, event["saddr"], event["sport"], event["daddr"], event["dport"], netns


class Annotator:
    """Adds `conntrack` to the events conntrack can explain; holds back those whose entry the reader has not read yet.

    A connection's entry appears when its first packet passes netfilter, i.e. while
    connect() runs, but the reader reads every REFRESH_S: an event that misses waits
    (at most MAX_PENDING of them, in order) for the next round that started after it,
    then is written with whatever that round found, or null.
    """

    MAX_PENDING = 20000

    def __init__(self, reader: ConntrackReader) -> None:
        self.reader = reader
        self.nat = NatAnalysis()
        self._pending: deque[tuple[int, dict]] = deque()
        self.annotated = self.unmatched = 0

    def note(self, event: dict) -> None:
        """An event to be annotated later (a UDP flow, written when it ends): its namespace is read from now on."""
        key = event_key(event)
        if key is not None:
            self.reader.note(key[5], event.get("pid", 0))

    def annotate(self, event: dict, final: bool = False) -> bool:
        """Set event["conntrack"]; False when it missed and may be held back for a later round."""
        key = event_key(event)
        if key is None:
            event["conntrack"] = None
            return True
        proto, saddr, sport, daddr, dport, netns = key
        self.reader.note(netns, event.get("pid", 0))
        match = self.reader.lookup(proto, saddr, sport, daddr, dport, netns)
        if match is None:
            if not final:
                return False
            event["conntrack"] = None
            self.unmatched += 1
            return True
        entry, matched = match
        event["conntrack"] = entry.annotation(matched)
        self.annotated += 1
        self.nat.add(event, entry)
        return True

    def hold(self, event: dict) -> list[dict]:
        """Keep an event that missed; returns the events to write now (the oldest, when the queue is full)."""
        self._pending.append((self.reader.rounds_started, event))
        if len(self._pending) > self.MAX_PENDING:
            _, oldest = self._pending.popleft()
            self.annotate(oldest, final=True)
            return [oldest]
        return []

    def ready(self, window_end: bool = False) -> list[dict]:
        """Events held back whose round has been read since: annotated, in the order they came."""
        done = self.reader.rounds_done
        out = []
        while self._pending and (window_end or done > self._pending[0][0]):
            _, event = self._pending.popleft()
            self.annotate(event, final=True)
            out.append(event)
        return out

    @property
    def pending(self) -> int:
        return len(self._pending)

    def nat_summary(self, reads: dict[str, int], entries: int, pressure: list[dict]) -> dict:
        return {**self.nat.summary(), "events_annotated": self.annotated, "events_unmatched": self.unmatched,
                "entries": entries, "reads": dict(reads), "tables": pressure}
