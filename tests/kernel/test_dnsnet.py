"""The DNS test kit on its own, without ktrace: a netns with a fake DNS server, and the clients that query it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dnsnet import RESOLVER, DnsNetns
from tests.helpers import wait_for

HOST_RESOLV_CONF = Path("/etc/resolv.conf")


def netns_names() -> list[str]:
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in listed.splitlines() if line.strip()]


@pytest.fixture
def ns(tmp_path):
    with DnsNetns(tmp_path, "dns") as ns:
        yield ns


def test_getaddrinfo_resolves_through_the_fake_server_and_the_host_resolv_conf_is_untouched(tmp_path):
    before = HOST_RESOLV_CONF.read_bytes()
    with DnsNetns(tmp_path, "dns") as ns:
        assert ns.resolv_conf.read_text().startswith("nameserver 127.0.0.1\n")
        assert ns.exec("cat", "/etc/resolv.conf").stdout == ns.resolv_conf.read_text()
        assert Path(f"/proc/{ns.server_pid}/comm").read_text().strip() == "kt-dns"

        v4 = ns.run_json("getaddrinfo", "web.test", "--family", "4")
        assert v4["ok"] and v4["error"] is None and v4["addresses"] == ["127.0.0.5"]
        both = ns.run_json("getaddrinfo", "web.test")
        assert both["ok"] and sorted(both["addresses"]) == ["127.0.0.5", "::5"]
        assert HOST_RESOLV_CONF.read_bytes() == before

        asked = {(q["name"], q["qtype"]) for q in ns.queries()}
        assert {("web.test", 1), ("web.test", 28)} <= asked
    assert HOST_RESOLV_CONF.read_bytes() == before


def test_getent_hosts_uses_the_fake_server(ns):
    result = ns.exec("getent", "hosts", "web.test")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[0] in ("::5", "127.0.0.5")
    # getaddrinfo with AI_ADDRCONFIG and AF_UNSPEC (`getent ahostsv4` would not query at all: glibc's AI_ADDRCONFIG
    # ignores loopback addresses, and a loopback is all this namespace has)
    result = ns.exec("getent", "ahosts", "web.test")
    assert result.returncode == 0 and {line.split()[0] for line in result.stdout.splitlines()} == {"127.0.0.5", "::5"}


def test_nxdomain_is_a_failure_with_an_answer(ns):
    result = ns.run_json("getaddrinfo", "gone.nx.test")
    assert not result["ok"] and result["addresses"] == []
    assert all(q["action"] == "nxdomain" for q in ns.queries())


def test_a_dropped_name_times_out_and_other_names_still_resolve(ns):
    ns.drop(["Slow.Test."])
    result = ns.run_json("getaddrinfo", "slow.test", "--family", "4")
    assert not result["ok"] and result["error"]
    assert ns.run_json("getaddrinfo", "fast.test", "--family", "4")["addresses"] == ["127.0.0.5"]
    actions = {q["name"]: q["action"] for q in ns.queries()}
    assert actions == {"slow.test": "drop", "fast.test": "answer"}

    ns.drop([])
    assert ns.run_json("getaddrinfo", "slow.test", "--family", "4")["ok"]


def test_silence_fails_every_lookup_until_lifted(ns):
    ns.silence()
    assert not ns.run_json("getaddrinfo", "web.test", "--family", "4")["ok"]
    quiet = ns.run_json("unconnected", "127.0.0.1", "web.test", "--timeout", "0.5")
    assert quiet["sent"] == 1 and quiet["answered"] == 0
    assert not ns.run_json("tcp", "127.0.0.1", "web.test", "--timeout", "0.5")["ok"]
    ns.silence(False)
    assert ns.run_json("getaddrinfo", "web.test", "--family", "4")["ok"]


def test_delay_is_applied_and_answers_still_arrive(ns):
    ns.delay(200)
    result = ns.run_json("unconnected", "127.0.0.1", "web.test", "--count", "2")
    assert result["answered"] == 2
    assert all(q["delay_ms"] == 200 for q in ns.queries())
    ns.delay(0)


@pytest.mark.parametrize("server", ["127.0.0.1", "::1"])
def test_unconnected_client_over_both_loopbacks(ns, server):
    result = ns.run_json("unconnected", server, "web.test", "--count", "5")
    assert result["sent"] == 5 and result["answered"] == 5 and len(result["ms"]) == 5
    assert result["rcodes"] == ["NOERROR"] * 5 and result["addresses"] == ["127.0.0.5"]
    assert {q["proto"] for q in ns.queries()} == {"udp"}


@pytest.mark.parametrize("server", ["127.0.0.1", "::1"])
def test_tcp_client_several_queries_on_one_connection(ns, server):
    result = ns.run_json("tcp", server, "web.test", "--count", "3")
    assert result["ok"] and result["answered"] == 3 and result["addresses"] == ["127.0.0.5"], result
    queries = ns.queries()
    assert len(queries) == 3 and {q["proto"] for q in queries} == {"tcp"} and len({q["peer"] for q in queries}) == 1
    nx = ns.run_json("tcp", server, "a.nx.test")
    assert nx["ok"] and nx["rcode"] == "NXDOMAIN" and nx["addresses"] == []


def test_the_server_survives_malformed_packets(ns):
    junk = "\n".join([
        "import socket",
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)",
        "q = b'\\x12\\x34\\x01\\x00\\x00\\x01' + bytes(6)",
        "for p in (b'', b'x', q[:6], q + b'\\x05ab', q + b'\\xc0\\x0c\\x00\\x01\\x00\\x01', bytes(range(256)) * 4):",
        "    s.sendto(p, ('127.0.0.1', 53))",
        "t = socket.create_connection(('127.0.0.1', 53))",
        "t.sendall(b'\\x00\\x05hello\\xff\\x00\\x00')",
        "t.close()",
    ])
    assert ns.exec(sys.executable, "-c", junk).returncode == 0
    assert ns.run_json("unconnected", "127.0.0.1", "web.test")["answered"] == 1
    assert ns.server is not None and ns.server.poll() is None


@pytest.mark.parametrize("family", ["4", "6"])
@pytest.mark.parametrize("connected", [False, True])
def test_udp_pair_delivers_every_datagram_inside_the_netns(ns, family, connected):
    args = ["udp-pair", "--count", "1000", "--size", "100", "--family", family, "--payload", "kt"]
    result = ns.run_json(*args, *(["--connected"] if connected else []))
    assert result["sent"] == 1000 and result["received"] == 1000 and result["bytes"] == 100_000
    loopback = "127.0.0.1:" if family == "4" else "[::1]:"
    assert result["sender"].startswith(loopback) and result["receiver"].startswith(loopback)


@pytest.mark.parametrize("family", ["4", "6"])
@pytest.mark.parametrize("connected", [False, True])
def test_udp_pair_on_the_host_loopback(family, connected):
    args = [sys.executable, RESOLVER, "udp-pair", "--count", "1000", "--size", "100", "--family", family]
    result = subprocess.run([*args, *(["--connected"] if connected else [])], capture_output=True, text=True,
                            timeout=60, check=True)
    record = json.loads(result.stdout)
    assert record["sent"] == 1000 and record["received"] == 1000 and record["bytes"] == 100_000


def test_udp_pair_ready_and_go_files(ns, tmp_path):
    ready, go = tmp_path / "udp.ready", tmp_path / "udp.go"
    proc = ns.popen("udp-pair", "--count", "10", "--size", "50", "--ready-file", str(ready), "--go-file", str(go))
    wait_for(ready, proc)
    info = json.loads(ready.read_text())
    assert info["pid"] == proc.pid
    assert Path(f"/proc/{proc.pid}/comm").read_text().strip() == "kt-udp"
    go.touch()
    out, err = proc.communicate(timeout=60)
    record = json.loads(out)
    assert proc.returncode == 0 and record["received"] == 10 and record["sender"] == info["sender"], err


def test_background_client_pid_is_the_resolver_and_its_comm_is_set(ns):
    ns.silence()
    proc = ns.popen("unconnected", "127.0.0.1", "web.test", "--timeout", "30")
    # the query reaching the server proves the client is running under its final comm
    log = ns.control_dir / "queries.jsonl"
    wait_for(log, proc)
    assert Path(f"/proc/{proc.pid}/comm").read_text().strip() == "kt-dig"
    ns.silence(False)
    # leaving it running: DnsNetns stops it on exit


def test_everything_is_removed_after_exit_even_when_the_body_raises(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), DnsNetns(tmp_path, "gone") as ns:
        server = ns.server
        assert ns.etc_dir.is_dir() and server is not None
        raise RuntimeError("boom")
    assert ns.name not in netns_names()
    assert not ns.etc_dir.exists()
    assert server.returncode is not None


def test_netns_and_etc_netns_are_gone_after_a_normal_exit(tmp_path):
    with DnsNetns(tmp_path, "bye") as ns:
        assert ns.run_json("getaddrinfo", "web.test", "--family", "4")["ok"]
    assert ns.name not in netns_names()
    assert not ns.etc_dir.exists() and not Path(f"/run/netns/{ns.name}").exists()
