"""Proving a bundle equal to its PyTorch model: every output within float32 rounding, then tokens, exactly.

fp32: each row of each output may differ from PyTorch by at most ROUNDING_FACTOR times the rounding
error float32 makes on that row, measured against the same model run in float64 (docs/export.md has
the measurements): PyTorch's own float32 error, or, where larger, the spread of ROUNDING_SAMPLES runs
of the float64 model with every arithmetic result rounded at random to float32's precision. The first
carries the output's scale, the fan-in of every product that fed it and the error carried across
steps; the second, how much the model amplifies rounding (a nearly hard attention softmax, a state
that drifts apart over steps), which one float32 run may by chance not show. One rule fits tiny and
large models.
fp16 and int8 bundles are held to the relative error their precision allows and, instead of token
identity, to caption agreement: the share of real images whose greedy caption equals PyTorch's.

The bundle side is the runtime itself: `Captioner.encode`/`.step` decoded by `captool.decode.greedy`,
with the step wrapped only to record what it returned. The PyTorch side follows the same tokens from
its own encoder state, so the state carried across steps is compared too, and `model.sample` gives
the reference captions.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from captool.bundle import STATE_FROM_ENCODER, STATE_FROM_STEP
from captool.decode import greedy
from captool.errors import CaptoolError
from captool.preprocess import IMAGE_EXTENSIONS

ROUNDING_FACTOR = 8.0  # fp32: bundle vs PyTorch within this many times float32's rounding on the row
STEP_DEPTH = 4.0  # ... times this for the step graphs: their state errors are carried along the trajectory
STEP_GRAPHS = ("decoder_step", "decoder_step_cached")
ATOL = 0.0  # fp32: absolute slack added to every row's bound (the rule is relative to scale alone by default)
UNIT_ROUNDOFF = 2.0 ** -24  # float32: even a correctly rounded result is off by up to this share of its value
ROUNDING_SAMPLES = 4  # float64 runs with float32-sized random rounding: how much the model amplifies rounding
TIE_GAP = 1e-5  # PyTorch's top two logits closer than this (or than twice the row's fp32 logits bound): a near-tie
BATCH_SIZES = (1, 3, 17)  # other than the trace batch (2), to prove the batch axis dynamic
IMAGE_CHUNK = 32  # user images are validated in batches of this many


@dataclass(frozen=True)
class Tolerance:
    """How close a bundle of one precision must be to PyTorch (docs/export.md has the measurements).

    fp32: in every row of every output (at every step), max |bundle - torch| at most
    `atol` + `rounding_factor` * e (the step graphs: STEP_DEPTH times that), e being PyTorch's own
    float32 error scaled to the row, or the sampled spread where larger (`_diff`); every greedy
    sequence identical (near-ties aside).
    fp16/int8: each output's relative error ||bundle - torch|| / ||torch|| (over the batch, at each
    step) at most `rel_err`, and at least `min_agreement` of the (real) images captioned exactly as
    PyTorch captions them. Elementwise bounds suit quantization badly: int8 may flip a few of 512
    state elements by ~1 and still give the same caption.
    """

    atol: Optional[float] = None
    rounding_factor: Optional[float] = None
    rel_err: Optional[float] = None
    min_agreement: Optional[float] = None

    def describe(self) -> str:
        if self.rounding_factor is not None:
            return (f"per row: max |diff| <= {self.atol:g} + {self.rounding_factor:g} x float32's rounding there "
                    f"(PyTorch's own vs float64, or the sampled spread where larger), x {STEP_DEPTH:g} for the step graphs")
        return f"||diff||/||torch|| <= {self.rel_err:g} per output"


TOLERANCES = {
    "fp32": Tolerance(atol=ATOL, rounding_factor=ROUNDING_FACTOR),
    "fp16": Tolerance(rel_err=0.02, min_agreement=0.98),
    "int8": Tolerance(rel_err=0.25, min_agreement=0.85),
}


def tolerance_for(precision: str, *, atol: Optional[float] = None, rounding_factor: Optional[float] = None,
                  rel_err: Optional[float] = None, min_agreement: Optional[float] = None) -> Tolerance:
    """TOLERANCES[precision] with the user's overrides (--atol, --rounding-factor: fp32 graphs;
    --rel-err, --min-agreement: fp16/int8); an option that does not apply to the precision is ignored."""
    for option, value, zero_ok in (("--atol", atol, True), ("--rounding-factor", rounding_factor, False),
                                   ("--rel-err", rel_err, False)):
        if value is not None and not (math.isfinite(value) and (value > 0 or (zero_ok and value == 0))):
            raise ExportError(f"{option} must be a finite number {'>= 0' if zero_ok else '> 0'}, got {value}")
    if min_agreement is not None and not 0.0 <= min_agreement <= 1.0:
        raise ExportError(f"--min-agreement must be a share between 0 and 1, got {min_agreement}")
    t = TOLERANCES[precision]
    if t.rounding_factor is not None:
        return replace(t, atol=t.atol if atol is None else atol,
                       rounding_factor=t.rounding_factor if rounding_factor is None else rounding_factor)
    return replace(t, rel_err=t.rel_err if rel_err is None else rel_err,
                   min_agreement=t.min_agreement if min_agreement is None else min_agreement)


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
    max_rel: float  # per row: max |bundle - torch| / max |torch|, the worst row
    rel_err: float = 0.0  # ||bundle - torch|| / ||torch|| over the batch (worst step for the decoder step)
    bound: float = 0.0  # the bound's share used, <= 1 to pass (fp32: worst row; fp16/int8: rel_err / its bound)
    rounding: float = 0.0  # fp32, on the worst row: float32's error there, max |torch - float64 torch| or the sampled spread
    sampled: bool = False  # fp32, on the worst row: `rounding` is the randomly rounded runs' spread (the model amplifies it)
    limit: float = 0.0  # fp32, on the worst row: the bound itself, atol + factor * rounding
    factor: float = 0.0  # fp32: the multiple of `rounding` allowed (rounding_factor, x STEP_DEPTH for a step)


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
    atol: Optional[float] = ATOL
    rounding_factor: Optional[float] = ROUNDING_FACTOR  # fp32: the bound is atol + this x PyTorch's float32 rounding
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
                      tolerance: Optional[Tolerance] = None, **kw) -> "ParityReport":
        """The report with `tolerance` (default TOLERANCES[precision]); `min_agreement` overrides its share
        (fp16/int8 only)."""
        t = tolerance or TOLERANCES[precision]
        agreement = t.min_agreement if min_agreement is None or t.min_agreement is None else min_agreement
        return cls(batches=batches, atol=t.atol, rounding_factor=t.rounding_factor, rel_err=t.rel_err,
                   min_agreement=agreement, precision=precision, **kw)

    @property
    def tolerance(self) -> Tolerance:
        return Tolerance(self.atol, self.rounding_factor, self.rel_err, self.min_agreement)

    def within(self, d: OutputDiff) -> bool:
        """The output is within this precision's tolerance (False for NaN)."""
        if math.isnan(d.max_abs) or math.isnan(d.bound):
            return False
        if self.rounding_factor is not None and not d.bound <= 1.0:
            return False
        return self.rel_err is None or d.rel_err <= self.rel_err

    def failure(self) -> str:
        """Why the report fails, in one line: the worst figure against its bound and the option that sets
        it, or the first differing caption; '' when it passes."""
        if self.ok:
            return ""
        if self.problems:
            return self.problems[0]
        failing = [(d, n) for d, n in self.worst() if not self.within(d)]
        if failing:
            d, n = max(failing, key=lambda dn: math.inf if math.isnan(dn[0].bound) else dn[0].bound)
            where = f"{d.graph} {d.output} (N={n})"
            if self.rounding_factor is not None:
                source = "the sampled float32 rounding spread" if d.sampled else "PyTorch's own float32 error"
                return (f"{where}: a row's max |diff| {d.bound * d.limit:.3g} is {d.bound:.3g} x its bound "
                        f"{d.limit:.3g} (= {self.atol:g} + {d.factor:g} x {source} "
                        f"{d.rounding:.3g}); --rounding-factor or --atol set the bound")
            return (f"{where}: ||diff||/||torch|| {d.rel_err:.3g} is above the {self.precision} bound "
                    f"{self.rel_err:g}; --rel-err sets the bound")
        for b in self.batches:
            if b.mismatches:
                m = b.mismatches[0]
                return (f"{b.step_graph} N={b.batch_size} image {m['index']}: the greedy tokens differ from PyTorch's "
                        f"at step {m['step']} (top-2 gap {m['gap']:.2e}, not a near-tie); no option loosens this")
            if not b.generate_equal:
                return f"{b.step_graph} N={b.batch_size}: Captioner.generate gave other tokens than the recorded greedy loop"
        return (f"caption agreement {self.agreement or 0.0:.1%} is below the {self.precision} minimum "
                f"{self.min_agreement:.0%}; --min-agreement sets it")

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
                    rows[key] = (replace(d), b.batch_size)
                    continue
                acc, n = rows[key]
                if not (d.bound <= acc.bound) and not math.isnan(acc.bound):
                    n = b.batch_size  # the batch of the worst share of the bound
                _fold(acc, d)
                rows[key] = (acc, n)
        return list(rows.values())

    def table(self) -> str:
        if self.min_agreement is None:
            lines = [f"parity: bundle (onnxruntime) vs PyTorch, tolerance {self.tolerance.describe()}"]
        else:
            lines = [f"parity: {self.precision} bundle (onnxruntime) vs PyTorch, tolerance ||diff||/||torch|| <= "
                     f"{self.rel_err:g} per output; captions must agree on >= {self.min_agreement:.0%} of the images"]
        if self.problems:
            return "\n".join(lines + [f"not comparable: {p}" for p in self.problems] + ["result: FAIL"])
        lines += [f"{'graph':<20}{'output':<17}{'max abs':>10}{'max rel':>10}{'rel err':>10}{'rounding':>10}"
                  f"{'of bound':>9}  {'worst N':>7}  result"]
        for d, n in self.worst():
            verdict = "ok" if self.within(d) else "FAIL"
            rounding = f"{d.rounding:.2e}{'*' if d.sampled else ''}" if self.rounding_factor is not None else "-"
            lines.append(f"{d.graph:<20}{d.output:<17}{d.max_abs:>10.2e}{d.max_rel:>10.2e}{d.rel_err:>10.2e}"
                         f"{rounding:>10}{d.bound:>9.2f}  {n:>7}  {verdict}")
        if any(d.sampled for d, _ in self.worst()):
            lines.append("* the model amplifies rounding there: the randomly rounded float64 runs' spread set the bound")
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
                        "rounding_factor": self.rounding_factor, "bound": self.tolerance.describe(),
                        "failure": self.failure() or None, "tie_gap": self.tie_gap, "min_agreement": self.min_agreement, "agreement": self.agreement,
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


def _diff(graph: str, name: str, got: np.ndarray, ref: np.ndarray, exact: Optional[np.ndarray] = None,
          tolerance: Tolerance = TOLERANCES["fp32"], spread: Optional[np.ndarray] = None) -> OutputDiff:
    """One output of one call: bundle `got` against PyTorch `ref`, judged per row (axis 0 is the batch).

    fp32 (`exact`: the same output of the float64 model): each row's max |got - ref| against
    atol + rounding_factor * e, e = rho * max |exact| of the row, where rho is PyTorch's own float32
    error relative to scale, max |ref - exact| / max |exact|, at its worst over the batch (at least
    2^-24: a correctly rounded result is that close). Pooling rho over the batch keeps a row whose
    PyTorch error happens to be small from setting a bound float32 cannot promise (docs/export.md).
    `spread` (N,): per row, how far the randomly rounded float64 runs strayed from `exact`; where it is
    larger than rho's figure it is the row's e.
    fp16/int8: rel_err / its bound.
    """
    if got.shape != ref.shape:
        raise ExportError(f"{graph} output {name}: bundle gives shape {list(got.shape)}, PyTorch {list(ref.shape)}")
    if got.size == 0:
        return OutputDiff(graph, name, 0.0, 0.0)
    rows = ref.shape[0]
    delta = np.abs(got.astype(np.float64) - ref.astype(np.float64)).reshape(rows, -1)  # (N, everything else)
    scale = np.abs(ref.astype(np.float64)).reshape(rows, -1)
    err, norm = float(np.sqrt((delta ** 2).sum())), float(np.sqrt((scale ** 2).sum()))
    rel_err = err / norm if norm > 0 else (0.0 if err == 0 else math.inf)
    row_delta, row_scale = delta.max(axis=1), scale.max(axis=1)  # (N,)
    d = OutputDiff(graph, name, float(delta.max()), _worst(_ratio(row_delta, row_scale)), rel_err)
    limits = row_limits(graph, ref, exact, tolerance, spread)
    if limits is not None:
        d.factor, rounding, limit = limits
        ratio = _ratio(row_delta, limit)
        i = int(np.argmax(np.nan_to_num(ratio, nan=math.inf)))
        d.bound, d.rounding, d.limit = float(ratio[i]), float(rounding[i]), float(limit[i])
        d.sampled = spread is not None and bool(spread[i] >= rounding[i] > 0)
    elif tolerance.rel_err is not None:
        d.bound = rel_err / tolerance.rel_err
    return d


def row_limits(graph: str, ref: np.ndarray, exact: Optional[np.ndarray], tolerance: Tolerance,
               spread: Optional[np.ndarray] = None):
    """fp32's per-row bound on max |bundle - torch| for one output: (factor, rounding (N,), limit (N,)),
    or None where the bound is not per row (no float64 twin, or a relative-error tolerance)."""
    if exact is None or tolerance.rounding_factor is None:
        return None
    rows = ref.shape[0]
    exact = exact.astype(np.float64).reshape(rows, -1)
    exact_scale = np.abs(exact).max(axis=1)  # (N,)
    own = np.abs(ref.astype(np.float64).reshape(rows, -1) - exact).max(axis=1)  # (N,)
    rho = max(_worst(_ratio(own, exact_scale)), UNIT_ROUNDOFF)  # PyTorch's relative float32 error
    rounding = rho * exact_scale  # (N,)
    if spread is not None:
        rounding = np.maximum(rounding, spread)  # the model amplifies rounding on these rows
    factor = tolerance.rounding_factor * (STEP_DEPTH if graph in STEP_GRAPHS else 1.0)
    return factor, rounding, tolerance.atol + factor * rounding


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, 0 where both are 0 (an exact zero is within any bound), inf for x / 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(num == 0, 0.0, num / den)


def _worst(x: np.ndarray) -> float:
    return math.nan if np.isnan(x).any() else float(x.max())


def _worse(a: float, b: float) -> float:
    """max() that keeps a NaN: a NaN anywhere must stay the worst value."""
    if math.isnan(a) or math.isnan(b):
        return math.nan
    return max(a, b)


def _fold(acc: OutputDiff, d: OutputDiff) -> None:
    """Fold another call's difference of the same output into `acc`: the worst of each figure, and the
    rounding and bound of the call whose share of the bound is the worst."""
    if not (d.bound <= acc.bound) and not math.isnan(acc.bound):
        acc.rounding, acc.limit, acc.factor, acc.sampled = d.rounding, d.limit, d.factor, d.sampled
    acc.max_abs, acc.max_rel = _worse(acc.max_abs, d.max_abs), _worse(acc.max_rel, d.max_rel)
    acc.rel_err, acc.bound = _worse(acc.rel_err, d.rel_err), _worse(acc.bound, d.bound)


def float64_twin(model):
    """The model in float64: its distance from the float32 model is float32's own rounding error."""
    return copy.deepcopy(model).to(dtype=torch.float64).eval()


# What RandomRounding rounds: torch functions whose result is computed, not copied or selected. Shape
# changes, lookups, clamps and casts from integers are exact in float32 too, and are left alone.
ARITHMETIC = frozenset({
    "add", "sub", "mul", "div", "true_divide", "neg", "__add__", "__radd__", "__sub__", "__rsub__", "__mul__",
    "__rmul__", "__truediv__", "__rtruediv__", "__matmul__", "__rmatmul__", "matmul", "mm", "bmm", "addmm",
    "baddbmm", "einsum", "linear", "conv1d", "conv2d", "batch_norm", "layer_norm", "group_norm", "mean", "sum",
    "softmax", "log_softmax", "sigmoid", "tanh", "exp", "log", "sqrt", "rsqrt", "pow", "__pow__", "hardswish",
    "silu", "gelu", "scaled_dot_product_attention", "addcmul", "lerp"})


class RandomRounding(TorchFunctionMode):
    """Every arithmetic result off by a random share of up to 2^-24 of itself, as one float32 rounding may
    leave it: a float64 model run under this mode is one sample of what float32 could have computed
    (Monte Carlo arithmetic). Run under it several times, the spread of an output against the plain
    float64 run shows how much the model amplifies rounding there. Seeded: a report is reproducible.
    """

    def __init__(self, seed: int):
        super().__init__()
        self.generator = torch.Generator().manual_seed(seed)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))  # this mode is off inside its own __torch_function__
        if (getattr(func, "__name__", "") in ARITHMETIC and isinstance(out, torch.Tensor)
                and out.dtype == torch.float64 and out.numel()):
            noise = torch.empty_like(out).uniform_(-UNIT_ROUNDOFF, UNIT_ROUNDOFF, generator=self.generator)
            out = out.addcmul_(out, noise)  # out (1 + noise), in place: `out` is this call's own new tensor
        return out


def _trajectory(model, features: torch.Tensor, tokens: Sequence[np.ndarray], cached: bool):
    """The model's outputs from the backbone's `features` along the bundle's tokens, from its own state:
    [(graph, {name: tensor})], the encoder's, the attention cache's (`cached`), then one per step ("step")."""
    encoded = model.encode_features(features)  # model.encode(images) is this on extract_features(images)
    calls = [("encoder", encoded)]
    if cached:
        calls.append(("attention_cache", model.attention_cache(encoded["features"])))
    state = {STATE_FROM_ENCODER[k]: v for k, v in encoded.items()}
    for token in tokens:
        out = model.step(torch.from_numpy(token), **state)
        calls.append(("step", out))
        state.update({STATE_FROM_STEP[k]: v for k, v in out.items() if k in STATE_FROM_STEP})
    return calls


def _rounded_runs(exact, features: torch.Tensor, exact_features: torch.Tensor, tokens, cached: bool,
                  samples: int) -> list:
    """`samples` trajectories of the float64 twin under RandomRounding, each from the backbone's float64
    features moved by PyTorch's own float32 error on them, every element's sign drawn at random.

    The backbone is not rerun: it is a feed-forward stack whose error PyTorch's own figure already
    carries, and rerunning it under RandomRounding took 3x the float64 model's time. What the runs
    measure is how the head (projection, attention, the steps) amplifies errors of that size.
    """
    error = features.double() - exact_features  # PyTorch's float32 backbone error, element by element
    runs = []
    for k in range(samples):
        mode = RandomRounding(seed=k)
        sign = torch.randint(0, 2, error.shape, generator=mode.generator, dtype=torch.float64) * 2 - 1
        with mode:
            runs.append(_trajectory(exact, exact_features + sign * error, tokens, cached))
    return runs


def _spreads(exact_calls, sample_runs) -> list[dict[str, np.ndarray]]:
    """Per call and output, per row (N,): max over the sampled runs of max |sample - exact|."""
    spreads = []
    for i, (_, outputs) in enumerate(exact_calls):
        per_output = {}
        for name, value in outputs.items():
            rows = value.shape[0]
            exact = value.numpy().reshape(rows, -1)
            per_output[name] = np.max([np.abs(run[i][1][name].numpy().reshape(rows, -1) - exact).max(axis=1)
                                       for run in sample_runs], axis=0) if value.numel() else np.zeros(rows)
        spreads.append(per_output)
    return spreads


def compare_batch(captioner, model, images: np.ndarray, source: str, *, exact=None,
                  tolerance: Tolerance = TOLERANCES["fp32"], samples: int = ROUNDING_SAMPLES) -> BatchResult:
    """Run uint8 images (N, 3, S, S) through the bundle's greedy decoder and through PyTorch.

    fp32 (`tolerance.rounding_factor` set): `exact`, the model's float64 twin (made here if not given),
    follows the same tokens too, plain and `samples` times under RandomRounding, and sets each row's bound.
    """
    vocab, max_length = captioner.vocab, captioner.manifest.max_length
    step_graph = getattr(captioner, "step_graph", "decoder_step")
    if tolerance.rounding_factor is not None and exact is None:
        exact = float64_twin(model)
    if tolerance.rounding_factor is None:
        exact = None
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

    # PyTorch, its float64 twin and the twin's randomly rounded runs follow the bundle's tokens, each from
    # its own state: the state carried across steps is compared as well.
    cached = "attention_keys" in encoded  # the attention cache in use: its outputs, then its step's
    step_tokens = [token for token, _ in records]
    got_calls = [encoded] + ([encoded] if cached else []) + [got for _, got in records]
    with torch.no_grad():
        x = torch.from_numpy(images)
        features = model.extract_features(x)
        ref_calls = _trajectory(model, features, step_tokens, cached)
        ref_tokens = model.sample(None, max_length=max_length, features=features).numpy()  # (N, L)
        if exact is not None:
            exact_features = exact.extract_features(x)
            exact_calls = _trajectory(exact, exact_features, step_tokens, cached)
            runs = _rounded_runs(exact, features, exact_features, step_tokens, cached, samples)
            spreads = _spreads(exact_calls, runs) if runs else [None] * len(exact_calls)

    diffs: list[OutputDiff] = []
    step_diffs: dict[str, OutputDiff] = {}
    ref_logits = []
    tie_gaps = []  # (N,) per step: a top-2 gap within this is a near-tie (twice the row's logits bound)
    for i, ((graph, ref), got) in enumerate(zip(ref_calls, got_calls)):
        graph = step_graph if graph == "step" else graph
        for name, value in ref.items():
            ref64 = None if exact is None else exact_calls[i][1][name].numpy()
            spread = None if exact is None or spreads[i] is None else spreads[i][name]
            d = _diff(graph, name, got[name], value.numpy(), ref64, tolerance, spread)
            if graph != step_graph:
                diffs.append(d)
            elif name in step_diffs:
                _fold(step_diffs[name], d)
            else:
                step_diffs[name] = d
        if graph == step_graph:
            logits = ref["logits"].numpy()  # (N, V)
            ref_logits.append(logits)
            limits = None if exact is None else row_limits(
                step_graph, logits, exact_calls[i][1]["logits"].numpy(), tolerance,
                None if spreads[i] is None else spreads[i]["logits"])
            tie_gaps.append(np.full(len(images), TIE_GAP) if limits is None else np.maximum(TIE_GAP, 2 * limits[2]))
    diffs.extend(step_diffs.values())

    result = BatchResult(source=source, batch_size=len(images), steps=len(records), diffs=diffs, equal=0,
                         generate_equal=generate_equal, step_graph=step_graph)
    for i, (got_row, ref_row) in enumerate(zip(tokens, ref_tokens)):
        differ = np.flatnonzero(got_row != ref_row)
        if differ.size == 0:
            result.equal += 1
            continue
        t = int(differ[0])  # the prefixes agree up to t, so PyTorch's logits at step t are the ones to judge
        gap, tie = float("inf"), TIE_GAP
        if t < len(ref_logits):
            top2 = np.sort(ref_logits[t][i])[-2:]
            gap, tie = float(top2[1] - top2[0]), float(tie_gaps[t][i])
        # A near-tie: PyTorch's own top two logits closer than the bundle's logits may differ from PyTorch's
        # (twice the row's bound: each of the two may move by it), so rounding alone can flip the choice.
        entry = {"index": i, "step": t, "gap": gap, "tie_gap": tie, "bundle": got_row.tolist(), "torch": ref_row.tolist()}
        (result.near_ties if gap <= tie else result.mismatches).append(entry)
    return result


def merged(chunks: list[BatchResult]) -> BatchResult:
    """A folder's images, validated IMAGE_CHUNK at a time, as one entry of the report: the worst of each
    output's figures, the counts summed, near-ties and mismatches indexed from the folder's first image.
    (Per chunk, 1,000 photos made the manifest's parity 260 kB and `captool run`'s start 4 ms slower.)"""
    first = chunks[0]
    out = replace(first, diffs=[replace(d) for d in first.diffs], near_ties=[], mismatches=[], equal=0, batch_size=0,
                  steps=0)
    by_output = {(d.graph, d.output): d for d in out.diffs}
    for chunk in chunks:
        for d in chunk.diffs if chunk is not first else []:
            _fold(by_output[(d.graph, d.output)], d)
        for key in ("near_ties", "mismatches"):
            getattr(out, key).extend({**m, "index": m["index"] + out.batch_size} for m in getattr(chunk, key))
        out.equal += chunk.equal
        out.batch_size += chunk.batch_size
        out.steps = max(out.steps, chunk.steps)
        out.generate_equal = out.generate_equal and chunk.generate_equal
    return out


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
                  min_agreement: Optional[float] = None, atol: Optional[float] = None,
                  rounding_factor: Optional[float] = None, rel_err: Optional[float] = None) -> ParityReport:
    """Validate a bundle against the PyTorch model of `checkpoint` (run dir, model file or the model).

    fp32: random uint8 images at each batch size (seeded), plus the images under `images` if given.
    fp16/int8: real images only, with the precision's tolerance and caption agreement: `real` (an
    ImageSet), else those under `images`, else the validation images the manifest records;
    `min_agreement` replaces the precision's default share; `atol` and `rounding_factor` the fp32
    bound's, `rel_err` the fp16/int8 relative error's (TOLERANCES has the defaults).
    Raises BundleError if the bundle does not load; a bundle of another model gives a failed report.
    """
    from captool.captioner import Captioner

    model = load_model(checkpoint)
    captioner = Captioner(bundle_dir, device="cpu", attention_cache=False)
    precision = captioner.manifest.precision
    if precision not in TOLERANCES:
        raise ExportError(f"{bundle_dir}: precision {precision!r} is not one this captool validates "
                          f"({', '.join(TOLERANCES)}); install the captool that wrote it")
    tolerance = tolerance_for(precision, atol=atol, rounding_factor=rounding_factor, rel_err=rel_err,
                              min_agreement=min_agreement)
    if precision != "fp32" and real is None:
        real = recorded_validation_images(captioner.manifest, images)
    files = image_files(images) if images is not None and real is None else []
    differences = mismatched(captioner.manifest, model)
    if differences:
        problem = (f"{bundle_dir} was not exported from this checkpoint ({'; '.join(differences)}): "
                   f"pass the run dir it came from")
        return ParityReport.for_precision(precision, [], tolerance=tolerance, seed=seed,
                                          providers=list(captioner.providers), problems=[problem])
    size = captioner.manifest.image_size
    # Each step the runtime may decode with is proven: decoder_step.onnx, and the attention cache's.
    decoders = [captioner]
    if captioner.manifest.has_attention_cache:
        decoders.append(Captioner(bundle_dir, device="cpu", attention_cache=True))
    exact = float64_twin(model) if tolerance.rounding_factor is not None else None
    batches = []
    for decoder in decoders:
        def compare(images_: np.ndarray, source: str) -> BatchResult:
            return compare_batch(decoder, model, images_, source, exact=exact, tolerance=tolerance)

        if precision == "fp32":
            rng = np.random.default_rng(seed)
            batches += [compare(random_images(n, size, rng), "random") for n in batch_sizes]
        chunks = []
        for start in range(0, len(files), IMAGE_CHUNK):
            chunk = np.stack([decoder.preprocess(p) for p in files[start:start + IMAGE_CHUNK]])  # (n, 3, S, S)
            chunks.append(compare(chunk, str(images)))
        batches += [merged(chunks)] if chunks else []
        if real is not None:
            # Random noise says nothing about a quantized model: its activation ranges come from real images.
            parts = [compare(real.images[part], real.source) for part in real_batches(len(real.images), batch_sizes)]
            batches += parts[:len(batch_sizes)] + ([merged(parts[len(batch_sizes):])] if parts[len(batch_sizes):] else [])
    return ParityReport.for_precision(precision, batches, tolerance=tolerance, seed=seed,
                                      providers=list(captioner.providers),
                                      images=real.describe() if real is not None else None)


def recorded_validation_images(manifest, images: str | Path | None):
    """A quantized bundle's validation images: those under `images`, else the ones its manifest names."""
    from .calibration import VALIDATION_IMAGES, load_images

    size = manifest.image_size
    if images is not None:
        return load_images(images, split="val", count=VALIDATION_IMAGES, size=size, option="--images",
                           jpeg_decode=manifest.jpeg_decode)
    entry = (manifest.raw.get("quantization") or {}).get("validation") or {}
    path, split, count = entry.get("path"), entry.get("split") or "val", entry.get("images", VALIDATION_IMAGES)
    if not path or not Path(path).exists():
        raise ExportError(f"{manifest.root} is a {manifest.precision} bundle, validated on real images, and the "
                          f"images it was validated on ({path or 'not recorded'}) are not here; pass --images DIR")
    return load_images(path, split=split, count=int(count), size=size, option="--images",
                       jpeg_decode=manifest.jpeg_decode)
