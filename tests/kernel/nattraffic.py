"""Run inside the test's namespace: a backend on 10.77.0.1 and a client that talks to the VIP 10.96.0.10.

Prints one JSON line: the client's TCP and UDP tuples as its sockets see them (the VIP) and as the backend
sees them (the real address after DNAT): (local address, local port, remote address, remote port).
"""

from __future__ import annotations

import json
import socket
import sys

BACKEND, VIP = "10.77.0.1", "10.96.0.10"


def main() -> None:
    tcp_port, udp_port, vip_tcp, vip_udp = (int(a) for a in sys.argv[1:5])
    server = socket.socket()
    server.bind((BACKEND, tcp_port))
    server.listen()
    client = socket.create_connection((VIP, vip_tcp), timeout=10)
    accepted, _ = server.accept()
    client.sendall(b"ping")
    assert accepted.recv(4) == b"ping"
    result = {"tcp_client": [*client.getsockname(), *client.getpeername()],
              "tcp_backend": [*accepted.getsockname(), *accepted.getpeername()]}
    client.close()
    accepted.close()
    server.close()

    backend = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    backend.bind((BACKEND, udp_port))
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.connect((VIP, vip_udp))
    sender.send(b"query")
    data, peer = backend.recvfrom(16)
    backend.sendto(b"answer", peer)
    assert sender.recv(16) == b"answer"
    result["udp_client"] = [*sender.getsockname(), *sender.getpeername()]
    result["udp_backend"] = [*backend.getsockname(), *peer]
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
