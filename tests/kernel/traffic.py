"""Loopback TCP traffic with known shapes, run as separate processes with their own comm.

    python traffic.py server PORT_FILE [HOST]   accept forever; "hold" connections are kept open
    python traffic.py backlog PORT_FILE HOST    listen and never accept: connections wait in the accept queue
    python traffic.py client PORT N_OK N_REFUSED N_HOLD [CLOSED_PORT]
    python traffic.py connect HOST PORT         one blocking connect, prints the result
    python traffic.py wait-connect HOST PORT    one connect() on a blocking socket with no timeout (Python polls a
                                                 socket with a timeout without blocking in connect())
    python traffic.py give-up HOST PORT N SECS  N connects, each closed after SECS without an answer; prints a JSON
                                                 line: attempts, timeouts, local ports
    python traffic.py pings HOST PORT N CLOSED_PORT M
                                                N ping/pong connections to a traffic.py server, every other one
                                                 connected non-blocking, then M connects to CLOSED_PORT (refused);
                                                 prints their local ports: {"ok": [...], "refused": [...]}
"""

from __future__ import annotations

import ctypes
import socket
import sys
import time

PR_SET_NAME = 15


def set_comm(name: str) -> None:
    ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode(), 0, 0, 0)


def server(port_file: str, host: str = "127.0.0.1") -> None:
    set_comm("kt-server")
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((host, 0))
    srv.listen(512)
    held = []
    with open(port_file + ".tmp", "w") as f:
        f.write(str(srv.getsockname()[1]))
    import os

    os.rename(port_file + ".tmp", port_file)
    while True:
        conn, _ = srv.accept()
        data = conn.recv(16)
        if data == b"hold":
            held.append(conn)  # never closed: CLOSE_WAIT once the client closes
            continue
        conn.sendall(b"pong")
        conn.recv(16)  # wait for the client's FIN
        conn.close()


def backlog(port_file: str, host: str) -> None:
    import os

    set_comm("kt-backlog")
    srv = socket.socket()
    srv.bind((host, 0))
    srv.listen(64)
    with open(port_file + ".tmp", "w") as f:
        f.write(str(srv.getsockname()[1]))
    os.rename(port_file + ".tmp", port_file)
    while True:
        time.sleep(3600)


def client(port: int, n_ok: int, n_refused: int, n_hold: int, closed_port: int) -> None:
    set_comm("kt-client")
    for _ in range(n_ok):
        c = socket.create_connection(("127.0.0.1", port))
        c.sendall(b"ping")
        c.recv(16)
        c.close()
    for _ in range(n_refused):
        try:
            socket.create_connection(("127.0.0.1", closed_port)).close()
        except ConnectionRefusedError:
            pass
    for _ in range(n_hold):
        c = socket.create_connection(("127.0.0.1", port))
        c.sendall(b"hold")
        time.sleep(0.01)
        c.close()


def connect(host: str, port: int) -> None:
    set_comm("kt-connect")
    start = time.monotonic()
    c = socket.create_connection((host, port), timeout=10)
    print(f"connected {time.monotonic() - start:.3f}", flush=True)
    c.close()


def wait_connect(host: str, port: int) -> None:
    set_comm("kt-connect")
    socket.socket().connect((host, port))
    print("connected", flush=True)


def give_up(host: str, port: int, n: int, seconds: float) -> None:
    """An application with its own connect timeout: it closes the socket itself, long before the kernel would."""
    import json

    set_comm("kt-giveup")
    timeouts, ports = 0, []
    for _ in range(n):
        c = socket.socket()
        c.settimeout(seconds)
        c.bind(("0.0.0.0", 0))
        ports.append(c.getsockname()[1])
        try:
            c.connect((host, port))
        except TimeoutError:
            timeouts += 1
        c.close()
    print(json.dumps({"attempts": n, "timeouts": timeouts, "ports": ports}), flush=True)


def pings(host: str, port: int, n: int, closed_port: int, m: int) -> None:
    """A blocking connect() returns after the handshake; a non-blocking one returns (EINPROGRESS) before it."""
    import errno
    import json
    import select

    set_comm("kt-pings")
    ports = []
    for i in range(n):
        c = socket.socket()
        if i % 2:
            c.setblocking(False)
            assert c.connect_ex((host, port)) == errno.EINPROGRESS
            select.select([], [c], [], 10)
            assert c.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0
            c.setblocking(True)
        else:
            c.connect((host, port))
        ports.append(c.getsockname()[1])
        c.sendall(b"ping")
        c.recv(16)
        c.close()
    refused = []
    for _ in range(m):
        c = socket.socket()
        assert c.connect_ex((host, closed_port)) == errno.ECONNREFUSED
        refused.append(c.getsockname()[1])  # the port it had: the kernel keeps it in the socket after the refusal
        c.close()
    print(json.dumps({"ok": ports, "refused": refused}), flush=True)


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "server":
        server(*sys.argv[2:4])
    elif role == "backlog":
        backlog(sys.argv[2], sys.argv[3])
    elif role == "give-up":
        give_up(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]))
    elif role == "client":
        client(int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    elif role == "pings":
        pings(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    elif role == "wait-connect":
        wait_connect(sys.argv[2], int(sys.argv[3]))
    elif role == "connect":
        connect(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit(f"unknown role {role}")
