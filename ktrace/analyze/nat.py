"""Findings on the conntrack tables --with-conntrack read: a table that filled up, or refused entries.

A full conntrack table drops the first packet of every new connection in its namespace ("nf_conntrack: table
full, dropping packet"): Service traffic then fails node-wide while nothing is wrong with any pod.
"""

from __future__ import annotations

from ktrace.analyze.common import Examples, finding

NEAR_FULL = 0.9  # of nf_conntrack_max
HINT_FULL = ("conntrack refused new connections: the table is full. Raise net.netfilter.nf_conntrack_max "
             "(kube-proxy: --conntrack-max-per-core), shorten nf_conntrack_tcp_timeout_* for short-lived "
             "connections, or find the client opening them.")
HINT_NEAR = ("The conntrack table is nearly full; once full, new connections in this namespace are dropped. "
             "Raise net.netfilter.nf_conntrack_max or find what opens so many connections.")
HINT_RACE = ("Entries lost an insert race (two packets of one new flow on two CPUs, typically parallel A and AAAA "
             "queries from one UDP socket through a DNAT'd DNS Service): one of them is dropped. "
             "Use single-request-reopen or TCP for DNS, or NodeLocal DNSCache.")


def conntrack_findings(tables: list[dict]) -> list[dict]:
    out = []
    for index, row in enumerate(tables):
        subject = {"netns": row["netns"], "entries_max": row["entries_max"], "limit": row["limit"],
                   "drop": row["drop"], "early_drop": row["early_drop"], "insert_failed": row["insert_failed"]}
        refused = row["drop"] + row["early_drop"]
        where = f"netns {row['netns']}"
        if refused:
            out.append(finding("conntrack_pressure", "critical",
                               f"conntrack table full in {where}: {row['drop']} new connections dropped, "
                               f"{row['early_drop']} entries evicted ({row['entries_max']} of {row['limit']})",
                               subject, Examples(count=refused), HINT_FULL, f"/nat/tables/{index}"))
        elif row["limit"] and row["entries_max"] >= NEAR_FULL * row["limit"]:
            out.append(finding("conntrack_pressure", "warning",
                               f"conntrack table nearly full in {where}: {row['entries_max']} of {row['limit']}",
                               subject, Examples(count=row["entries_max"]), HINT_NEAR, f"/nat/tables/{index}"))
        if row["insert_failed"]:
            out.append(finding("conntrack_pressure", "warning",
                               f"{row['insert_failed']} conntrack inserts failed in {where} (clashing flows dropped)",
                               subject, Examples(count=row["insert_failed"]), HINT_RACE, f"/nat/tables/{index}"))
    return out
