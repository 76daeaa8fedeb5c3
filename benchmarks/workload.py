"""Pure-Python fallback for workload.c, used when no C compiler is available.

Same interface and behaviour: ``python -m benchmarks.workload tcp|udp N [-t SEC] [-r RATE]``.
Slower than the C version, so its rates are not comparable with it, but ratios
measured with the same generator still are.
"""

from __future__ import annotations

import argparse
import socket
import time
from typing import Callable

LOOPBACK = "127.0.0.1"
TIME_CHECK_EVERY = 64
BATCH_S = 0.001  # paced: sleep once per millisecond's worth of operations
MESSAGE = b"ktrace\n\0"


def tcp_cycle(listener: socket.socket, server: tuple[str, int]) -> None:
    """connect / accept / server writes / server closes / client reads EOF / client closes."""
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.connect(server)
    conn, _ = listener.accept()
    conn.sendall(MESSAGE)
    conn.close()
    while client.recv(64):
        pass
    client.close()


class Pace:
    """Operation i is due at start + i / rate; sleep to it once per batch (rate 0: unpaced)."""

    def __init__(self, rate: float, start: float) -> None:
        self.rate = rate
        self.start = start
        self.batch = max(1, int(rate * BATCH_S))

    def wait(self, i: int) -> None:
        if self.rate <= 0 or i == 0 or i % self.batch:
            return
        ahead = self.start + i / self.rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)


def run_tcp(n: int, deadline: float, pace: Pace) -> tuple[int, int]:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind((LOOPBACK, 0))
        listener.listen(128)
        server = listener.getsockname()
        return _loop(n, deadline, pace, lambda: tcp_cycle(listener, server)), server[1]


def run_udp(n: int, deadline: float, pace: Pace) -> tuple[int, int]:
    payload = b"k" * 32
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    cli = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with srv, cli:
        srv.bind((LOOPBACK, 0))
        cli.bind((LOOPBACK, 0))
        server = srv.getsockname()

        def round_trip() -> None:
            cli.sendto(payload, server)
            data, peer = srv.recvfrom(64)
            srv.sendto(data, peer)
            cli.recvfrom(64)

        return _loop(n, deadline, pace, round_trip), server[1]


def _loop(n: int, deadline: float, pace: Pace, op: Callable[[], None]) -> int:
    for i in range(n):
        if i % TIME_CHECK_EVERY == 0 and time.monotonic() > deadline:
            return i
        pace.wait(i)
        op()
    return n


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Loopback socket churn; the last line is ops_per_s=R done=D port=P elapsed_s=T."
    )
    parser.add_argument("kind", choices=("tcp", "udp"))
    parser.add_argument("n", type=int)
    parser.add_argument("-t", dest="cap", type=float, default=60.0, help="time cap in seconds (default 60)")
    parser.add_argument("-r", dest="rate", type=float, default=0.0, help="offered operations per second (paced)")
    args = parser.parse_args()
    if args.n <= 0 or args.cap <= 0 or args.rate < 0:
        parser.error("N and SEC must be positive, RATE not negative")

    start = time.monotonic()
    run = run_tcp if args.kind == "tcp" else run_udp
    done, port = run(args.n, start + args.cap, Pace(args.rate, start))
    elapsed = time.monotonic() - start
    note = " (time cap reached)" if done < args.n else ""
    print(f"{args.kind}: {done} of {args.n} ops in {elapsed:.3f} s{note}")
    print(f"ops_per_s={done / elapsed if elapsed > 0 else 0.0:.1f} done={done} port={port} elapsed_s={elapsed:.6f}")


if __name__ == "__main__":
    main()
