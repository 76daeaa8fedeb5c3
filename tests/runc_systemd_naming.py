#!/usr/bin/env python3
"""runc as containerd's BinaryName, giving containers systemd-style cgroup paths on a host without systemd.

With a cgroup_parent ending in ".slice", containerd 1.6 hands runc the systemd driver's form
"kubepods-burstable-pod<uid>.slice:cri-containerd:<id>" whatever the driver. runc's systemd driver needs a
running systemd, and its cgroupfs driver takes that string as one literal relative directory. On `create`
this wrapper rewrites it in the bundle's config.json to the path systemd would have made,

    /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid>.slice/cri-containerd-<id>.scope

runs runc with the cgroupfs driver, then puts the original config.json back so the bundle looks as it does
on a systemd node. Every other invocation goes to runc unchanged. Only the standard library is used: the
shim runs this with the environment containerd was started with.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

RUNC = os.environ.get("KTRACE_TESTS_RUNC", "runc")
# runc's global flags that take a value, so the subcommand is the first other word
GLOBAL_VALUE_FLAGS = {"--root", "--log", "--log-format", "--criu", "--rootless"}
SYSTEMD_FORM = re.compile(r"^(?P<slice>[^/:]+\.slice):(?P<prefix>[^/:]+):(?P<name>[^/:]+)$")


def slice_path(slice_name: str) -> str:
    """systemd's nesting of a slice: a-b-c.slice lives in a-b.slice, which lives in a.slice."""
    if slice_name == "-.slice":
        return ""
    parts = slice_name[: -len(".slice")].split("-")
    return "".join("/" + "-".join(parts[: i + 1]) + ".slice" for i in range(len(parts)))


def expand(cgroups_path: str) -> str | None:
    """The cgroupfs path systemd would give "slice:prefix:name", or None if the path is not in that form."""
    m = SYSTEMD_FORM.match(cgroups_path)
    if m is None:
        return None
    return f"{slice_path(m['slice'])}/{m['prefix']}-{m['name']}.scope"


def subcommand(args: list[str]) -> str:
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in GLOBAL_VALUE_FLAGS:
            skip = True
        elif not arg.startswith("-"):
            return arg
    return ""


def bundle_of(args: list[str]) -> Path:
    """The --bundle (-b) of a `create` command line; runc's default is the current directory."""
    for i, arg in enumerate(args):
        if arg in ("--bundle", "-b") and i + 1 < len(args):
            return Path(args[i + 1])
        for flag in ("--bundle=", "-b="):
            if arg.startswith(flag):
                return Path(arg[len(flag):])
    return Path.cwd()


def main(args: list[str]) -> int:
    if subcommand(args) != "create":
        os.execvp(RUNC, [RUNC, *args])
    config_file = bundle_of(args) / "config.json"
    original = config_file.read_bytes()
    config = json.loads(original)
    expanded = expand(config.get("linux", {}).get("cgroupsPath", ""))
    if expanded is None:
        os.execvp(RUNC, [RUNC, *args])
    config["linux"]["cgroupsPath"] = expanded
    config_file.write_text(json.dumps(config))
    try:
        return subprocess.run([RUNC, *args]).returncode
    finally:
        config_file.write_bytes(original)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
