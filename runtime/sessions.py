"""onnxruntime sessions for a bundle: which provider really runs, the options, and IO binding.

onnxruntime-gpu lists CUDAExecutionProvider as available even where the CUDA libraries are missing,
then logs a red error and runs on CPU. So captool finds out first whether CUDA can load (driver,
CUDA and cuDNN libraries), asks for it only then, and afterwards checks what the session actually
runs on. docs/runtime.md explains each choice and the numbers behind the session options.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .bundle import IMAGE_STATE
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


def session_options(graph: str, threads: Optional[int], verbose: bool = False):
    """SessionOptions for the encoder or the decoder step (docs/runtime.md has the measurements).

    Both graphs are chains of ops: sequential execution, one inter-op thread. The encoder
    (MobileNetV2) gets `threads` intra-op threads (default: onnxruntime's, one per physical core),
    and they spin between its ops but stop when a run ends: waking a sleeping pool thread for each
    of ~100 nodes cost more than the convolutions at batch 1 (2 cores: 0.94 ms without spinning,
    0.76 ms spinning within a run, 0.55 ms spinning on after it, which burns a core while idle and
    halved the speed of anything else running, PyTorch in `captool bench` included).
    CAPTOOL_ENCODER_SPIN=0 turns spinning off, for a machine whose cores are busy with other work.
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
    spin = graph == "encoder" and encoder_spin_wanted()
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if spin:
        opts.add_session_config_entry("session.force_spinning_stop", "1")
    return opts


def _env_flag(name: str) -> Optional[bool]:
    """An on/off environment switch: 1/true/yes/on or 0/false/no/off; None when unset or other."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return None


def encoder_spin_wanted() -> bool:
    """The encoder's pool threads spin unless CAPTOOL_ENCODER_SPIN turns it off."""
    return _env_flag("CAPTOOL_ENCODER_SPIN") is not False


def create_session(path, graph: str, placement: Placement, threads: Optional[int] = None, verbose: bool = False):
    """An InferenceSession on the placement's providers (check `get_providers()` afterwards)."""
    import onnxruntime as ort

    return ort.InferenceSession(str(path), session_options(graph, threads, verbose),
                                providers=list(placement.providers))


def open_sessions(graphs: dict[str, object], device: str, threads: Optional[int] = None, verbose: bool = False):
    """Sessions for {graph kind: path} on the device asked for -> ({graph kind: session}, placement).

    If CUDA was chosen but onnxruntime did not start it (it falls back to CPU without raising),
    `cuda` refuses and `auto` carries on with CPU sessions and a notice saying so.
    """
    placement = place(device)
    sessions = {graph: create_session(path, graph, placement, threads, verbose) for graph, path in graphs.items()}
    if placement.device == "cuda" and not all(CUDA in s.get_providers() for s in sessions.values()):
        why = (f"onnxruntime could not start its CUDA provider although the CUDA libraries load (a GPU "
               f"or driver too old for CUDA {_cuda_major()}?); --verbose shows onnxruntime's log")
        if device == "cuda":
            raise DeviceError(f"--device cuda: {why}, or use --device cpu")
        placement = Placement("cpu", (CPU,), notice=f"running on CPU: {why}")
        sessions = {graph: create_session(path, graph, placement, threads, verbose) for graph, path in graphs.items()}
    return sessions, placement


def attention_cache_wanted(manifest, override: Optional[bool] = None) -> bool:
    """Use the bundle's attention cache where it has one; CAPTOOL_ATTENTION_CACHE=0 (or `override`) says no.

    Asking for it (True, or the variable set to 1) on a bundle without one is an error.
    """
    wanted = override if override is not None else _env_flag("CAPTOOL_ATTENTION_CACHE")
    if wanted and not manifest.has_attention_cache:
        raise BundleError(f"{manifest.root} has no attention cache ({manifest.cell_type} bundle"
                          f"{'' if manifest.cell_type != 'attention' else ' exported before captool had one'}); "
                          f"re-export an attention model with this captool, or leave the attention cache off")
    return manifest.has_attention_cache if wanted is None else wanted


def io_binding_wanted(device: str, override: Optional[bool] = None) -> bool:
    """IO binding on CUDA by default; CAPTOOL_IO_BINDING=1/0 (or `override`) forces it on or off."""
    if override is not None:
        return override
    env = _env_flag("CAPTOOL_IO_BINDING")
    return device == "cuda" if env is None else env


class BoundStep:
    """The decoder step through IO binding: the state stays where the provider put it between steps.

    Feeds may be numpy arrays (copied to the device once: a numpy array seen again, such as the
    attention features, reuses its copy) or the OrtValues a previous call returned (used in place).
    Each call sends the tokens and brings back only the logits; h_next, c_next and attn_weights stay
    on the device as OrtValues, ready to be fed back. On the CPU provider the same code runs with
    device memory being host memory, which is how the tests exercise it.
    """

    def __init__(self, session, device: str, device_id: int = 0):
        import onnxruntime as ort

        self._ort = ort
        self.session = session
        self.device, self.device_id = device, device_id
        self.inputs = [i.name for i in session.get_inputs()]
        self.outputs = [o.name for o in session.get_outputs()]
        self._binding = session.io_binding()
        self._uploaded: dict[str, tuple[np.ndarray, object]] = {}

    def _on_device(self, name: str, value):
        if isinstance(value, self._ort.OrtValue):
            return value
        seen = self._uploaded.get(name)
        if seen is not None and seen[0] is value:  # holding the array keeps its identity unique
            return seen[1]
        ortvalue = self._ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self.device, self.device_id)
        self._uploaded[name] = (value, ortvalue)
        return ortvalue

    def __call__(self, feeds: dict) -> dict:
        b = self._binding
        b.clear_binding_inputs()
        b.clear_binding_outputs()
        for name in self.inputs:
            b.bind_ortvalue_input(name, self._on_device(name, feeds[name]))
        for name in self.outputs:
            # Fresh output buffers each step: this step's h_next must not overwrite the h it reads.
            b.bind_output(name, "cpu" if name == "logits" else self.device, self.device_id)
        self.session.run_with_iobinding(b)
        out = dict(zip(self.outputs, b.get_outputs()))
        out["logits"] = out["logits"].numpy()  # (N, V) on the host: the tokens are chosen here
        return out


class StepBuffers:
    """The decoder step on the CPU with every input and output bound once, to buffers made once.

    A greedy step through `session.run` converts its feeds, allocates its outputs and builds dicts:
    about as long as the step's own arithmetic at batch 1 (docs/runtime.md has the figures). Here two
    IO bindings alternate: call t reads the state from buffer t % 2 and writes the next state into
    the other, so nothing moves and nothing is allocated per step. `tokens` is the token input
    itself: write the next tokens into it (np.argmax(..., out=tokens)), then `run()`; `run()` returns
    the logits buffer, which the next call overwrites.
    """

    def __init__(self, session, batch: int, shapes: dict[str, tuple[int, ...]]):
        import onnxruntime as ort

        self.session, self.batch = session, batch
        inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        carried = {"h_next": "h", "c_next": "c"}  # outputs fed back as the next step's inputs

        def buffer(name, dtype=np.float32):
            return np.zeros((batch, *shapes[name]), dtype=dtype)

        self.tokens = np.zeros((batch,), dtype=np.int64)
        self._state = {name: (buffer(name), buffer(name)) for name in inputs if name in ("h", "c")}
        self._shared = {"token": self.tokens}
        for name in inputs:
            if name in IMAGE_STATE:  # the same at every step: one buffer for both bindings
                self._shared[name] = buffer(name)
        self._out = {name: buffer(name) for name in outputs if name not in carried}
        self._bindings = []
        for parity in (0, 1):
            b = session.io_binding()
            for name in inputs:
                array = self._shared[name] if name in self._shared else self._state[name][parity]
                b.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(array))
            for name in outputs:
                array = self._state[carried[name]][1 - parity] if name in carried else self._out[name]
                b.bind_ortvalue_output(name, ort.OrtValue.ortvalue_from_numpy(array))
            self._bindings.append(b)
        self._parity = 0
        # The public run_with_iobinding first checks for WebGPU graph capture on every call: 2 µs of
        # a 28 µs step (shipped model, batch 1). The binding's own session is called where it is there.
        native = getattr(session, "_sess", None)
        options = ort.RunOptions()  # one for every call
        if native is not None and all(hasattr(b, "_iobinding") for b in self._bindings):
            self._run, self._runs = native.run_with_iobinding, [(b._iobinding, options) for b in self._bindings]
        else:
            self._run, self._runs = session.run_with_iobinding, [(b, options) for b in self._bindings]

    def load(self, state: dict[str, np.ndarray]) -> None:
        """Start from this state (h, plus c and features or the attention cache where the graph takes
        them; other entries are ignored), batch rows as made."""
        self._parity = 0
        for name, value in state.items():
            if name in self._shared and name != "token":
                np.copyto(self._shared[name], value)
            elif name in self._state:
                np.copyto(self._state[name][0], value)

    def run(self) -> np.ndarray:
        """One step on `tokens` and the current state; the logits (batch, V), overwritten by the next call."""
        self._run(*self._runs[self._parity])
        self._parity ^= 1
        return self._out["logits"]

    def state(self) -> dict[str, np.ndarray]:
        """The current state (copies): what the next `run()` reads."""
        current = {name: pair[self._parity].copy() for name, pair in self._state.items()}
        current.update({name: array.copy() for name, array in self._shared.items() if name in IMAGE_STATE})
        return current
