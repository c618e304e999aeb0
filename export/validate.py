"""Proving a bundle equal to its PyTorch model: tensors within 1e-4 at every step, then tokens, exactly.

The bundle side is the runtime itself: `Captioner.encode`/`.step` decoded by `captool.decode.greedy`,
with the step wrapped only to record what it returned. The PyTorch side follows the same tokens from
its own encoder state, so the state carried across steps is compared too, and `model.sample` gives
the reference captions.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch

from captool.bundle import STATE_FROM_ENCODER, STATE_FROM_STEP
from captool.decode import greedy
from captool.errors import CaptoolError
from captool.preprocess import IMAGE_EXTENSIONS, preprocess

ATOL = 1e-4  # absolute tolerance for every output at every step
TIE_GAP = 1e-5  # PyTorch's top two logits closer than this: a differing token is a near-tie
BATCH_SIZES = (1, 3, 17)  # other than the trace batch (2), to prove the batch axis dynamic
IMAGE_CHUNK = 32  # user images are validated in batches of this many


class ExportError(CaptoolError):
    """Export or verification failed; `report` holds the parity table when validation was reached."""

    def __init__(self, message: str, report: Optional["ParityReport"] = None):
        super().__init__(message)
        self.report = report


@dataclass
class OutputDiff:
    """Worst difference of one graph output over a batch (over every step, for the decoder step)."""

    graph: str
    output: str
    max_abs: float
    max_rel: float  # |bundle - torch| / (|torch| + ATOL), elementwise


@dataclass
class BatchResult:
    """One batch of images through both sides: tensor differences and the token comparison."""

    source: str  # "random" or the image directory
    batch_size: int
    steps: int  # decoder steps the greedy loop ran
    diffs: list[OutputDiff]
    equal: int  # sequences identical to model.sample
    near_ties: list[dict] = field(default_factory=list)  # {"index", "step", "gap", "bundle", "torch"}
    mismatches: list[dict] = field(default_factory=list)  # {"index", "step", "gap", "bundle", "torch"}
    generate_equal: bool = True  # Captioner.generate gave the same tokens as the recorded loop


@dataclass
class ParityReport:
    """Bundle against PyTorch on every batch; `.ok` is the verdict, `.table()` the human form."""

    batches: list[BatchResult]
    atol: float = ATOL
    tie_gap: float = TIE_GAP
    seed: int = 0
    providers: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # why nothing could be compared (bundle of another model)

    @property
    def ok(self) -> bool:
        within = all(d.max_abs <= self.atol for b in self.batches for d in b.diffs)  # False for NaN
        tokens = all(not b.mismatches and b.generate_equal for b in self.batches)
        return bool(self.batches) and not self.problems and within and tokens

    def worst(self) -> list[tuple[OutputDiff, int]]:
        """Per (graph, output): the largest differences over all batches, and the batch size of the worst."""
        rows: dict[tuple[str, str], tuple[OutputDiff, int]] = {}
        for b in self.batches:
            for d in b.diffs:
                key = (d.graph, d.output)
                if key not in rows:
                    rows[key] = (OutputDiff(d.graph, d.output, d.max_abs, d.max_rel), b.batch_size)
                    continue
                acc, n = rows[key]
                if not (d.max_abs <= acc.max_abs) and not math.isnan(acc.max_abs):
                    n = b.batch_size
                acc.max_abs, acc.max_rel = _worse(acc.max_abs, d.max_abs), _worse(acc.max_rel, d.max_rel)
                rows[key] = (acc, n)
        return list(rows.values())

    def table(self) -> str:
        lines = [f"parity: bundle (onnxruntime) vs PyTorch, tolerance {self.atol:g} absolute"]
        if self.problems:
            return "\n".join(lines + [f"not comparable: {p}" for p in self.problems] + ["result: FAIL"])
        lines += [f"{'graph':<13}{'output':<14}{'max abs':>10}{'max rel':>10}  {'worst N':>7}  result"]
        for d, n in self.worst():
            verdict = "ok" if d.max_abs <= self.atol else "FAIL"
            lines.append(f"{d.graph:<13}{d.output:<14}{d.max_abs:>10.2e}{d.max_rel:>10.2e}  {n:>7}  {verdict}")
        lines.append(f"{'images':<22}{'N':>4}{'steps':>7}{'equal':>7}{'near-tie':>10}{'differ':>8}")
        for b in self.batches:
            source = b.source if len(b.source) <= 21 else "…" + b.source[-20:]
            lines.append(f"{source:<22}{b.batch_size:>4}{b.steps:>7}{b.equal:>7}{len(b.near_ties):>10}{len(b.mismatches):>8}")
            for m in b.mismatches[:3]:
                lines.append(f"  image {m['index']}: step {m['step']} bundle {m['bundle']} torch {m['torch']} (top-2 gap {m['gap']:.2e})")
            if not b.generate_equal:
                lines.append("  Captioner.generate gave other tokens than the recorded greedy loop")
        lines.append(f"result: {'PASS' if self.ok else 'FAIL'}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return _finite({"ok": self.ok, "atol": self.atol, "tie_gap": self.tie_gap, "seed": self.seed,
                        "providers": self.providers, "problems": self.problems,
                        "batches": [asdict(b) for b in self.batches]})


def _finite(x):
    """NaN and infinity as strings, so the report is valid JSON for any reader."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def _diff(graph: str, name: str, got: np.ndarray, ref: np.ndarray) -> OutputDiff:
    if got.shape != ref.shape:
        raise ExportError(f"{graph} output {name}: bundle gives shape {list(got.shape)}, PyTorch {list(ref.shape)}")
    delta = np.abs(got.astype(np.float64) - ref.astype(np.float64))
    if delta.size == 0:
        return OutputDiff(graph, name, 0.0, 0.0)
    return OutputDiff(graph, name, float(delta.max()), float((delta / (np.abs(ref) + ATOL)).max()))


def _worse(a: float, b: float) -> float:
    """max() that keeps a NaN: a NaN anywhere must stay the worst value."""
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return max(a, b)


def _merge(acc: dict[str, OutputDiff], d: OutputDiff) -> None:
    old = acc.get(d.output)
    if old is None:
        acc[d.output] = d
    else:
        old.max_abs, old.max_rel = _worse(old.max_abs, d.max_abs), _worse(old.max_rel, d.max_rel)


def compare_batch(captioner, model, images: np.ndarray, source: str) -> BatchResult:
    """Run uint8 images (N, 3, S, S) through the bundle's greedy decoder and through PyTorch."""
    vocab, max_length = captioner.vocab, captioner.manifest.max_length
    records: list[tuple[np.ndarray, dict[str, np.ndarray]]] = []

    def recording_step(feeds):
        out = captioner.step(feeds)
        # Copies: a decoder may reuse its buffers between steps.
        records.append((np.array(feeds["token"]), {k: np.array(v) for k, v in out.items()}))
        return out

    encoded = captioner.encode(images)
    tokens = greedy(encoded, recording_step, start_id=vocab.start_id, end_id=vocab.end_id,
                    null_id=vocab.null_id, max_length=max_length)  # (N, L)
    generate_equal = np.array_equal(captioner.generate(images), tokens)

    diffs: list[OutputDiff] = []
    step_diffs: dict[str, OutputDiff] = {}
    ref_logits = []
    with torch.no_grad():
        ref_encoded = model.encode(torch.from_numpy(images))
        for name, value in ref_encoded.items():
            diffs.append(_diff("encoder", name, encoded[name], value.numpy()))
        # PyTorch follows the bundle's tokens from its own state: the carried state is compared as well.
        state = {STATE_FROM_ENCODER[k]: v for k, v in ref_encoded.items()}
        for token, got in records:
            ref = model.step(torch.from_numpy(token), **state)
            for name, value in ref.items():
                _merge(step_diffs, _diff("decoder_step", name, got[name], value.numpy()))
            ref_logits.append(ref["logits"].numpy())  # (N, V)
            state.update({STATE_FROM_STEP[k]: v for k, v in ref.items() if k in STATE_FROM_STEP})
        ref_tokens = model.sample(torch.from_numpy(images), max_length=max_length).numpy()  # (N, L)
    diffs.extend(step_diffs.values())

    result = BatchResult(source=source, batch_size=len(images), steps=len(records), diffs=diffs, equal=0,
                         generate_equal=generate_equal)
    for i, (got_row, ref_row) in enumerate(zip(tokens, ref_tokens)):
        differ = np.flatnonzero(got_row != ref_row)
        if differ.size == 0:
            result.equal += 1
            continue
        t = int(differ[0])  # the prefixes agree up to t, so PyTorch's logits at step t are the ones to judge
        gap = float("inf")
        if t < len(ref_logits):
            top2 = np.sort(ref_logits[t][i])[-2:]
            gap = float(top2[1] - top2[0])
        entry = {"index": i, "step": t, "gap": gap, "bundle": got_row.tolist(), "torch": ref_row.tolist()}
        (result.near_ties if gap < TIE_GAP else result.mismatches).append(entry)
    return result


def random_images(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 3, size, size), dtype=np.uint8)  # (N, 3, S, S)


def image_files(directory: str | Path) -> list[Path]:
    """The image files under `directory` (recursively, by extension), in sorted order."""
    root = Path(directory)
    if not root.is_dir():
        raise ExportError(f"--images {root}: not a directory; pass a folder of images")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ExportError(f"--images {root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in it")
    return files


def load_model(checkpoint):
    """A CaptioningRNN as given, or loaded from a run dir / model file; on CPU, float32, eval()."""
    if isinstance(checkpoint, torch.nn.Module):
        model = checkpoint
    else:
        from captool.training import load_checkpoint

        model = load_checkpoint(checkpoint)
    return model.to(device="cpu", dtype=torch.float32).eval()


def mismatched(manifest, model) -> list[str]:
    """How the bundle's manifest disagrees with the model (cell type, sizes, vocabulary); [] if it does not."""
    cfg = model.config
    dims = manifest.raw.get("dims", {})
    problems = []
    if manifest.cell_type != cfg.cell_type:
        problems.append(f"cell type {manifest.cell_type} vs {cfg.cell_type}")
    for key in ("hidden_dim", "wordvec_dim", "vocab_size"):
        if dims.get(key) != getattr(cfg, key):
            problems.append(f"{key} {dims.get(key)} vs {getattr(cfg, key)}")
    if list(manifest.vocab.idx_to_token) != list(model.idx_to_token):
        problems.append("the vocabularies differ")
    return problems


def verify_bundle(bundle_dir: str | Path, checkpoint, *, images: str | Path | None = None,
                  batch_sizes: Sequence[int] = BATCH_SIZES, seed: int = 0) -> ParityReport:
    """Validate a bundle against the PyTorch model of `checkpoint` (run dir, model file or the model).

    Random uint8 images at each batch size (seeded), plus the images under `images` if given.
    Raises BundleError if the bundle does not load; a bundle of another model gives a failed report.
    """
    from captool.captioner import Captioner

    files = image_files(images) if images is not None else []
    model = load_model(checkpoint)
    captioner = Captioner(bundle_dir, device="cpu")
    differences = mismatched(captioner.manifest, model)
    if differences:
        problem = (f"{bundle_dir} was not exported from this checkpoint ({'; '.join(differences)}): "
                   f"pass the run dir it came from")
        return ParityReport(batches=[], seed=seed, providers=list(captioner.providers), problems=[problem])
    size = captioner.manifest.image_size
    rng = np.random.default_rng(seed)
    batches = [compare_batch(captioner, model, random_images(n, size, rng), "random") for n in batch_sizes]
    if files:
        for start in range(0, len(files), IMAGE_CHUNK):
            chunk = np.stack([preprocess(p, size) for p in files[start:start + IMAGE_CHUNK]])  # (n, 3, S, S)
            batches.append(compare_batch(captioner, model, chunk, str(images)))
    return ParityReport(batches=batches, seed=seed, providers=list(captioner.providers))
