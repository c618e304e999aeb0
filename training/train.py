"""The training loop behind `captool train`: the seed's Adam with per-epoch decay, cached frozen features, resumable runs.

A run directory holds:
  model.safetensors, model.json   the last finished epoch's checkpoint (`load_checkpoint(run_dir)`)
  optimizer.safetensors           Adam's moments and the torch RNG states, for --resume
  train_state.json                the TrainConfig, the epoch counter, the per-epoch history and
                                  the index of optimizer.safetensors
  features/                       frozen-backbone features, keyed by a hash of images and backbone
Nothing in it is pickled. The four files of an epoch are committed together (training/run_state.py):
a kill or Ctrl-C at any moment leaves the last committed epoch whole, and the next `captool train
--out DIR --resume` continues from it. A run holds a lock on its directory while it works. Epoch e's
data order comes from a generator seeded with (seed, e) and the learning rate of epoch e is
lr * lr_decay**e (the seed's LambdaLR, written out), so the epoch counter plus Adam's state is all a
resumed run needs to continue exactly as an unbroken one.

The warm-up (training/warmup.py) is committed the same way after each of its epochs, as epoch 0 of
the run: the checkpoint holds the warming backbone, optimizer.safetensors the warm-up's Adam, the
history a `"phase": "warmup"` entry naming warmup-head-NNNN.safetensors (the throw-away head,
written before the commit, the previous one removed after it). A run stopped during the warm-up
resumes it at the next warm-up epoch and reaches the weights an unbroken run reaches.
  quality.json                    the quality report of each epoch (training/quality.py)
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

from captool.bundle import sha256_file
from captool.files import atomic_write, lock
from captool.progress import Progress

from . import quality
from .checkpoint import load_checkpoint
from .config import RESUMABLE, TrainConfig
from .data import CaptionSplit, load_data
from .errors import TrainingError
from .model import CaptioningRNN
from .run_state import STATE, feature_key, load_features, open_run, read_state, restore_optimizer, save_epoch, save_features
from .warmup import WarmUp

__all__ = ["RESUMABLE", "TrainConfig", "TrainResult", "TrainingRun", "interrupted", "resume_config", "train"]

Log = Callable[[str], None]


def log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


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
    history: list[dict] = field(default_factory=list)  # captioning epochs (warm-up ones left out)
    quality: Optional[dict] = None  # the last epoch's quality report, where one was made

    def summary(self) -> str:
        if not self.history:
            return f"{self.run_dir}: nothing trained"
        last = self.history[-1]
        val = f", val loss {last['val_loss']:.4f}" if last.get("val_loss") is not None else ""
        return f"{self.run_dir}: {self.epochs} epochs, train loss {last['train_loss']:.4f}{val}"


def is_warmup(entry: dict) -> bool:
    return entry.get("phase") == "warmup"


def warmups_done(history: list[dict]) -> int:
    return sum(is_warmup(h) for h in history)


class TrainingRun:
    """One training run in memory: the data, the model, Adam, and the frozen features if cached."""

    def __init__(self, config: TrainConfig, *, resume: bool = False, log: Log = log_stderr):
        if config.backbone.lower() == "none" and not config.train_backbone and not config.warmup_epochs:
            log("--backbone none: a frozen random MobileNetV2 gives near-constant features, so it is trained too "
                "(--train-backbone; or --warmup-epochs N to train it as a concept detector, then freeze it)")
            config = replace(config, train_backbone=True)
        self.config, self.log, self.run_dir = config, log, Path(config.out)
        # The thread count is part of the arithmetic (reduction order, features included): every run
        # of this config, through the CLI, the API or a resume in another process, computes alike.
        use_threads(config.threads)
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
        self.state = state
        self.epoch = state["epoch"] if state else 0
        self.history: list[dict] = state["history"] if state else []

        data = load_data(config.data, images=config.images, min_count=config.min_count,
                         report=lambda m: log(f"warning: {m}"), jpeg_decode=config.jpeg_decode)
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
        self.quality_sample = self._quality_sample(data.vocab)

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
        return self.epoch == 0 and warmups_done(self.history) < self.config.warmup_epochs

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

    def _quality_sample(self, vocab) -> Optional[quality.QualitySample]:
        """The images each epoch's quality report captions: the validation split's first ones."""
        n = self.config.quality_images
        if not n:
            return None
        try:
            sample = quality.from_dataset(self.config.data, self.config.images, n, self.config.jpeg_decode)
        except Exception as e:  # the report is a help, never a reason to refuse training
            self.log(f"warning: quality report on the split in memory ({e})")
            sample = None
        if sample is None:
            split = self.val_split or self.train_split
            sample = quality.from_split(split, vocab, n, "val" if self.val_split is not None else "train")
        return sample if sample.ids else None

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
                             backbone=backbone, device=self.device, train_backbone=c.train_backbone,
                             jpeg_decode=c.jpeg_decode).train()

    def _restore(self, state: dict) -> None:
        if self.epoch:
            rng = restore_optimizer(self.run_dir, state, self.optimizer)
        else:  # a warm-up's save holds the warm-up's Adam (_warm_up restores it where still needed)
            rng = restore_optimizer(self.run_dir, state, self._new_warmup().optimizer)
            self.model.set_backbone_trainable(self.config.train_backbone)
        torch.set_rng_state(rng["torch"])
        if self.device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        done = warmups_done(self.history)
        where = f"epoch {self.epoch}" if self.epoch else f"warm-up epoch {done}/{self.config.warmup_epochs}"
        self.log(f"resumed {self.run_dir} after {where}")

    def _new_warmup(self) -> WarmUp:
        c = self.config
        self.model.set_backbone_trainable(True)
        return WarmUp(self.model, self.train_split, batch_size=c.batch_size, lr=c.lr, seed=c.seed, device=self.device)

    @torch.no_grad()
    def _extract(self, images: torch.Tensor, batch_size: int = 128, label: str = "") -> torch.Tensor:
        """The backbone in eval mode over uint8 images (M, 3, S, S), in batches."""
        self.model.eval()
        chunks = []
        # Unlabelled (a trained backbone's validation features, inside an epoch's bar): no bar of its own.
        with Progress(label, total=images.shape[0], unit="images", live=None if label else False,
                      lines=bool(label)) as bar:
            for i in range(0, images.shape[0], batch_size):
                chunks.append(self.model.extract_features(images[i:i + batch_size].to(self.device)))
                bar.update(chunks[-1].shape[0])
            if label:
                bar.finish()
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
            self.features[name] = self._extract(split.images, label=f"{name} features (frozen backbone)")
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
        c, report = self.config, None
        if self.epoch >= c.epochs:
            self.log(f"{self.run_dir} has trained {self.epoch} epochs already (--epochs {c.epochs}): nothing to do")
        if self._warmup_pending():
            self._warm_up()
            if not c.train_backbone:  # a concept detector now: frozen, its features computed once
                self._cache_features()
        while self.epoch < c.epochs:
            lr = c.lr * c.lr_decay ** self.epoch
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            with Progress(f"epoch {self.epoch + 1}/{c.epochs}", total=self._epoch_size(), unit="samples") as bar:
                train_loss, rate = self._train_epoch(bar)
                val_loss = self._evaluate()
                self._check_finite(val_loss)
                self.epoch += 1
                self.history.append({"epoch": self.epoch, "train_loss": train_loss, "val_loss": val_loss,
                                     "samples_per_s": rate, "lr": lr})
                save_epoch(self.run_dir, self.model, self.config, self.epoch, self.history, self.optimizer,
                           self.device)
                val = f"  val loss {val_loss:.4f}" if val_loss is not None else ""
                bar.finish(f"epoch {self.epoch}/{c.epochs}  train loss {train_loss:.4f}{val}  "
                           f"{rate:.0f} samples/s  lr {lr:.2e}")
            report = self._quality() or report
        if report is not None:  # the end of the run: what the captions look like now
            self.log(quality.examples_text(report))
        return TrainResult(self.run_dir, self.epoch, [h for h in self.history if not is_warmup(h)], report)

    def _warm_up(self) -> None:
        """The backbone's concept-detector warm-up, committed after each of its epochs (resumable)."""
        c = self.config
        warm = self._new_warmup()
        done = warmups_done(self.history)
        if done:  # resumed: the head and Adam of the last committed warm-up epoch
            self._load_head(warm, self.history[-1])
            restore_optimizer(self.run_dir, self.state, warm.optimizer)
        n = self.train_split.images.shape[0]
        for e in range(done, c.warmup_epochs):
            with Progress(f"warm-up {e + 1}/{c.warmup_epochs}", total=n, unit="images") as bar:
                loss, rate = warm.run_epoch(e, lambda k, running: bar.update(k, note=f"loss {running:.4f}"))
                head = self.run_dir / f"warmup-head-{e + 1:04d}.safetensors"
                self._save_head(warm, head)
                self.history.append({"phase": "warmup", "epoch": e + 1, "of": c.warmup_epochs, "loss": loss,
                                     "images_per_s": rate, "head": {"file": head.name, "sha256": sha256_file(head)}})
                save_epoch(self.run_dir, self.model, self.config, 0, self.history, warm.optimizer, self.device)
                for old in self.run_dir.glob("warmup-head-*.safetensors"):  # the commit names `head` now
                    if old != head:
                        old.unlink(missing_ok=True)
                bar.finish(f"warm-up {e + 1}/{c.warmup_epochs}  concept-detector loss {loss:.4f}  {rate:.0f} images/s")
        for old in self.run_dir.glob("warmup-head-*.safetensors"):  # the warm-up is over: the head is not needed
            old.unlink(missing_ok=True)
        self.model.set_backbone_trainable(c.train_backbone)

    def _save_head(self, warm: WarmUp, path: Path) -> None:
        from safetensors.torch import save_file

        tensors = {k: v.detach().to("cpu").contiguous() for k, v in warm.head.state_dict().items()}
        atomic_write(path, lambda p: save_file(tensors, str(p)))

    def _load_head(self, warm: WarmUp, entry: dict) -> None:
        from safetensors.torch import load_file

        index = entry.get("head") or {}
        path = self.run_dir / str(index.get("file", ""))
        if not path.is_file() or sha256_file(path) != index.get("sha256"):
            raise TrainingError(f"{path}: the warm-up head {STATE} names is missing or changed; the warm-up cannot "
                                f"be resumed exactly: start a new run with another --out")
        warm.head.load_state_dict(load_file(str(path), device=str(self.device)))

    def _epoch_size(self) -> int:
        split = self.train_split
        return split.images.shape[0] if self.config.one_caption_per_image else len(split)

    def _train_epoch(self, bar: Progress) -> tuple[float, float]:
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
            bar.update(len(rows), note=f"loss {total / seen:.4f}")
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

    def _quality(self) -> Optional[dict]:
        """This epoch's quality report: one line (and a warning when every caption is the same), quality.json."""
        if self.quality_sample is None:
            return None
        entry = quality.report(self.model, self.quality_sample, self.epoch, self.device,
                               warn=lambda m: self.log(f"warning: {m}"))
        quality.write_quality(self.run_dir, entry)
        self.log(quality.metrics_line(entry))
        return entry

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
        state = read_run(run_dir)
    except (TrainingError, OSError):
        return f"interrupted before an epoch was saved in {run_dir}: nothing to resume; run the same command again"
    done = warmups_done(state["history"])
    saved = (f"epoch {state['epoch']}" if state["epoch"] or not done
             else f"warm-up epoch {done}/{state['config'].get('warmup_epochs', done)}")
    return (f"interrupted: {saved} is saved in {run_dir}; resume with: "
            f"captool train --out {shlex.quote(str(run_dir))} --resume")


def use_threads(threads: int) -> None:
    """torch's intra-op threads for this process, set once by the entry point (`captool train --threads`)."""
    torch.set_num_threads(threads)


def train(config: TrainConfig, *, resume: bool = False, log: Log = log_stderr) -> TrainResult:
    """Train as `captool train` does; `resume` continues the run in config.out."""
    return TrainingRun(config, resume=resume, log=log).fit()
