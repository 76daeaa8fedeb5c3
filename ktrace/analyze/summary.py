"""summary.json: counts, losses, the probe table, top talkers and findings of one window."""

from __future__ import annotations

from collections import Counter

from ktrace.analyze.common import Examples, capped, finding
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
# same at both ends (bpf/common.bpf.h kt_sample_ports; a TCP socket's events all follow its decision).
SAMPLED_FAMILIES = {"tcp_state": "ports", "connect": "ports", "retransmit": "ports", "reset": "ports",
                    "udp": "ports", "dns": "ports"}
SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}
TOP_TALKERS = 10  # TCP processes listed, the most connections first
DNS_SUSPECTS = 100  # (process, server) pairs with unanswered queries listed
CONSOLE_FINDINGS = 10  # findings the console lists: every critical one, then the next ones up to this many


def sampling(every: int, probes: list[dict]) -> dict:
    """What --sample kept: 1 flow in `every` of the families listed (those that ran); the others are whole."""
    ran = {row["family"] for row in probes if row["status"] == "ok"}
    if every <= 1:
        return {"every": 1, "families": []}
    return {"every": every, "families": [{"family": f, "decision": unit}
                                         for f, unit in SAMPLED_FAMILIES.items() if f in ran]}


def rank(f: dict) -> tuple:
    """Strictly by severity, then impact: the events it rests on, then the processes that made them."""
    return (SEVERITY_ORDER.get(f["severity"], 3), -f["evidence"]["count"], -f["subject"].get("processes", 0),
            f["rule"], f["title"])


def console_view(findings: list[dict], meta: dict, total: dict, lines: int, sampled: dict) -> dict:
    """What `ktrace snapshot` prints when the window ends, line by line, kept in summary.json as it was printed.
    findings: ordered by rank; every critical one is listed however many."""
    critical = sum(1 for f in findings if f["severity"] == "critical")
    shown = findings[:max(critical, CONSOLE_FINDINGS)]
    # a udp_flow line stands for many datagrams: lines and kernel events are different counts
    not_written = [f"{total['capped']:,} capped"]
    if total["disk_full"]:
        not_written.append(f"{total['disk_full']:,} not written: disk full")
    not_written.append(f"{total['ringbuf_full'] + total.get('missed', 0):,} lost")
    text = [f"ktrace: {meta.get('window', {}).get('actual_s', 0):.1f}s, {lines:,} lines written for "
            f"{total['written']:,} kernel events ({', '.join(not_written)}), {len(findings)} findings"]
    if sampled["families"]:  # never silent: the counts cover the kept flows only
        families = ", ".join(row["family"] for row in sampled["families"])
        text.append(f"ktrace: sampled 1 flow in {sampled['every']} of {families}: their counts and findings cover "
                    "the kept flows only")
    text += [f"  [{f['severity']}] {f['title']}" for f in shown]
    if len(findings) > len(shown):
        text.append(f"  ... {len(findings) - len(shown)} more in summary.json (findings)")
    text += [f"ktrace: degraded: {reason}" for reason in meta.get("degraded", [])]
    return {"lines": text, "findings_shown": len(shown), "findings_omitted": len(findings) - len(shown)}


def events_lost(lost: int, missed: int) -> dict:
    """Events that never reached events.jsonl: lost in transit (ring full, undecodable), and runs of ktrace's
    programs the kernel skipped (missed), whose events the hooks never saw."""
    parts, hints = [], []
    if lost:
        parts.append(f"{lost} events lost in transit")
        hints.append("The ring buffer filled: raise --ring-size, narrow --ports or use --sample.")
    if missed:
        parts.append(f"{missed} runs of ktrace's hooks skipped by the kernel")
        hints.append("The kernel skipped a hook while another BPF program ran on the same CPU (recursion_misses): "
                     "counts of the families in losses.by_family with missed > 0 may be short by that many.")
    return finding("events_lost", "warning", "; ".join(parts), {}, Examples(count=lost + missed), " ".join(hints),
                   "/losses/total")


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
              coverage: dict | None = None,
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
        # bundles of ktrace versions that did not read the kernel's skipped runs have no missed column
        kinds = ("seen", "written", "aggregated", *LOSS_KINDS,
                 *(("missed",) if any("missed" in f for f in losses.values()) else ()))
        total = {kind: sum(f.get(kind) or 0 for f in losses.values()) for kind in kinds}
        unaccounted = sum(abs(f["seen"] - f["written"] - sum(f[k] for k in LOSS_KINDS)) for f in losses.values())
        lost = total["ringbuf_full"] + total["undecodable"]
        if lost or total.get("missed"):
            findings.append(events_lost(lost, total.get("missed", 0)))
        findings.sort(key=rank)
        for f in findings:
            # the rules know processes and endpoints; the pods come from who made the evidence events
            f["pods"] = self.pods.pods_of(f["evidence"]["lines"])
        files_events = files.get("events", {})
        sampled = sampling(every, probes)
        console = console_view(findings, meta, total, files_events.get("lines", 0), sampled)
        return {
            "schema": SCHEMA,
            **meta,
            "counts": dict(sorted(self.counts.items())),
            "coverage": coverage,
            # a skipped run is an event of unknown kind, or none: it cannot be balanced, only counted
            "losses": {"by_family": losses, "total": total, "balanced": unaccounted == 0 and not total.get("missed")},
            "probes": probes,
            "sampling": sampled,
            "tcp": {**self.tcp.summary(), "sample_every": every},
            **capped("top_talkers", self.tcp.top_talkers(), TOP_TALKERS),
            "udp": {**self.udp.summary(), "kernel_map": udp_map, "sample_every": every},
            "dns": {**self.dns.summary(), "sample_every": every},
            **capped("dns_suspects", self.dns.suspects(), DNS_SUSPECTS),
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
            "console": console,
            "files": files,
            "warnings": warnings,
        }
