"""The README's two commands: the quickstart runs as written in a fresh venv, and CI runs the test command."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from captool import Captioner

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "models" / "shapes-attention"


def two_commands() -> list[str]:
    """The ```bash blocks of the README's "Two commands" section, in order."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return [block.strip() for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)]


def test_readme_gives_two_commands_and_ci_runs_the_test_command():
    install_and_run, install_and_test = two_commands()
    assert install_and_run == "pip install . && captool run examples/"
    test_command = install_and_test.split("&&")[-1].strip()
    assert test_command == "python -m pytest"
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert test_command in [line.strip() for line in ci if not line.lstrip().startswith("#")]


@pytest.mark.slow
def test_quickstart_in_a_fresh_venv_captions_the_examples_without_torch(tmp_path):
    """The first command, as written, in a venv of its own, from a copy of the checkout."""
    command = two_commands()[0]
    source = tmp_path / "captool"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache", ".venv", "runs", "data"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CAPTOOL_MODEL", "VIRTUAL_ENV")}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"  # `pip` and `captool` are the venv's
    start = time.perf_counter()
    proc = subprocess.run(["bash", "-c", command], capture_output=True, text=True, cwd=source, env=env,
                          timeout=1500)
    print(f"quickstart took {time.perf_counter() - start:.1f}s")
    assert proc.returncode == 0, proc.stderr[-3000:]

    no_torch = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True, text=True)
    assert "No module named 'torch'" in no_torch.stderr

    # pip's own progress shares stdout with the captions; the captions are the `path<TAB>caption` lines.
    lines = [line.split("\t") for line in proc.stdout.splitlines() if "\t" in line]
    images = sorted(p for p in (REPO / "examples").iterdir() if p.suffix in (".png", ".jpg"))
    assert [Path(path).name for path, _ in lines] == [p.name for p in images]
    want = Captioner(SHIPPED, device="cpu").caption([str(p) for p in images])
    assert [caption for _, caption in lines] == [c.text for c in want]
    assert all(caption for _, caption in lines)


def test_python_snippet_runs_from_any_directory(tmp_path):
    """The README's Python API block, run as written from a directory that is not the checkout."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
    snippet = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    env = {k: v for k, v in os.environ.items() if k != "CAPTOOL_MODEL"}
    proc = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("a red circle [")
