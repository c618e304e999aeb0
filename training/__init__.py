"""captool.training: the seed's captioning model, its layers, and checkpoints (needs the `train` extra).

The names below load on first use (a module `__getattr__`): `captool.training.config` (TrainConfig,
its defaults, the checks before torch) is then importable without torch, as `captool train` needs.
"""

from __future__ import annotations

import importlib

from .errors import TrainingError  # noqa: F401  (no torch: always loaded)

# public name -> the module of this package that defines it
_LAZY = {
    "FeatureExtractor": "backbone",
    "load_checkpoint": "checkpoint",
    "read_checkpoint_metadata": "checkpoint",
    "save_checkpoint": "checkpoint",
    "CaptioningRNN": "model",
    "ModelConfig": "model",
    "TrainConfig": "config",
    **{name: "layers" for name in (
        "LSTM", "RNN", "AttentionLSTM", "WordEmbedding", "attention_forward", "dot_product_attention",
        "lstm_forward", "lstm_step_forward", "rnn_backward", "rnn_forward", "rnn_step_backward",
        "rnn_step_forward", "temporal_softmax_loss")},
}

__all__ = sorted([*_LAZY, "TrainingError"])


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value  # looked up once
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
