"""DNS and UDP clients for tests, each role under its own comm so kernel events can name it. Prints one JSON line.

    python resolver.py getaddrinfo NAME [--family 4|6|any]                       comm kt-gai
    python resolver.py unconnected SERVER NAME [--port 53] [--count N] [--timeout S]   comm kt-dig
    python resolver.py tcp SERVER NAME [--port 53] [--timeout S] [--count N]       comm kt-dnstcp
    python resolver.py udp-pair --count N --size S [--payload TEXT] [--connected] [--recv-from] [--family 4|6]
                                [--ready-file F] [--go-file G]                     comm kt-udp

Every role exits 0 when it ran to the end, even if the lookups failed; the JSON says what happened.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import random
import socket
import struct
import sys
import time
from pathlib import Path

PR_SET_NAME = 15
QTYPE_A = 1
QTYPE_AAAA = 28
RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
BURST = 64


def set_comm(name: str) -> None:
    ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode(), 0, 0, 0)


def emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


def elapsed_ms(start: float) -> float:
    return round((time.monotonic() - start) * 1000, 3)


def build_query(name: str, qtype: int = QTYPE_A, qid: int | None = None) -> tuple[int, bytes]:
    qid = random.randrange(1 << 16) if qid is None else qid
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)  # RD
    qname = b"".join(bytes([len(label)]) + label.encode() for label in name.rstrip(".").split(".") if label)
    return qid, header + qname + b"\x00" + struct.pack("!HH", qtype, 1)


def skip_name(msg: bytes, pos: int) -> int:
    while True:
        length = msg[pos]
        if length & 0xC0 == 0xC0:
            return pos + 2
        pos += 1 + length
        if length == 0:
            return pos


def parse_reply(msg: bytes) -> tuple[int, str, list[str]]:
    """(id, rcode name, A/AAAA addresses) of a reply."""
    qid, flags, qdcount, ancount = struct.unpack("!HHHH", msg[:8])
    pos = 12
    for _ in range(qdcount):
        pos = skip_name(msg, pos) + 4
    addresses = []
    for _ in range(ancount):
        pos = skip_name(msg, pos)
        rtype, _rclass, _ttl, rdlength = struct.unpack("!HHIH", msg[pos:pos + 10])
        pos += 10
        rdata = msg[pos:pos + rdlength]
        pos += rdlength
        if rtype == QTYPE_A and rdlength == 4:
            addresses.append(socket.inet_ntop(socket.AF_INET, rdata))
        elif rtype == QTYPE_AAAA and rdlength == 16:
            addresses.append(socket.inet_ntop(socket.AF_INET6, rdata))
    rcode = flags & 0xF
    return qid, RCODES.get(rcode, str(rcode)), addresses


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def fmt_addr(sockaddr: tuple) -> str:
    host, port = sockaddr[0], sockaddr[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# roles


def role_getaddrinfo(args: argparse.Namespace) -> None:
    set_comm("kt-gai")
    family = {"4": socket.AF_INET, "6": socket.AF_INET6, "any": socket.AF_UNSPEC}[args.family]
    start = time.monotonic()
    try:
        infos = socket.getaddrinfo(args.name, None, family, socket.SOCK_STREAM)
    except OSError as exc:
        emit({"ok": False, "error": str(exc), "addresses": [], "ms": elapsed_ms(start)})
        return
    ms = elapsed_ms(start)
    addresses: list[str] = []
    for info in infos:
        if info[4][0] not in addresses:
            addresses.append(info[4][0])
    emit({"ok": True, "error": None, "addresses": addresses, "ms": ms})


def role_unconnected(args: argparse.Namespace) -> None:
    set_comm("kt-dig")
    server = (args.server, args.port)
    sock = socket.socket(family_of(args.server), socket.SOCK_DGRAM)
    sent = answered = 0
    times: list[float] = []
    rcodes: list[str] = []
    addresses: list[str] = []
    for _ in range(args.count):
        qid, query = build_query(args.name)
        start = time.monotonic()
        sock.sendto(query, server)
        sent += 1
        deadline = start + args.timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            sock.settimeout(remaining)
            try:
                data, peer = sock.recvfrom(65535)
            except (TimeoutError, socket.timeout):
                break
            try:
                rid, rcode, addrs = parse_reply(data)
            except (struct.error, IndexError):
                continue
            if rid != qid or peer[1] != args.port:
                continue
            answered += 1
            times.append(elapsed_ms(start))
            rcodes.append(rcode)
            addresses.extend(a for a in addrs if a not in addresses)
            break
    local = fmt_addr(sock.getsockname()) if sent else None
    sock.close()
    emit({"sent": sent, "answered": answered, "ms": times, "rcodes": rcodes, "addresses": addresses,
          "local": local})


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("connection closed mid-message")
        data += chunk
    return data


def role_tcp(args: argparse.Namespace) -> None:
    set_comm("kt-dnstcp")
    start = time.monotonic()
    record: dict = {"ok": False, "error": None, "rcode": None, "addresses": [], "answered": 0, "ms": None}
    try:
        with socket.create_connection((args.server, args.port), timeout=args.timeout) as sock:
            for _ in range(args.count):  # several queries, one connection
                qid, query = build_query(args.name)
                sock.sendall(struct.pack("!H", len(query)) + query)
                (length,) = struct.unpack("!H", recv_exact(sock, 2))
                rid, rcode, addrs = parse_reply(recv_exact(sock, length))
                if rid != qid:
                    raise ValueError(f"reply id {rid} != query id {qid}")
                record["answered"] += 1
                record.update(rcode=rcode, addresses=addrs)
        record["ok"] = True
    except (OSError, ValueError, struct.error, IndexError) as exc:
        record["error"] = f"{type(exc).__name__}: {exc}"
    record["ms"] = elapsed_ms(start)
    emit(record)


def set_rcvbuf(sock: socket.socket, size: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, 33, size)  # SO_RCVBUFFORCE: root may exceed rmem_max
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


def wait_file(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {path}")
        time.sleep(0.01)


def role_udp_pair(args: argparse.Namespace) -> None:
    set_comm("kt-udp")
    family = socket.AF_INET6 if args.family == "6" else socket.AF_INET
    loopback = "::1" if family == socket.AF_INET6 else "127.0.0.1"
    text = (args.payload or "kt-udp ").encode()
    payload = (text * (args.size // len(text) + 1))[:args.size]
    receiver = socket.socket(family, socket.SOCK_DGRAM)
    set_rcvbuf(receiver, max(4 << 20, BURST * (args.size + 1024) * 4))
    receiver.bind((loopback, 0))
    receiver.settimeout(10)
    sender = socket.socket(family, socket.SOCK_DGRAM)
    sender.bind((loopback, 0))
    dest = receiver.getsockname()[:2]
    if args.connected:
        sender.connect(dest)
    names = {"sender": fmt_addr(sender.getsockname()), "receiver": fmt_addr(receiver.getsockname())}
    if args.ready_file:
        tmp = Path(str(args.ready_file) + ".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), **names}))
        os.rename(tmp, args.ready_file)
    if args.go_file:
        wait_file(args.go_file)
    sent = received = nbytes = 0
    while sent < args.count:
        burst = min(BURST, args.count - sent)
        for _ in range(burst):
            if args.connected:
                sender.send(payload)
            else:
                sender.sendto(payload, dest)
            sent += 1
        for _ in range(burst):
            try:
                data = receiver.recvfrom(65535)[0] if args.recv_from else receiver.recv(65535)
            except (TimeoutError, socket.timeout):
                break
            received += 1
            nbytes += len(data)
    sender.close()
    receiver.close()
    emit({"sent": sent, "received": received, "bytes": nbytes, **names})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    roles = parser.add_subparsers(dest="role", required=True)

    p = roles.add_parser("getaddrinfo")
    p.add_argument("name")
    p.add_argument("--family", choices=["4", "6", "any"], default="any")
    p.set_defaults(fn=role_getaddrinfo)

    p = roles.add_parser("unconnected")
    p.add_argument("server")
    p.add_argument("name")
    p.add_argument("--port", type=int, default=53)
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--timeout", type=float, default=2.0)
    p.set_defaults(fn=role_unconnected)

    p = roles.add_parser("tcp")
    p.add_argument("server")
    p.add_argument("name")
    p.add_argument("--port", type=int, default=53)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--count", type=int, default=1, help="queries sent one after another on the one connection")
    p.set_defaults(fn=role_tcp)

    p = roles.add_parser("udp-pair")
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--size", type=int, required=True)
    p.add_argument("--payload", default=None)
    p.add_argument("--connected", action="store_true")
    p.add_argument("--recv-from", action="store_true", help="receive with recvfrom(), which returns the source")
    p.add_argument("--family", choices=["4", "6"], default="4")
    p.add_argument("--ready-file", type=Path, default=None)
    p.add_argument("--go-file", type=Path, default=None, help="after the ready file, wait for this file to appear")
    p.set_defaults(fn=role_udp_pair)

    args = parser.parse_args(argv)
    args.fn(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
