"""Accepted sockets before accept(): their first state changes wait in the kernel for the process that accepts them,
and are written with the listener when no process does within the window."""

from __future__ import annotations

import sys

from tests.helpers import TRAFFIC, record_during, wait_for
from tests.tcpnet import SERVER_ADDR, TwoHosts


def test_connections_no_process_accepted_in_the_window_are_written_at_its_end_with_the_listener(tmp_path):
    connections = 3
    with TwoHosts("backlog") as net:
        port_file = tmp_path / "backlog.port"
        server = net.popen(net.server, sys.executable, TRAFFIC, "backlog", str(port_file), SERVER_ADDR)
        wait_for(port_file, server)
        port = int(port_file.read_text())
        before = net.nstat(net.server)
        script = ("import socket, sys\n"
                  "sys.stdin.readline()\n"
                  f"held = [socket.create_connection(('{SERVER_ADDR}', {port}), timeout=5)\n"
                  f"        for _ in range({connections})]\n"
                  "print('connected', flush=True)\n"
                  "sys.stdin.read()\n")
        client = net.popen(net.client, sys.executable, "-c", script, stdin=-1, stdout=-1, text=True)

        def connect() -> None:
            client.stdin.write("go\n")
            client.stdin.flush()
            assert client.stdout.readline().strip() == "connected"

        bundle = record_during(tmp_path, connect, f"--ports={port}")
        passive_opens = net.nstat(net.server)["TcpPassiveOpens"] - before["TcpPassiveOpens"]
        # the kernel's view of the server's namespace: the connections wait, established, in the accept queue
        queued = net.run(net.server, "ss", "-Htn", "state", "established", f"( sport = :{port} )").stdout
        client.stdin.close()
        client.wait(timeout=30)

    assert passive_opens == connections == len(queued.splitlines())
    server_side = [e for e in bundle.of_type("tcp_state") if e["saddr"] == SERVER_ADDR and e["sport"] == port]
    changes = sorted((e["dport"], e["old_state"], e["new_state"]) for e in server_side)
    ports = sorted({e["dport"] for e in server_side})
    assert len(ports) == connections
    assert changes == sorted((p, *change) for p in ports for change in (("LISTEN", "SYN_RECV"),
                                                                        ("SYN_RECV", "ESTABLISHED")))
    assert {(e["pid"], e["comm"], e["attribution"]) for e in server_side} == {(server.pid, "kt-backlog", "listener")}
    # written late, but with the time they happened: SYN_RECV before ESTABLISHED on each socket
    for p in ports:
        times = {e["new_state"]: e["ts_ns"] for e in server_side if e["dport"] == p}
        assert times["SYN_RECV"] <= times["ESTABLISHED"]
    # nothing held in the kernel was lost: every change seen was written or counted as a loss
    row = bundle.summary["losses"]["by_family"]["tcp_state"]
    assert row["seen"] == row["written"] + sum(v for k, v in row.items() if k not in ("seen", "written", "aggregated"))
    assert bundle.summary["losses"]["balanced"]
