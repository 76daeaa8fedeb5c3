"""`ktrace doctor`: what this kernel lets ktrace do, family by family."""

from __future__ import annotations

import platform
from pathlib import Path

from ktrace import capture, interrupt, libbpf, node, probes
from ktrace.enrich.containers import ContainerNames, find_socket
from ktrace.errors import KtraceError
from ktrace.snapshot import check_btf, check_privileges


def examine(cri_socket: Path | None = None) -> dict:
    """Resolve every family's chain for real, then try each alternative that was not needed.

    A signal is only noted while BPF loads (libbpf calls back into Python), and acted on between two trials."""
    interrupt.defer()
    check_privileges()
    check_btf()
    libbpf.library()
    families = tuple(f.name for f in probes.FAMILIES)
    try:
        cap = capture.load(capture.CaptureConfig(families=families, ring_bytes=64 << 10))
        table = cap.table
        cap.close()
        error = None
    except KtraceError as exc:
        table, error = [], str(exc)
    rows = {row.family: row for row in table}
    for family in probes.FAMILIES:
        row = rows.get(family.name)
        if row is None:
            row = rows[family.name] = probes.FamilyStatus(
                family.name, alternatives=[probes.HookStatus(h.label, "not tried", min_kernel=h.min_kernel)
                                           for h in family.chain])
        for hook, alt in zip(family.chain, row.alternatives):
            signame = interrupt.received()
            if signame:
                raise interrupt.Interrupted(signame, "while examining the probes")
            if alt.status == "not tried":
                alt.status, alt.reason = capture.trial(family, hook)
    return {
        "cri": cri_status(cri_socket or find_socket()),
        "kernel": platform.release(),
        "libbpf": libbpf.version(),
        "btf": str(node.BTF_PATH),
        "lockdown": node.lockdown(),
        "tracefs": str(probes.tracefs()) if probes.tracefs() else None,
        "error": error,
        "families": [rows[f.name].as_dict() for f in probes.FAMILIES],
    }


def cri_status(socket: Path | None) -> dict:
    """Which runtime would name pods: the CRI socket, and whether it answers."""
    names = ContainerNames(socket)
    names.start()
    names.wait()
    report = names.report()
    names.close()
    return {"socket": report["socket"], "runtime": report["runtime"], "containers": report["containers_known"],
            "error": names.warnings[0] if names.warnings else None}


def _cri_line(cri: dict) -> str:
    if cri["socket"] is None:
        return "pod names: no CRI socket found (--cri-socket names one); from kubelet's log files"
    if cri["runtime"] is None:
        return f"pod names: {cri['error']}"
    runtime = cri["runtime"]
    return (f"pod names: CRI {cri['socket']} · {runtime['runtime_name']} {runtime['runtime_version']} "
            f"({runtime['runtime_api_version']}) · {cri['containers']} containers and pods known")


def render(report: dict) -> str:
    width = max([44, *(len(a["hook"]) for f in report["families"] for a in f["alternatives"])])
    lines = [
        f"kernel {report['kernel']} · libbpf {report['libbpf']} · lockdown {report['lockdown'] or 'none'} · "
        f"tracefs {report['tracefs'] or 'missing'}",
        _cri_line(report["cri"]),
        "",
        f"{'family':<14} {'status':<8} {'hook':<{width + 2}} {'result':<12} reason",
    ]
    for fam in report["families"]:
        for i, alt in enumerate(fam["alternatives"]):
            name = fam["family"] if i == 0 else ""
            status = fam["status"] if i == 0 else ""
            mark = "→ " if alt["status"] == "chosen" else "  "
            lines.append(f"{name:<14} {status:<8} {mark}{alt['hook']:<{width}} {alt['status']:<12} "
                         f"{alt['reason']}".rstrip())
    if report["error"]:
        lines += ["", f"error: {report['error']}"]
    return "\n".join(lines)
