"""Shared fixtures: a tiny trained checkpoint and its exported bundle per cell type, made once per session.

`tiny_checkpoint(cell) -> Path`
    A run directory written by `save_checkpoint` (model.json + model.safetensors) holding a
    CaptioningRNN for cell "rnn", "lstm" or "attention": vocabulary of the 4 specials + 12 words,
    wordvec 16, hidden 16, MobileNetV2 width 0.25 (random, frozen), max_length 15. The head gets 40
    Adam steps on 8 fixed random images with fixed 1-4 word captions, so greedy captions end with
    `<END>` and the logits are far from ties. Seeded: the same weights every session.
`tiny_bundle(cell) -> Path`
    The bundle that `captool.export.export_bundle` writes from `tiny_checkpoint(cell)` (validated,
    parity report in its manifest). An export takes ~10 s of CPU, hence one per cell per session.

`synth_data(train, val, seed) -> Path`
    A `captool synth` dataset folder, made once per session for each (train, val, seed).
`backbone_file -> Path`
    A local MobileNetV2 state dict (random, width 0.25, torch seed 0): a frozen backbone without
    ImageNet weights, for `captool train --backbone FILE`.

All are session-scoped and cached. Treat the directories as read-only: copy one
(`shutil.copytree`) before tampering with it. They need torch (and onnx for bundles); a test module
that uses them should start with `pytest.importorskip("torch")` so a torch-free run skips it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest

TINY_WORDS = ["a", "red", "blue", "green", "circle", "square", "triangle", "small", "big", "on", "left", "right"]
TINY_DIMS = {"wordvec_dim": 16, "hidden_dim": 16, "backbone_width": 0.25}


def _train_tiny(cell: str):
    """A tiny CaptioningRNN whose head has learnt 8 captions (backbone frozen, features computed once)."""
    import torch

    from captool.training import CaptioningRNN
    from captool.vocab import SPECIALS, Vocab

    torch.manual_seed({"rnn": 0, "lstm": 1, "attention": 2}[cell])
    vocab = Vocab(list(SPECIALS) + TINY_WORDS)
    model = CaptioningRNN(vocab.token_to_idx, cell_type=cell, **TINY_DIMS)
    g = torch.Generator().manual_seed(7)
    images = torch.randint(0, 256, (8, 3, 112, 112), dtype=torch.uint8, generator=g)  # (8, 3, 112, 112)
    texts = ["a red circle", "blue square", "a small green triangle", "big", "red on left",
             "a blue circle on right", "green", "small square"]
    captions = torch.tensor([vocab.encode(t, length=8) for t in texts])  # (8, 8)
    with torch.no_grad():
        features = model.extract_features(images)  # (8, 1280) or (8, 1280, 4, 4)
    head = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(head, lr=1e-2)
    model.train()
    for _ in range(40):
        opt.zero_grad()
        model.loss_from_features(features, captions).backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Callable[[str], Path]:
    """Factory: cell type -> run dir of a tiny trained checkpoint (cached for the session)."""
    cache: dict[str, Path] = {}

    def make(cell: str = "rnn") -> Path:
        if cell not in cache:
            pytest.importorskip("torch")
            from captool.training import save_checkpoint

            run_dir = tmp_path_factory.mktemp(f"tiny-checkpoint-{cell}")
            save_checkpoint(_train_tiny(cell), run_dir)
            cache[cell] = run_dir
        return cache[cell]

    return make


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory) -> Callable[[str], Path]:
    """Factory: cell type -> bundle dir exported (and validated) from tiny_checkpoint(cell)."""
    cache: dict[str, Path] = {}

    def make(cell: str = "rnn") -> Path:
        if cell not in cache:
            pytest.importorskip("onnx")
            from captool.export import export_bundle

            out = tmp_path_factory.mktemp(f"tiny-bundle-{cell}") / "bundle"
            export_bundle(tiny_checkpoint(cell), out)
            cache[cell] = out
        return cache[cell]

    return make


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> Callable[[int, int, int], Path]:
    """Factory: (train, val, seed) -> a `captool synth` dataset folder (cached for the session)."""
    cache: dict[tuple[int, int, int], Path] = {}

    def make(train: int, val: int, seed: int) -> Path:
        if (train, val, seed) not in cache:
            from typer.testing import CliRunner

            from captool.cli import app

            out = tmp_path_factory.mktemp("synth") / "data"
            result = CliRunner().invoke(app, ["synth", str(out), "--train", str(train), "--val", str(val),
                                              "--seed", str(seed)])
            assert result.exit_code == 0, result.output
            cache[train, val, seed] = out
        return cache[train, val, seed]

    return make


@pytest.fixture(scope="session")
def backbone_file(tmp_path_factory) -> Path:
    """A local MobileNetV2 state dict (random, width 0.25): a frozen backbone without ImageNet weights."""
    torch = pytest.importorskip("torch")
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("backbone") / "mobilenet_v2_w025.pth"
    torch.save(torchvision.models.mobilenet_v2(width_mult=0.25).state_dict(), path)
    return path
