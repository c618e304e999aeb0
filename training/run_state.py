"""The run directory's files beside the checkpoint: what --resume needs (Adam, RNG, epoch) and cached features.

optimizer.safetensors holds Adam's per-parameter tensors as `state.<param id>.<name>` and the torch
RNG states as `rng.torch` / `rng.cuda` (uint8); train_state.json holds everything else (the
TrainConfig, the epoch counter, the history, Adam's param groups). No pickle: both are plain data.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path

import torch

from captool.bundle import sha256_file

from .checkpoint import read_checkpoint_metadata
from .errors import TrainingError

STATE = "train_state.json"
OPTIMIZER = "optimizer.safetensors"
STATE_FORMAT = "captool-train-state"
STATE_VERSION = 1


def _atomic(path: Path, write) -> None:
    """Write to a temporary file beside `path`, then rename: a crash leaves the old file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_state(run_dir: Path, config, epoch: int, history: list[dict], optimizer: torch.optim.Optimizer,
                device: torch.device) -> None:
    """Adam's state and the RNG states after `epoch`, then train_state.json naming them."""
    from safetensors.torch import save_file

    saved = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, param_state in saved["state"].items():
        for name, value in param_state.items():
            key = f"state.{param_id}.{name}"
            if isinstance(value, torch.Tensor):
                tensors[key] = value.detach().to("cpu").contiguous()
            else:
                scalars[key] = value
    tensors["rng.torch"] = torch.get_rng_state()
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in saved["param_groups"]]
    _atomic(run_dir / OPTIMIZER, lambda p: save_file(tensors, str(p)))
    state = {"format": STATE_FORMAT, "version": STATE_VERSION, "epoch": epoch, "config": asdict(config),
             "history": history, "optimizer": {"file": OPTIMIZER, "sha256": sha256_file(run_dir / OPTIMIZER),
                                               "param_groups": groups, "scalars": scalars}}
    _atomic(run_dir / STATE, lambda p: p.write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8"))


def read_state(run_dir: Path) -> dict:
    """train_state.json, checked against the checkpoint it goes with."""
    path = run_dir / STATE
    if not path.is_file():
        raise TrainingError(f"{run_dir} has no {STATE}: there is no run to resume; start it without --resume")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrainingError(f"{path}: not valid JSON ({e}); the run cannot be resumed, start a new one") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT or state.get("version") != STATE_VERSION:
        raise TrainingError(f"{path}: not a captool training state of version {STATE_VERSION}")
    model_epoch = read_checkpoint_metadata(run_dir).get("extra", {}).get("epoch")
    if model_epoch != state["epoch"]:
        raise TrainingError(f"{run_dir}: the checkpoint is of epoch {model_epoch} but {STATE} of epoch "
                            f"{state['epoch']} (a save was interrupted); an exact resume is impossible, start a new run")
    return state


def restore_optimizer(run_dir: Path, state: dict, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Load Adam's state saved by write_state into `optimizer`; returns the saved RNG states."""
    from safetensors.torch import load_file

    index, path = state["optimizer"], run_dir / state["optimizer"]["file"]
    if not path.is_file() or sha256_file(path) != index["sha256"]:
        raise TrainingError(f"{path} is missing or not the file {STATE} names; the run cannot be resumed exactly")
    tensors = load_file(str(path), device="cpu")
    param_state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *index["scalars"].items()]:
        if key.startswith("state."):
            _, param_id, name = key.split(".", 2)
            param_state.setdefault(int(param_id), {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in index["param_groups"]]
    try:
        optimizer.load_state_dict({"state": param_state, "param_groups": groups})
    except (ValueError, KeyError) as e:
        raise TrainingError(f"{path} does not fit this model's parameters ({e}); start a new run") from None
    return {name[len("rng."):]: t for name, t in tensors.items() if name.startswith("rng.")}


def feature_key(images: torch.Tensor, extractor: torch.nn.Module, device: torch.device) -> str:
    """A hash of the pixels and the backbone weights: cached features are reused only for the same both."""
    h = hashlib.sha256()
    h.update(images.contiguous().numpy().data)
    for name, t in sorted(extractor.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    # Features from another device or torch differ in the last bits; a resumed run must see the same ones.
    h.update(f"pooling={getattr(extractor, 'pooling', None)} {device.type} torch {torch.__version__}".encode())
    return h.hexdigest()[:16]


def save_features(path: Path, features: torch.Tensor) -> None:
    from safetensors.torch import save_file

    _atomic(path, lambda p: save_file({"features": features.detach().to("cpu").contiguous()}, str(p)))


def load_features(path: Path) -> torch.Tensor | None:
    """Cached features, or None when the file cannot be read (they are then computed again)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")["features"]
    except Exception:  # a damaged cache file costs a recomputation, never the run
        return None
