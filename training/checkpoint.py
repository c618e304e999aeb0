"""Checkpoints: weights in model.safetensors, architecture + vocabulary in model.json, no pickle anywhere.

A save never leaves a directory without a loadable checkpoint. Each file is written through
`captool.files.atomic_write` (a temporary file, fsynced, renamed); model.json is the commit point and
records the sha256 of its weights. Before the weights file is replaced, the previous one is kept as
model.prev.safetensors, so a crash between the two renames (new weights, old model.json) still loads
the previous checkpoint, whose hash model.json names. The backup is removed once model.json is in place.
A training run's directory installs whole epochs from a staged set (training/run_state.py); while one is
being installed, the weights model.json names may still be in that set, and are read from there.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from captool.bundle import sha256_file
from captool.files import atomic_write, read_versioned, write_json

from .errors import TrainingError
from .model import CaptioningRNN, ModelConfig

WEIGHTS = "model.safetensors"
CONFIG = "model.json"
PREVIOUS_WEIGHTS = "model.prev.safetensors"
FORMAT = "captool-checkpoint"
FORMAT_VERSION = 1
STAGED = ".epoch-*"  # epochs committed but not yet installed in a run directory (run_state.py)


def save_checkpoint(model: CaptioningRNN, run_dir: str | os.PathLike, **extra: Any) -> Path:
    """Write model.safetensors and model.json into run_dir (created if needed); returns model.json's path.

    `extra` is JSON-serializable metadata kept under "extra" (epoch, losses, training settings...);
    read it back with `read_checkpoint_metadata`.
    """
    from safetensors.torch import save_file

    run_dir = Path(run_dir)
    try:
        extra_json = json.loads(json.dumps(extra))
    except (TypeError, ValueError) as e:
        raise TrainingError(f"checkpoint metadata must be JSON-serializable: {e}") from None
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    weights, backup = run_dir / WEIGHTS, run_dir / PREVIOUS_WEIGHTS
    if weights.is_file() and (run_dir / CONFIG).is_file():
        backup.unlink(missing_ok=True)
        try:
            os.link(weights, backup)  # the old weights stay reachable under a second name
        except OSError:  # no hard links on this file system
            shutil.copyfile(weights, backup)
    replaced = False
    try:
        atomic_write(weights, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
        replaced = True
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": model.config.to_dict(),
            "idx_to_token": list(model.idx_to_token),
            "weights": {"file": WEIGHTS, "sha256": sha256_file(weights), "bytes": weights.stat().st_size},
            "tools": {"torch": torch.__version__, "captool": _captool_version()},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "extra": extra_json,
        }
        write_json(run_dir / CONFIG, meta, indent=1)  # the commit point
    except BaseException:
        if not replaced:  # the old pair is intact: no backup needed
            backup.unlink(missing_ok=True)
        raise
    backup.unlink(missing_ok=True)
    return run_dir / CONFIG


def _captool_version() -> str:
    import captool

    return captool.__version__


def _run_dir(path: str | os.PathLike) -> Path:
    p = Path(path)
    if p.is_dir():
        return p
    if p.name in (WEIGHTS, CONFIG):
        return p.parent
    if not p.exists():
        raise TrainingError(f"checkpoint {p} does not exist: pass a run directory written by `captool train`")
    raise TrainingError(f"{p} is not a checkpoint: pass the run directory, its {WEIGHTS} or its {CONFIG}")


def read_checkpoint_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """model.json of a checkpoint, checked for format and version (no weights are read)."""
    config_path = _run_dir(path) / CONFIG
    if not config_path.exists():
        raise TrainingError(f"{config_path.parent} has no {CONFIG}: not a captool checkpoint (write one with `captool train`)")
    meta = read_versioned(config_path, FORMAT, FORMAT_VERSION, error=TrainingError, what="captool checkpoint",
                          key="format_version", fix="the checkpoint is damaged, save or train it again")
    for key, kind in (("config", dict), ("idx_to_token", list), ("weights", dict), ("extra", dict)):
        if not isinstance(meta.get(key, {} if key == "extra" else None), kind):
            raise TrainingError(f"{config_path}: '{key}' is missing or not a JSON {kind.__name__}; the checkpoint "
                                f"is damaged, save or train it again")
    return meta


def _verified_weights(run_dir: Path, meta: dict) -> Path:
    """The weights file whose sha256 model.json records: model.safetensors, the backup after a crash,
    or the staged epoch being installed right now."""
    weights = run_dir / WEIGHTS
    expected = meta["weights"].get("sha256")
    staged = sorted(run_dir.glob(f"{STAGED}/{WEIGHTS}"))
    if not weights.is_file() and not staged:
        raise TrainingError(f"{run_dir} has {CONFIG} but no {WEIGHTS}: the checkpoint is incomplete, save or train it again")
    # Looked at again last: an install in progress may move the staged file to the top meanwhile.
    for candidate in (weights, *staged, weights):
        if candidate.is_file() and sha256_file(candidate) == expected:
            return candidate
    backup = run_dir / PREVIOUS_WEIGHTS
    if backup.is_file() and sha256_file(backup) == expected:
        warnings.warn(
            f"{weights} is newer than {CONFIG} (a save was interrupted); loading the previous checkpoint "
            f"from {backup}", RuntimeWarning, stacklevel=3,
        )
        return backup
    raise TrainingError(
        f"{weights}: sha256 does not match the one {CONFIG} records; the weights were modified or damaged "
        f"after saving, save or train the checkpoint again"
    )


def load_checkpoint(path: str | os.PathLike) -> CaptioningRNN:
    """The model a checkpoint holds, in eval() on CPU in float32, ready for `sample`.

    `path` is the run directory, its model.safetensors or its model.json.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    run_dir = _run_dir(path)
    meta = read_checkpoint_metadata(run_dir)
    config_path = run_dir / CONFIG
    try:
        config = ModelConfig.from_dict(meta["config"])
        model = CaptioningRNN.from_config(config, list(meta["idx_to_token"]))
    except (TrainingError, TypeError, ValueError, KeyError) as e:
        raise TrainingError(f"{config_path}: bad model description: {e}") from None
    weights = _verified_weights(run_dir, meta)
    try:
        state = load_file(str(weights), device="cpu")
    except (SafetensorError, OSError) as e:
        raise TrainingError(f"{weights}: not a readable safetensors file ({e}); save or train the checkpoint again") from None

    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise TrainingError(
            f"{weights} does not fit the architecture in {CONFIG}: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]}; the two files come from different models, save or train again"
        )
    for name, ref in expected.items():
        if state[name].shape != ref.shape:
            raise TrainingError(
                f"{weights} does not fit the architecture in {CONFIG}: {name} has shape "
                f"{tuple(state[name].shape)}, the config needs {tuple(ref.shape)}"
            )
    model.load_state_dict(state)
    return model.float().eval()
