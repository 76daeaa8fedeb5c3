"""Loopback UDP traffic through each send and receive syscall, run as a process with its own comm.

    python udptraffic.py unconnected FAMILY N SIZE   sendto() and recvfrom() on unconnected sockets   comm kt-sendto
    python udptraffic.py connected FAMILY N SIZE     send() and recv() on two sockets connected to each other   kt-send
    python udptraffic.py mmsg FAMILY BATCHES         sendmmsg() batches to two receivers, read by recvmmsg()    kt-mmsg

FAMILY is 4 (127.0.0.1) or 6 (::1). Every role prints one JSON line: the endpoints ([host, port]) and what it
sent and received, so a test can compare it with what the kernel reported.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import struct
import sys

PR_SET_NAME = 15
MSG_WAITFORONE = 0x10000
BURST = 50  # datagrams in flight at once; far below the receive buffer
MMSG_SIZES = (10, 20, 30)  # one sendmmsg batch: to receiver a, to b, to a

libc = ctypes.CDLL(None, use_errno=True)


def set_comm(name: str) -> None:
    libc.prctl(PR_SET_NAME, name.encode(), 0, 0, 0)


def loopback(family: str) -> tuple[socket.AddressFamily, str]:
    return (socket.AF_INET6, "::1") if family == "6" else (socket.AF_INET, "127.0.0.1")


def bound(af: socket.AddressFamily, host: str) -> socket.socket:
    s = socket.socket(af, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    s.bind((host, 0))
    s.settimeout(10)
    return s


def endpoint(s: socket.socket) -> list:
    host, port = s.getsockname()[:2]
    return [host, port]


def unconnected(family: str, count: int, size: int) -> dict:
    set_comm("kt-sendto")
    af, host = loopback(family)
    sender, receiver = bound(af, host), bound(af, host)
    dest = receiver.getsockname()
    payload = b"u" * size
    peers, received, nbytes, sent = set(), 0, 0, 0
    while sent < count:
        burst = min(BURST, count - sent)
        for _ in range(burst):
            sender.sendto(payload, dest)
            sent += 1
        for i in range(burst):
            if i == 0:
                receiver.recvfrom(65535, socket.MSG_PEEK)  # read again below: not a datagram of its own
            data, peer = receiver.recvfrom(65535)
            peers.add(tuple(peer[:2]))
            received += 1
            nbytes += len(data)
    return {"sender": endpoint(sender), "receiver": endpoint(receiver), "sent": sent, "received": received,
            "bytes": nbytes, "peers": sorted(list(p) for p in peers)}


def connected(family: str, count: int, size: int) -> dict:
    set_comm("kt-send")
    af, host = loopback(family)
    a, b = bound(af, host), bound(af, host)
    a.connect(b.getsockname())
    b.connect(a.getsockname())
    payload = b"c" * size
    received = nbytes = sent = 0
    while sent < count:
        burst = min(BURST, count - sent)
        for _ in range(burst):
            a.send(payload)
            sent += 1
        for _ in range(burst):
            nbytes += len(b.recv(65535))
            received += 1
    return {"sender": endpoint(a), "receiver": endpoint(b), "sent": sent, "received": received, "bytes": nbytes}


class Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class Msghdr(ctypes.Structure):
    _fields_ = [("name", ctypes.c_void_p), ("namelen", ctypes.c_uint32), ("iov", ctypes.POINTER(Iovec)),
                ("iovlen", ctypes.c_size_t), ("control", ctypes.c_void_p), ("controllen", ctypes.c_size_t),
                ("flags", ctypes.c_int)]


class Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", Msghdr), ("len", ctypes.c_uint)]


assert ctypes.sizeof(Mmsghdr) == 64 and Mmsghdr.len.offset == 56


def sockaddr(af: socket.AddressFamily, host: str, port: int) -> bytes:
    if af == socket.AF_INET6:
        return struct.pack("=H", af) + struct.pack("!HI", port, 0) + socket.inet_pton(af, host) + b"\0" * 4
    return struct.pack("=H", af) + struct.pack("!H", port) + socket.inet_pton(af, host) + b"\0" * 8


def parse_sockaddr(raw: bytes) -> list:
    (af,) = struct.unpack_from("=H", raw)
    (port,) = struct.unpack_from("!H", raw, 2)
    if af == socket.AF_INET6:
        return [socket.inet_ntop(af, raw[8:24]), port]
    return [socket.inet_ntop(af, raw[4:8]), port]


def check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def mmsg(family: str, batches: int) -> dict:
    set_comm("kt-mmsg")
    af, host = loopback(family)
    sender, ra, rb = bound(af, host), bound(af, host), bound(af, host)
    dests = (ra, rb, ra)
    n = len(MMSG_SIZES)
    names = [ctypes.create_string_buffer(sockaddr(af, host, d.getsockname()[1])) for d in dests]
    datas = [ctypes.create_string_buffer(b"m" * size, size) for size in MMSG_SIZES]
    iovs = (Iovec * n)(*(Iovec(ctypes.cast(d, ctypes.c_void_p), len(d)) for d in datas))
    out = (Mmsghdr * n)()
    for i in range(n):
        out[i].hdr.name = ctypes.cast(names[i], ctypes.c_void_p)
        out[i].hdr.namelen = len(names[i].raw) - 1
        out[i].hdr.iov = ctypes.pointer(iovs[i])
        out[i].hdr.iovlen = 1
    for _ in range(batches):
        assert check(libc.sendmmsg(sender.fileno(), out, n, 0), "sendmmsg") == n

    def receive(sock: socket.socket, expected: int) -> tuple[int, int, set]:
        slots = 8
        bufs = [ctypes.create_string_buffer(2048) for _ in range(slots)]
        froms = [ctypes.create_string_buffer(128) for _ in range(slots)]
        riovs = (Iovec * slots)(*(Iovec(ctypes.cast(b, ctypes.c_void_p), 2048) for b in bufs))
        msgs, nbytes, peers = 0, 0, set()
        while msgs < expected:
            vec = (Mmsghdr * slots)()
            for i in range(slots):
                vec[i].hdr.name = ctypes.cast(froms[i], ctypes.c_void_p)
                vec[i].hdr.namelen = 128
                vec[i].hdr.iov = ctypes.pointer(riovs[i])
                vec[i].hdr.iovlen = 1
            got = check(libc.recvmmsg(sock.fileno(), vec, min(slots, expected - msgs), MSG_WAITFORONE, None),
                        "recvmmsg")
            for i in range(got):
                nbytes += vec[i].len
                peers.add(tuple(parse_sockaddr(froms[i].raw[:vec[i].hdr.namelen])))
            msgs += got
        return msgs, nbytes, peers

    got_a = receive(ra, 2 * batches)
    got_b = receive(rb, batches)
    return {"sender": endpoint(sender), "a": endpoint(ra), "b": endpoint(rb), "batches": batches,
            "sizes": list(MMSG_SIZES), "a_received": got_a[:2], "b_received": got_b[:2],
            "peers": sorted(list(p) for p in got_a[2] | got_b[2])}


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "unconnected":
        result = unconnected(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif role == "connected":
        result = connected(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif role == "mmsg":
        result = mmsg(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(f"unknown role {role}")
    print(json.dumps(result), flush=True)
