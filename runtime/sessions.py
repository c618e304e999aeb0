"""onnxruntime sessions for a bundle: which provider really runs, and the options of each graph's session.

onnxruntime-gpu lists CUDAExecutionProvider as available even where the CUDA libraries are missing,
then logs a red error and runs on CPU. So captool finds out first whether CUDA can load (driver,
CUDA and cuDNN libraries), asks for it only then, and afterwards checks what the session actually
runs on. docs/runtime.md explains each choice and the numbers behind the session options.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import re
import sys
from dataclasses import dataclass
from typing import Optional

from .errors import BundleError, DeviceError

DEVICES = ("auto", "cpu", "cuda")
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
GPU_FIX = ("pip install 'captool[gpu]' (CUDA and cuDNN from PyPI), or install CUDA {cuda} and cuDNN 9 "
           "system-wide and put their lib directories on LD_LIBRARY_PATH")

# onnxruntime's log levels: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal.
QUIET, VERBOSE = 4, 2


def set_verbose(verbose: bool) -> None:
    """onnxruntime's own log (process-wide): fatal only by default, warnings and errors with --verbose."""
    import onnxruntime as ort

    ort.set_default_logger_severity(VERBOSE if verbose else QUIET)


def _cuda_major() -> str:
    try:
        from onnxruntime.capi import build_and_package_info as info

        return str(getattr(info, "cuda_version", "13") or "13").split(".")[0]
    except ImportError:
        return "13"


def _can_load(library: str) -> bool:
    try:
        ctypes.CDLL(library)
        return True
    except OSError:
        return False


def _preload_pip_cuda() -> None:
    """Load CUDA/cuDNN from the nvidia-* wheels (captool[gpu]); onnxruntime does not look there itself."""
    import onnxruntime as ort

    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    # preload_dlls reports failures with print(); they are ours to report, in one line.
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(Exception):
        preload(cuda=True, cudnn=True, msvc=False, directory="")


@dataclass(frozen=True)
class CudaProblem:
    """Why CUDA cannot run here, and what would fix it."""

    reason: str
    fix: str
    has_gpu: bool  # a driver is there: the user likely wants the GPU, so `auto` names the fix too


def cuda_problem() -> Optional[CudaProblem]:
    """Why the CUDA provider cannot run in this process, or None when it should load.

    The checks that need no GPU come first, so that a CPU box never loads the CUDA libraries.
    """
    import onnxruntime as ort

    cuda = _cuda_major()
    if CUDA not in ort.get_available_providers():
        return CudaProblem(f"this onnxruntime ({ort.__version__}) is a CPU-only build",
                           "pip uninstall onnxruntime, then pip install 'captool[gpu]'", False)
    if not sys.platform.startswith("linux"):
        return None  # library names differ; the provider check after session creation decides
    if not _can_load("libcuda.so.1"):
        return CudaProblem("no NVIDIA driver found (libcuda.so.1 cannot be loaded): this machine has no usable GPU",
                           f"on a GPU machine, install the NVIDIA driver; CUDA {cuda} and cuDNN 9 then come "
                           f"with pip install 'captool[gpu]'", False)
    _preload_pip_cuda()
    needed = [f"libcudart.so.{cuda}", f"libcublasLt.so.{cuda}", f"libcublas.so.{cuda}", "libcurand.so.10",
              "libcudnn.so.9"]
    missing = [lib for lib in needed if not _can_load(lib)]
    if missing:
        return CudaProblem(f"CUDA {cuda} / cuDNN 9 libraries not found ({', '.join(missing)})",
                           GPU_FIX.format(cuda=cuda), True)
    return None


@dataclass(frozen=True)
class Placement:
    """Where the sessions run, and the one line that says why when `auto` chose the CPU."""

    device: str  # "cuda" or "cpu"
    providers: tuple
    notice: Optional[str] = None


def place(device: str) -> Placement:
    """Resolve --device: `cuda` or refuse with the reason and the fix; `auto` falls back with a notice."""
    if device not in DEVICES:
        raise DeviceError(f"unknown device {device!r}; use one of {', '.join(DEVICES)}")
    if device == "cpu":
        return Placement("cpu", (CPU,))
    problem = cuda_problem()
    if problem is None:
        cuda_options = {"device_id": 0, "cudnn_conv_algo_search": "HEURISTIC"}
        return Placement("cuda", ((CUDA, cuda_options), CPU))
    if device == "cuda":
        raise DeviceError(f"--device cuda: {problem.reason}; fix: {problem.fix}")
    notice = f"running on CPU: {problem.reason}" + (f"; for the GPU: {problem.fix}" if problem.has_gpu else "")
    return Placement("cpu", (CPU,), notice=notice)


def session_options(graph: str, threads: Optional[int], verbose: bool = False, spin: bool = True):
    """SessionOptions for the encoder or the decoder step (docs/runtime.md has the measurements).

    Both graphs are chains of ops: sequential execution, one inter-op thread. The encoder
    (MobileNetV2) gets `threads` intra-op threads (default: onnxruntime's, one per physical core),
    and they spin between its ops but stop when a run ends: waking a sleeping pool thread for each
    of ~100 nodes cost more than the convolutions at batch 1 (2 cores: 0.94 ms without spinning,
    0.76 ms spinning within a run, 0.55 ms spinning on after it, which burns a core while idle and
    halved the speed of anything else running, PyTorch in `captool bench` included).
    `spin=False` turns spinning off, for a machine whose cores are busy with other work.
    The decoder step ("decoder_step", "decoder_step_cached") is a few small matmuls: below 32 rows
    a thread pool gains nothing, so it runs on the calling thread alone; "decoder_step_wide", the
    same graph for wide batches, gets `threads` like the encoder, without spinning, and so does the
    attention cache ("attention_cache", one (16N x H) x (H x 4H) matmul per batch: 2 threads vs 1
    measured 79 vs 93 µs at batch 1, 2.9 vs 5.5 ms at batch 64).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.inter_op_num_threads = 1
    opts.log_severity_level = VERBOSE if verbose else QUIET
    if graph in ("decoder_step", "decoder_step_cached"):
        opts.intra_op_num_threads = 1
    elif threads:  # the encoder, and the decoder step's session for wide batches (Captioner.step)
        opts.intra_op_num_threads = threads
    spin = graph == "encoder" and spin
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if spin:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    return opts


def create_session(path, graph: str, placement: Placement, threads: Optional[int] = None, verbose: bool = False,
                   spin: bool = True):
    """An InferenceSession on the placement's providers (check `get_providers()` afterwards).

    onnxruntime's own load errors (a graph it cannot parse, an empty graph, weights it cannot find)
    become a BundleError naming the file; load_manifest has already checked its hash.
    """
    import onnxruntime as ort

    try:
        return ort.InferenceSession(str(path), session_options(graph, threads, verbose, spin),
                                    providers=list(placement.providers))
    except Exception as e:  # onnxruntime's exception types are not public; any failure here is a load failure
        raise BundleError(f"{path}: onnxruntime cannot load this graph ({_load_error(e)}); the bundle is damaged "
                          f"or was not written by `captool export`: re-export it") from None


def _load_error(e: Exception) -> str:
    """onnxruntime's message in one short line: without its error code, the path (named already) and
    the C++ source location ("/onnxruntime_src/...cc:256 onnxruntime::Model::Model(...) ")."""
    text = " ".join(str(e).split())
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"^Load model from .*? failed: ?", "", text)
    while True:
        location = re.search(r"\S+\.(?:cc|cpp|h):\d+ [^(]*\(", text)
        if not location:
            break
        depth, i = 1, location.end()  # skip the function's signature up to its matching parenthesis
        while i < len(text) and depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        text = (text[:location.start()] + text[i:].lstrip()).strip()
    return text if len(text) <= 300 else text[:297] + "..."


def open_sessions(graphs: dict[str, object], device: str, threads: Optional[int] = None, verbose: bool = False,
                  spin: bool = True):
    """Sessions for {graph kind: path} on the device asked for -> ({graph kind: session}, placement).

    If CUDA was chosen but onnxruntime did not start it (it falls back to CPU without raising),
    `cuda` refuses and `auto` carries on with CPU sessions and a notice saying so.
    """
    placement = place(device)
    sessions = {graph: create_session(path, graph, placement, threads, verbose, spin) for graph, path in graphs.items()}
    if placement.device == "cuda" and not all(CUDA in s.get_providers() for s in sessions.values()):
        why = (f"onnxruntime could not start its CUDA provider although the CUDA libraries load (a GPU "
               f"or driver too old for CUDA {_cuda_major()}?); --verbose shows onnxruntime's log")
        if device == "cuda":
            raise DeviceError(f"--device cuda: {why}, or use --device cpu")
        placement = Placement("cpu", (CPU,), notice=f"running on CPU: {why}")
        sessions = {graph: create_session(path, graph, placement, threads, verbose, spin) for graph, path in graphs.items()}
    return sessions, placement
