"""The run directory's files beside the checkpoint: what --resume needs (Adam, RNG, epoch), committed a whole epoch at a time.

optimizer.safetensors holds Adam's per-parameter tensors as `state.<param id>.<name>` and the torch
RNG states as `rng.torch` / `rng.cuda` (uint8); train_state.json holds everything else (the
TrainConfig, the epoch counter, the history, Adam's param groups). No pickle: both are plain data.

An epoch's set (model.safetensors, model.json, optimizer.safetensors, train_state.json) is written
in full into `.epoch-NNNN.XXXXXXXX.tmp/` and committed by renaming that directory to `.epoch-NNNN/`,
one atomic step; the files are then moved to the top of the run directory and the empty directory
removed. `open_run` (under the run's lock) finishes a committed epoch a kill interrupted and removes
what an uncommitted one left, so an interruption at any point leaves the last committed epoch whole.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch

from captool.bundle import sha256_file
from captool.files import atomic_write, fsync_dir, make_temp_dir, read_versioned, write_json

from .checkpoint import CONFIG, WEIGHTS, read_checkpoint_metadata, save_checkpoint
from .errors import TrainingError

STATE = "train_state.json"
OPTIMIZER = "optimizer.safetensors"
STATE_FORMAT = "captool-train-state"
STATE_VERSION = 1
# model.json first: while it names the new weights, a reader finds them in the staged set (checkpoint.py).
INSTALL_ORDER = (CONFIG, WEIGHTS, OPTIMIZER, STATE)


def _staged(run_dir: Path, epoch: int) -> Path:
    return run_dir / f".epoch-{epoch:04d}"


def open_run(run_dir: Path) -> None:
    """Make the run directory whole again after a kill: call it holding the run's lock.

    A committed epoch is installed (its files moved to the top); an uncommitted one (a `.tmp`
    directory) and the temporary files of an interrupted write are removed.
    """
    for leftover in [*run_dir.glob(".*.tmp"), *run_dir.glob("features/.*.tmp")]:
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    for staged in sorted(run_dir.glob(".epoch-[0-9][0-9][0-9][0-9]")):
        install(run_dir, staged)


def install(run_dir: Path, staged: Path) -> None:
    """Move a committed epoch's files to the top of the run directory; repeating it is harmless."""
    for name in INSTALL_ORDER:
        with contextlib.suppress(FileNotFoundError):  # moved already, by an install a kill interrupted
            os.replace(staged / name, run_dir / name)
    fsync_dir(run_dir)
    with contextlib.suppress(OSError):
        staged.rmdir()


def save_epoch(run_dir: Path, model, config, epoch: int, history: list[dict], optimizer: torch.optim.Optimizer,
               device: torch.device) -> None:
    """Commit the checkpoint, Adam's state and the RNG states after `epoch` as one set."""
    run_dir.mkdir(parents=True, exist_ok=True)
    building = make_temp_dir(_staged(run_dir, epoch))
    try:
        save_checkpoint(model, building, epoch=epoch)
        write_state(building, config, epoch, history, optimizer, device)
        fsync_dir(building)
        os.rename(building, _staged(run_dir, epoch))  # the commit point
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    fsync_dir(run_dir)
    install(run_dir, _staged(run_dir, epoch))


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
    atomic_write(run_dir / OPTIMIZER, lambda p: save_file(tensors, str(p)))
    state = {"format": STATE_FORMAT, "version": STATE_VERSION, "epoch": epoch, "config": asdict(config),
             "history": history, "optimizer": {"file": OPTIMIZER, "sha256": sha256_file(run_dir / OPTIMIZER),
                                               "param_groups": groups, "scalars": scalars}}
    write_json(run_dir / STATE, state, indent=1)


def read_state(run_dir: Path) -> dict:
    """train_state.json, checked against the checkpoint it goes with."""
    path = run_dir / STATE
    state = read_versioned(path, STATE_FORMAT, STATE_VERSION, error=TrainingError, what="training state",
                           fix="there is no run to resume: start it without --resume" if not path.exists()
                           else "the run cannot be resumed: start a new one with another --out")
    shapes = {"epoch": int, "config": dict, "history": list, "optimizer": dict}
    wrong = [k for k, kind in shapes.items() if not isinstance(state.get(k), kind) or isinstance(state.get(k), bool)]
    if wrong or not all(isinstance(state["optimizer"].get(k), kind) for k, kind in
                        (("file", str), ("sha256", str), ("param_groups", list), ("scalars", dict))):
        raise TrainingError(f"{path}: {', '.join(wrong) or 'optimizer'} missing or of the wrong type; the run "
                            f"cannot be resumed: start a new one with another --out")
    model_epoch = read_checkpoint_metadata(run_dir).get("extra", {}).get("epoch")
    if model_epoch != state["epoch"]:
        raise TrainingError(f"{run_dir}: the checkpoint is of epoch {model_epoch} but {STATE} of epoch "
                            f"{state['epoch']}: the files were changed by hand; start a new run with another --out")
    return state


def restore_optimizer(run_dir: Path, state: dict, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Load Adam's state saved by write_state into `optimizer`; returns the saved RNG states."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index, path = state["optimizer"], run_dir / OPTIMIZER
    if index["file"] != OPTIMIZER or not path.is_file() or sha256_file(path) != index["sha256"]:
        raise TrainingError(f"{path} is missing or not the file {STATE} names; the run cannot be resumed exactly")
    try:
        tensors = load_file(str(path), device="cpu")
        param_state: dict[int, dict] = {}
        for key, value in [*tensors.items(), *index["scalars"].items()]:
            if key.startswith("state."):
                _, param_id, name = key.split(".", 2)
                param_state.setdefault(int(param_id), {})[name] = value
        groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in index["param_groups"]]
        optimizer.load_state_dict({"state": param_state, "param_groups": groups})
        return {name[len("rng."):]: t for name, t in tensors.items() if name.startswith("rng.")}
    except (SafetensorError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise TrainingError(f"{path} does not fit this model's parameters ({e}); start a new run") from None


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

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda p: save_file({"features": features.detach().to("cpu").contiguous()}, str(p)))


def load_features(path: Path) -> torch.Tensor | None:
    """Cached features, or None when the file cannot be read (they are then computed again)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")["features"]
    except Exception:  # a damaged cache file costs a recomputation, never the run
        return None
