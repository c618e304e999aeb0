"""`Captioner`: a loaded bundle and its onnxruntime sessions, from images to captions, safe under threads."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .bundle import GRAPH_FILES, Manifest, load_manifest
from .decode import Beams, FeedStep, beam_search, greedy_loop, initial_state
from .errors import BundleError, CaptoolError
from .graphs import check_sessions
from .preprocess import ImageSource, preprocess
from .sessions import create_session, open_sessions, set_verbose
from .steps import BufferedStep, DeviceStep

log = logging.getLogger("captool")

# From this many rows the decoder step's matmuls are worth splitting across threads: measured on the
# shipped model (2 cores), one thread vs two: 505 vs 343 µs at 64 rows, 261 vs 204 at 32, equal at 16,
# 35 vs 43 µs at 1 row.
WIDE_BATCH = 32

# Batch sizes whose step buffers a thread keeps (a directory's last chunk is smaller than the rest).
KEPT_BUFFERS = 4


@dataclass(frozen=True)
class Caption:
    """One image's result: the caption text and its word ids (before `<END>`)."""

    text: str
    tokens: list[int]
    path: Optional[str] = None


class Captioner:
    """Runs a bundle: `encode` and `step` are the graphs, `generate` and `caption` the decoding loops.

    Any number of threads may call one Captioner at once and get exactly the serial results:
    onnxruntime sessions run concurrently, and whatever a decoding call keeps between steps (state,
    bound buffers) belongs to that call or to the calling thread, never to the instance.

    Args:
        bundle_dir: a directory written by `captool export`, checked in full before any image is
            read; default: the bundle shipped with captool (`captool.models.default_bundle`).
        device: "auto" (CUDA if it really loads, else CPU with a one-line notice in `.notice`),
            "cpu", or "cuda" (a DeviceError naming what is missing if it cannot run).
        threads: intra-op threads for the encoder (default: one per physical core); the decoder
            step runs on one thread, and on this many for batches of WIDE_BATCH rows or more
            (docs/runtime.md says why).
        verbose: let onnxruntime's own warnings and errors through (process-wide setting).
        io_binding: run the decoder step through IO binding (default): on the CPU, greedy steps
            on buffers bound once; on CUDA, the state stays on the device between steps. False runs
            every step through `session.run` (slower; the same tokens).
        attention_cache: decode with the bundle's attention cache (attention_cache.onnx and
            decoder_step_cached.onnx) instead of decoder_step.onnx; default: where the bundle has
            one. Same captions, fewer bytes read per step (docs/runtime.md). True on a bundle
            without one is a BundleError.
        spin: let the encoder's pool threads spin between its ops within a run (default; faster
            at small batches). False for a machine whose cores are busy with other work.
    """

    def __init__(self, bundle_dir: str | Path | None = None, device: str = "auto", threads: Optional[int] = None, *,
                 verbose: bool = False, io_binding: bool = True, attention_cache: Optional[bool] = None,
                 spin: bool = True):
        if bundle_dir is None:
            from captool.models import default_bundle

            bundle_dir = default_bundle()
        self.manifest: Manifest = load_manifest(bundle_dir)
        self.vocab = self.manifest.vocab
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise CaptoolError(f"threads must be a positive integer, got {threads!r}")
        for name, value in (("io_binding", io_binding), ("spin", spin), ("attention_cache", attention_cache)):
            if not isinstance(value, bool) and not (name == "attention_cache" and value is None):
                raise CaptoolError(f"{name} must be True or False, got {value!r}")
        set_verbose(verbose)
        self.attention_cache = self._wants_cache(attention_cache)
        self.step_graph = "decoder_step_cached" if self.attention_cache else "decoder_step"
        self._step_path = self.manifest.root / GRAPH_FILES[self.step_graph]
        graphs = {"encoder": self.manifest.encoder_path, self.step_graph: self._step_path}
        if self.attention_cache:
            graphs["attention_cache"] = self.manifest.root / GRAPH_FILES["attention_cache"]
        sessions, placement = open_sessions(graphs, device, threads, verbose, spin=spin)
        self._encoder, self._decoder = sessions["encoder"], sessions[self.step_graph]
        self._cache = sessions.get("attention_cache")
        self.device = placement.device
        self.notice = placement.notice
        if self.notice:
            log.info(self.notice)
        self.providers: list[str] = self._decoder.get_providers()
        check_sessions(self.manifest, sessions)
        self._encoder_outputs = [o.name for o in self._encoder.get_outputs()]
        self._cache_outputs = [o.name for o in self._cache.get_outputs()] if self._cache else []
        self._step_inputs = [i.name for i in self._decoder.get_inputs()]
        self._step_outputs = [o.name for o in self._decoder.get_outputs()]
        self._step_specs = row_specs(self.manifest, self.step_graph)
        self.threads, self.verbose, self.io_binding, self.spin = threads, verbose, io_binding, spin
        self._placement = placement
        # The wide step's session is made on the first wide batch (CPU only), once, under this lock.
        self._wide_decoder = None
        self._wide_lock = threading.Lock()
        self._per_thread = threading.local()  # each thread's BufferedSteps, by batch size

    def _wants_cache(self, asked: Optional[bool]) -> bool:
        m = self.manifest
        if asked and not m.has_attention_cache:
            raise BundleError(f"{m.root} has no attention cache ({m.cell_type} bundle"
                              f"{'' if m.cell_type != 'attention' else ' exported before captool had one'}); "
                              f"re-export an attention model with this captool, or leave attention_cache off")
        return m.has_attention_cache if asked is None else asked

    @property
    def step_path(self) -> Path:
        """The decoder step graph this Captioner decodes with (decoder_step.onnx or decoder_step_cached.onnx)."""
        return self._step_path

    # --- the graphs --------------------------------------------------------------------------

    def encode(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 [N,3,S,S] -> the encoder's outputs by name (h0, plus c0 and features where present).

        With the attention cache in use, also its outputs (attention_keys, attention_values), which
        the cached step takes instead of the features.
        """
        s = self.manifest.image_size
        if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
                or images.shape[1:] != (3, s, s):
            got = f"{images.dtype} {list(images.shape)}" if isinstance(images, np.ndarray) else type(images).__name__
            raise CaptoolError(f"encoder input must be uint8 [N,3,{s},{s}] (see captool.preprocess), got {got}")
        out = dict(zip(self._encoder_outputs, self._encoder.run(self._encoder_outputs, {"image": images})))
        if self._cache is not None:
            out.update(zip(self._cache_outputs, self._cache.run(self._cache_outputs, {"features": out["features"]})))
        return out

    def step_session(self, batch: int):
        """The decoder step's session for `batch` rows: on the CPU, wide batches get the multi-threaded one."""
        if self.device == "cpu" and batch >= WIDE_BATCH and self.threads != 1:
            with self._wide_lock:
                if self._wide_decoder is None:
                    self._wide_decoder = create_session(self._step_path, "decoder_step_wide", self._placement,
                                                        self.threads, self.verbose, spin=self.spin)
            return self._wide_decoder
        return self._decoder

    def step(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One decoder step: token and state in, logits and next state out, by name (numpy).

        Feeds the step graph does not take (the features, when the attention cache is in use) are left out.
        """
        session = self.step_session(feeds["token"].shape[0])
        return dict(zip(self._step_outputs, session.run(self._step_outputs, {k: feeds[k] for k in self._step_inputs})))

    def decoding_step(self, encoded: dict[str, np.ndarray]):
        """The decoder step as the greedy loop runs it, starting from `encode`'s outputs.

        CPU with IO binding: this thread's `BufferedStep` for the batch size, loaded with the state;
        CUDA with IO binding: a `DeviceStep` made for this call; without IO binding: `session.run`.
        """
        n = next(iter(encoded.values())).shape[0]
        if not self.io_binding:
            return FeedStep(self.step, encoded)
        if self.device != "cpu":
            return FeedStep(DeviceStep(self.step_session(n), self.device), encoded)
        mine = getattr(self._per_thread, "steps", None)
        if mine is None:
            mine = self._per_thread.steps = {}
        if n not in mine:
            if len(mine) >= KEPT_BUFFERS:
                mine.pop(next(iter(mine)))  # the oldest batch size goes
            mine[n] = BufferedStep(self.step_session(n), n, self._step_specs)
        return mine[n].load(initial_state(encoded))

    # --- decoding ----------------------------------------------------------------------------

    def _max_length(self, max_length: Optional[int]) -> int:
        if max_length is None:
            return self.manifest.max_length
        if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 1:
            raise CaptoolError(f"max_length must be a positive integer, got {max_length!r}")
        return int(max_length)

    def beam_search(self, images: np.ndarray, beam_size: int, max_length: Optional[int] = None,
                    length_penalty: float = 0.0) -> Beams:
        """uint8 [N,3,S,S] -> all k hypotheses per image with their scores, best first."""
        if isinstance(beam_size, bool) or not isinstance(beam_size, (int, np.integer)) or beam_size < 1:
            raise CaptoolError(f"beam_size must be a positive integer, got {beam_size!r}")
        v = self.vocab
        step = DeviceStep(self.step_session(images.shape[0] * int(beam_size)), self.device) \
            if self.io_binding and self.device != "cpu" else self.step
        return beam_search(self.encode(images), step, beam_size=int(beam_size),
                           start_id=v.start_id, end_id=v.end_id, null_id=v.null_id,
                           max_length=self._max_length(max_length), length_penalty=length_penalty)

    def generate(self, images: np.ndarray, beam_size: int = 1, max_length: Optional[int] = None,
                 length_penalty: float = 0.0) -> np.ndarray:
        """uint8 [N,3,S,S] -> int64 [N, L] token ids (`<END>` kept, `<NULL>` after it)."""
        if beam_size != 1:
            return self.beam_search(images, beam_size, max_length, length_penalty).best
        v = self.vocab
        step = self.decoding_step(self.encode(images))
        return greedy_loop(step, start_id=v.start_id, end_id=v.end_id, null_id=v.null_id,
                           max_length=self._max_length(max_length))

    def to_caption(self, row: np.ndarray, path: Optional[str] = None) -> Caption:
        """One row of `generate` as a Caption: the words before `<END>`, without `<NULL>`/`<START>`."""
        ids = self.vocab.word_ids(row)
        return Caption(text=" ".join(self.vocab.idx_to_token[i] for i in ids), tokens=ids, path=path)

    def preprocess(self, image: ImageSource):
        """One image as this bundle's encoder takes it: uint8 (3, S, S), by its manifest's size and
        JPEG decoding rule (captool.preprocess.preprocess)."""
        return preprocess(image, self.manifest.image_size, self.manifest.jpeg_decode)

    def caption(self, images: Sequence[ImageSource] | ImageSource, beam_size: int = 1,
                max_length: Optional[int] = None, *, length_penalty: float = 0.0,
                batch_size: int = 32) -> list[Caption]:
        """Caption paths, PIL images or H×W×3 uint8 arrays; one `Caption` per image, in order.

        An unreadable image raises ImageError; `captool run` instead reports it and goes on.
        """
        if not isinstance(images, (list, tuple)):
            images = [images]
        out: list[Caption] = []
        for lo in range(0, len(images), batch_size):
            chunk = images[lo:lo + batch_size]
            batch = np.stack([self.preprocess(im) for im in chunk])  # (n,3,S,S)
            tokens = self.generate(batch, beam_size=beam_size, max_length=max_length, length_penalty=length_penalty)
            for im, row in zip(chunk, tokens):
                out.append(self.to_caption(row, str(im) if isinstance(im, (str, Path)) else None))
        return out


def row_specs(manifest: Manifest, graph: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """The per-row shape and the dtype of each input and output of `graph`, as the manifest records them."""
    entries = manifest.raw.get("graphs", {}).get(graph, {})
    shapes = {}
    for entry in [*entries.get("inputs", []), *entries.get("outputs", [])]:
        shape = entry.get("shape") if isinstance(entry, dict) else None
        if not isinstance(shape, list) or not shape or not all(isinstance(d, int) for d in shape[1:]):
            raise BundleError(f"{manifest.root}: the manifest gives {graph} no fixed per-row shape for "
                              f"{entry!r}; re-export the bundle with this captool")
        try:
            dtype = np.dtype(entry.get("dtype", "float32"))
        except TypeError:
            raise BundleError(f"{manifest.root}: the manifest gives {graph}'s {entry.get('name')!r} the unknown "
                              f"dtype {entry.get('dtype')!r}; re-export the bundle") from None
        shapes[entry["name"]] = (tuple(shape[1:]), dtype)
    if not shapes:
        raise BundleError(f"{manifest.root}: the manifest does not describe the {graph} graph's tensors "
                          f"('graphs.{graph}'); re-export the bundle with this captool")
    return shapes
