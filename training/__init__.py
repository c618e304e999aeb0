"""captool.training: the seed's captioning model, its layers, and checkpoints (needs the `train` extra)."""

from .backbone import FeatureExtractor
from .checkpoint import load_checkpoint, read_checkpoint_metadata, save_checkpoint
from .errors import TrainingError
from .layers import (
    LSTM,
    RNN,
    AttentionLSTM,
    WordEmbedding,
    attention_forward,
    dot_product_attention,
    lstm_forward,
    lstm_step_forward,
    rnn_backward,
    rnn_forward,
    rnn_step_backward,
    rnn_step_forward,
    temporal_softmax_loss,
)
from .model import CaptioningRNN, ModelConfig

__all__ = [
    "AttentionLSTM",
    "CaptioningRNN",
    "FeatureExtractor",
    "LSTM",
    "ModelConfig",
    "RNN",
    "TrainingError",
    "WordEmbedding",
    "attention_forward",
    "dot_product_attention",
    "load_checkpoint",
    "lstm_forward",
    "lstm_step_forward",
    "read_checkpoint_metadata",
    "rnn_backward",
    "rnn_forward",
    "rnn_step_backward",
    "rnn_step_forward",
    "save_checkpoint",
    "temporal_softmax_loss",
]
