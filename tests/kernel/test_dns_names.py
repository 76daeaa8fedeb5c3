"""--with-dns-names: the names processes look up through libc, with the result and the latency, and nothing without it.

Every lookup runs in a network namespace with a fake DNS server on its loopback
(tests/dnsnet.py); events are told apart from the rest of the host by that
namespace's inode.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from ktrace import capture, libc, probes, schemas
from tests.dnsnet import DnsNetns
from tests.helpers import Ktrace, require_kernel

OK_NAME = "web.test"
DROPPED_NAME = "slow.test"  # the fake server never answers it: the resolver times out after 1 s
NX_NAME = "gone.nx.test"  # NXDOMAIN
ADDRESS = "127.0.0.5"  # an address literal: converted, never looked up


def _netns_inode(ns: DnsNetns) -> int:
    return os.stat(f"/run/netns/{ns.name}").st_ino


def _finish(ktrace: Ktrace) -> None:
    ktrace.signal()
    assert ktrace.finish() == 0, ktrace.stderr


@pytest.fixture(scope="module")
def names(tmp_path_factory):
    """One window with --with-dns-names: getaddrinfo that succeeds, times out and gets NXDOMAIN; getent hosts."""
    require_kernel()
    tmp = tmp_path_factory.mktemp("names")
    with DnsNetns(tmp, "names") as ns:
        ns.drop([DROPPED_NAME])
        ktrace = Ktrace(tmp, "--with-dns-names", duration="120s").started()
        try:
            pids, results = {}, {}
            for label, args in (("ok", (OK_NAME,)), ("dropped", (DROPPED_NAME, "--family", "4")),
                                ("nx", (NX_NAME,))):
                proc = ns.popen("getaddrinfo", *args)
                out, err = proc.communicate(timeout=60)
                assert proc.returncode == 0, err
                pids[label], results[label] = proc.pid, out
            literal = ns.popen("getaddrinfo", ADDRESS)
            literal.communicate(timeout=60)
            pids["literal"] = literal.pid
            getent_ok = ns.exec("getent", "hosts", OK_NAME)
            getent_nx = ns.exec("getent", "hosts", NX_NAME)
            _finish(ktrace)
        finally:
            ktrace.kill()
        netns = _netns_inode(ns)
    assert getent_ok.returncode == 0 and getent_nx.returncode == 2
    assert '"ok": true' in results["ok"] and '"ok": false' in results["dropped"] and '"ok": false' in results["nx"]
    bundle = ktrace.bundle()
    return {"bundle": bundle, "pids": pids, "netns": netns,
            "lookups": [e for e in bundle.of_type("dns_lookup") if e["netns"] == netns]}


def _of(names: dict, label: str) -> list[dict]:
    return [e for e in names["lookups"] if e["pid"] == names["pids"][label]]


def test_successful_getaddrinfo_has_its_name_result_and_latency(names):
    (event,) = _of(names, "ok")
    assert event["comm"] == "kt-gai" and event["attribution"] == "current"
    assert event["function"] == "getaddrinfo" and event["name"] == OK_NAME and event["family"] == "any"
    assert event["result"] == "ok" and event["ret"] == 0
    assert 0 < event["latency_ms"] < 1000


def test_lookup_of_a_name_the_server_drops_fails_with_eai_again_after_the_resolver_timeout(names):
    (event,) = _of(names, "dropped")
    assert event["function"] == "getaddrinfo" and event["name"] == DROPPED_NAME and event["family"] == "ipv4"
    assert event["result"] == "EAI_AGAIN" and event["ret"] == -3
    assert 900 <= event["latency_ms"] <= 10_000  # resolv.conf: timeout:1 attempts:1


def test_lookup_of_a_name_that_does_not_exist_fails_with_eai_noname(names):
    (event,) = _of(names, "nx")
    assert event["name"] == NX_NAME and event["result"] == "EAI_NONAME" and event["ret"] == -2


def test_getent_hosts_goes_through_gethostbyname2_and_its_nested_r_call_is_not_a_second_lookup(names):
    getent = [e for e in names["lookups"] if e["comm"] == "getent"]
    ok = [e for e in getent if e["name"] == OK_NAME]
    nx = [e for e in getent if e["name"] == NX_NAME]
    # getent hosts asks for IPv6 first and only falls back to IPv4 when that finds nothing
    assert [(e["function"], e["family"], e["result"], e["ret"]) for e in ok] == [("gethostbyname2", "ipv6", "ok", 0)]
    assert [(e["function"], e["family"], e["result"], e["ret"]) for e in nx] == [
        ("gethostbyname2", "ipv6", "HOST_NOT_FOUND", -1), ("gethostbyname2", "ipv4", "HOST_NOT_FOUND", -1)]
    assert all(e["latency_ms"] > 0 for e in getent)


def test_address_literal_is_counted_as_filtered_not_recorded(names):
    assert _of(names, "literal") == []
    assert all(e["name"] != ADDRESS for e in names["lookups"])
    assert names["bundle"].summary["losses"]["by_family"]["dns_names"]["filtered"] >= 1


def test_lookup_events_validate_against_the_events_schema(names):
    assert names["lookups"]
    for event in names["lookups"]:
        assert schemas.validate("events", event) == []


def test_probe_table_names_the_libc_files_probed_and_nothing_is_lost(names):
    bundle = names["bundle"]
    (row,) = [r for r in bundle.summary["probes"] if r["family"] == "dns_names"]
    assert row["status"] == "ok" and row["chosen"].startswith("uprobe/libc:")
    assert "uprobes on " in row["reason"] and "libc" in row["reason"]
    assert bundle.node["probes"] == bundle.summary["probes"]
    assert bundle.node["args"]["with_dns_names"] is True and "dns_names" in bundle.node["args"]["probes"]
    loss = bundle.summary["losses"]["by_family"]["dns_names"]
    assert loss["written"] >= len(names["lookups"]) and loss["ringbuf_full"] == 0
    assert loss["seen"] == loss["written"] + loss["filtered"]
    assert bundle.summary["counts"]["dns_lookup"] == len(bundle.of_type("dns_lookup"))


def test_without_the_flag_no_name_reaches_the_bundle(tmp_path):
    secret = f"quiet-{os.getpid()}.test"
    with DnsNetns(tmp_path, "quiet") as ns:
        ktrace = Ktrace(tmp_path, duration="120s").started()
        try:
            assert '"ok": true' in ns.run("getaddrinfo", secret, timeout=60).stdout
            assert ns.exec("getent", "hosts", secret).returncode == 0
            _finish(ktrace)
        finally:
            ktrace.kill()
        asked = {q["name"] for q in ns.queries()}
    assert secret in asked  # the lookups really went out, over DNS
    bundle = ktrace.bundle()
    assert bundle.of_type("dns_lookup") == []
    assert "dns_names" not in bundle.node["args"]["probes"] and bundle.node["args"]["with_dns_names"] is False
    assert all(r["family"] != "dns_names" for r in bundle.summary["probes"])
    needle = secret.encode()
    for kind in ("events.jsonl", "summary.json", "node.json"):
        assert needle not in bundle.paths[kind].read_bytes(), kind
    with tarfile.open(bundle.paths["bundle.tgz"]) as tar:
        for member in tar.getmembers():
            assert needle not in tar.extractfile(member).read(), member.name


# A process on a libc of its own, as in a container whose image brings one: a copy of the host's libc, loaded
# through LD_LIBRARY_PATH and deleted while the process runs (as after a package upgrade). It waits for GO.
OWN_LIBC_CLIENT = """
import os, socket, sys, time
while not os.path.exists(sys.argv[1]):
    time.sleep(0.02)
try:
    socket.getaddrinfo(sys.argv[2], None)
    print("ok", flush=True)
except OSError as exc:
    print(exc, flush=True)
"""


def test_a_process_on_its_own_deleted_libc_gets_its_own_uprobes(tmp_path):
    host = libc.discover.__wrapped__().files[0]
    own = tmp_path / "lib"
    own.mkdir()
    shutil.copyfile(host.path, own / "libc.so.6")
    go = tmp_path / "go"
    with DnsNetns(tmp_path, "ownlibc") as ns:
        client = subprocess.Popen(ns.command(sys.executable, "-c", OWN_LIBC_CLIENT, str(go), OK_NAME),
                                  env={**os.environ, "LD_LIBRARY_PATH": str(own)}, stdout=subprocess.PIPE, text=True)
        try:
            maps = Path(f"/proc/{client.pid}/maps")
            deadline = time.monotonic() + 30
            # `ip netns exec` is linked with libc too and maps the copy before it execs Python: wait for Python
            # itself, or the copy may be gone before Python loads it, and Python takes the host's libc
            while (Path(f"/proc/{client.pid}/exe").resolve() != Path(sys.executable).resolve()
                   or str(own / "libc.so.6") not in maps.read_text()):
                assert time.monotonic() < deadline and client.poll() is None, "the client never mapped its libc"
                time.sleep(0.02)
            (own / "libc.so.6").unlink()
            ktrace = Ktrace(tmp_path, "--with-dns-names", duration="120s").started()
            try:
                go.touch()
                out, _ = client.communicate(timeout=60)
                _finish(ktrace)
            finally:
                ktrace.kill()
        finally:
            if client.poll() is None:
                client.kill()
                client.wait()
    assert out.strip() == "ok"
    bundle = ktrace.bundle()
    (row,) = [r for r in bundle.summary["probes"] if r["family"] == "dns_names"]
    assert f"pid {client.pid}:{own / 'libc.so.6'} (deleted)" in row["reason"]
    (event,) = [e for e in bundle.of_type("dns_lookup") if e["pid"] == client.pid]
    assert (event["function"], event["name"], event["result"]) == ("getaddrinfo", OK_NAME, "ok")


# --- which libc files get the uprobes (through ktrace.capture, in this process) ---


def _libbpf_file() -> str:
    """A 64-bit ELF library of this machine with none of the resolver functions: the libbpf ktrace loaded."""
    from ktrace import libbpf

    libbpf.library()
    for line in open("/proc/self/maps"):
        path = line.split()[-1]
        if "/libbpf.so" in path:
            return path
    raise AssertionError("ktrace loaded libbpf, yet no libbpf.so is mapped in this process")


def test_a_libc_without_the_functions_is_reported_and_does_not_fail_the_family(monkeypatch):
    host = libc.discover.__wrapped__().files[0]
    other = _libbpf_file()
    monkeypatch.setattr(libc, "discover", lambda: libc.Discovery(files=[host, libc.LibcFile(other, other)]))
    cap = capture.load(capture.CaptureConfig(families=("dns_names",), ring_bytes=64 << 10))
    try:
        (row,) = cap.table
        assert len(cap.links) == len(probes.UPROBES)
    finally:
        cap.close()
    assert row.status == "ok"
    assert row.reason.startswith(f"uprobes on 1 libc file(s): {host.shown};")
    assert f"{other}: not probed: getaddrinfo, gethostbyname, gethostbyname2, gethostbyname_r, gethostbyname2_r" \
        in row.reason


def test_without_any_function_to_probe_the_family_is_missing_and_the_others_still_load(monkeypatch):
    other = _libbpf_file()
    monkeypatch.setattr(libc, "discover", lambda: libc.Discovery(files=[libc.LibcFile(other, other)]))
    cap = capture.load(capture.CaptureConfig(families=("tcp_state", "dns_names"), ring_bytes=64 << 10))
    try:
        rows = {row.family: row for row in cap.table}
    finally:
        cap.close()
    assert rows["tcp_state"].status == "ok"
    names = rows["dns_names"]
    assert names.status == "missing" and names.chosen is None
    assert names.alternatives[0].status == "refused"
    assert "no libc function could be probed" in names.reason and other in names.reason
