"""`captool bench --against`: other engines on the same model and images, interleaved with captool.

Each contender is measured only where its package is installed (a missing one is reported as
skipped, with the install line), runs the same greedy loop (`captool.decode.greedy`) over its own
engine, and is checked to give captool's tokens: a contender that is faster but captions
differently is reported as such, never as a win.

- `onnxruntime`: the bundle's encoder.onnx and decoder_step.onnx in plain InferenceSessions with
  onnxruntime's default options, fed dicts (what a user writes first).
- `openvino`: the same two ONNX graphs compiled by OpenVINO for its CPU plugin, once with
  INFERENCE_PRECISION_HINT f32 and once bf16 (OpenVINO's default on CPUs with bf16 instructions).
- `torch-compile`: the checkpoint's `encode` and `step` under `torch.compile` (needs --checkpoint).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from captool.decode import greedy
from captool.errors import CaptoolError

CONTENDERS = ("onnxruntime", "openvino", "torch-compile")
PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino", "torch-compile": "torch"}
INSTALL = {"openvino": "pip install openvino", "torch-compile": "pip install 'captool[train]'"}


def parse_against(text: Optional[str]) -> list[str]:
    """`openvino,torch-compile` -> ["openvino", "torch-compile"]; unknown names are refused."""
    names = [n.strip() for n in (text or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise CaptoolError(f"--against: unknown contender {', '.join(unknown)}; the contenders are "
                           f"{', '.join(CONTENDERS)}")
    return list(dict.fromkeys(names))


def _greedy_with(encode: Callable, step: Callable, vocab, max_length: int) -> Callable[[np.ndarray], np.ndarray]:
    """images (N, 3, S, S) uint8 -> tokens (N, L), captool's greedy loop over this engine's graphs."""
    def generate(images: np.ndarray) -> np.ndarray:
        return greedy(encode(images), step, start_id=vocab.start_id, end_id=vocab.end_id, null_id=vocab.null_id,
                      max_length=max_length)
    return generate


def onnxruntime_contender(captioner, threads: Optional[int]) -> dict[str, Callable]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    manifest = captioner.manifest
    sessions = {name: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                for name, path in (("encoder", manifest.encoder_path), ("step", manifest.root / "decoder_step.onnx"))}
    names = {k: [o.name for o in s.get_outputs()] for k, s in sessions.items()}

    def encode(images):
        return dict(zip(names["encoder"], sessions["encoder"].run(None, {"image": images})))

    def step(feeds):
        return dict(zip(names["step"], sessions["step"].run(None, feeds)))

    return {"onnxruntime": _greedy_with(encode, step, captioner.vocab, manifest.max_length)}


def openvino_contenders(captioner, threads: Optional[int]) -> dict[str, Callable]:
    import openvino as ov

    core = ov.Core()
    manifest = captioner.manifest
    out = {}
    for precision in ("f32", "bf16"):
        config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads is not None:
            config["INFERENCE_NUM_THREADS"] = threads
        compiled = {name: core.compile_model(str(path), "CPU", config)
                    for name, path in (("encoder", manifest.encoder_path), ("step", manifest.root / "decoder_step.onnx"))}
        requests = {k: c.create_infer_request() for k, c in compiled.items()}
        names = {k: [o.get_any_name() for o in c.outputs] for k, c in compiled.items()}

        def run(kind, feeds, requests=requests, names=names):
            result = requests[kind].infer(feeds)  # copies the outputs: the next call may reuse its buffers
            return {name: np.asarray(result[i]) for i, name in enumerate(names[kind])}

        out[f"openvino-{precision}"] = _greedy_with(lambda images, run=run: run("encoder", {"image": images}),
                                                    lambda feeds, run=run: run("step", feeds),
                                                    captioner.vocab, manifest.max_length)
    return out


def torch_compile_contender(captioner, checkpoint: Optional[Path], threads: Optional[int]) -> dict[str, Callable]:
    if checkpoint is None:
        raise CaptoolError("torch-compile needs the checkpoint: pass --checkpoint RUN_DIR")
    import torch

    from captool.training import load_checkpoint

    if threads is not None:
        torch.set_num_threads(threads)
    model = load_checkpoint(checkpoint).eval()
    encode, step = torch.compile(model.encode, dynamic=True), torch.compile(model.step, dynamic=True)

    def encode_np(images):
        with torch.inference_mode():
            return {k: v.numpy() for k, v in encode(torch.from_numpy(images)).items()}

    def step_np(feeds):
        with torch.inference_mode():
            args = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in feeds.items()}
            out = step(args.pop("token"), args.pop("h"), args.pop("c", None), args.pop("features", None))
            return {k: v.numpy() for k, v in out.items()}

    return {"torch-compile": _greedy_with(encode_np, step_np, captioner.vocab, captioner.manifest.max_length)}


def make_contenders(names: list[str], captioner, checkpoint: Optional[Path], threads: Optional[int]
                    ) -> tuple[dict[str, Callable], dict[str, str]]:
    """(generate functions by contender label, skipped contenders with the reason)."""
    made, skipped = {}, {}
    for name in names:
        if importlib.util.find_spec(PACKAGES[name]) is None:
            skipped[name] = f"not installed ({INSTALL.get(name, 'pip install ' + PACKAGES[name])})"
            continue
        try:
            if name == "onnxruntime":
                made.update(onnxruntime_contender(captioner, threads))
            elif name == "openvino":
                made.update(openvino_contenders(captioner, threads))
            else:
                made.update(torch_compile_contender(captioner, checkpoint, threads))
        except CaptoolError as e:
            skipped[name] = str(e)
    return made, skipped


def against(captioner, names: list[str], pixels: np.ndarray, batch64: np.ndarray, *, checkpoint: Optional[Path],
            threads: Optional[int], repeats: int, interleaved: Callable, graphs=None) -> dict:
    """Per contender: caption latency at batch 1 (median over the images) and throughput at batch 64,
    each interleaved with captool's own calls in blocks (3 untimed, 3 timed per side), and whether
    its tokens equal captool's.

    `graphs`: another bundle of the same model (a Captioner) whose graphs the contenders run, e.g. the
    fp32 bundle while captool runs the int8 one: each engine at its best on the same model."""
    source = captioner
    if graphs is not None:
        if list(graphs.vocab.idx_to_token) != list(captioner.vocab.idx_to_token) or \
                graphs.manifest.cell_type != captioner.manifest.cell_type:
            raise CaptoolError(f"--against-bundle {graphs.manifest.root} is another model than {captioner.manifest.root} "
                               f"(cell type or vocabulary differ); pass a bundle exported from the same checkpoint")
        source = graphs
    contenders, skipped = make_contenders(names, source, checkpoint, threads)
    n = len(pixels)
    singles = [pixels[i:i + 1] for i in range(n)]  # n × (1, 3, S, S)
    ours = {"caption_b1": lambda r: captioner.generate(singles[r % n]), "caption_b64": lambda r: captioner.generate(batch64)}
    want = captioner.generate(batch64)
    out: dict = {"skipped": skipped, "contenders": {}, "graphs": str(source.manifest.root),
                 "graphs_precision": source.manifest.precision}
    for label, generate in contenders.items():
        got = generate(batch64)
        rows_equal = int(np.sum(np.all(got == want, axis=1))) if got.shape == want.shape else 0
        times = interleaved({"caption_b1": (ours["caption_b1"], lambda r, g=generate: g(singles[r % n])),
                             "caption_b64": (ours["caption_b64"], lambda r, g=generate: g(batch64))},
                            {"caption_b1": repeats, "caption_b64": max(3, repeats // 5)},
                            settle=("caption_b1", "caption_b64"))  # each side in its steady state: the
        # other side's thread pool may still spin after its call (a plain session spins by default)
        b1 = {side: float(np.median(t)) for side, t in zip(("captool", label), times["caption_b1"])}
        b64 = {side: 64 / float(np.median(t)) for side, t in zip(("captool", label), times["caption_b64"])}
        out["contenders"][label] = {
            "caption_b1_ms": {k: v * 1e3 for k, v in b1.items()},
            "throughput_b64": b64,
            "captool_faster_b1": b1[label] / b1["captool"],  # above 1: captool is faster
            "captool_faster_b64": b64["captool"] / b64[label],
            "tokens_agree_b64": rows_equal / len(want),
        }
    return out


def against_lines(section: dict) -> list[str]:
    lines = ["against (each interleaved with captool; 'captool faster by' above 1 means captool wins; contenders "
             f"run {section.get('graphs', 'the same bundle')} ({section.get('graphs_precision', 'fp32')})):",
             f"{'contender':<16}{'b1 ms':>8}{'captool':>9}{'faster by':>11}{'b64 img/s':>11}{'captool':>9}"
             f"{'faster by':>11}  tokens"]
    for label, c in section["contenders"].items():
        agree = c["tokens_agree_b64"]
        verdict = "same" if agree == 1 else f"DIFFER on {1 - agree:.0%} of rows"
        if agree < 1 and (c["captool_faster_b1"] < 1 or c["captool_faster_b64"] < 1):
            verdict += ": faster, but a different answer"
        lines.append(f"{label:<16}{c['caption_b1_ms'][label]:>8.3g}{c['caption_b1_ms']['captool']:>9.3g}"
                     f"{c['captool_faster_b1']:>10.2f}×{c['throughput_b64'][label]:>11,.0f}"
                     f"{c['throughput_b64']['captool']:>9,.0f}{c['captool_faster_b64']:>10.2f}×  {verdict}")
    for name, why in section["skipped"].items():
        lines.append(f"{name:<16}skipped: {why}")
    return lines
