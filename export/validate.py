"""Proving a bundle equal to its PyTorch model: tensors within 1e-4 at every step, then tokens, exactly.

fp16 and int8 bundles are held to the tolerance their precision allows and, instead of token identity,
to caption agreement: the share of real images whose greedy caption equals PyTorch's (TOLERANCES).

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

ATOL = 1e-4  # fp32: every element of every output at every step within ATOL + RTOL * |torch|
RTOL = 1e-5  # float32 rounding grows with the magnitude: the LSTM's cell state reaches |c| ~ 20
TIE_GAP = 1e-5  # PyTorch's top two logits closer than this: a differing token is a near-tie
BATCH_SIZES = (1, 3, 17)  # other than the trace batch (2), to prove the batch axis dynamic
IMAGE_CHUNK = 32  # user images are validated in batches of this many


@dataclass(frozen=True)
class Tolerance:
    """How close a bundle of one precision must be to PyTorch (docs/export.md has the measurements).

    fp32: every element of every output within `atol` + `rtol` * |torch| of PyTorch, every greedy
    sequence identical (near-ties aside). fp16/int8: each output's relative error
    ||bundle - torch|| / ||torch|| (over the batch, at each step) at most `rel_err`, and at least
    `min_agreement` of the (real) images captioned exactly as PyTorch captions them. Elementwise bounds suit quantization badly: int8
    may flip a few of 512 state elements by ~1 and still give the same caption.
    """

    atol: Optional[float] = None
    rtol: Optional[float] = None
    rel_err: Optional[float] = None
    min_agreement: Optional[float] = None


TOLERANCES = {
    "fp32": Tolerance(atol=ATOL, rtol=RTOL),
    "fp16": Tolerance(rel_err=0.02, min_agreement=0.98),
    "int8": Tolerance(rel_err=0.25, min_agreement=0.85),
}


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
    rel_err: float = 0.0  # ||bundle - torch|| / ||torch|| over the batch (worst step for the decoder step)
    bound: float = 0.0  # max |bundle - torch| / (ATOL + RTOL * |torch|): the fp32 bound's share used, <= 1 to pass


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
    step_graph: str = "decoder_step"  # the step that decoded: decoder_step, or decoder_step_cached


@dataclass
class ParityReport:
    """Bundle against PyTorch on every batch; `.ok` is the verdict, `.table()` the human form."""

    batches: list[BatchResult]
    atol: float = ATOL
    rtol: Optional[float] = RTOL
    tie_gap: float = TIE_GAP
    seed: int = 0
    providers: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # why nothing could be compared (bundle of another model)
    precision: str = "fp32"
    rel_err: Optional[float] = None  # the fp16/int8 bound on OutputDiff.rel_err (atol is None for those)
    min_agreement: Optional[float] = None  # None: token identity (fp32); else the share of captions to agree
    images: Optional[dict] = None  # where the real validation images came from (quantized bundles)

    @classmethod
    def for_precision(cls, precision: str, batches: list[BatchResult], min_agreement: Optional[float] = None,
                      **kw) -> "ParityReport":
        """The report with TOLERANCES[precision]; `min_agreement` overrides its share (fp16/int8 only)."""
        t = TOLERANCES[precision]
        agreement = t.min_agreement if min_agreement is None or t.min_agreement is None else min_agreement
        return cls(batches=batches, atol=t.atol, rtol=t.rtol, rel_err=t.rel_err, min_agreement=agreement,
                   precision=precision, **kw)

    def within(self, d: OutputDiff) -> bool:
        """The output is within this precision's tolerance (False for NaN)."""
        if self.atol is not None and not (d.bound <= 1.0 and not math.isnan(d.max_abs)):
            return False
        return self.rel_err is None or (d.rel_err <= self.rel_err and not math.isnan(d.max_abs))

    @property
    def agreement(self) -> Optional[float]:
        """Share of images whose greedy tokens equal PyTorch's (near-ties count as disagreeing); for a
        bundle validated on both its steps (the attention cache), the lower of the two shares."""
        shares = [equal / total for equal, total in self.agreement_by_step().values()]
        return min(shares) if shares else None

    def agreement_by_step(self) -> dict[str, tuple[int, int]]:
        """Per step graph that decoded: (images captioned as PyTorch does, images)."""
        counts: dict[str, tuple[int, int]] = {}
        for b in self.batches:
            equal, total = counts.get(b.step_graph, (0, 0))
            counts[b.step_graph] = (equal + b.equal, total + b.batch_size)
        return counts

    @property
    def ok(self) -> bool:
        within = all(self.within(d) for b in self.batches for d in b.diffs)
        if self.min_agreement is None:
            tokens = all(not b.mismatches and b.generate_equal for b in self.batches)
        else:
            tokens = all(b.generate_equal for b in self.batches) and (self.agreement or 0.0) >= self.min_agreement
        return bool(self.batches) and not self.problems and within and tokens

    def worst(self) -> list[tuple[OutputDiff, int]]:
        """Per (graph, output): the largest differences over all batches, and the batch size of the worst."""
        rows: dict[tuple[str, str], tuple[OutputDiff, int]] = {}
        for b in self.batches:
            for d in b.diffs:
                key = (d.graph, d.output)
                if key not in rows:
                    rows[key] = (OutputDiff(d.graph, d.output, d.max_abs, d.max_rel, d.rel_err, d.bound), b.batch_size)
                    continue
                acc, n = rows[key]
                if not (d.max_abs <= acc.max_abs) and not math.isnan(acc.max_abs):
                    n = b.batch_size
                acc.max_abs, acc.max_rel = _worse(acc.max_abs, d.max_abs), _worse(acc.max_rel, d.max_rel)
                acc.rel_err, acc.bound = _worse(acc.rel_err, d.rel_err), _worse(acc.bound, d.bound)
                rows[key] = (acc, n)
        return list(rows.values())

    def table(self) -> str:
        if self.min_agreement is None:
            lines = [f"parity: bundle (onnxruntime) vs PyTorch, tolerance {self.atol:g} + {self.rtol:g}·|torch| per element"]
        else:
            lines = [f"parity: {self.precision} bundle (onnxruntime) vs PyTorch, tolerance ||diff||/||torch|| <= "
                     f"{self.rel_err:g} per output; captions must agree on >= {self.min_agreement:.0%} of the images"]
        if self.problems:
            return "\n".join(lines + [f"not comparable: {p}" for p in self.problems] + ["result: FAIL"])
        lines += [f"{'graph':<20}{'output':<17}{'max abs':>10}{'max rel':>10}{'rel err':>10}{'of bound':>9}  {'worst N':>7}  result"]
        for d, n in self.worst():
            verdict = "ok" if self.within(d) else "FAIL"
            lines.append(f"{d.graph:<20}{d.output:<17}{d.max_abs:>10.2e}{d.max_rel:>10.2e}{d.rel_err:>10.2e}"
                         f"{f'{d.bound:.2f}' if self.atol is not None else '-':>9}"
                         f"  {n:>7}  {verdict}")
        lines.append(f"{'images':<22}{'step':<20}{'N':>4}{'steps':>7}{'equal':>7}{'near-tie':>10}{'differ':>8}")
        for b in self.batches:
            source = b.source if len(b.source) <= 21 else "…" + b.source[-20:]
            lines.append(f"{source:<22}{b.step_graph:<20}{b.batch_size:>4}{b.steps:>7}{b.equal:>7}{len(b.near_ties):>10}{len(b.mismatches):>8}")
            for m in b.mismatches[:3]:
                lines.append(f"  image {m['index']}: step {m['step']} bundle {m['bundle']} torch {m['torch']} (top-2 gap {m['gap']:.2e})")
            if not b.generate_equal:
                lines.append("  Captioner.generate gave other tokens than the recorded greedy loop")
        if self.min_agreement is not None and self.agreement is not None:
            by_step = self.agreement_by_step()
            for step, (equal, total) in by_step.items():
                verdict = "ok" if equal / total >= self.min_agreement else "FAIL"
                via = f" ({step})" if len(by_step) > 1 else ""
                lines.append(f"caption agreement with PyTorch{via}: {equal}/{total} = {equal / total:.1%} "
                             f"(min {self.min_agreement:.0%}) {verdict}")
        lines.append(f"result: {'PASS' if self.ok else 'FAIL'}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return _finite({"ok": self.ok, "precision": self.precision, "atol": self.atol, "rel_err": self.rel_err,
                        "rtol": self.rtol, "tie_gap": self.tie_gap, "min_agreement": self.min_agreement, "agreement": self.agreement,
                        "images": self.images, "seed": self.seed, "providers": self.providers,
                        "problems": self.problems, "batches": [asdict(b) for b in self.batches]})


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
    scale = np.abs(ref.astype(np.float64))
    norm = float(np.sqrt((scale ** 2).sum()))
    err = float(np.sqrt((delta ** 2).sum()))
    rel_err = err / norm if norm > 0 else (0.0 if err == 0 else math.inf)
    return OutputDiff(graph, name, float(delta.max()), float((delta / (scale + ATOL)).max()), rel_err,
                      float((delta / (ATOL + RTOL * scale)).max()))


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
        old.rel_err, old.bound = _worse(old.rel_err, d.rel_err), _worse(old.bound, d.bound)


def compare_batch(captioner, model, images: np.ndarray, source: str) -> BatchResult:
    """Run uint8 images (N, 3, S, S) through the bundle's greedy decoder and through PyTorch."""
    vocab, max_length = captioner.vocab, captioner.manifest.max_length
    step_graph = getattr(captioner, "step_graph", "decoder_step")
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
        if "attention_keys" in encoded:  # the attention cache in use: its outputs, then its step's
            for name, value in model.attention_cache(ref_encoded["features"]).items():
                diffs.append(_diff("attention_cache", name, encoded[name], value.numpy()))
        # PyTorch follows the bundle's tokens from its own state: the carried state is compared as well.
        state = {STATE_FROM_ENCODER[k]: v for k, v in ref_encoded.items()}
        for token, got in records:
            ref = model.step(torch.from_numpy(token), **state)
            for name, value in ref.items():
                _merge(step_diffs, _diff(step_graph, name, got[name], value.numpy()))
            ref_logits.append(ref["logits"].numpy())  # (N, V)
            state.update({STATE_FROM_STEP[k]: v for k, v in ref.items() if k in STATE_FROM_STEP})
        ref_tokens = model.sample(torch.from_numpy(images), max_length=max_length).numpy()  # (N, L)
    diffs.extend(step_diffs.values())

    result = BatchResult(source=source, batch_size=len(images), steps=len(records), diffs=diffs, equal=0,
                         generate_equal=generate_equal, step_graph=step_graph)
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
    """The image files under `directory` by captool's one rule (captool.inputs.find_images: recursive,
    sorted, each real file once through links, names starting with "." skipped)."""
    from captool.inputs import find_images

    root = Path(directory)
    try:
        files = find_images(root)
    except (FileNotFoundError, NotADirectoryError):
        raise ExportError(f"--images {root}: not a directory; pass a folder of images") from None
    except OSError as e:
        raise ExportError(f"--images {root}: cannot list it ({e.strerror or e}); pass a folder you can read") from None
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


def real_batches(n: int, sizes: Sequence[int] = BATCH_SIZES) -> list[slice]:
    """Slices of n images: the batch sizes first (proving the batch axis dynamic), then IMAGE_CHUNKs."""
    out, start = [], 0
    for size in list(sizes) + [IMAGE_CHUNK] * n:
        if start >= n:
            break
        out.append(slice(start, min(n, start + size)))
        start += size
    return out


def verify_bundle(bundle_dir: str | Path, checkpoint, *, images: str | Path | None = None,
                  batch_sizes: Sequence[int] = BATCH_SIZES, seed: int = 0, real=None,
                  min_agreement: Optional[float] = None) -> ParityReport:
    """Validate a bundle against the PyTorch model of `checkpoint` (run dir, model file or the model).

    fp32: random uint8 images at each batch size (seeded), plus the images under `images` if given.
    fp16/int8: real images only, with the precision's tolerance and caption agreement: `real` (an
    ImageSet), else those under `images`, else the validation images the manifest records;
    `min_agreement` replaces the precision's default share.
    Raises BundleError if the bundle does not load; a bundle of another model gives a failed report.
    """
    from captool.captioner import Captioner

    model = load_model(checkpoint)
    captioner = Captioner(bundle_dir, device="cpu", attention_cache=False)
    precision = captioner.manifest.precision
    if precision not in TOLERANCES:
        raise ExportError(f"{bundle_dir}: precision {precision!r} is not one this captool validates "
                          f"({', '.join(TOLERANCES)}); install the captool that wrote it")
    if precision != "fp32" and real is None:
        real = recorded_validation_images(captioner.manifest, images)
    files = image_files(images) if images is not None and real is None else []
    differences = mismatched(captioner.manifest, model)
    if differences:
        problem = (f"{bundle_dir} was not exported from this checkpoint ({'; '.join(differences)}): "
                   f"pass the run dir it came from")
        return ParityReport.for_precision(precision, [], min_agreement, seed=seed,
                                          providers=list(captioner.providers), problems=[problem])
    size = captioner.manifest.image_size
    # Each step the runtime may decode with is proven: decoder_step.onnx, and the attention cache's.
    decoders = [captioner]
    if captioner.manifest.has_attention_cache:
        decoders.append(Captioner(bundle_dir, device="cpu", attention_cache=True))
    batches = []
    for decoder in decoders:
        if precision == "fp32":
            rng = np.random.default_rng(seed)
            batches += [compare_batch(decoder, model, random_images(n, size, rng), "random") for n in batch_sizes]
        for start in range(0, len(files), IMAGE_CHUNK):
            chunk = np.stack([preprocess(p, size) for p in files[start:start + IMAGE_CHUNK]])  # (n, 3, S, S)
            batches.append(compare_batch(decoder, model, chunk, str(images)))
        if real is not None:
            # Random noise says nothing about a quantized model: its activation ranges come from real images.
            for part in real_batches(len(real.images), batch_sizes):
                batches.append(compare_batch(decoder, model, real.images[part], real.source))
    return ParityReport.for_precision(precision, batches, min_agreement, seed=seed,
                                      providers=list(captioner.providers),
                                      images=real.describe() if real is not None else None)


def recorded_validation_images(manifest, images: str | Path | None):
    """A quantized bundle's validation images: those under `images`, else the ones its manifest names."""
    from .calibration import VALIDATION_IMAGES, load_images

    size = manifest.image_size
    if images is not None:
        return load_images(images, split="val", count=VALIDATION_IMAGES, size=size, option="--images")
    entry = (manifest.raw.get("quantization") or {}).get("validation") or {}
    path, split, count = entry.get("path"), entry.get("split") or "val", entry.get("images", VALIDATION_IMAGES)
    if not path or not Path(path).exists():
        raise ExportError(f"{manifest.root} is a {manifest.precision} bundle, validated on real images, and the "
                          f"images it was validated on ({path or 'not recorded'}) are not here; pass --images DIR")
    return load_images(path, split=split, count=int(count), size=size, option="--images")
