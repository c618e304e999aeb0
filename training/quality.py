"""The quality report after each training epoch: a validation sample captioned greedily and scored as `captool eval` scores.

A loss says little about captions: a tiny model can reach a fair loss and caption every image the
same. After each captioning epoch the first `quality_images` validation images (100 by default) are
captioned by the PyTorch model (greedy, the way `captool eval` samples a checkpoint) and scored with
captool.evaluation's `score_captions` (BLEU-4, CIDEr-D; the simple tokenizer, no java) and, on
`captool synth` data, `fact_accuracy`. A few captions are shown beside their references, a warning
says when every caption is the same, and the run folder's quality.json (written atomically) keeps
every epoch's figures and the last epoch's examples.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from captool.files import read_json, write_json
from captool.vocab import Vocab

from .data import CaptionSplit

QUALITY = "quality.json"
EXAMPLES = 5  # captions shown beside their references


@dataclass
class QualitySample:
    """The images a report captions: ids, pixels, every reference caption, and synth scenes where there are."""

    split: str  # "val", or "train" when the data has no validation split
    ids: list
    images: torch.Tensor  # uint8 (M, 3, S, S)
    references: dict  # id -> [caption, ...]
    scenes: Optional[dict] = None  # id -> scene, for fact accuracy on `captool synth` data
    features: Optional[torch.Tensor] = None  # a frozen backbone's features of `images`, computed once


def from_split(split: CaptionSplit, vocab: Vocab, n: int, name: str) -> QualitySample:
    """The first n images of a split in memory, their references decoded from the caption rows."""
    m = min(n, split.images.shape[0])
    references: dict = {}
    for row, image in zip(split.captions.tolist(), split.image_idx.tolist()):
        if image < m:
            references.setdefault(image, []).append(vocab.decode(row))
    ids = [i for i in range(m) if references.get(i)]
    return QualitySample(name, ids, split.images[ids], {i: references[i] for i in ids})


def from_dataset(data: str, images: Optional[str], n: int, jpeg_decode: str = "full") -> Optional[QualitySample]:
    """The first n validation images of a COCO-style or Karpathy dataset, with the annotation file's own
    reference texts and scenes; None for the course's coco.pt (its split in memory is used instead)."""
    from captool.datasets import find_dataset
    from captool.evaluation import load_eval_set
    from captool.preprocess import preprocess

    if find_dataset(Path(data), "val").suffix == ".pt":
        return None
    evalset = load_eval_set(data, "val", Path(images) if images else None).head(n)
    kept, pixels = [], []
    for image_id, path in zip(evalset.ids, evalset.images):
        try:
            pixels.append(torch.from_numpy(preprocess(path, jpeg_decode=jpeg_decode)))
            kept.append(image_id)
        except Exception:  # an unreadable image was reported when the data was loaded
            continue
    if not kept:
        return None
    scenes = {i: evalset.scenes[i] for i in kept} if evalset.scenes is not None else None
    return QualitySample("val", kept, torch.stack(pixels), {i: evalset.references[i] for i in kept}, scenes)


@torch.no_grad()
def caption_sample(model, sample: QualitySample, device: torch.device, batch_size: int = 50) -> dict:
    """Image id -> greedy caption, by the PyTorch model in eval mode."""
    vocab = Vocab(list(model.idx_to_token))
    was_training = model.training
    model.eval()
    frozen = not model.backbone_trainable
    if frozen and sample.features is None:  # a frozen backbone's features do not change between epochs
        sample.features = torch.cat([model.extract_features(sample.images[i:i + batch_size].to(device))
                                     for i in range(0, len(sample.ids), batch_size)])
    rows = []
    for i in range(0, len(sample.ids), batch_size):
        if frozen:
            rows.append(model.sample(None, features=sample.features[i:i + batch_size]))
        else:
            rows.append(model.sample(sample.images[i:i + batch_size].to(device)))
    model.train(was_training)
    tokens = torch.cat(rows).tolist()  # (M, L)
    return {image_id: vocab.decode(row) for image_id, row in zip(sample.ids, tokens)}


def score(captions: dict, sample: QualitySample, warn: Callable[[str], None]) -> dict:
    """BLEU-4 and CIDEr-D (captool.evaluation.score_captions), fact accuracy on synth data."""
    metrics: dict = {}
    try:
        from captool.evaluation import score_captions
    except ImportError:
        warn("BLEU-4 and CIDEr-D need pycocoevalcap: pip install 'captool[eval]'")
    else:
        scores, _ = score_captions(captions, {i: sample.references[i] for i in captions}, tokenizer="simple")
        metrics.update(bleu4=scores["bleu4"], cider=scores["cider"])
    if sample.scenes is not None:
        from captool.datasets.facts import fact_accuracy

        metrics["fact_accuracy"] = fact_accuracy(captions, sample.scenes)
    return metrics


def report(model, sample: QualitySample, epoch: int, device: torch.device, warn: Callable[[str], None]) -> dict:
    """Caption the sample, score it; the dict quality.json keeps for this epoch."""
    captions = caption_sample(model, sample, device)
    distinct = sorted(set(captions.values()))
    if len(distinct) == 1 and len(captions) > 1:
        warn(f"all {len(captions)} captions of the {sample.split} sample are the same: {distinct[0]!r}; the model "
             f"ignores the image so far: train more epochs, or warm the backbone up (--warmup-epochs N)")
    examples = [{"image_id": i, "caption": captions[i], "references": sample.references[i][:3]}
                for i in list(captions)[:EXAMPLES]]
    return {"epoch": epoch, "split": sample.split, "n_images": len(captions), "decoding": "greedy",
            "metrics": score(captions, sample, warn), "distinct_captions": len(distinct),
            "all_same": len(distinct) == 1, "examples": examples}


def metrics_line(entry: dict) -> str:
    names = {"bleu4": "BLEU-4 {:.3f}", "cider": "CIDEr-D {:.3f}", "fact_accuracy": "facts {:.0%}"}
    figures = "  ".join(names[k].format(v) for k, v in entry["metrics"].items())
    return (f"quality after epoch {entry['epoch']}: {figures}  ({entry['n_images']} {entry['split']} images, "
            f"greedy; {entry['distinct_captions']} distinct captions)")


def examples_text(entry: dict) -> str:
    lines = [f"captions of {entry['split']} images after epoch {entry['epoch']} (caption | a reference):"]
    lines += [f"  {e['caption']!s:<44} | {e['references'][0]}" for e in entry["examples"]]
    return "\n".join(lines)


def write_quality(run_dir: Path, entry: dict) -> None:
    """quality.json: every epoch's figures so far (those of a resumed run's earlier epochs kept) and the last examples."""
    path = run_dir / QUALITY
    epochs: list = []
    if path.is_file():
        try:
            old = read_json(path, what="quality report")
            epochs = [e for e in old.get("epochs", []) if isinstance(e, dict) and e.get("epoch", 0) < entry["epoch"]]
        except Exception:  # a damaged report is rewritten, never a reason to stop training
            epochs = []
    summary = {k: entry[k] for k in ("epoch", "metrics", "distinct_captions", "all_same")}
    write_json(path, {"format": "captool-quality", "version": 1, "epochs": [*epochs, summary], "last": entry})
