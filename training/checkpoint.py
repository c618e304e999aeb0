"""Checkpoints: weights in model.safetensors, architecture + vocabulary in model.json, no pickle anywhere.

A save never leaves a run directory without a loadable checkpoint. Both files are written in full
to temporary files first; model.json is the commit point and records the sha256 of its weights.
Before the weights file is replaced, the previous one is kept as model.prev.safetensors, so a crash
between the two renames (new weights, old model.json) still loads the previous checkpoint, whose
hash model.json names. The backup is removed once model.json is in place.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

from captool.bundle import sha256_file

from .errors import TrainingError
from .model import CaptioningRNN, ModelConfig

WEIGHTS = "model.safetensors"
CONFIG = "model.json"
PREVIOUS_WEIGHTS = "model.prev.safetensors"
FORMAT = "captool-checkpoint"
FORMAT_VERSION = 1


def _write_temp(run_dir: Path, name: str, write) -> Path:
    """Write a file in full (and to disk) under a temporary name beside its final one."""
    fd, tmp = tempfile.mkstemp(dir=run_dir, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a checkpoint is as readable as any other file
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _fsync_dir(path: Path) -> None:
    if os.name == "posix":  # renames are durable only once the directory is synced
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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

    tmp_weights = _write_temp(run_dir, WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    tmp_config = None
    try:
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": model.config.to_dict(),
            "idx_to_token": list(model.idx_to_token),
            "weights": {"file": WEIGHTS, "sha256": sha256_file(tmp_weights), "bytes": tmp_weights.stat().st_size},
            "tools": {"torch": torch.__version__, "captool": _captool_version()},
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "extra": extra_json,
        }
        text = json.dumps(meta, indent=1) + "\n"
        tmp_config = _write_temp(run_dir, CONFIG, lambda p: p.write_text(text, encoding="utf-8"))

        weights, backup = run_dir / WEIGHTS, run_dir / PREVIOUS_WEIGHTS
        if weights.is_file() and (run_dir / CONFIG).is_file():
            backup.unlink(missing_ok=True)
            try:
                os.link(weights, backup)  # the old weights stay reachable under a second name
            except OSError:  # no hard links on this file system
                shutil.copyfile(weights, backup)
        os.replace(tmp_weights, weights)
        os.replace(tmp_config, run_dir / CONFIG)  # the commit point
        backup.unlink(missing_ok=True)
        _fsync_dir(run_dir)
    except BaseException:
        tmp_weights.unlink(missing_ok=True)
        if tmp_config is not None:
            tmp_config.unlink(missing_ok=True)
        raise
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
    if not config_path.is_file():
        raise TrainingError(f"{config_path.parent} has no {CONFIG}: not a captool checkpoint (write one with `captool train`)")
    try:
        meta = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TrainingError(f"{config_path}: not valid JSON ({e}); the checkpoint is damaged, save or train it again") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise TrainingError(f"{config_path}: not a captool checkpoint (no \"format\": \"{FORMAT}\")")
    if meta.get("format_version") != FORMAT_VERSION:
        raise TrainingError(
            f"{config_path}: checkpoint format version {meta.get('format_version')!r}, this captool reads "
            f"version {FORMAT_VERSION}; use the captool that wrote it"
        )
    for key in ("config", "idx_to_token", "weights"):
        if key not in meta:
            raise TrainingError(f"{config_path}: has no '{key}'; the checkpoint is damaged, save or train it again")
    return meta


def _verified_weights(run_dir: Path, meta: dict) -> Path:
    """The weights file whose sha256 model.json records: model.safetensors, or the backup after a crash."""
    weights = run_dir / WEIGHTS
    expected = meta["weights"].get("sha256")
    if not weights.is_file():
        raise TrainingError(f"{run_dir} has {CONFIG} but no {WEIGHTS}: the checkpoint is incomplete, save or train it again")
    if sha256_file(weights) == expected:
        return weights
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
    except (TrainingError, TypeError) as e:
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
