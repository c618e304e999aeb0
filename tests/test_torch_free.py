"""The runtime needs no PyTorch: it imports and captions with torch made unimportable.

The plain `pip install .` venv check is the README quickstart test, tests/test_readme.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from captool import Captioner

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


def test_runtime_tests_run_with_torch_unimportable():
    """A torch-free install runs the runtime's own tests: those that need torch skip, the rest pass."""
    here = Path(__file__).parent
    modules = [str(here / m) for m in ("test_decode.py", "test_vocab.py", "test_threads.py", "test_preprocess.py")]
    script = f"""
import sys
for name in {BLOCK!r}:
    sys.modules[name] = None  # `import torch` now raises ImportError
import pytest
code = pytest.main(["-q", "-p", "no:cacheprovider", "-m", "not slow", *{modules!r}])
assert sys.modules["torch"] is None
sys.exit(code)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    summary = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
    assert " skipped" in summary, summary  # the tiny bundles need torch to be made
