"""UDP view of a window: flows, datagrams and bytes, top talkers by bytes."""

from __future__ import annotations

from collections import Counter, defaultdict

from ktrace.analyze.common import capped, endpoint, process_name

TOP = 10


class UdpAnalysis:
    def __init__(self) -> None:
        self.flows = 0
        self.totals: Counter[str] = Counter()
        self.per_process: dict[tuple[int, str], Counter] = defaultdict(Counter)
        self.identity: dict[tuple[int, str], dict] = {}
        self.biggest: list[tuple[int, dict]] = []  # (bytes, row) of the largest flows, at most TOP * 4 kept

    def add(self, event: dict, line: int | None) -> None:
        if event["type"] != "udp_flow":
            return
        self.flows += 1
        way = "out" if event["direction"] == "egress" else "in"
        proc = (event["pid"], process_name(event))
        c = self.per_process[proc]
        c[f"packets_{way}"] += event["packets"]
        c[f"bytes_{way}"] += event["bytes"]
        c["errors"] += event["errors"]
        c["flows"] += 1
        self.identity.setdefault(proc, {"pid": event["pid"], "comm": proc[1], "cgroup_id": event["cgroup_id"],
                                        "memcg_id": event["memcg_id"], "netns": event["netns"]})
        self.totals[f"packets_{way}"] += event["packets"]
        self.totals[f"bytes_{way}"] += event["bytes"]
        self.totals["errors"] += event["errors"]
        row = {"pid": event["pid"], "comm": proc[1], "direction": event["direction"],
               "source": endpoint(event["saddr"], event["sport"]),
               "destination": endpoint(event["daddr"], event["dport"]),
               "packets": event["packets"], "bytes": event["bytes"], "errors": event["errors"], "line": line}
        self.biggest.append((event["bytes"], row))
        if len(self.biggest) > TOP * 8:
            self.biggest.sort(key=lambda item: -item[0])
            del self.biggest[TOP * 4:]

    def top_talkers(self) -> list[dict]:
        rows = []
        for proc, c in self.per_process.items():
            rows.append({**self.identity[proc], "bytes": c["bytes_out"] + c["bytes_in"], "bytes_out": c["bytes_out"],
                         "bytes_in": c["bytes_in"], "packets_out": c["packets_out"], "packets_in": c["packets_in"],
                         "errors": c["errors"], "flows": c["flows"]})
        rows.sort(key=lambda r: (-r["bytes"], r["pid"]))
        return rows

    def summary(self) -> dict:
        biggest = sorted(self.biggest, key=lambda item: -item[0])[:TOP]
        return {
            "flows": self.flows,
            "packets_out": self.totals["packets_out"], "bytes_out": self.totals["bytes_out"],
            "packets_in": self.totals["packets_in"], "bytes_in": self.totals["bytes_in"],
            "errors": self.totals["errors"],
            **capped("top_talkers", self.top_talkers(), TOP),
            # every flow is a row, only the largest are kept: the others are counted
            "top_flows": [row for _, row in biggest], "top_flows_omitted": self.flows - len(biggest),
        }
