"""The `convit-kernels` console script: the command line, where Ctrl-C at any moment is one line and status 130.

A module of its own outside the package: importing anything in ``convit_kernels`` first runs the
package's ``__init__``, which imports torch (seconds), and a Ctrl-C during that import ended in a
traceback before ``convit_kernels.cli.main`` ran. This module imports nothing heavy before its guard.
"""

import signal
import sys

__all__ = ["main"]

INTERRUPTED = 128 + signal.SIGINT  # 130, as a shell reports a command stopped by Ctrl-C


def main() -> int:
    try:
        from convit_kernels.cli import main as run_command

        return run_command()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while the line is printed: no traceback
        print("interrupted", file=sys.stderr)
        return INTERRUPTED


if __name__ == "__main__":
    raise SystemExit(main())
