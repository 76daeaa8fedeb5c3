"""Exit statuses and the typed errors that map onto them.

Every error ktrace reports is one line that names the step and the cause, and,
where there is one, the fix. The CLI maps each error class to its exit status.
"""

from __future__ import annotations

from enum import IntEnum, unique


@unique
class ExitStatus(IntEnum):
    """Process exit status of every ktrace command."""

    SUCCESS = 0
    ERROR = 1  # an unexpected failure
    USAGE = 2  # wrong flags or arguments
    DEGRADED = 3  # bundle written, but a probe family is missing or events were lost
    NO_BTF = 4  # the kernel exposes no BTF
    NOT_PRIVILEGED = 5  # not root / missing CAP_BPF and CAP_PERFMON
    NO_LIBBPF = 6  # libbpf.so.1 missing or older than 1.0
    OUTPUT = 7  # the output directory is unwritable or the disk is full
    BAD_BUNDLE = 8  # a bundle given to analyze is unreadable
    INTERRUPTED = 130  # SIGINT before a snapshot's window could start (nothing recorded), or in doctor: 128 + 2
    TERMINATED = 143  # the same for SIGTERM: 128 + 15


class KtraceError(Exception):
    """An error with a one-line message and an exit status."""

    status = ExitStatus.ERROR

    def __init__(self, message: str, *, detail: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail  # shown under -v (e.g. the verifier's last lines)

    def __str__(self) -> str:
        return self.message


class NotPrivileged(KtraceError):
    status = ExitStatus.NOT_PRIVILEGED


class NoBTF(KtraceError):
    status = ExitStatus.NO_BTF


class LibbpfMissing(KtraceError):
    status = ExitStatus.NO_LIBBPF


class OutputError(KtraceError):
    status = ExitStatus.OUTPUT


class BadBundle(KtraceError):
    status = ExitStatus.BAD_BUNDLE


class BpfError(KtraceError):
    """A libbpf call failed; errno is the kernel's or libbpf's reason."""

    def __init__(self, message: str, errno: int = 0, *, program: str = "", detail: str = "") -> None:
        super().__init__(message, detail=detail)
        self.errno = errno
        self.program = program
