"""summary.json: counts, losses, the probe table, top talkers and findings of one window."""

from __future__ import annotations

from collections import Counter

from ktrace.analyze.dns import DnsAnalysis
from ktrace.analyze.drops import DropAnalysis
from ktrace.analyze.latency import LatencyAnalysis
from ktrace.analyze.lookups import LookupAnalysis
from ktrace.analyze.nat import conntrack_findings
from ktrace.analyze.pods import PodAnalysis
from ktrace.analyze.process import OomAnalysis, ProcessAnalysis
from ktrace.analyze.tcp import TcpAnalysis
from ktrace.analyze.udp import UdpAnalysis

SCHEMA = "ktrace.summary/1"
LOSS_KINDS = ("filtered", "sampled_out", "ringbuf_full", "capped", "disk_full", "undecodable")
# The families --sample narrows, and what one keep-or-drop decision covers: "ports", a flow by its two ports, the
# same at both ends (bpf/common.bpf.h kt_sample_ports); "socket", every event of one TCP socket (bpf/tcp.bpf.c).
SAMPLED_FAMILIES = {"tcp_state": "socket", "connect": "socket", "retransmit": "socket", "reset": "socket",
                    "udp": "ports", "dns": "ports"}


def sampling(every: int, probes: list[dict]) -> dict:
    """What --sample kept: 1 flow in `every` of the families listed (those that ran); the others are whole."""
    ran = {row["family"] for row in probes if row["status"] == "ok"}
    if every <= 1:
        return {"every": 1, "families": []}
    return {"every": every, "families": [{"family": f, "decision": unit}
                                         for f, unit in SAMPLED_FAMILIES.items() if f in ran]}


class Summary:
    """Accumulates every decoded event of a window (written or not) into summary.json."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.tcp = TcpAnalysis()
        self.udp = UdpAnalysis()
        self.dns = DnsAnalysis()
        self.lookups = LookupAnalysis()
        self.oom = OomAnalysis()
        self.processes = ProcessAnalysis()
        self.drops = DropAnalysis()
        self.latency = LatencyAnalysis()
        self.pods = PodAnalysis()

    def add(self, event: dict, line: int | None) -> None:
        self.counts[event["type"]] += 1
        self.tcp.add(event, line)
        self.udp.add(event, line)
        self.dns.add(event, line)
        self.lookups.add(event, line)
        self.oom.add(event, line)
        self.processes.add(event, line)
        self.drops.add(event, line)
        self.latency.add(event, line)
        self.pods.add(event, line)

    def build(self, *, meta: dict, losses: dict[str, dict[str, int]], probes: list[dict], files: dict,
              warnings: list[str], udp_map: dict | None = None, process_counts: dict | None = None,
              drops_map: dict | None = None, latency_losses: dict | None = None, nat: dict | None = None,
              cri: dict | None = None) -> dict:
        """What only the kernel maps knew, none of it known offline: udp_map, drops_map: those maps' sizes and
        use, when their families ran; process_counts: what the process family counted without events;
        latency_losses: per section (sched, blockio), the losses counted apart from the family counters;
        nat: with --with-conntrack, the translations conntrack showed on the window's events (else None);
        cri: where pod and container names came from (ktrace.enrich.containers), None when not recorded."""
        options = meta.get("options", {})
        every = options.get("sample", 1)
        sched_warn, bio_warn = options.get("sched_warn_ms"), options.get("bio_warn_ms")
        findings = (self.dns.findings(options.get("dns_timeout_s")) + self.lookups.findings()
                    + self.tcp.findings() + self.oom.findings() + self.processes.findings() + self.drops.findings()
                    + self.latency.sched_findings(sched_warn) + self.latency.blockio_findings(bio_warn)
                    + conntrack_findings(nat["tables"] if nat else []))
        latency_losses = latency_losses or {}
        total = {kind: sum(f.get(kind, 0) for f in losses.values())
                 for kind in ("seen", "written", "aggregated", *LOSS_KINDS)}
        unaccounted = sum(abs(f["seen"] - f["written"] - sum(f[k] for k in LOSS_KINDS)) for f in losses.values())
        if total["ringbuf_full"] or total["undecodable"]:
            findings.insert(0, {
                "rule": "events_lost", "severity": "warning",
                "title": f"{total['ringbuf_full'] + total['undecodable']} events lost in transit",
                "subject": {}, "evidence": {"count": total["ringbuf_full"] + total["undecodable"], "lines": []},
                "hint": "The ring buffer filled: raise --ring-size, narrow --ports or use --sample.",
            })
        severity_order = {"critical": 0, "warning": 1, "info": 2}
        findings.sort(key=lambda f: severity_order.get(f["severity"], 3))
        for f in findings:
            # the rules know processes and endpoints; the pods come from who made the evidence events
            f["pods"] = self.pods.pods_of(f["evidence"]["lines"])
        return {
            "schema": SCHEMA,
            **meta,
            "counts": dict(sorted(self.counts.items())),
            "losses": {"by_family": losses, "total": total, "balanced": unaccounted == 0},
            "probes": probes,
            "sampling": sampling(every, probes),
            "tcp": {**self.tcp.summary(), "sample_every": every},
            "top_talkers": self.tcp.top_talkers(),
            "udp": {**self.udp.summary(), "kernel_map": udp_map, "sample_every": every},
            "dns": {**self.dns.summary(), "sample_every": every},
            "dns_suspects": self.dns.suspects(),
            "dns_lookups": self.lookups.summary(),
            "oom": self.oom.summary(),
            "processes": self.processes.summary(process_counts),
            "drops": self.drops.summary(drops_map),
            "sched": self.latency.sched_summary(sched_warn, latency_losses.get("sched")),
            "blockio": self.latency.blockio_summary(bio_warn, latency_losses.get("blockio")),
            "pods": self.pods.summary(findings),
            "nat": nat,
            "cri": cri,
            "findings": findings,
            "files": files,
            "warnings": warnings,
        }
