"""Concept-detector warm-up: teach a randomly initialized backbone what the captions talk about.

Trained from scratch, the captioner finds a language model first: the pooled features of a random
MobileNetV2 hardly differ between images, so the RNN learns to ignore h0 and the backbone gets no
useful signal back (measured here on `captool synth` scenes: loss stuck at ~9.5 per caption, every
colour and shape wrong, after 50,000 samples). Before the captioning epochs, the backbone is trained
to predict which words an image's captions use (multi-label, a linear head on the pooled features,
binary cross-entropy), in the spirit of visual-concept detectors. The head is thrown away; the
captioner keeps the seed's architecture exactly. Without `--train-backbone` the warmed backbone is
then frozen and its features are computed once, so captioning epochs cost only the decoder.

Concepts are the caption words and their frequent adjacent pairs ("red circle", "blue square"):
words alone say which colours and which shapes a scene holds, not which shape has which colour, and
that binding is what a caption must get right.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
from torch import Tensor, nn

from .data import CaptionSplit

N_SPECIALS = 4  # <NULL> <START> <END> <UNK> are no concepts
MAX_PAIRS = 1000  # the most frequent word pairs that become concepts
MIN_PAIR_IMAGES = 20  # a pair seen in fewer images is too rare to learn a detector for


def word_targets(split: CaptionSplit, vocab_size: int) -> Tensor:
    """Multi-hot (M, V) float: the words any caption of each image uses, specials excluded."""
    targets = torch.zeros(split.images.shape[0], vocab_size)
    rows = split.image_idx.repeat_interleave(split.captions.shape[1])  # (K*17,)
    targets.index_put_((rows, split.captions.reshape(-1)), torch.ones(rows.shape[0]))
    targets[:, :N_SPECIALS] = 0.0
    return targets


def pair_targets(split: CaptionSplit, vocab_size: int, max_pairs: int = MAX_PAIRS,
                 min_images: int = MIN_PAIR_IMAGES) -> Tensor:
    """Multi-hot (M, P) float: which of the P most frequent adjacent word pairs each image's captions use.

    Pairs with a special token are left out; P is at most `max_pairs`, pairs in fewer than
    `min_images` images are dropped (P may be 0).
    """
    first, second = split.captions[:, :-1], split.captions[:, 1:]  # (K, 16) each
    keep = (first >= N_SPECIALS) & (second >= N_SPECIALS)
    codes = first * vocab_size + second  # (K, 16): one int per ordered pair
    rows = split.image_idx[:, None].expand_as(codes)[keep]
    codes = codes[keep]
    pairs, column = torch.unique(codes, return_inverse=True)  # (U,), (n,)
    m = split.images.shape[0]
    seen = torch.zeros(m, len(pairs))
    seen.index_put_((rows, column), torch.ones(len(rows)))
    counts = seen.sum(dim=0)  # images per pair
    order = torch.argsort(counts, descending=True, stable=True)[:max_pairs]
    order = order[counts[order] >= min_images]
    return seen[:, order]


def concept_targets(split: CaptionSplit, vocab_size: int) -> Tensor:
    """(M, V + P) float: word targets then pair targets, what the warm-up's detector predicts."""
    return torch.cat([word_targets(split, vocab_size), pair_targets(split, vocab_size)], dim=1)


class WarmUp:
    """One run's warm-up: the concept targets, a throw-away head and the Adam over backbone and head.

    Epoch e's image order comes from a generator seeded with (seed, e), so that the backbone, the head
    and Adam's state after an epoch are all a resumed warm-up needs to continue as an unbroken one.
    """

    def __init__(self, model: nn.Module, split: CaptionSplit, *, batch_size: int, lr: float, seed: int,
                 device: torch.device):
        self.model, self.split, self.batch_size, self.seed, self.device = model, split, batch_size, seed, device
        self.targets = concept_targets(split, model.config.vocab_size)  # (M, V + P)
        generator = torch.Generator().manual_seed(seed * 7_919 + 1)
        with torch.random.fork_rng(devices=[]):  # nn.Linear's own init draws from the global RNG: not ours to move
            self.head = nn.Linear(model.config.input_dim, self.targets.shape[1], device=device)
        with torch.no_grad():  # initialized from the run's seed, leaving the global RNG untouched
            bound = 1.0 / math.sqrt(model.config.input_dim)
            self.head.weight.copy_(torch.rand(self.head.weight.shape, generator=generator) * 2 * bound - bound)
            self.head.bias.zero_()
        params = [p for p in model.feature_extractor.parameters() if p.requires_grad] + list(self.head.parameters())
        self.optimizer = torch.optim.Adam(params, lr=lr)

    def run_epoch(self, epoch: int, progress: Callable[[int, float], None] = lambda n, loss: None) -> tuple[float, float]:
        """Train one epoch (0-based); returns its mean loss and images/s. `progress(images, running loss)` per batch."""
        n = self.split.images.shape[0]
        order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 7_919 + 104_729 * (epoch + 1)))
        self.model.train()
        total, started = 0.0, time.perf_counter()
        for start in range(0, n, self.batch_size):
            idx = order[start:start + self.batch_size]
            features = self.model.extract_features(self.split.images[idx].to(self.device))  # (B, C) or (B, C, 4, 4)
            if features.dim() == 4:
                features = features.mean(dim=(2, 3))  # attention's grid, pooled for the detector: (B, C)
            loss = nn.functional.binary_cross_entropy_with_logits(self.head(features), self.targets[idx].to(self.device))
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += loss.item() * len(idx)
            progress(len(idx), total / (start + len(idx)))
        return total / n, n / max(time.perf_counter() - started, 1e-9)


def warm_up_backbone(
    model: nn.Module,
    split: CaptionSplit,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    device: torch.device,
    log: Callable[[str], None],
) -> list[float]:
    """Train `model.feature_extractor` (and a throw-away head) as a concept detector; per-epoch losses."""
    warm = WarmUp(model, split, batch_size=batch_size, lr=lr, seed=seed, device=device)
    losses = []
    for epoch in range(epochs):
        loss, rate = warm.run_epoch(epoch)
        losses.append(loss)
        log(f"warm-up {epoch + 1}/{epochs}  concept-detector loss {loss:.4f}  {rate:.0f} images/s")
    return losses
