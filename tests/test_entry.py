"""The `captool` entry point: a Ctrl-C while the CLI is still importing is one line and status 130."""

from __future__ import annotations

import subprocess
import sys

SCRIPT = """
import sys

class InterruptTheImport:  # a Ctrl-C that lands while captool.cli (typer and all) is being imported
    def find_spec(self, name, path=None, target=None):
        if name == "captool.cli":
            raise KeyboardInterrupt

sys.meta_path.insert(0, InterruptTheImport())
sys.argv = ["captool", "run", "photo.jpg"]
from captool.entry import main
main()
"""


def test_ctrl_c_while_the_cli_loads_is_one_line():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130
    assert proc.stderr == "captool: error: interrupted\n" and proc.stdout == ""


def test_the_console_script_is_the_entry_point():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "captool"]
    assert script.value == "captool.entry:main"
    proc = subprocess.run([sys.executable, "-c", "import sys; sys.argv = ['captool', '--version']\n"
                           "from captool.entry import main; main()"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("captool ")
