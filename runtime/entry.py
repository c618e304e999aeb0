"""The `captool` command's entry point: Ctrl-C while the CLI is still loading is one line, not a traceback.

`captool.cli` imports typer and its dependencies (~0.1-0.2 s); a Ctrl-C in that window used to print
a traceback of the import. The command's own handlers take over once it runs.
"""

from __future__ import annotations

import sys

INTERRUPTED = 130  # the shell's status for a process ended by SIGINT


def main() -> None:
    try:
        from .cli import main as cli
    except KeyboardInterrupt:
        sys.stderr.write("captool: error: interrupted\n")
        sys.exit(INTERRUPTED)
    cli()
