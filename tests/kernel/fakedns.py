"""A fake DNS server for tests: UDP and TCP on loopback, behaviour steered by files in a control directory.

    python fakedns.py --ready-file F --control-dir D [--listen 127.0.0.1] [--listen ::1] [--port 53]

Answers: A -> 127.0.0.5, AAAA -> ::5, any name under nx.test -> NXDOMAIN, other types -> NOERROR with no answer.
Control files, re-read on every query:
    drop       names (one a line, case-insensitive, trailing dot ignored) whose queries get no reply
    silent     if it exists, no query gets a reply
    delay_ms   an integer number of milliseconds to wait before replying
Every query is appended to D/queries.jsonl as {"proto", "peer", "name", "qtype", "id", "action", "delay_ms"},
action being answer, empty, nxdomain, notimp, drop or "malformed: why".
The ready file (JSON {"pid", "port", "listen"}) appears, by atomic rename, once every socket is bound.
SIGTERM or SIGINT stops the server cleanly. Malformed packets are ignored (or get FORMERR), never fatal.
"""

from __future__ import annotations

import argparse
import ctypes
import heapq
import itertools
import json
import os
import selectors
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

PR_SET_NAME = 15
QTYPE_A = 1
QTYPE_AAAA = 28
CLASS_IN = 1
RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
ANSWER_A = socket.inet_pton(socket.AF_INET, "127.0.0.5")
ANSWER_AAAA = socket.inet_pton(socket.AF_INET6, "::5")
TTL = 60
TCP_MAX_BUFFER = 1 << 20


def set_comm(name: str) -> None:
    ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode(), 0, 0, 0)


def normalize(name: str) -> str:
    return name.strip().rstrip(".").lower()


class Malformed(Exception):
    pass


def parse_question(msg: bytes) -> tuple[int, str, int, int, int]:
    """(id, qname, qtype, qclass, end offset of the question) of a query; raises Malformed."""
    if len(msg) < 12:
        raise Malformed("short header")
    qid, flags, qdcount = struct.unpack("!HHH", msg[:6])
    if flags & 0x8000:
        raise Malformed("not a query")
    if qdcount < 1:
        raise Malformed("no question")
    labels = []
    pos = 12
    while True:
        if pos >= len(msg):
            raise Malformed("truncated name")
        length = msg[pos]
        pos += 1
        if length == 0:
            break
        if length & 0xC0:
            raise Malformed("compressed or extended label in the question")
        if pos + length > len(msg):
            raise Malformed("truncated label")
        labels.append(msg[pos:pos + length].decode("ascii", "replace"))
        pos += length
        if pos > 12 + 255:
            raise Malformed("name too long")
    if pos + 4 > len(msg):
        raise Malformed("truncated question")
    qtype, qclass = struct.unpack("!HH", msg[pos:pos + 4])
    return qid, ".".join(labels), qtype, qclass, pos + 4


def is_nx(name: str) -> bool:
    name = normalize(name)
    return name == "nx.test" or name.endswith(".nx.test")


def build_reply(msg: bytes) -> tuple[bytes | None, dict]:
    """The reply to one query (None: no reply at all) and a record of what was asked."""
    try:
        qid, qname, qtype, qclass, end = parse_question(msg)
    except Malformed as exc:
        info = {"name": None, "qtype": None, "id": None, "action": f"malformed: {exc}"}
        if len(msg) >= 12 and not msg[2] & 0x80:
            qid, flags = struct.unpack("!HH", msg[:4])
            info["id"] = qid
            reply_flags = 0x8000 | (flags & 0x7900) | 0x0080 | RCODE_FORMERR  # QR, opcode, RD; RA
            return struct.pack("!HHHHHH", qid, reply_flags, 0, 0, 0, 0), info
        return None, info
    flags = struct.unpack("!H", msg[2:4])[0]
    opcode = (flags >> 11) & 0xF
    info = {"name": qname, "qtype": qtype, "id": qid}
    answers = b""
    ancount = 0
    if opcode != 0:
        rcode = RCODE_NOTIMP
    elif is_nx(qname):
        rcode = RCODE_NXDOMAIN
    else:
        rcode = RCODE_NOERROR
        rdata = None
        if qclass == CLASS_IN and qtype == QTYPE_A:
            rdata = ANSWER_A
        elif qclass == CLASS_IN and qtype == QTYPE_AAAA:
            rdata = ANSWER_AAAA
        if rdata is not None:
            answers = struct.pack("!HHHIH", 0xC00C, qtype, CLASS_IN, TTL, len(rdata)) + rdata
            ancount = 1
    info["action"] = {RCODE_NOERROR: "answer" if ancount else "empty", RCODE_NXDOMAIN: "nxdomain",
                      RCODE_NOTIMP: "notimp"}[rcode]
    reply_flags = 0x8000 | (opcode << 11) | (flags & 0x0100) | 0x0080 | rcode  # QR, opcode, RD copied, RA
    header = struct.pack("!HHHHHH", qid, reply_flags, 1, ancount, 0, 0)
    return header + msg[12:end] + answers, info


class Control:
    """The control directory, read afresh for every query."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.log_path = path / "queries.jsonl"

    def _read(self, name: str) -> str | None:
        try:
            return (self.path / name).read_text()
        except (OSError, UnicodeDecodeError):
            return None

    def verdict(self, qname: str | None) -> tuple[str, float]:
        """("drop" | "reply", delay in seconds)."""
        if (self.path / "silent").exists():
            return "drop", 0.0
        dropped = self._read("drop")
        if qname is not None and dropped:
            if normalize(qname) in {normalize(line) for line in dropped.splitlines() if line.strip()}:
                return "drop", 0.0
        delay = 0.0
        text = self._read("delay_ms")
        if text:
            try:
                delay = max(0, int(text.strip())) / 1000.0
            except ValueError:
                delay = 0.0
        return "reply", delay

    def log(self, record: dict) -> None:
        try:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError:
            pass


class TcpConn:
    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.inbuf = b""
        self.outbuf = b""
        self.closed = False


class Server:
    def __init__(self, listen: list[str], port: int, control: Control) -> None:
        self.control = control
        self.sel = selectors.DefaultSelector()
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = itertools.count()
        self.listeners: list[socket.socket] = []
        self.conns: dict[int, TcpConn] = {}
        for addr in listen:
            family = socket.AF_INET6 if ":" in addr else socket.AF_INET
            for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                sock = socket.socket(family, kind)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((addr, port))
                if kind == socket.SOCK_STREAM:
                    sock.listen(128)
                sock.setblocking(False)
                self.listeners.append(sock)
                self.sel.register(sock, selectors.EVENT_READ, ("udp" if kind == socket.SOCK_DGRAM else "accept"))

    # timers

    def later(self, delay: float, fn: Callable[[], None]) -> None:
        if delay <= 0:
            fn()
        else:
            heapq.heappush(self.timers, (time.monotonic() + delay, next(self.seq), fn))

    def run_due_timers(self) -> float | None:
        now = time.monotonic()
        while self.timers and self.timers[0][0] <= now:
            _, _, fn = heapq.heappop(self.timers)
            fn()
        return max(0.0, self.timers[0][0] - time.monotonic()) if self.timers else None

    # queries

    def handle(self, proto: str, peer: str, msg: bytes, send: Callable[[bytes], None]) -> None:
        reply, info = build_reply(msg)
        action, delay = self.control.verdict(info.get("name"))
        if action == "drop":
            info["action"] = "drop"
            reply = None
        self.control.log({"proto": proto, "peer": peer, **info, "delay_ms": round(delay * 1000)})
        if reply is not None:
            self.later(delay, lambda: send(reply))

    def on_udp(self, sock: socket.socket) -> None:
        for _ in range(64):
            try:
                msg, addr = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return

            def send(data: bytes, sock: socket.socket = sock, addr: tuple = addr) -> None:
                try:
                    sock.sendto(data, addr)
                except OSError:
                    pass

            self.handle("udp", f"{addr[0]}:{addr[1]}", msg, send)

    def on_accept(self, sock: socket.socket) -> None:
        try:
            conn, addr = sock.accept()
        except OSError:
            return
        conn.setblocking(False)
        tc = TcpConn(conn, f"{addr[0]}:{addr[1]}")
        self.conns[conn.fileno()] = tc
        self.sel.register(conn, selectors.EVENT_READ, "tcp")

    def close_conn(self, tc: TcpConn) -> None:
        if tc.closed:
            return
        tc.closed = True
        try:
            self.sel.unregister(tc.sock)
        except (KeyError, ValueError):
            pass
        self.conns.pop(tc.sock.fileno(), None)
        tc.sock.close()

    def tcp_send(self, tc: TcpConn, data: bytes) -> None:
        if tc.closed:
            return
        tc.outbuf += struct.pack("!H", len(data)) + data
        self.flush(tc)

    def flush(self, tc: TcpConn) -> None:
        try:
            while tc.outbuf:
                n = tc.sock.send(tc.outbuf)
                tc.outbuf = tc.outbuf[n:]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self.close_conn(tc)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if tc.outbuf else 0)
        try:
            self.sel.modify(tc.sock, events, "tcp")
        except (KeyError, ValueError):
            pass

    def on_tcp(self, sock: socket.socket, mask: int) -> None:
        tc = self.conns.get(sock.fileno())
        if tc is None:
            return
        if mask & selectors.EVENT_WRITE:
            self.flush(tc)
        if not mask & selectors.EVENT_READ or tc.closed:
            return
        try:
            data = sock.recv(65535)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close_conn(tc)
            return
        tc.inbuf += data
        if len(tc.inbuf) > TCP_MAX_BUFFER:
            self.close_conn(tc)
            return
        while len(tc.inbuf) >= 2:
            (length,) = struct.unpack("!H", tc.inbuf[:2])
            if len(tc.inbuf) < 2 + length:
                break
            msg, tc.inbuf = tc.inbuf[2:2 + length], tc.inbuf[2 + length:]
            self.handle("tcp", tc.peer, msg, lambda data, tc=tc: self.tcp_send(tc, data))

    def serve_forever(self) -> None:
        while True:
            timeout = self.run_due_timers()
            for key, mask in self.sel.select(timeout):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    if key.data == "udp":
                        self.on_udp(sock)
                    elif key.data == "accept":
                        self.on_accept(sock)
                    else:
                        self.on_tcp(sock, mask)
                except Exception as exc:  # noqa: BLE001 - one bad packet must never stop the server
                    print(f"fakedns: ignored {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)

    def close(self) -> None:
        for tc in list(self.conns.values()):
            self.close_conn(tc)
        for sock in self.listeners:
            sock.close()
        self.sel.close()


def write_ready(path: Path, record: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record))
    os.rename(tmp, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ready-file", required=True, type=Path)
    parser.add_argument("--control-dir", required=True, type=Path)
    parser.add_argument("--listen", action="append", help="address to listen on (repeatable)")
    parser.add_argument("--port", type=int, default=53)
    args = parser.parse_args(argv)
    set_comm("kt-dns")

    def stop(signum: int, frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    args.control_dir.mkdir(parents=True, exist_ok=True)
    listen = args.listen or ["127.0.0.1", "::1"]
    server = Server(listen, args.port, Control(args.control_dir))
    try:
        write_ready(args.ready_file, {"pid": os.getpid(), "port": args.port, "listen": listen})
        server.serve_forever()
    except SystemExit:
        pass
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
