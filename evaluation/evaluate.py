"""`captool eval`: caption a dataset split with a bundle or a checkpoint and score it (COCO metrics, facts).

The scores come from pycocoevalcap's own scorers (Bleu(4), Rouge, Cider — its Cider is CIDEr-D —
and Meteor where java runs), against every reference caption of each image; nothing is
re-implemented. Captions are tokenized with pycocoevalcap's PTBTokenizer when java is on PATH
(as the COCO evaluation server does), otherwise with `captool.vocab.tokenize`, which gives the same
tokens on plain captions (it differs on contractions and hyphenated words). The report names the
tokenizer used. Given a bundle, this module never imports torch; a checkpoint is sampled by the
PyTorch model itself, so the two sides can be compared on the same images.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from captool.bundle import MANIFEST
from captool.datasets import find_dataset, read_annotations
from captool.errors import CaptoolError, DataError, ImageError
from captool.preprocess import preprocess
from captool.progress import Progress, phase
from captool.vocab import Vocab, tokenize

TOKENIZERS = ("auto", "ptb", "simple")
METRIC_NAMES = {"bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4",
                "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider": "CIDEr-D", "fact_accuracy": "fact accuracy"}


@dataclass
class Sampler:
    """A model to caption with, bundle or checkpoint: uint8 [N,3,S,S] -> int64 [N,L] word ids."""

    kind: str  # "bundle" (onnxruntime) | "checkpoint" (PyTorch's own sample)
    path: Path
    vocab: Vocab
    image_size: int
    max_length: int
    generate: Callable[[np.ndarray], np.ndarray]
    model: Any = None  # the Captioner or the CaptioningRNN, for benchmarks
    jpeg_decode: str = "full"  # how its JPEG files are decoded (the bundle's or the model's rule)


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def open_model(path: str | Path, *, beam_size: int = 1, device: str = "auto",
               threads: Optional[int] = None) -> Sampler:
    """A bundle directory (torch-free) or a checkpoint run directory / model file (imports torch)."""
    path = Path(path)
    if beam_size < 1:
        raise CaptoolError(f"--beam-size must be >= 1, got {beam_size}")
    if is_bundle(path):
        from captool.captioner import Captioner

        captioner = Captioner(path, device=device, threads=threads)
        m = captioner.manifest
        return Sampler("bundle", path, captioner.vocab, m.image_size, m.max_length,
                       lambda images: captioner.generate(images, beam_size=beam_size), captioner, m.jpeg_decode)
    if not (path / "model.json").is_file() and path.suffix != ".safetensors":
        raise CaptoolError(f"{path}: neither a bundle (no {MANIFEST}) nor a checkpoint (no model.json); "
                           f"pass a directory written by `captool export` or `captool train`")
    if beam_size != 1:
        raise CaptoolError("beam search runs on bundles only: the checkpoint side is the PyTorch model's own "
                           "greedy sample(); use --beam-size 1 to compare the two, or evaluate the bundle")
    from captool.training import reference

    model = reference.load_reference(path, threads)
    config = model.config
    return Sampler("checkpoint", path, Vocab(list(model.idx_to_token)), config.image_size,
                   config.max_length, reference.sampler(model), model, config.jpeg_decode)


@dataclass
class EvalSet:
    """One split of a captions dataset: image ids in file order, their images, references and scenes."""

    source: Path
    format: str  # "coco-json" | "karpathy-json" | "coco.pt"
    split: str
    ids: list
    images: Any  # a list of paths, or uint8 [M,3,S,S] for coco.pt
    references: dict
    scenes: Optional[dict] = None  # image id -> scene facts, for `captool synth` data

    def head(self, n: Optional[int]) -> "EvalSet":
        if n is None or n >= len(self.ids):
            return self
        keep = self.ids[:n]
        scenes = {i: self.scenes[i] for i in keep} if self.scenes is not None else None
        return EvalSet(self.source, self.format, self.split, keep, self.images[:n],
                       {i: self.references[i] for i in keep}, scenes)


# ---- datasets: captool.datasets reads them without torch (except the course's coco.pt) -------------


def _coco_pt(path: Path, split: str) -> EvalSet:
    """The course's coco.pt through training's loader (it needs torch to read the file)."""
    if split not in ("train", "val"):
        raise CaptoolError(f"{path}: coco.pt has the splits train and val, not {split!r}")
    from captool.training.data import load_data

    data = load_data(path)
    part = data.train if split == "train" else data.val
    refs: dict = {}
    for row, image in zip(part.captions.tolist(), part.image_idx.tolist()):
        refs.setdefault(image, []).append(data.vocab.decode(row))
    ids = sorted(refs)
    if not ids:
        raise DataError(f"{path}: {split}_captions has no caption with a word to score against")
    return EvalSet(path, "coco.pt", split, ids, part.images.numpy()[ids], refs)


def load_eval_set(data: str | Path, split: str = "val", image_dir: Optional[Path] = None) -> EvalSet:
    """A split of a COCO captions dataset (dir or file), a Karpathy JSON, or the course's coco.pt.

    Which file and which image folder: the rules of captool.datasets, the same as `captool train`'s.
    """
    path = find_dataset(Path(data), split)
    if path.suffix == ".pt":
        return _coco_pt(path, split)
    annotations = read_annotations(path, images=Path(image_dir) if image_dir else None)
    records = annotations.of_split(split)  # an image without a reference caption cannot be scored
    if not records and annotations.format == "karpathy-json":
        raise DataError(f"{path}: no image of split {split!r} with a reference caption "
                        f"(Karpathy splits are train, restval, val and test)")
    if not records:
        raise DataError(f"{path}: no image with a reference caption")
    ids = [r.image_id for r in records]
    scenes = {r.image_id: r.scene for r in records} if all(r.scene is not None for r in records) else None
    return EvalSet(path, annotations.format, split, ids, [r.path for r in records],
                   {r.image_id: r.captions for r in records}, scenes)


# ---- scoring: pycocoevalcap's scorers -----------------------------------------------------------


@contextlib.contextmanager
def _quiet():
    """pycocoevalcap prints to stdout and its java tools to stderr; keep both off the user's output."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                yield
        finally:
            sys.stdout.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def _ptb(captions: dict) -> dict:
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    return PTBTokenizer().tokenize({i: [{"caption": c} for c in cs] for i, cs in captions.items()})


def _simple(captions: dict) -> dict:
    return {i: [" ".join(tokenize(c, max_words=1_000_000)) for c in cs] for i, cs in captions.items()}


def tokenize_for_scoring(gts: dict, res: dict, tokenizer: str = "auto") -> tuple[dict, dict, str]:
    """Both sides tokenized by the same tokenizer; returns (gts, res, the tokenizer's name)."""
    if tokenizer not in TOKENIZERS:
        raise CaptoolError(f"unknown tokenizer {tokenizer!r}; expected one of {', '.join(TOKENIZERS)}")
    if tokenizer == "auto":
        tokenizer = "ptb" if shutil.which("java") else "simple"
    if tokenizer == "ptb":
        if not shutil.which("java"):
            raise CaptoolError("the PTB tokenizer needs java on PATH; install a JRE or use --tokenizer simple")
        try:
            with _quiet():
                return _ptb(gts), _ptb(res), "ptb"
        except OSError as e:  # e.g. a read-only site-packages: the tokenizer writes its input file there
            raise CaptoolError(f"PTB tokenizer failed ({e}); use --tokenizer simple") from None
    return _simple(gts), _simple(res), "simple"


def score_captions(predictions: dict, references: dict, *, tokenizer: str = "auto",
                   meteor: bool = False) -> tuple[dict[str, float], str]:
    """Corpus scores of predictions (id -> caption) against references (id -> captions), and the tokenizer.

    Keys bleu1..bleu4, rouge_l, cider (CIDEr-D), and meteor when asked for (it needs java).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if set(predictions) != set(references):
        raise CaptoolError("predictions and references must cover the same image ids")
    if not predictions:
        raise CaptoolError("nothing to score: no predicted caption")
    gts, res, used = tokenize_for_scoring(references, {i: [c] for i, c in predictions.items()}, tokenizer)
    with _quiet():
        bleu, _ = Bleu(4).compute_score(gts, res)
        scores = {f"bleu{n + 1}": float(b) for n, b in enumerate(bleu)}
        if meteor:
            scores["meteor"] = _meteor(gts, res)
        scores["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
        scores["cider"] = float(Cider().compute_score(gts, res)[0])
    return scores, used


def _meteor(gts: dict, res: dict) -> float:
    if not shutil.which("java"):
        raise CaptoolError("METEOR needs java on PATH (the meteor jar ships with pycocoevalcap); drop --meteor")
    from pycocoevalcap.meteor.meteor import Meteor

    try:
        return float(Meteor().compute_score(gts, res)[0])
    except (OSError, ValueError) as e:  # ValueError: the jar died and answered nothing
        raise CaptoolError(f"METEOR failed to run ({e}); it starts java with -Xmx2G, drop --meteor") from None


# ---- the whole evaluation -----------------------------------------------------------------------


@dataclass
class EvalReport:
    """What `captool eval` prints: the scores and what they were measured on."""

    model: str
    model_kind: str  # "bundle" | "checkpoint"
    data: str
    format: str
    split: str
    n_images: int
    tokenizer: str
    beam_size: int
    metrics: dict[str, float]
    n_skipped: int = 0
    seconds: float = 0.0
    predictions: dict = field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        out = dict(self.metrics)
        out.update({k: v for k, v in asdict(self).items() if k not in ("metrics", "predictions")})
        return out

    def table(self) -> str:
        lines = [f"model      {self.model_kind} {self.model}",
                 f"data       {self.data} [{self.split}, {self.format}]: {self.n_images} images"
                 + (f" ({self.n_skipped} unreadable, skipped)" if self.n_skipped else ""),
                 f"decoding   {'greedy' if self.beam_size == 1 else f'beam {self.beam_size}'}, "
                 f"tokenizer {self.tokenizer}, {self.seconds:.1f} s"]
        lines += [f"{METRIC_NAMES[k]:<15}{v:8.4f}" for k, v in self.metrics.items()]
        return "\n".join(lines)


def caption_set(sampler: Sampler, evalset: EvalSet, batch_size: int = 32,
                warn: Callable[[str], None] = lambda m: None,
                progress: Callable[[int], None] = lambda n: None) -> dict:
    """Image id -> caption for every readable image of the set; unreadable ones are reported and left out.
    `progress(n)` is called after each batch with the number of images it held."""
    if batch_size < 1:
        raise CaptoolError(f"--batch-size must be >= 1, got {batch_size}")
    out: dict = {}
    for start in range(0, len(evalset.ids), batch_size):
        ids, pixels = [], []
        for image_id, image in zip(evalset.ids[start:start + batch_size], evalset.images[start:start + batch_size]):
            try:
                pixels.append(image if isinstance(image, np.ndarray) else
                              preprocess(image, sampler.image_size, sampler.jpeg_decode))
            except ImageError as e:
                warn(f"skipped: {e}")
                continue
            ids.append(image_id)
        if ids:
            tokens = sampler.generate(np.stack(pixels))  # (B,3,S,S) -> (B,L)
            out.update({i: sampler.vocab.decode(row) for i, row in zip(ids, tokens)})
        progress(len(evalset.ids[start:start + batch_size]))
    if not out:
        raise CaptoolError(f"{evalset.source}: none of the {len(evalset.ids)} images could be read")
    return out


def evaluate(model: str | Path, data: str | Path, *, split: str = "val", beam_size: int = 1,
             batch_size: int = 32, max_images: Optional[int] = None, tokenizer: str = "auto",
             meteor: bool = False, image_dir: Optional[Path] = None, device: str = "auto",
             warn: Callable[[str], None] = lambda m: None) -> EvalReport:
    """Caption `split` of `data` with a bundle or checkpoint `model` and score it.

    Args:
        model: a bundle directory (onnxruntime, torch-free) or a checkpoint run directory (PyTorch).
        data: a `captool synth`/COCO captions directory or file, a Karpathy JSON, or coco.pt.
        max_images: evaluate the first N images of the split only.
        tokenizer: "auto" (PTB when java is on PATH), "ptb" or "simple".
    """
    start = time.perf_counter()
    if max_images is not None and max_images < 1:
        raise CaptoolError(f"--max-images must be >= 1, got {max_images}")
    evalset = load_eval_set(data, split, image_dir).head(max_images)
    with phase(f"eval: opening {model}"):
        sampler = open_model(model, beam_size=beam_size, device=device)
    with Progress("eval: captioning", total=len(evalset.ids), unit="images") as bar:
        predictions = caption_set(sampler, evalset, batch_size, warn, progress=bar.update)
        bar.finish()
    references = {i: evalset.references[i] for i in predictions}
    with phase("eval: scoring"):
        metrics, used = score_captions(predictions, references, tokenizer=tokenizer, meteor=meteor)
    if evalset.scenes is not None:
        from captool.datasets.facts import fact_accuracy

        metrics["fact_accuracy"] = fact_accuracy(predictions, evalset.scenes)
    return EvalReport(model=str(model), model_kind=sampler.kind, data=str(evalset.source),
                      format=evalset.format, split=split, n_images=len(predictions), tokenizer=used,
                      beam_size=beam_size, metrics=metrics, n_skipped=len(evalset.ids) - len(predictions),
                      seconds=time.perf_counter() - start, predictions=predictions)


def write_predictions(report: EvalReport, path: Path) -> None:
    """The captions as a COCO results file ([{"image_id", "caption"}]), for any COCO evaluation tool."""
    rows = [{"image_id": i, "caption": c} for i, c in report.predictions.items()]
    Path(path).write_text(json.dumps(rows, indent=1), encoding="utf-8")
