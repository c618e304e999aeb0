"""The training loop behind `captool train`: the seed's Adam with per-epoch decay, cached frozen features, resumable runs.

A run directory holds:
  model.safetensors, model.json   the last finished epoch's checkpoint (`load_checkpoint(run_dir)`)
  optimizer.safetensors           Adam's moments and the torch RNG states, for --resume
  train_state.json                the TrainConfig, the epoch counter, the per-epoch history and
                                  the index of optimizer.safetensors
  features/                       frozen-backbone features, keyed by a hash of images and backbone
Nothing in it is pickled. The four files of an epoch are committed together (training/run_state.py):
a kill or Ctrl-C at any moment leaves the last committed epoch whole, and the next `captool train
--out DIR --resume` continues from it. A run holds a lock on its directory while it works. Epoch e's data order comes from a generator seeded with (seed, e) and the
learning rate of epoch e is lr * lr_decay**e (the seed's LambdaLR, written out), so the epoch
counter plus Adam's state is all a resumed run needs to continue exactly as an unbroken one.
"""

from __future__ import annotations

import contextlib
import math
import shlex
import sys
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Callable, Optional

import torch

from captool.files import lock

from .checkpoint import load_checkpoint
from .data import CaptionSplit, load_data
from .warmup import warm_up_backbone
from .errors import TrainingError
from .model import CELL_TYPES, CaptioningRNN
from .run_state import STATE, feature_key, load_features, open_run, read_state, restore_optimizer, save_epoch, save_features

Log = Callable[[str], None]


def log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class TrainConfig:
    """How to train; the architecture itself is the checkpoint's ModelConfig."""

    data: str = ""
    out: str = "runs/captioner"
    images: Optional[str] = None  # where image files are, when not beside the annotations
    cell: str = "rnn"
    epochs: int = 10
    batch_size: int = 50
    lr: float = 1e-3
    lr_decay: float = 1.0  # per epoch: epoch e trains at lr * lr_decay**e
    hidden_dim: int = 512
    wordvec_dim: int = 256
    backbone: str = "imagenet"  # "imagenet" | "none" | a state-dict file
    backbone_width: float = 1.0
    train_backbone: bool = False
    overfit: Optional[int] = None  # train on N examples only: the first caption of the first N images
    min_count: int = 1
    seed: int = 0
    device: str = "auto"
    cache_features: bool = True  # also keep frozen features on disk, in the run dir
    # Each epoch, one caption per image drawn at random: an epoch then costs one backbone pass per
    # image rather than per caption (5x fewer with COCO-style data) when the backbone is trained.
    one_caption_per_image: bool = False
    # Epochs of concept-detector warm-up of the backbone before captioning (training/warmup.py); the
    # backbone is frozen afterwards unless train_backbone.
    warmup_epochs: int = 0

    def __post_init__(self):
        if self.cell not in CELL_TYPES:
            raise TrainingError(f"invalid cell {self.cell!r}; only {', '.join(CELL_TYPES)} are supported")
        for name in ("epochs", "batch_size", "hidden_dim", "wordvec_dim", "min_count"):
            if getattr(self, name) < 1:
                raise TrainingError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.warmup_epochs < 0:
            raise TrainingError(f"--warmup-epochs must be 0 or more, got {self.warmup_epochs}")
        if self.warmup_epochs and not (self.train_backbone or self.backbone.lower() == "none"):
            raise TrainingError("--warmup-epochs trains the backbone: add --train-backbone (or --backbone none)")
        if self.overfit is not None and self.overfit < 1:
            raise TrainingError(f"--overfit must be at least 1, got {self.overfit}")
        if not (self.lr > 0 and self.lr_decay > 0 and self.backbone_width > 0):
            raise TrainingError(f"--lr, --lr-decay and --backbone-width must be positive, got "
                                f"{self.lr}, {self.lr_decay}, {self.backbone_width}")
        if not (self.device in ("auto", "cpu") or self.device.startswith("cuda")):
            raise TrainingError(f"invalid device {self.device!r}; use auto, cpu or cuda")


# Settings that may change when a run is resumed; the others define the run.
RESUMABLE = ("data", "images", "out", "epochs", "device", "cache_features")


def _in_use(run_dir: Path) -> TrainingError:
    return TrainingError(f"{run_dir} is in use by another `captool train`: wait for it to finish, or choose "
                         f"another --out")


def read_run(run_dir: Path) -> dict:
    """The run's train_state.json, after finishing or clearing what an interrupted save left."""
    if run_dir.is_dir():
        with lock(run_dir, _in_use(run_dir)):
            open_run(run_dir)
    return read_state(run_dir)


def saved_config(run_dir: Path, state: dict) -> TrainConfig:
    try:
        return TrainConfig(**state["config"])
    except (TypeError, TrainingError) as e:
        raise TrainingError(f"{run_dir / STATE}: field 'config' is not a training configuration ({e}); "
                            f"the run cannot be resumed: start a new one with another --out") from None


def resume_config(run_dir, **given) -> TrainConfig:
    """The run's own settings, with `given` ones applied: only those in RESUMABLE may differ."""
    saved = saved_config(Path(run_dir), read_run(Path(run_dir)))
    for name, value in given.items():
        if name not in RESUMABLE and value != getattr(saved, name):
            raise TrainingError(f"{run_dir} was trained with {name}={getattr(saved, name)!r}, not {value!r}: "
                                f"resume with the run's settings, or start a new run with another --out")
    return replace(saved, **given)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"--device {name}: torch sees no CUDA device; use --device cpu or auto")
    return torch.device(name)


@dataclass
class TrainResult:
    run_dir: Path
    epochs: int  # epochs trained so far, this call and earlier ones
    history: list[dict] = field(default_factory=list)

    def summary(self) -> str:
        if not self.history:
            return f"{self.run_dir}: nothing trained"
        last = self.history[-1]
        val = f", val loss {last['val_loss']:.4f}" if last.get("val_loss") is not None else ""
        return f"{self.run_dir}: {self.epochs} epochs, train loss {last['train_loss']:.4f}{val}"


class Progress:
    """A status line on stderr: redrawn in place on a terminal, one line per epoch otherwise."""

    def __init__(self):
        self.live = sys.stderr.isatty()
        self._shown = 0.0

    def batch(self, text: str, done: int, total: int) -> None:
        now = time.monotonic()
        if self.live and (now - self._shown > 0.2 or done == total):
            self._shown = now
            bar = "#" * (20 * done // total)
            sys.stderr.write(f"\r\033[K{text} [{bar:<20}] {done}/{total}")
            sys.stderr.flush()

    def epoch(self, line: str) -> None:
        sys.stderr.write(("\r\033[K" if self.live else "") + line + "\n")
        sys.stderr.flush()


class TrainingRun:
    """One training run in memory: the data, the model, Adam, and the frozen features if cached."""

    def __init__(self, config: TrainConfig, *, resume: bool = False, log: Log = log_stderr):
        if config.backbone.lower() == "none" and not config.train_backbone and not config.warmup_epochs:
            log("--backbone none: a frozen random MobileNetV2 gives near-constant features, so it is trained too "
                "(--train-backbone; or --warmup-epochs N to train it as a concept detector, then freeze it)")
            config = replace(config, train_backbone=True)
        self.config, self.log, self.run_dir = config, log, Path(config.out)
        self.device = resolve_device(config.device)
        if not resume:
            try:
                self.run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise TrainingError(f"--out {self.run_dir}: cannot create the run directory ({e.strerror or e}); "
                                    f"choose another --out") from None
        self._held = contextlib.ExitStack()  # the run's lock, released when fit ends
        if self.run_dir.is_dir():
            self._held.enter_context(lock(self.run_dir, _in_use(self.run_dir)))
            open_run(self.run_dir)
        try:
            self._setup(config, resume)
        except BaseException:
            self._held.close()
            raise

    def _setup(self, config: TrainConfig, resume: bool) -> None:
        log = self.log
        state = self._resume_state() if resume else self._check_new_run()
        self.epoch = state["epoch"] if state else 0
        self.history: list[dict] = state["history"] if state else []

        data = load_data(config.data, images=config.images, min_count=config.min_count,
                         report=lambda m: log(f"warning: {m}"))
        self.train_split = data.train
        self.val_split: Optional[CaptionSplit] = data.val if data.val is not None and len(data.val) else None
        if config.overfit:  # validating on as many examples keeps the seed's quick run quick
            self.train_split = self.train_split.first_pairs(config.overfit)
            if self.val_split is not None:
                self.val_split = self.val_split.first_pairs(config.overfit)
        skipped = f", {len(data.problems)} problems reported above" if data.problems else ""
        log(f"data: {data.format} {data.source}: {len(self.train_split)} training examples "
            f"({self.train_split.images.shape[0]} images), "
            f"{len(self.val_split) if self.val_split else 'no'} validation examples, "
            f"{len(data.vocab)} words{skipped}")

        self.model = self._model(data.vocab, resumed=state is not None)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(params, lr=config.lr)
        if state:
            self._restore(state)
        self.features: dict[str, Optional[torch.Tensor]] = {"train": None, "val": None}
        if not config.train_backbone and not self._warmup_pending():
            self._cache_features()

    # -- setup ------------------------------------------------------------------------------------

    def _warmup_pending(self) -> bool:
        return bool(self.config.warmup_epochs) and self.epoch == 0 and not self.history

    def _check_new_run(self) -> None:
        for name in ("train_state.json", "model.json"):
            if (self.run_dir / name).exists():
                raise TrainingError(f"{self.run_dir} already holds a training run ({name}): pass --resume to "
                                    f"continue it, or choose another --out")
        return None

    def _resume_state(self) -> dict:
        state = read_state(self.run_dir)
        saved = saved_config(self.run_dir, state)
        differ = [f.name for f in fields(TrainConfig) if f.name not in RESUMABLE
                  and getattr(saved, f.name) != getattr(self.config, f.name)]
        if differ:
            raise TrainingError(f"{self.run_dir} was trained with other settings ({', '.join(differ)}): resume "
                                f"with the run's settings, or start a new run with another --out")
        return state

    def _model(self, vocab, resumed: bool) -> CaptioningRNN:
        c = self.config
        if resumed:
            model = load_checkpoint(self.run_dir)
            if model.idx_to_token != vocab.idx_to_token:
                raise TrainingError(f"{c.data} gives another vocabulary than {self.run_dir} was trained "
                                    f"with: the data changed; resume on the same data")
            model.set_backbone_trainable(c.train_backbone)
            return model.to(self.device).train()
        torch.manual_seed(c.seed)
        input_dim = _make_divisible(1280 * max(1.0, c.backbone_width), 8)  # MobileNetV2's last_channel
        backbone = None if c.backbone.lower() == "none" else c.backbone
        return CaptioningRNN(vocab.token_to_idx, input_dim=input_dim, wordvec_dim=c.wordvec_dim,
                             hidden_dim=c.hidden_dim, cell_type=c.cell, backbone_width=c.backbone_width,
                             backbone=backbone, device=self.device, train_backbone=c.train_backbone).train()

    def _restore(self, state: dict) -> None:
        rng = restore_optimizer(self.run_dir, state, self.optimizer)
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.log(f"resumed {self.run_dir} after epoch {self.epoch}")

    @torch.no_grad()
    def _extract(self, images: torch.Tensor, batch_size: int = 128) -> torch.Tensor:
        """The backbone in eval mode over uint8 images (M, 3, S, S), in batches."""
        self.model.eval()
        chunks = [self.model.extract_features(images[i:i + batch_size].to(self.device))
                  for i in range(0, images.shape[0], batch_size)]
        self.model.train()
        return torch.cat(chunks)  # (M, 1280), or (M, 1280, 4, 4) for attention

    def _cache_features(self) -> None:
        """Run the frozen backbone once over every image: epochs then cost what the RNN costs."""
        for name, split in (("train", self.train_split), ("val", self.val_split)):
            if split is None:
                continue
            key = feature_key(split.images, self.model.feature_extractor, self.device)
            cache = self.run_dir / "features" / f"{name}-{key}.safetensors"
            cached = load_features(cache) if self.config.cache_features and cache.is_file() else None
            if cached is not None:
                self.features[name] = cached.to(self.device)
                continue
            started = time.perf_counter()
            self.features[name] = self._extract(split.images)
            self.log(f"{name} features: {split.images.shape[0]} images through the frozen backbone in "
                     f"{time.perf_counter() - started:.1f}s")
            if self.config.cache_features:
                save_features(cache, self.features[name])

    # -- the loop ---------------------------------------------------------------------------------

    def _loss(self, split: CaptionSplit, features: Optional[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
        captions = split.captions[rows].to(self.device)  # (B, 17)
        images = split.image_idx[rows]  # (B,) rows of split.images / features
        if features is not None:
            return self.model.loss_from_features(features[images.to(features.device)], captions)
        return self.model(split.images[images].to(self.device), captions)

    def fit(self) -> TrainResult:
        with self._held:  # the run directory stays locked until the last save
            return self._fit()

    def _fit(self) -> TrainResult:
        c, progress = self.config, Progress()
        if self.epoch >= c.epochs:
            self.log(f"{self.run_dir} has trained {self.epoch} epochs already (--epochs {c.epochs}): nothing to do")
        if self._warmup_pending():
            self.model.set_backbone_trainable(True)
            warm_up_backbone(self.model, self.train_split, epochs=c.warmup_epochs, batch_size=c.batch_size,
                             lr=c.lr, seed=c.seed, device=self.device, log=progress.epoch)
            if not c.train_backbone:  # a concept detector now: frozen, its features computed once
                self.model.set_backbone_trainable(False)
                self._cache_features()
        while self.epoch < c.epochs:
            lr = c.lr * c.lr_decay ** self.epoch
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            train_loss, rate = self._train_epoch(progress)
            val_loss = self._evaluate()
            self._check_finite(val_loss)
            self.epoch += 1
            self.history.append({"epoch": self.epoch, "train_loss": train_loss, "val_loss": val_loss,
                                 "samples_per_s": rate, "lr": lr})
            save_epoch(self.run_dir, self.model, self.config, self.epoch, self.history, self.optimizer, self.device)
            val = f"  val loss {val_loss:.4f}" if val_loss is not None else ""
            progress.epoch(f"epoch {self.epoch}/{c.epochs}  train loss {train_loss:.4f}{val}  "
                           f"{rate:.0f} samples/s  lr {lr:.2e}")
        return TrainResult(self.run_dir, self.epoch, list(self.history))

    def _train_epoch(self, progress: Progress) -> tuple[float, float]:
        split, bs = self.train_split, self.config.batch_size
        generator = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.epoch)
        order = epoch_rows(split, self.config.one_caption_per_image, generator)
        n = len(order)
        self.model.train()
        total, seen, batches = 0.0, 0, math.ceil(n / bs)
        started = time.perf_counter()
        for b in range(batches):
            rows = order[b * bs:(b + 1) * bs]
            loss = self._loss(split, self.features["train"], rows)
            value = loss.item()
            if not math.isfinite(value):
                self._diverged(f"training loss is {value} at epoch {self.epoch + 1}, batch {b + 1}/{batches}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total += value * len(rows)
            seen += len(rows)
            rate = seen / max(time.perf_counter() - started, 1e-9)
            progress.batch(f"epoch {self.epoch + 1}/{self.config.epochs} loss {total / seen:.4f} "
                           f"{rate:.0f} samples/s", b + 1, batches)
        return total / seen, seen / max(time.perf_counter() - started, 1e-9)

    @torch.no_grad()
    def _evaluate(self) -> Optional[float]:
        if self.val_split is None:
            return None
        # A trained backbone changes every epoch: its features (eval mode) once per image, not per caption.
        features = self.features["val"] if self.features["val"] is not None else self._extract(self.val_split.images)
        self.model.eval()
        n, bs, total = len(self.val_split), self.config.batch_size, 0.0
        for start in range(0, n, bs):
            rows = torch.arange(start, min(start + bs, n))
            total += self._loss(self.val_split, features, rows).item() * len(rows)
        self.model.train()
        return total / n

    def _check_finite(self, val_loss: Optional[float]) -> None:
        if val_loss is not None and not math.isfinite(val_loss):
            self._diverged(f"validation loss is {val_loss} after epoch {self.epoch + 1}")
        if not all(bool(torch.isfinite(p).all()) for p in self.model.parameters()):
            self._diverged(f"the weights hold NaN or inf after epoch {self.epoch + 1}")

    def _diverged(self, what: str):
        kept = (f"{self.run_dir} keeps the checkpoint of epoch {self.epoch}" if self.epoch
                else "no checkpoint was written")
        raise TrainingError(f"{what}: training stopped; {kept}. Try a lower --lr (now {self.config.lr})")


def epoch_rows(split: CaptionSplit, one_caption_per_image: bool, generator: torch.Generator) -> torch.Tensor:
    """The caption rows an epoch visits, shuffled: all of them, or one drawn per image."""
    if not one_caption_per_image:
        return torch.randperm(len(split), generator=generator)
    # A random key per caption; each image keeps its caption with the smallest key.
    keys = torch.rand(len(split), generator=generator)
    best = torch.full((split.images.shape[0],), 2.0).scatter_reduce(0, split.image_idx, keys, reduce="amin")
    chosen = torch.nonzero(keys == best[split.image_idx]).flatten()  # (M,) one row per image
    return chosen[torch.randperm(len(chosen), generator=generator)]


def _make_divisible(value: float, divisor: int = 8) -> int:
    """MobileNetV2's channel rounding: to a multiple of `divisor`, never down by more than 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * value else rounded


def interrupted(out) -> str:
    """The line `captool train` prints on Ctrl-C: which epoch is saved and the command that resumes."""
    run_dir = Path(out)
    try:
        epoch = read_run(run_dir)["epoch"]
    except (TrainingError, OSError):
        return f"interrupted before an epoch was saved in {run_dir}: nothing to resume; run the same command again"
    return (f"interrupted: epoch {epoch} is saved in {run_dir}; resume with: "
            f"captool train --out {shlex.quote(str(run_dir))} --resume")


def train(config: TrainConfig, *, resume: bool = False, log: Log = log_stderr) -> TrainResult:
    """Train as `captool train` does; `resume` continues the run in config.out."""
    return TrainingRun(config, resume=resume, log=log).fit()
