"""The runtime needs no PyTorch: with torch made unimportable, and from a plain `pip install .` venv."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from captool import Captioner

REPO = Path(__file__).resolve().parent.parent

# Everything the training and export extras bring; the runtime must work with none of it.
BLOCK = ["torch", "torchvision", "onnx", "onnxscript", "safetensors"]


def picture(path: Path, seed: int) -> Path:
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(path)
    return path


def test_runtime_captions_with_torch_unimportable(tiny_bundle, tmp_path):
    bundle = tiny_bundle("lstm")
    images = [picture(tmp_path / f"{i}.png", i) for i in range(2)]
    script = f"""
import json, sys
for name in {BLOCK!r}:
    sys.modules[name] = None  # `import torch` now raises ImportError
import captool
from captool import Captioner
from captool.cli import main
c = Captioner({str(bundle)!r}, device="cpu")
print(json.dumps([x.text for x in c.caption({[str(p) for p in images]!r}, beam_size=2)]))
sys.argv = ["captool", "run", "--model", {str(bundle)!r}, "--json", {str(images[0])!r}]
try:
    main()
except SystemExit as e:
    print("exit", e.code)
assert sys.modules["torch"] is None
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    want = Captioner(bundle, device="cpu")
    assert json.loads(lines[0]) == [c.text for c in want.caption(images, beam_size=2)]
    record = json.loads(lines[1])
    assert record["path"] == str(images[0]) and record["caption"] == want.caption(images[0])[0].text
    assert lines[2] == "exit 0"


def test_importing_captool_imports_no_heavy_package():
    code = "import sys, captool, captool.cli, captool.run; print(sorted(m for m in {!r} if m in sys.modules))".format(
        BLOCK + ["onnxruntime"])
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"  # not even onnxruntime until a Captioner is made


@pytest.mark.slow
def test_plain_pip_install_venv_captions_without_torch(tiny_bundle, tmp_path):
    """`pip install .` into a fresh venv (pip's cache makes it quick), then `captool run` from it."""
    bundle = tiny_bundle("rnn")
    image = picture(tmp_path / "a.png", 0)
    venv = tmp_path / "venv"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    bindir = venv / ("Scripts" if os.name == "nt" else "bin")
    # From a copy of the source: pip builds in the tree it is given, and the checkout stays as it is.
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "__pycache__", "*.egg-info", "build", "dist", ".pytest_cache", ".venv", "runs", "data"))
    install = subprocess.run([str(bindir / "python"), "-m", "pip", "install", "--quiet", str(source)],
                             capture_output=True, text=True, timeout=1200)
    installed = time.perf_counter() - start
    assert install.returncode == 0, install.stderr[-3000:]
    no_torch = subprocess.run([str(bindir / "python"), "-c", "import torch"], capture_output=True, text=True)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CAPTOOL_MODEL")}
    proc = subprocess.run([str(bindir / "captool"), "run", str(image), "--model", str(bundle), "--json"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    total = time.perf_counter() - start
    print(f"venv + pip install . took {installed:.1f}s; with the first caption {total:.1f}s")
    assert proc.returncode == 0, proc.stderr
    record = json.loads(proc.stdout)
    assert record["caption"] == Captioner(bundle, device="cpu").caption(image)[0].text
