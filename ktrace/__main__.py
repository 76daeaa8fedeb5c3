"""`python -m ktrace` and the `ktrace` command.

SIGINT and SIGTERM are taken over before the rest of ktrace (click, the probe
table, ctypes) is imported, so a signal in the first milliseconds is one line
and a documented exit status, never a traceback.
"""

import sys

from ktrace import interrupt


def run() -> int:
    try:
        interrupt.install()  # may deliver a signal held pending by a launcher: raised here
        from ktrace.cli import main

        return main()
    except interrupt.Interrupted as exc:  # while importing, or between main() and here
        sys.stderr.write(f"ktrace: {exc.message}\n")
        return int(exc.status)
    finally:
        interrupt.defer()  # from here to the exit a signal changes nothing


if __name__ == "__main__":
    sys.exit(run())
