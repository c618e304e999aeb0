"""`captool bench`: the runtime against the PyTorch model, side by side, and both against the machine's floor.

Every in-process figure is measured interleaved: each repeat times the runtime and then PyTorch (the
order alternating between repeats) on the same images, so machine noise hits both sides alike.
Cold start runs each side as a fresh child process and takes its wall time and peak RSS. The floor
is what the hardware allows: the ONNX graphs' multiply-accumulates (×2 = FLOPs) against this
machine's numpy float32 matmul rate, and their bytes (weights + inputs + outputs) against its copy
bandwidth. Torch is imported only for the PyTorch side.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from captool.bundle import STATE_FROM_ENCODER
from captool.decode import initial_state
from captool.errors import CaptoolError
from captool.evaluation import Sampler, open_model
from .floor import best_rates, cache_level, graph_cost, machine_rates, seconds_of
from captool.preprocess import IMAGE_EXTENSIONS, preprocess
from captool.progress import Progress, phase

# name: (unit, scale from seconds or from the raw value, higher is better)
FIGURES = {
    "caption_b1_median": ("ms", 1e3, False), "caption_b1_p90": ("ms", 1e3, False),
    "throughput_b8": ("images/s", 1.0, True), "throughput_b64": ("images/s", 1.0, True),
    "encoder_b1": ("ms", 1e3, False), "step_b1": ("µs", 1e6, False), "step_b64": ("µs", 1e6, False),
    "cold_start": ("s", 1.0, False), "cold_start_peak_rss": ("MB", 1e-6, False),
}
WARMUP_S = 0.2  # untimed calls per figure and side before timing: at least 2, and at least this long


# ---- timing -----------------------------------------------------------------------------------------



SETTLE_CALLS, BLOCK_CALLS = 3, 3  # per side and repeat, for the short calls


def interleaved(pairs: dict[str, tuple[Callable, Optional[Callable]]], repeats: dict[str, int],
                settle: tuple[str, ...] = (), warmup: int = 2,
                progress: Callable[[int], None] = lambda n: None) -> dict[str, tuple[list[float], list[float]]]:
    """Seconds per call of each (runtime, pytorch) pair; PyTorch goes first on odd repeats (`progress(1)` after each).

    The first calls after a switch of sides pay for the other side: its worker threads still spin
    (torch's OpenMP pool for tens of milliseconds) and the caches hold its weights. Measured on the
    shipped model, one call after the switch: onnxruntime's encoder 1.18 ms against 0.58 ms in a
    row, PyTorch's 8.4 ms against 4.4 ms. So each side of a short call named in `settle` runs a
    block: SETTLE_CALLS untimed calls, then BLOCK_CALLS timed ones, the steady state of a stream
    of images, while the blocks still alternate.
    """
    times: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in pairs}
    for name, (rt, pt) in pairs.items():
        for fn in (rt, pt):  # first calls allocate, plan kernels and fill caches
            started, calls = time.perf_counter(), 0
            while fn is not None and (calls < warmup or time.perf_counter() - started < WARMUP_S) and calls < 10:
                fn(0)
                calls += 1
        for r in range(repeats[name]):
            sides = [(0, rt), (1, pt)] if r % 2 == 0 else [(1, pt), (0, rt)]
            for side, fn in sides:
                if fn is None:
                    continue
                if name not in settle:
                    times[name][side].append(seconds_of(lambda: fn(r)))
                    continue
                for _ in range(SETTLE_CALLS):
                    fn(r)
                for k in range(BLOCK_CALLS):
                    times[name][side].append(seconds_of(lambda: fn(r + k)))
            progress(1)
    return times


def _calls(generate: Callable, encode: Callable, prepare_step: Callable, images: np.ndarray, batch64: np.ndarray,
           start_id: int, as_input: Callable = lambda a: a, context: Callable = contextlib.nullcontext) -> dict:
    """The timed calls of one side, `fn(repeat)`; batch 1 goes through the images one by one.

    prepare_step(feeds) -> a call running one decoder step on those feeds, as the side's greedy loop does.
    """
    n = len(images)
    singles = [as_input(images[i:i + 1]) for i in range(n)]  # n × (1,3,S,S)
    b8, b64 = as_input(batch64[:8]), as_input(batch64)
    with context():
        feeds = {b: {"token": as_input(np.full((len(x),), start_id, dtype=np.int64)), **initial_state(encode(x))}
                 for b, x in ((1, singles[0]), (64, b64))}
        steps = {b: prepare_step(f) for b, f in feeds.items()}
    calls = {"caption_b1": lambda r: generate(singles[r % n]), "caption_b8": lambda r: generate(b8),
             "caption_b64": lambda r: generate(b64), "encoder_b1": lambda r: encode(singles[r % n]),
             "step_b1": lambda r: steps[1](), "step_b64": lambda r: steps[64]()}

    def in_context(fn):
        def call(r):
            with context():
                return fn(r)
        return call

    return {name: in_context(fn) for name, fn in calls.items()}


def _side_calls(sampler: Sampler, images: np.ndarray, batch64: np.ndarray, max_length: int) -> dict:
    start = sampler.vocab.start_id
    if sampler.kind == "bundle":
        c = sampler.model
        return _calls(c.generate, c.encode, partial(_runtime_step, c), images, batch64, start)
    from captool.training.reference import bench_calls

    torch_side = bench_calls(sampler.model, max_length)
    return _calls(torch_side["generate"], torch_side["encode"], lambda feeds: partial(torch_side["step"], feeds),
                  images, batch64, start, as_input=torch_side["as_input"], context=torch_side["context"])


def _runtime_step(captioner, feeds: dict) -> Callable:
    """The step as the runtime's greedy loop runs it (`Captioner.decoding_step`), on these feeds."""
    step = captioner.decoding_step({STATE_TO_ENCODER.get(name, name): value for name, value in feeds.items()
                                    if name != "token"})
    step.tokens[:] = feeds["token"]
    return step


# The encoder's output names of the step's state inputs (h <- h0, c <- c0; the rest keep their names).
STATE_TO_ENCODER = {step: encoder for encoder, step in STATE_FROM_ENCODER.items()}


# ---- cold start: whole processes ----------------------------------------------------------------

# Runs one job from a small, fresh process: on Linux a child's peak RSS starts at its parent's (fork
# and exec carry the high-water mark over), so measuring straight from this process, which holds
# torch, would report torch's memory for every job.
_LAUNCHER = """import os, sys, time
start = time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.execv(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{time.perf_counter() - start} {usage.ru_maxrss} {os.waitstatus_to_exitcode(status)}")
"""


def run_child(argv: list[str]) -> tuple[float, Optional[int], str]:
    """Wall seconds, peak RSS in bytes (None where the OS cannot say) and stdout of one job's process."""
    with tempfile.TemporaryDirectory() as tmp:
        figures, out, err = Path(tmp) / "figures", Path(tmp) / "stdout", Path(tmp) / "stderr"
        with open(out, "wb") as stdout, open(err, "wb") as stderr:
            if hasattr(os, "fork") and hasattr(os, "wait4"):
                launch = [sys.executable, "-S", "-c", _LAUNCHER, str(figures)] + argv
                code = subprocess.run(launch, stdout=stdout, stderr=stderr).returncode
                wall, rss, code = (float(x) for x in figures.read_text().split()) if code == 0 else (0, 0, code)
                rss = int(rss) * (1 if sys.platform == "darwin" else 1024)  # Linux reports KiB
            else:
                wall = seconds_of(lambda: subprocess.run(argv, stdout=stdout, stderr=stderr))
                rss, code = None, 0
        if code != 0:
            tail = err.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise CaptoolError(f"cold-start job failed (exit {int(code)}): {' '.join(argv[:4])}…: {tail[0]}")
        return wall, rss, out.read_text(errors="replace")


def cold_start(bundle: Path, checkpoint: Optional[Path], image: Path, repeats: int,
               progress: Callable[[int], None] = lambda n: None) -> dict:
    """Median wall time and peak RSS of `captool run IMAGE --model BUNDLE` vs a PyTorch script doing the same."""
    jobs = {"runtime": [sys.executable, "-m", "captool.cli", "run", str(image), "--model", str(bundle),
                        "--device", "cpu", "--json"]}
    if checkpoint is not None:  # training/reference.py: import torch + torchvision, load, preprocess, sample
        jobs["pytorch"] = [sys.executable, "-m", "captool.training.reference", str(checkpoint), str(image)]
    runs: dict[str, list] = {side: [] for side in jobs}
    for r in range(repeats):
        for side in (list(jobs) if r % 2 == 0 else list(jobs)[::-1]):
            runs[side].append(run_child(jobs[side]))
            progress(1)
    result = {side: {"seconds": float(np.median([w for w, _, _ in rs])),
                     "peak_rss": max((m for _, m, _ in rs if m is not None), default=None)}
              for side, rs in runs.items()}
    if checkpoint is not None:
        caption = json.loads(runs["runtime"][0][2].splitlines()[0]).get("caption")
        result["captions_agree"] = caption == runs["pytorch"][0][2].strip()
    return result


# ---- the whole benchmark -------------------------------------------------------------------------


def bench_images(count: int, size: int, image_dir: Optional[Path] = None, jpeg_decode: str = "full") -> np.ndarray:
    """uint8 [count,3,S,S]: the first images of `image_dir` (JPEGs decoded by the bundle's rule), or
    `captool synth` val scenes (seed 0)."""
    if count < 1:
        raise CaptoolError(f"--images must be >= 1, got {count}")
    if image_dir is not None:
        from captool.inputs import find_images  # captool's one rule: recursive, sorted, each real file once

        try:
            files = find_images(image_dir)[:count]
        except OSError as e:
            raise CaptoolError(f"{image_dir}: cannot list it ({e.strerror or e}); pass a folder of images") from None
        if not files:
            raise CaptoolError(f"{image_dir}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
        return np.stack([preprocess(p, size, jpeg_decode) for p in files])
    from captool.datasets.synth import generate

    return np.stack([preprocess(image, size) for image, _, _ in generate(0, "val", count)])  # (N,3,S,S)


def _check_same_model(runtime: Sampler, pytorch: Sampler) -> None:
    dims, config = runtime.model.manifest.raw.get("dims", {}), pytorch.model.config
    differ = [k for k in ("hidden_dim", "wordvec_dim", "vocab_size", "input_dim")
              if k in dims and dims[k] != getattr(config, k)]
    if runtime.model.manifest.cell_type != config.cell_type or differ or \
            runtime.vocab.idx_to_token != pytorch.vocab.idx_to_token:
        raise CaptoolError(f"{runtime.path} and {pytorch.path} are not the same model (they differ in "
                           f"{', '.join(differ) or 'cell type or vocabulary'}); bench a bundle against the "
                           f"checkpoint it was exported from")


def _summary(seconds: list[float]) -> tuple[float, float]:
    return float(np.median(seconds)), float(np.percentile(seconds, 90))


def bench(bundle: str | Path, checkpoint: Optional[str | Path] = None, *, images: int = 16,
          repeats: int = 20, cold: bool = True, cold_repeats: int = 3, threads: Optional[int] = None,
          image_dir: Optional[Path] = None, rates: Optional[dict] = None,
          pipeline: Optional[dict[str, int]] = None, pipeline_batch: int = 64, against: Sequence[str] = (),
          against_bundle: Optional[Path] = None) -> dict:
    """Every figure for the runtime (and PyTorch where `checkpoint` is given), as one JSON-able dict.

    `repeats` times each per-call figure; the batch-8 and batch-64 captions get a fifth of that (at
    least 3). `rates` replaces the machine measurement (tests pass small sizes). `pipeline`: image
    counts per kind (captool.benchmarks.pipeline.KINDS) for the pipeline section, None to skip it;
    `against`: contenders (captool.benchmarks.contenders.CONTENDERS) measured beside captool, on the graphs
    of `against_bundle` where given (another bundle of the same model), else on the benched bundle's.
    """
    if repeats < 2 or cold_repeats < 1:
        raise CaptoolError(f"--repeats must be >= 2 and --cold-repeats >= 1, got {repeats} and {cold_repeats}")
    runtime = open_model(bundle, device="cpu", threads=threads)
    if runtime.kind != "bundle":
        raise CaptoolError(f"{bundle}: `captool bench` takes a bundle first; pass the checkpoint with --checkpoint")
    pytorch = open_model(checkpoint, threads=threads) if checkpoint is not None else None
    if pytorch is not None:
        _check_same_model(runtime, pytorch)
    if against:
        from .contenders import parse_against

        against = parse_against(",".join(against))  # unknown names refused before anything is timed
    sampled = [] if rates is not None else [machine_rates()]  # the rates: best of before and after the figures
    pixels = bench_images(images, runtime.image_size, image_dir, runtime.jpeg_decode)
    batch64 = np.concatenate([pixels] * (64 // len(pixels) + 1))[:64]  # (64,3,S,S), images repeated
    counts = {name: repeats for name in ("caption_b1", "encoder_b1", "step_b1", "step_b64")}
    counts.update(caption_b8=max(3, repeats // 5), caption_b64=max(3, repeats // 5))
    rt_calls = _side_calls(runtime, pixels, batch64, runtime.max_length)
    pt_calls = _side_calls(pytorch, pixels, batch64, runtime.max_length) if pytorch else {}
    with Progress("bench: per-call figures", total=sum(counts.values()), unit="repeats") as bar:
        times = interleaved({k: (rt_calls[k], pt_calls.get(k)) for k in rt_calls}, counts,
                            settle=("caption_b1", "caption_b8", "encoder_b1", "step_b1", "step_b64"),
                            progress=bar.update)
        bar.finish()

    sides = ("runtime", "pytorch") if pytorch else ("runtime",)
    values: dict[str, dict[str, float]] = {}
    for i, side in enumerate(sides):
        t = {name: ts[i] for name, ts in times.items()}
        median, p90 = _summary(t["caption_b1"])
        values[side] = {"caption_b1_median": median, "caption_b1_p90": p90,
                        "throughput_b8": 8 / _summary(t["caption_b8"])[0],
                        "throughput_b64": 64 / _summary(t["caption_b64"])[0],
                        **{k: _summary(t[k])[0] for k in ("encoder_b1", "step_b1", "step_b64")}}
    report: dict = {"bundle": str(bundle), "checkpoint": str(checkpoint) if checkpoint else None,
                    "cell_type": runtime.model.manifest.cell_type,
                    "precision": runtime.model.manifest.precision,
                    "step_graph": runtime.model.step_graph,
                    "settings": {"images": len(pixels), "repeats": counts, "cold_repeats": cold_repeats if cold else 0,
                                 "threads": threads}}
    if pytorch is not None:
        agree = np.array_equal(rt_calls["caption_b64"](0), pt_calls["caption_b64"](0).numpy())
        report["tokens_agree_b64"] = bool(agree)
    if cold:
        with tempfile.TemporaryDirectory() as tmp:
            image = Path(tmp) / "one.png"
            from PIL import Image

            Image.fromarray(pixels[0].transpose(1, 2, 0)).save(image)  # (3,S,S) -> (S,S,3)
            with Progress("bench: cold start", total=cold_repeats * len(sides), unit="processes") as bar:
                started = cold_start(Path(bundle), Path(checkpoint) if checkpoint else None, image, cold_repeats,
                                     progress=bar.update)
                bar.finish()
        for side in sides:
            values[side]["cold_start"] = started[side]["seconds"]
            if started[side]["peak_rss"] is not None:
                values[side]["cold_start_peak_rss"] = started[side]["peak_rss"]
        if "captions_agree" in started:
            report["cold_start_captions_agree"] = started["captions_agree"]
    if against:
        from .contenders import against as measure_against

        graphs = open_model(against_bundle, device="cpu", threads=threads).model if against_bundle else None
        report["against"] = measure_against(runtime.model, list(against), pixels, batch64,
                                            checkpoint=Path(checkpoint) if checkpoint else None, threads=threads,
                                            repeats=repeats, interleaved=interleaved, graphs=graphs)
    if pipeline is not None:
        from .pipeline import pipeline as measure_pipeline

        report["pipeline"] = measure_pipeline(runtime.model, counts=pipeline, batch_size=pipeline_batch,
                                              repeats=max(2, repeats // 5))
    report["figures"] = _figures(values)
    with phase("bench: this machine's compute and memory rates"):
        report["machine"] = _machine(runtime, pytorch, rates or best_rates(*sampled, machine_rates()))
    report["floor"] = _floor(runtime, values["runtime"], report["machine"])
    return report


def _figures(values: dict[str, dict[str, float]]) -> dict:
    """Per figure: unit, runtime, pytorch, and ratio (above 1 the runtime is better by that factor)."""
    out = {}
    for name, (unit, scale, higher_better) in FIGURES.items():
        if name not in values["runtime"]:
            continue
        rt, pt = values["runtime"][name], values.get("pytorch", {}).get(name)
        ratio = None if pt is None else (rt / pt if higher_better else pt / rt)
        out[name] = {"unit": unit, "runtime": rt * scale, "pytorch": None if pt is None else pt * scale,
                     "ratio": ratio}
    return out


def _machine(runtime: Sampler, pytorch: Optional[Sampler], rates: dict) -> dict:
    import onnxruntime

    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__, "providers": runtime.model.providers, **rates}
    if pytorch is not None:
        from captool.training.reference import versions

        info.update(versions())
    return info


def _floor(runtime: Sampler, measured: dict, machine: dict) -> dict:
    """Encoder and decoder step against the compute floor (FLOPs) and memory floor (weights + I/O bytes)."""
    captioner = runtime.model
    step = captioner.step_path  # the step greedy runs: decoder_step_cached.onnx where the bundle has it
    out = {}
    for name, path, batch in (("encoder_b1", captioner.manifest.encoder_path, 1), ("step_b1", step, 1),
                              ("step_b64", step, 64)):
        try:
            cost = graph_cost(path, batch)
        except ImportError:
            return {"skipped": "the floor reads the ONNX graphs with the onnx package: pip install onnx"}
        compute = cost.flops / machine["matmul_flops"]
        memory = (cost.weight_bytes + cost.io_bytes) / machine["copy_bytes_per_s"]
        floor = max(compute, memory)
        level = cache_level(cost.weight_bytes + cost.io_bytes, machine.get("caches", {}))
        out[name] = {"macs": cost.macs, "flops": cost.flops, "weight_bytes": cost.weight_bytes,
                     "io_bytes": cost.io_bytes, "activation_bytes": cost.activation_bytes,
                     "compute_floor_s": compute, "memory_floor_s": memory,
                     "bound": "compute" if compute >= memory else "memory",
                     "measured_s": measured[name], "x_from_floor": measured[name] / floor,
                     "cache_level": level,  # the smallest cache that holds the weights + I/O (None: DRAM)
                     "cache_floor_s": None if level is None else
                     (cost.weight_bytes + cost.io_bytes) / machine["caches"][level]["copy_bytes_per_s"],
                     "uncounted": cost.uncounted}
    return out


# ---- output ------------------------------------------------------------------------------------------


def _below_floor(f: dict, machine: dict) -> str:
    """Why a figure beat its floor, naming the cache level that explains it."""
    moved = (f["weight_bytes"] + f["io_bytes"]) / 1e6
    level = f.get("cache_level")
    size = machine.get("caches", {}).get(level, {}).get("bytes", 0) / 1e6
    if f["bound"] == "memory":
        if level is None:
            return (f" (below it, yet its {moved:.3g} MB fit no cache level: the copy rate was sampled low, "
                    f"samples {_spread(machine.get('copy_samples'), 1e9)} GB/s; rerun on a quiet machine)")
        return (f" (below it: its {moved:.3g} MB of weights and I/O stay in {level} ({size:.3g} MB) between calls, so "
                f"the DRAM floor does not bind; from {level} ({machine['caches'][level]['copy_bytes_per_s'] / 1e9:.3g} "
                f"GB/s) the floor is {f['cache_floor_s'] * 1e6:.3g} µs, the compute floor "
                f"{f['compute_floor_s'] * 1e6:.3g} µs)")
    where = f"in {level} ({size:.3g} MB)" if level else "beyond every cache level"
    return (f" (below it: the reference matmul's operands (3 × 4 MB, n = 1024) stream from L3, this graph's "
            f"{moved:.3g} MB sit {where}; matmul samples {_spread(machine.get('matmul_samples'), 1e9)} GFLOP/s)")


def _spread(samples: Optional[list], scale: float) -> str:
    return "-" if not samples else f"{min(samples) / scale:.3g}–{max(samples) / scale:.3g}"


def _fmt(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def table(report: dict) -> str:
    """The report as text: figures side by side, then the floor."""
    m = report["machine"]
    lines = [f"bundle {report['bundle']} ({report['cell_type']}, {report['precision']}, "
             f"{report.get('step_graph', 'decoder_step')})"
             + (f" vs checkpoint {report['checkpoint']}" if report["checkpoint"] else ""),
             f"machine: {m['cpu']}, {m['cores']} cores; matmul {m['matmul_flops'] / 1e9:.1f} GFLOP/s, "
             f"copy {m['copy_bytes_per_s'] / 1e9:.1f} GB/s (best of {len(m.get('matmul_samples', [])) or 1} samples: "
             f"{_spread(m.get('matmul_samples'), 1e9)} GFLOP/s); onnxruntime {m['onnxruntime']}"
             + (f", torch {m['torch']} ({m['torch_threads']} threads)" if "torch" in m else ""),
             "", f"{'figure':<22}{'unit':<10}{'runtime':>10}{'pytorch':>10}{'runtime better by':>19}"]
    for name, f in report["figures"].items():
        ratio = "-" if f["ratio"] is None else f"{f['ratio']:.2f}×"
        lines.append(f"{name:<22}{f['unit']:<10}{_fmt(f['runtime']):>10}{_fmt(f['pytorch']):>10}{ratio:>19}")
    for key in ("tokens_agree_b64", "cold_start_captions_agree"):
        if key in report:
            lines.append(f"{key}: {'yes' if report[key] else 'NO'}")
    if "pipeline" in report:
        from .pipeline import pipeline_lines

        lines += ["", *pipeline_lines(report["pipeline"])]
    if "against" in report:
        from .contenders import against_lines

        lines += ["", *against_lines(report["against"])]
    lines.append("")
    floor = report["floor"]
    if "skipped" in floor:
        return "\n".join(lines + [f"floor: skipped ({floor['skipped']})"])
    for name, f in floor.items():
        limit = max(f["compute_floor_s"], f["memory_floor_s"])
        lines.append(f"{name}: {f['flops'] / 1e6:.3g} MFLOP, {(f['weight_bytes'] + f['io_bytes']) / 1e6:.3g} MB; "
                     f"runtime {f['measured_s'] * 1e3:.3g} ms vs floor {limit * 1e3:.3g} ms: "
                     f"{f['x_from_floor']:.1f}× from the {f['bound']} floor"
                     + (_below_floor(f, m) if f["x_from_floor"] < 1 else ""))
    return "\n".join(lines)


def plot(report: dict, path: str | Path) -> None:
    """A PNG, one panel per unit: per-call times (log scale, floor dashed), throughput, cold start, memory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figs, floor = report["figures"], report["floor"]
    panels = [("time per call (ms, log)", ["caption_b1_median", "caption_b1_p90", "encoder_b1", "step_b1", "step_b64"]),
              ("throughput (images/s)", ["throughput_b8", "throughput_b64"]),
              ("cold start (s)", ["cold_start"]), ("cold-start peak RSS (MB)", ["cold_start_peak_rss"])]
    panels = [(title, [n for n in names if n in figs]) for title, names in panels]
    panels = [(title, names) for title, names in panels if names]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels) + 2, 4.2),
                             gridspec_kw={"width_ratios": [len(names) + 1 for _, names in panels]})
    for ax, (title, names) in zip(np.atleast_1d(axes), panels):
        to_ms = [1e-3 if figs[n]["unit"] == "µs" else 1.0 for n in names] if "ms" in title else [1.0] * len(names)
        x = np.arange(len(names))
        for offset, side in ((-0.2, "runtime"), (0.2, "pytorch")):
            if figs[names[0]][side] is not None:
                ax.bar(x + offset, [figs[n][side] * k for n, k in zip(names, to_ms)], width=0.4, label=side)
        if "ms" in title:
            ax.set_yscale("log")
            marks = [(i, floor[n]) for i, n in enumerate(names) if n in floor]
            for i, f in marks:
                ax.hlines(max(f["compute_floor_s"], f["memory_floor_s"]) * 1e3, i - 0.4, i + 0.4,
                          colors="black", linestyles="dashed", label="floor" if i == marks[0][0] else None)
        ax.set_xticks(x, [n.replace("_", " ").replace("caption ", "") for n in names], fontsize=7, rotation=20)
        ax.set_title(title, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(f"captool bench: {report['bundle']} ({report['machine']['cpu']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
