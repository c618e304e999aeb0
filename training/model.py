"""The seed's CaptioningRNN: MobileNetV2 features -> h0, word embedding, recurrent cell, vocabulary scores.

The decoder is written as `encode` (images -> initial state) and `step` (one token -> next state and
logits): export traces exactly these two into encoder.onnx and decoder_step.onnx, and `sample` is a
loop over them, so PyTorch and the bundle decode the same way.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields
from typing import Mapping

import torch
from torch import Tensor, nn

from captool.bundle import CELL_TYPES, STATE_FROM_ENCODER, STATE_FROM_STEP
from captool.preprocess import JPEG_DECODES
from captool.vocab import Vocab

from .backbone import FeatureExtractor
from .errors import TrainingError
from .layers import (LSTM, RNN, AttentionLSTM, WordEmbedding, attention_cache, cached_attention_step,
                     dot_product_attention, temporal_softmax_loss)


@dataclass(frozen=True)
class ModelConfig:
    """The architecture, all that is needed (with the vocabulary) to rebuild the model from its weights."""

    cell_type: str
    vocab_size: int
    input_dim: int = 1280
    wordvec_dim: int = 128
    hidden_dim: int = 128
    backbone_width: float = 1.0
    image_size: int = 112
    max_length: int = 15  # sample's default length
    ignore_index: int = 0  # <NULL> padding takes no part in the loss
    jpeg_decode: str = "full"  # how its JPEG files were decoded (captool.preprocess); its bundle keeps it

    def __post_init__(self):
        if self.cell_type not in CELL_TYPES:
            raise TrainingError(f"invalid cell type {self.cell_type!r}; only {', '.join(CELL_TYPES)} are supported")
        for name in ("vocab_size", "input_dim", "wordvec_dim", "hidden_dim", "image_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise TrainingError(f"model {name} must be a positive integer, got {value!r}")
        if not self.backbone_width > 0:
            raise TrainingError(f"backbone_width must be positive, got {self.backbone_width!r}")
        if self.jpeg_decode not in JPEG_DECODES:
            raise TrainingError(f"model jpeg_decode must be one of {', '.join(JPEG_DECODES)}, got {self.jpeg_decode!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "ModelConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise TrainingError(f"unknown model config keys {unknown}; this captool knows {sorted(known)}")
        return cls(**d)


class CaptioningRNN(nn.Module):
    """Image captioner: uint8 images (N, 3, 112, 112) in, word ids out.

    Args:
        word_to_idx: token -> id; ids 0..V-1 with <NULL>, <START>, <END>, <UNK> at 0..3 (coco.pt's layout).
        input_dim: channels of the backbone's features (1280 for MobileNetV2 at width <= 1.0).
        wordvec_dim, hidden_dim: word vector and hidden state sizes.
        cell_type: "rnn" (the seed's), "lstm" or "attention" (attention LSTM over the 4×4 grid).
        ignore_index: target id that takes no part in the loss (<NULL>).
        backbone_width: MobileNetV2 width multiplier.
        backbone: None (random init), "imagenet" (torchvision's cache) or a local state-dict file.
        train_backbone: train MobileNetV2 too; frozen (the default) keeps it in eval() with no grads.

    Training with a frozen backbone can skip it: cache `extract_features(images)` once per dataset
    (backbone in eval, under no_grad) and train on `loss_from_features(features, captions)`, which
    equals `forward(images, captions)`.
    """

    def __init__(
        self,
        word_to_idx: Mapping[str, int],
        input_dim: int = 1280,
        wordvec_dim: int = 128,
        hidden_dim: int = 128,
        cell_type: str = "rnn",
        ignore_index: int = 0,
        backbone_width: float = 1.0,
        backbone: str | os.PathLike | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        *,
        image_size: int = 112,
        max_length: int = 15,
        train_backbone: bool = False,
        jpeg_decode: str = "full",
    ):
        super().__init__()
        self.idx_to_token = _idx_to_token(word_to_idx)
        vocab = Vocab(self.idx_to_token)
        self._null, self._start, self._end = vocab.null_id, vocab.start_id, vocab.end_id
        self.config = ModelConfig(
            cell_type=cell_type, vocab_size=len(vocab), input_dim=input_dim, wordvec_dim=wordvec_dim,
            hidden_dim=hidden_dim, backbone_width=float(backbone_width), image_size=image_size,
            max_length=max_length, ignore_index=ignore_index, jpeg_decode=jpeg_decode,
        )
        attention = cell_type == "attention"

        self.feature_extractor = FeatureExtractor(
            width=backbone_width, pooling=not attention, weights=backbone, device=device, dtype=dtype
        )
        if self.feature_extractor.out_channels != input_dim:
            raise TrainingError(
                f"input_dim={input_dim} but MobileNetV2 at width {backbone_width} gives "
                f"{self.feature_extractor.out_channels} channels; pass input_dim={self.feature_extractor.out_channels}"
            )
        V = len(vocab)
        if attention:  # keeps the grid: (N, 1280, 4, 4) -> (N, H, 4, 4)
            self.feature_projector = nn.Conv2d(input_dim, hidden_dim, kernel_size=1, device=device, dtype=dtype)
        else:  # (N, 1280) -> (N, H)
            self.feature_projector = nn.Linear(input_dim, hidden_dim, device=device, dtype=dtype)
        self.word_embedding = WordEmbedding(V, wordvec_dim, device=device, dtype=dtype)
        cell = {"rnn": RNN, "lstm": LSTM, "attention": AttentionLSTM}[cell_type]
        self.cell = cell(wordvec_dim, hidden_dim, device=device, dtype=dtype)
        self.out_projector = nn.Linear(hidden_dim, V, device=device, dtype=dtype)
        self.set_backbone_trainable(train_backbone)

    @classmethod
    def from_config(cls, config: ModelConfig, idx_to_token: list[str], **kwargs) -> "CaptioningRNN":
        """The model a checkpoint describes (random weights until its state dict is loaded)."""
        if len(idx_to_token) != config.vocab_size:
            raise TrainingError(f"vocabulary has {len(idx_to_token)} tokens but the config says {config.vocab_size}")
        return cls(
            {tok: i for i, tok in enumerate(idx_to_token)}, input_dim=config.input_dim,
            wordvec_dim=config.wordvec_dim, hidden_dim=config.hidden_dim, cell_type=config.cell_type,
            ignore_index=config.ignore_index, backbone_width=config.backbone_width,
            image_size=config.image_size, max_length=config.max_length, jpeg_decode=config.jpeg_decode, **kwargs,
        )

    # -- backbone ---------------------------------------------------------------------------------

    def set_backbone_trainable(self, flag: bool) -> None:
        """Train MobileNetV2 end to end (BatchNorm in train mode), or freeze it (eval, no grads)."""
        self.feature_extractor.set_trainable(flag, module_training=self.training)

    @property
    def backbone_trainable(self) -> bool:
        return self.feature_extractor.trainable

    def extract_features(self, images: Tensor) -> Tensor:
        """uint8 images (N, 3, S, S) -> pooled features (N, 1280), or the grid (N, 1280, 4, 4) for attention."""
        return self.feature_extractor(images)

    # -- training ---------------------------------------------------------------------------------

    def forward(self, images: Tensor, captions: Tensor) -> Tensor:
        """The loss of captions (N, T+1) for images: captions[:, :-1] go in, captions[:, 1:] are the targets."""
        return self.loss_from_features(self.extract_features(images), captions)

    def loss_from_features(self, features: Tensor, captions: Tensor) -> Tensor:
        """forward() from precomputed `extract_features` output: the head alone."""
        captions_in, captions_out = captions[:, :-1], captions[:, 1:]  # (N, T) each
        x = self.word_embedding(captions_in)  # (N, T) -> (N, T, W)
        projected = self.feature_projector(features)  # (N, H), or (N, H, 4, 4) for attention
        h = self.cell(x, projected)  # (N, T, H); rnn/lstm take h0, attention takes the grid A
        scores = self.out_projector(h)  # (N, T, H) -> (N, T, V)
        return temporal_softmax_loss(scores, captions_out, self.config.ignore_index)

    # -- decoding: the two graphs export traces, and the loop over them ---------------------------

    def encode(self, images: Tensor) -> dict[str, Tensor]:
        """uint8 images (N, 3, S, S) -> the decoder's initial state, named as encoder.onnx's outputs."""
        return self.encode_features(self.extract_features(images))

    def encode_features(self, features: Tensor) -> dict[str, Tensor]:
        """encode() from precomputed features: {"h0"} (rnn), + "c0" (lstm), + "features" A (attention)."""
        projected = self.feature_projector(features)
        if self.config.cell_type == "rnn":
            return {"h0": projected}  # (N, H)
        if self.config.cell_type == "lstm":
            return {"h0": projected, "c0": torch.zeros_like(projected)}  # (N, H) each; c0 = 0
        h0 = projected.mean(dim=(2, 3))  # A (N, H, 4, 4) -> (N, H)
        return {"h0": h0, "c0": h0, "features": projected}

    def step(self, token: Tensor, h: Tensor, c: Tensor | None = None, features: Tensor | None = None) -> dict[str, Tensor]:
        """One decoder step: token int64 (N,), state (N, H) -> {"logits" (N, V), "h_next", ...}.

        lstm adds "c_next"; attention adds "c_next" and "attn_weights" (N, 4, 4). No data-dependent
        control flow: the branches depend on the cell type only.
        """
        cell_type = self.config.cell_type
        if cell_type != "rnn" and c is None:
            raise TrainingError(f"step() of a {cell_type} model needs the cell state c")
        if cell_type == "attention" and features is None:
            raise TrainingError("step() of an attention model needs the projected features A (N, H, 4, 4)")
        x = self.word_embedding(token)  # (N,) -> (N, W)
        out: dict[str, Tensor] = {}
        if cell_type == "rnn":
            h_next = self.cell.step_forward(x, h)
        elif cell_type == "lstm":
            h_next, out["c_next"] = self.cell.step_forward(x, h, c)
        else:
            attn, attn_weights = dot_product_attention(h, features)  # (N, H), (N, 4, 4)
            h_next, out["c_next"] = self.cell.step_forward(x, h, c, attn)
            out["attn_weights"] = attn_weights
        return {"logits": self.out_projector(h_next), "h_next": h_next, **out}  # logits (N, V)

    def attention_cache(self, features: Tensor) -> dict[str, Tensor]:
        """An attention model's per-image part of every step, once: {"attention_keys", "attention_values"}.

        layers.attention_cache says what they are; `step_cached` takes them instead of the features.
        """
        self._require_attention("attention_cache")
        keys, values = attention_cache(features, self.cell.Wattn)
        return {"attention_keys": keys, "attention_values": values}  # (N, H, 16), (N, 16, 4H)

    def step_cached(self, token: Tensor, h: Tensor, c: Tensor, attention_keys: Tensor,
                    attention_values: Tensor) -> dict[str, Tensor]:
        """`step` of an attention model on `attention_cache`'s outputs: the same outputs, fewer weights read."""
        self._require_attention("step_cached")
        x = self.word_embedding(token)  # (N,) -> (N, W)
        cell = self.cell
        h_next, c_next, attn_weights = cached_attention_step(x, h, c, attention_keys, attention_values,
                                                             cell.Wx, cell.Wh, cell.b)
        return {"logits": self.out_projector(h_next), "h_next": h_next, "c_next": c_next, "attn_weights": attn_weights}

    def _require_attention(self, what: str) -> None:
        if self.config.cell_type != "attention":
            raise TrainingError(f"{what}() is for attention models; this one is {self.config.cell_type}")

    @torch.no_grad()
    def sample(self, images: Tensor | None, max_length: int | None = None, *, features: Tensor | None = None) -> Tensor:
        """Greedy captions: int64 (N, max_length) word ids, <END> kept, <NULL> after it.

        Runs encode + step in a loop, as the runtime's decoder does with the bundle (argmax takes the
        first maximum on ties). `features` replaces `images` with precomputed `extract_features` output.
        Does not change train/eval mode: call eval() first for deployment behaviour.
        """
        max_length = self.config.max_length if max_length is None else max_length
        encoded = self.encode(images) if features is None else self.encode_features(features)
        state = {STATE_FROM_ENCODER[k]: v for k, v in encoded.items()}
        N = state["h"].shape[0]
        device = state["h"].device
        captions = torch.full((N, max_length), self._null, dtype=torch.long, device=device)
        word = torch.full((N,), self._start, dtype=torch.long, device=device)
        done = torch.zeros(N, dtype=torch.bool, device=device)
        for t in range(max_length):
            out = self.step(word, **state)
            word = out["logits"].argmax(dim=1)  # (N, V) -> (N,)
            captions[:, t] = torch.where(done, self._null, word)
            done |= word == self._end
            if bool(done.all()):
                break
            state.update({STATE_FROM_STEP[k]: v for k, v in out.items() if k in STATE_FROM_STEP})
        return captions


def _idx_to_token(word_to_idx: Mapping[str, int]) -> list[str]:
    """word_to_idx as a list, checking that the ids are exactly 0..V-1."""
    ids = sorted(word_to_idx.values())
    if ids != list(range(len(ids))):
        raise TrainingError(f"word_to_idx must map its {len(ids)} tokens onto ids 0..{len(ids) - 1} exactly once")
    tokens = [""] * len(ids)
    for token, i in word_to_idx.items():
        tokens[i] = token
    try:
        Vocab(tokens)
    except ValueError as e:
        raise TrainingError(f"bad vocabulary: {e}") from None
    return tokens
