"""UDP flow records → one udp_flow event per flow.

A flow's counts reach user space in pieces: the kernel map's entry when the
window ends, entries drained early because the map was filling up, and single
datagrams that crossed the ring while it was full. They are summed here.
"""

from __future__ import annotations

MAX_FLOWS = 262144  # flows held before they are written early (a flow then spans more than one line)


def flow_key(event: dict) -> tuple:
    return (event["netns_sk"], event["pid"], event["direction"], event["family"], event["saddr"], event["sport"],
            event["daddr"], event["dport"])


class UdpFlows:
    def __init__(self) -> None:
        self.flows: dict[tuple, dict] = {}

    def add(self, event: dict) -> None:
        key = flow_key(event)
        flow = self.flows.get(key)
        if flow is None:
            self.flows[key] = event
            return
        flow["packets"] += event["packets"]
        flow["bytes"] += event["bytes"]
        flow["errors"] += event["errors"]
        if event["ts_ns"] < flow["ts_ns"]:
            flow["time"], flow["ts_ns"] = event["time"], event["ts_ns"]
        if event["last_ts_ns"] > flow["last_ts_ns"]:
            flow["last_time"], flow["last_ts_ns"] = event["last_time"], event["last_ts_ns"]
            flow["last_error"] = event["last_error"] or flow["last_error"]

    @property
    def full(self) -> bool:
        return len(self.flows) >= MAX_FLOWS

    def take(self) -> list[dict]:
        """Every flow held, oldest first, and forget them."""
        out = sorted(self.flows.values(), key=lambda f: f["ts_ns"])
        self.flows = {}
        return out
