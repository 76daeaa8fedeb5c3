"""The `ktrace` command line. `ktrace` alone runs a snapshot (the same as `ktrace snapshot`)."""

from __future__ import annotations

import difflib
import logging
import re
import sys
import traceback
from pathlib import Path

import click
import orjson

from ktrace import __version__, capture, probes
from ktrace.enrich import containers
from ktrace.errors import ExitStatus, KtraceError
from ktrace.events.dns import DNS_TIMEOUT_S
from ktrace.interrupt import Interrupted

EXIT_CODES_HELP = "\b\nExit status:\n" + "\n".join(
    f"  {s.value:>3}  {s.name.lower().replace('_', ' ')}" for s in ExitStatus
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SIZE = re.compile(r"^\s*(\d+)\s*([kmg]i?b?|b)?\s*$", re.IGNORECASE)


class Duration(click.ParamType):
    name = "duration"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, (int, float)):
            return float(value)
        m = _DURATION.match(str(value))
        if not m:
            self.fail(f"{value!r} is not a duration (examples: 60, 60s, 2m, 1h)", param, ctx)
        seconds = float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, None: 1}[m.group(2)]
        if seconds <= 0:
            self.fail("must be longer than 0", param, ctx)
        return seconds


class Size(click.ParamType):
    name = "size"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        m = _SIZE.match(str(value))
        if not m:
            self.fail(f"{value!r} is not a size (examples: 5000000, 500k, 20M, 1G)", param, ctx)
        unit = (m.group(2) or "b")[0].lower()
        return int(m.group(1)) * {"b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}[unit]


class PortList(click.ParamType):
    name = "ports"

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        ports = []
        for part in str(value).split(","):
            part = part.strip()
            if not part.isdigit() or not 1 <= int(part) <= 65535:
                self.fail(f"{part!r} is not a port (1-65535)", param, ctx)
            ports.append(int(part))
        if len(ports) > self.limit:
            self.fail(f"at most {self.limit} ports", param, ctx)
        return tuple(sorted(set(ports)))


class FamilyList(click.ParamType):
    name = "families"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        names = tuple(n.strip() for n in str(value).split(",") if n.strip())
        unknown = [n for n in names if n not in probes.FAMILY_BY_NAME]
        if unknown or not names:
            known = ", ".join(probes.FAMILY_BY_NAME)
            self.fail(f"unknown probe family {', '.join(unknown) or '(none)'}; known: {known}", param, ctx)
        return names


class HookList(click.ParamType):
    """Hook labels as `ktrace doctor` shows them, comma-separated; the option may also be repeated."""

    name = "hooks"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        # labels hold commas inside braces ("tp_btf/sock_{send,recv}_length"): split only outside them
        labels, depth, start, text = [], 0, 0, str(value)
        for i, ch in enumerate(text + ","):
            if ch == "{":
                depth += 1
            elif ch == "}":
                depth -= 1
            elif ch == "," and depth <= 0:
                labels.append(text[start:i].strip())
                start, depth = i + 1, 0
        labels = [label for label in labels if label]
        unknown = [label for label in labels if label not in probes.HOOK_LABELS]
        if unknown or not labels:
            self.fail(f"unknown hook {', '.join(unknown) or '(none)'}; known: {', '.join(probes.HOOK_LABELS)}",
                      param, ctx)
        return tuple(labels)


class DefaultToSnapshot(click.Group):
    """`ktrace [OPTIONS]` is `ktrace snapshot [OPTIONS]`; `ktrace --help` shows the snapshot's options too."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            # snapshot takes no arguments: a bare word first is a command, misspelt
            close = difflib.get_close_matches(args[0], self.commands, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"commands: {', '.join(self.commands)}"
            raise click.UsageError(f"no such command {args[0]!r}; {hint}", ctx)
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h", "--version")):
            args = ["snapshot", *args]
        return super().parse_args(ctx, args)

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage(ctx.command_path, "[SNAPSHOT OPTIONS]")
        formatter.write_usage(ctx.command_path, "COMMAND [ARGS]...", prefix="   or: ")

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        super().format_options(ctx, formatter)  # the group's own options, then the commands
        snapshot = self.commands["snapshot"]
        with click.Context(snapshot, info_name="snapshot", parent=ctx) as sub:
            rows = [row for param in snapshot.get_params(sub) if param.name != "help"
                    for row in [param.get_help_record(sub)] if row is not None]
        with formatter.section("Snapshot options (ktrace alone is ktrace snapshot)"):
            formatter.write_dl(rows)


def _setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    if quiet:
        level = logging.ERROR
    logging.basicConfig(level=level, format="ktrace: %(levelname)s: %(name)s: %(message)s", stream=sys.stderr)
    # libbpf's own log (and the verifier's) only with -vv
    logging.getLogger("ktrace.libbpf").setLevel(logging.DEBUG if verbose > 1 else logging.WARNING)


@click.group(cls=DefaultToSnapshot, context_settings={"help_option_names": ["-h", "--help"]},
             epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="ktrace")
def cli() -> None:
    """ktrace: a forensic snapshot of what a node's kernel is doing.

    \b
    Examples:
      sudo ktrace --duration=60s --out-dir=/var/tmp/ktrace
      sudo ktrace --duration=60s --dns-only
      sudo ktrace --duration=90s --ports=80,443,6443
      sudo ktrace doctor
    """


@cli.command(epilog=EXIT_CODES_HELP)
@click.option("--duration", "-d", type=Duration(), default="60s", show_default=True,
              help="Length of the window: 60, 60s, 2m, 1h.")
@click.option("--out-dir", "-o", type=click.Path(path_type=Path), default=Path("."), show_default=True,
              help="Where the bundle is written (created if missing).")
@click.option("--node", default=None, help="Node name in file names. [default: $NODE_NAME, then the hostname]")
@click.option("--ports", type=PortList(), default=None,
              help="Only flows with one of these ports (comma-separated), filtered in the kernel. Dropped TCP/UDP "
                   "packets on them are also recorded one by one (all drops are counted either way).")
@click.option("--dns-only", is_flag=True,
              help="Only DNS: DNS messages, and TCP and UDP flows on --dns-ports. The rest is filtered in the kernel "
                   "and counted. Process, OOM, sched and blockio are left out unless --probes names them.")
@click.option("--dns-ports", type=PortList(limit=capture.MAX_DNS_PORTS), default="53", show_default=True,
              help=f"Ports whose traffic is DNS (comma-separated, at most {capture.MAX_DNS_PORTS}).")
@click.option("--dns-timeout", type=Duration(), default=f"{DNS_TIMEOUT_S:g}s", show_default=True,
              help="A DNS query with no reply after this long is reported as dns_timeout (the default is glibc's "
                   "resolver timeout). A reply that comes later still counts in the reply times.")
@click.option("--udp-flows", type=click.IntRange(min=64, max=1 << 22), default=capture.DEFAULT_MAP_SIZES["udp_flows"],
              show_default=True,
              help="UDP flows counted in the kernel at once (about 300 bytes each). When the map fills, idle "
                   "flows are read out early and new flows' datagrams cross the ring buffer one by one.")
@click.option("--sample", type=click.IntRange(min=1), default=1, show_default=True,
              help="Keep 1 flow in N, decided in the kernel by a hash of its two ports, the same at both ends of "
                   "a connection or a DNS exchange; a kept flow keeps all its events, listening sockets are always "
                   "kept. Process, OOM, drop, sched and blockio events are never sampled.")
@click.option("--max-events", type=click.IntRange(min=0), default=None,
              help="Write at most this many per-event lines; the rest are counted as capped (the aggregate lines "
                   "and summary.json still cover the whole window). [default: no limit]")
@click.option("--max-bytes", type=Size(), default=None,
              help="Write at most this many bytes of per-event lines (500k, 20M); the rest are counted as capped "
                   "(the aggregate lines and summary.json still cover the whole window). "
                   "[default: 1G, or a quarter of --out-dir's free space when that is less]")
@click.option("--probes", "families", type=FamilyList(), default=None,
              help=f"Probe families to load (comma-separated), of: {', '.join(probes.FAMILY_BY_NAME)}. "
                   f"[default: {', '.join(f.name for f in probes.FAMILIES if f.default)}]")
@click.option("--skip-hook", "skip_hooks", type=HookList(), multiple=True, metavar="LABEL",
              help="Treat this alternative as unavailable so that the next one in its family's chain is used, "
                   "e.g. when the first one misbehaves on this kernel. Labels as `ktrace doctor` shows them; "
                   "repeat the option or separate labels with commas.")
@click.option("--with-connect-latency/--without-connect-latency", default=True, show_default=True,
              help="Record connect() calls with errno and syscall time (the handshake time is always recorded).")
@click.option("--with-dns-names", is_flag=True,
              help="Also record the host names processes look up, with the result and the time each lookup took "
                   "(uprobes on getaddrinfo and gethostbyname* in glibc and musl). The names go into the bundle. "
                   "Resolvers that bypass libc are not covered: Go programs, statically linked binaries, dig, "
                   "nslookup.")
@click.option("--with-args", is_flag=True,
              help="Also record the arguments of every exec (the first 256 bytes of argv). Off by default: "
                   "command lines hold passwords and tokens, and they go into the bundle.")
@click.option("--with-conntrack", is_flag=True,
              help="Read the kernel's conntrack table (netlink, else /proc/net/nf_conntrack) of ktrace's network "
                   "namespace and of the namespaces events show, every 2s: tcp_state, connect and udp_flow events "
                   "carry their entry (state, reply tuple, NAT) and summary.json lists the NAT translations seen "
                   "(Service VIP:port → backend:port).")
@click.option("--with-cri/--without-cri", "with_cri", default=None,
              help="Name pods and containers by asking the container runtime over its CRI socket (one query per "
                   "container, never per event); else from kubelet's log files. [default: when a socket is found]")
@click.option("--cri-socket", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The runtime's CRI socket. [default: the first of "
                   f"{', '.join(str(p) for p in containers.SOCKETS)} that exists]")
@click.option("--pod-logs-dir", type=click.Path(path_type=Path, file_okay=False), default=containers.POD_LOGS_DIR,
              show_default=True, help="kubelet's podLogsDir: pod names from its <namespace>_<pod>_<uid> directories "
                                      "when the runtime cannot be asked.")
@click.option("--sched-warn", type=Duration(), default="10ms", show_default=True,
              help="A run-queue wait longer than this is recorded as a runq_latency event (every wait is counted "
                   "in the kernel's per-cgroup histogram); a cgroup whose p99 is over it is a finding.")
@click.option("--bio-warn", type=Duration(), default="100ms", show_default=True,
              help="A block request slower than this from issue to completion is recorded as a bio_latency event "
                   "(every request is counted in the kernel's per-disk histogram); a disk whose p99 is over it is "
                   "a finding.")
@click.option("--ring-size", type=Size(), default="8M", show_default=True,
              help="Size of the ring buffer of the busy families: TCP, UDP, drops, sched, blockio (a power of two).")
@click.option("--rare-ring-size", type=Size(), default="1M", show_default=True,
              help="Size of the ring buffer of the rare families: oom, process, cgroups, dns, dns_names (a power "
                   "of two). A flood on the other ring never takes their place.")
@click.option("--stream", is_flag=True,
              help="Also write every event to stdout as the window runs, one JSON line each, as in events.jsonl "
                   "(for log shippers); the bundle is written as usual and its path goes to stderr. Decoding then "
                   "runs beside the capture instead of after the window. Ends the window early when the reader "
                   "of stdout goes away.")
@click.option("--ready-file", type=click.Path(path_type=Path), default=None,
              help="Create this file once the probes are attached (for scripts that start traffic after).")
@click.option("--verbose", "-v", count=True, help="More detail; -vv adds libbpf's and the verifier's log.")
@click.option("--quiet", "-q", is_flag=True,
              help="No status on stderr, only errors. The bundle's path is printed on stdout either way.")
def snapshot(duration: float, out_dir: Path, node: str | None, ports: tuple[int, ...] | None, dns_only: bool,
             dns_ports: tuple[int, ...], dns_timeout: float, udp_flows: int, sample: int, max_events: int | None,
             max_bytes: int | None, families: tuple[str, ...] | None, skip_hooks: tuple[tuple[str, ...], ...],
             with_connect_latency: bool, with_dns_names: bool, with_args: bool, with_conntrack: bool,
             with_cri: bool | None, cri_socket: Path | None, pod_logs_dir: Path, sched_warn: float, bio_warn: float,
             ring_size: int, rare_ring_size: int, stream: bool, ready_file: Path | None, verbose: int,
             quiet: bool) -> int:
    """Record TCP, UDP, DNS, process, OOM, scheduler, disk and packet-drop activity for a fixed window and write
    a bundle.

    \b
    Writes four files to --out-dir:
      ktrace.<node>.<ts>.events.jsonl   one event per line
      ktrace.<node>.<ts>.summary.json   counts, losses, probes, findings
      ktrace.<node>.<ts>.node.json      kernel, BTF, cgroups, libbpf, arguments
      ktrace.<node>.<ts>.bundle.tgz     the three above

    \b
    Examples:
      sudo ktrace --duration=10s --out-dir=./out
      sudo ktrace --duration=60s --dns-only
      sudo ktrace --duration=2m --ports=443,6443 --sample 10
      sudo ktrace --duration=60s --max-events=100000
      sudo ktrace --duration=60s --dns-only --with-dns-names
      sudo ktrace --duration=60s --skip-hook='tp_btf/sock_{send,recv}_length'
      sudo ktrace --duration=30s --with-conntrack
      sudo ktrace --duration=5m --stream | vector --config ship.toml
      sudo ktrace --duration=30s --cri-socket=/run/k3s/containerd/containerd.sock
    """
    from ktrace.snapshot import SnapshotOptions, run

    _setup_logging(verbose, quiet)
    for size, hint in ((ring_size, "--ring-size"), (rare_ring_size, "--rare-ring-size")):
        if size < 4096 or size & (size - 1):
            raise click.BadParameter("must be a power of two of at least 4096 bytes", param_hint=hint)
    selected = families or tuple(f.name for f in probes.FAMILIES if f.default)
    if not with_connect_latency:
        selected = tuple(f for f in selected if f != "connect")
    if dns_only and ports:
        raise click.BadParameter("--dns-only filters on --dns-ports; leave --ports out", param_hint="--ports")
    if dns_only:
        selected += tuple(f for f in ("dns", "udp_peers") if f not in selected)
        if not families:  # only DNS: the families that are not about the network stay out unless named
            selected = tuple(f for f in selected if f not in ("oom", "process", "sched", "blockio"))
    if with_dns_names and "dns_names" not in selected:
        selected += ("dns_names",)
    opts = SnapshotOptions(duration_s=duration, out_dir=out_dir, node=node or "", ports=ports or (),
                           dns_ports=dns_ports, dns_only=dns_only, dns_timeout_s=dns_timeout, udp_flows=udp_flows,
                           sample=sample, max_events=max_events, max_bytes=max_bytes, families=selected,
                           ring_bytes=ring_size, rare_ring_bytes=rare_ring_size,
                           skip_hooks=frozenset(label for labels in skip_hooks for label in labels),
                           quiet=quiet, ready_file=ready_file, with_args=with_args, sched_warn_s=sched_warn,
                           bio_warn_s=bio_warn, with_conntrack=with_conntrack, with_cri=with_cri,
                           cri_socket=cri_socket, pod_logs_dir=pod_logs_dir, stream=stream)
    result = run(opts)
    if not quiet:
        for line in result.summary["console"]["lines"]:  # the view summary.json keeps, exactly as printed
            click.echo(line, err=True)
    # stdout holds only this line, also with -q: scripts read it; with --stream, stdout holds the events
    click.echo(str(result.paths["bundle.tgz"]), err=stream)
    return int(result.status)


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--cri-socket", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The runtime's CRI socket to check. [default: auto-detected, as snapshot does]")
@click.option("--verbose", "-v", count=True)
def doctor(as_json: bool, cri_socket: Path | None, verbose: int) -> int:
    """Show, per probe family, which hook this kernel lets ktrace use and why, and which runtime names pods.

    \b
    Example:
      sudo ktrace doctor --json | jq '.families[] | {family, chosen}'
    """
    from ktrace import doctor as doctor_mod

    _setup_logging(verbose, False)
    report = doctor_mod.examine(cri_socket)
    if as_json:
        click.echo(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(doctor_mod.render(report))
    missing_required = any(f["status"] != "ok" and probes.FAMILY_BY_NAME[f["family"]].required
                           for f in report["families"])
    if missing_required:
        return int(ExitStatus.ERROR)
    return int(ExitStatus.DEGRADED if any(f["status"] != "ok" for f in report["families"]) else ExitStatus.SUCCESS)


def main(argv: list[str] | None = None) -> int:
    """Entry point: every failure is one line on stderr and a documented exit status."""
    args = sys.argv[1:] if argv is None else argv
    verbose = any(a in ("-v", "-vv", "--verbose") for a in args)
    try:
        rv = cli.main(args=args, prog_name="ktrace", standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc))
        return int(ExitStatus.USAGE)
    except click.UsageError as exc:
        click.echo(f"ktrace: error: {exc.format_message()} (see ktrace --help)", err=True)
        return int(ExitStatus.USAGE)
    except click.Abort:
        click.echo("ktrace: aborted", err=True)
        return 130
    except Interrupted as exc:
        click.echo(f"ktrace: {exc.message}", err=True)
        return int(exc.status)
    except KtraceError as exc:
        click.echo(f"ktrace: error: {exc.message}", err=True)
        if verbose and exc.detail:
            click.echo(exc.detail, err=True)
        return int(exc.status)
    except BrokenPipeError:
        return int(ExitStatus.ERROR)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: one line, no traceback
        click.echo(f"ktrace: internal error: {type(exc).__name__}: {exc} (rerun with -v for details)", err=True)
        if verbose:
            traceback.print_exc()
        return int(ExitStatus.ERROR)
    return int(rv or 0) if isinstance(rv, int) else 0
