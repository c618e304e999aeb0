"""`Captioner`: a loaded bundle and its two onnxruntime sessions, from images to captions."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .bundle import GRAPH_FILES, Manifest, load_manifest
from .decode import Beams, beam_search, greedy, greedy_bound
from .errors import CaptoolError
from .graphs import check_sessions
from .preprocess import ImageSource, preprocess
from .sessions import (BoundStep, StepBuffers, attention_cache_wanted, create_session, io_binding_wanted, open_sessions,
                       set_verbose)

log = logging.getLogger("captool")

# From this many rows the decoder step's matmuls are worth splitting across threads: measured on the
# shipped model (2 cores), one thread vs two: 505 vs 343 µs at 64 rows, 261 vs 204 at 32, equal at 16,
# 35 vs 43 µs at 1 row.
WIDE_BATCH = 32

# Batch sizes whose bound step buffers are kept (a directory's last chunk is smaller than the rest).
_KEPT_BUFFERS = 4

@dataclass(frozen=True)
class Caption:
    """One image's result: the caption text and its word ids (before `<END>`)."""

    text: str
    tokens: list[int]
    path: Optional[str] = None


class Captioner:
    """Runs a bundle: `encode` and `step` are the graphs, `generate` and `caption` the decoding loops.

    Args:
        bundle_dir: a directory written by `captool export`; checked in full before any image is read.
        device: "auto" (CUDA if it really loads, else CPU with a one-line notice in `.notice`),
            "cpu", or "cuda" (a DeviceError naming what is missing if it cannot run).
        threads: intra-op threads for the encoder (default: one per physical core); the decoder
            step runs on one thread, and on this many for batches of WIDE_BATCH rows or more
            (docs/runtime.md says why).
        verbose: let onnxruntime's own warnings and errors through (process-wide setting).
        io_binding: run the decoder step through IO binding; default on CUDA only (env
            CAPTOOL_IO_BINDING=1/0 overrides the default).
        attention_cache: decode with the bundle's attention cache (attention_cache.onnx and
            decoder_step_cached.onnx) instead of decoder_step.onnx; default on where the bundle has
            one (env CAPTOOL_ATTENTION_CACHE=1/0 overrides the default). Same captions, fewer bytes
            read per step (docs/runtime.md).
    """

    def __init__(self, bundle_dir: str | Path, device: str = "auto", threads: Optional[int] = None, *,
                 verbose: bool = False, io_binding: Optional[bool] = None,
                 attention_cache: Optional[bool] = None):
        self.manifest: Manifest = load_manifest(bundle_dir)
        self.vocab = self.manifest.vocab
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise CaptoolError(f"threads must be a positive integer, got {threads!r}")
        set_verbose(verbose)
        self.attention_cache = attention_cache_wanted(self.manifest, attention_cache)
        self.step_graph = "decoder_step_cached" if self.attention_cache else "decoder_step"
        self._step_path = self.manifest.root / GRAPH_FILES[self.step_graph]
        graphs = {"encoder": self.manifest.encoder_path, self.step_graph: self._step_path}
        if self.attention_cache:
            graphs["attention_cache"] = self.manifest.root / GRAPH_FILES["attention_cache"]
        sessions, placement = open_sessions(graphs, device, threads, verbose)
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
        self._threads, self._verbose, self._placement = threads, verbose, placement
        self._wide_decoder = None  # made on the first wide batch (CPU only)
        self.io_binding = io_binding_wanted(self.device, io_binding)
        self._step_fn = BoundStep(self._decoder, self.device) if self.io_binding else self.step
        self._buffers: dict[int, StepBuffers] = {}  # greedy's bound step on the CPU, per batch size

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

    def _step_session(self, batch: int):
        """The decoder step's session for `batch` rows: on the CPU, wide batches get the multi-threaded one."""
        if self.device == "cpu" and batch >= WIDE_BATCH and self._threads != 1:
            if self._wide_decoder is None:
                self._wide_decoder = create_session(self._step_path, "decoder_step_wide",
                                                    self._placement, self._threads, self._verbose)
            return self._wide_decoder
        return self._decoder

    def step(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One decoder step: token and state in, logits and next state out, by name (numpy).

        Feeds the step graph does not take (the features, when the attention cache is in use) are left out.
        """
        session = self._step_session(feeds["token"].shape[0])
        return dict(zip(self._step_outputs, session.run(self._step_outputs, {k: feeds[k] for k in self._step_inputs})))

    def step_buffers(self, batch: int) -> StepBuffers:
        """The CPU decoder step for `batch` rows with its inputs and outputs bound once (what greedy runs)."""
        if batch not in self._buffers:
            if len(self._buffers) >= _KEPT_BUFFERS:
                self._buffers.pop(next(iter(self._buffers)))  # the oldest batch size goes
            m = self.manifest
            H = m.hidden_dim
            shapes = {"h": (H,), "c": (H,), "features": (H, 4, 4), "attention_keys": (H, 16),
                      "attention_values": (16, 4 * H), "logits": (len(self.vocab),), "attn_weights": (4, 4)}
            self._buffers[batch] = StepBuffers(self._step_session(batch), batch, shapes)
        return self._buffers[batch]

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
        return beam_search(self.encode(images), self._step_fn, beam_size=int(beam_size),
                           start_id=v.start_id, end_id=v.end_id, null_id=v.null_id,
                           max_length=self._max_length(max_length), length_penalty=length_penalty)

    def generate(self, images: np.ndarray, beam_size: int = 1, max_length: Optional[int] = None,
                 length_penalty: float = 0.0) -> np.ndarray:
        """uint8 [N,3,S,S] -> int64 [N, L] token ids (`<END>` kept, `<NULL>` after it)."""
        if beam_size != 1:
            return self.beam_search(images, beam_size, max_length, length_penalty).best
        v = self.vocab
        ids = {"start_id": v.start_id, "end_id": v.end_id, "null_id": v.null_id,
               "max_length": self._max_length(max_length)}
        encoded = self.encode(images)
        if self.io_binding:  # state kept on the device between steps
            return greedy(encoded, self._step_fn, **ids)
        return greedy_bound(encoded, self.step_buffers(images.shape[0]), **ids)

    def to_caption(self, row: np.ndarray, path: Optional[str] = None) -> Caption:
        """One row of `generate` as a Caption: the words before `<END>`, without `<NULL>`/`<START>`."""
        ids = self.vocab.word_ids(row)
        return Caption(text=" ".join(self.vocab.idx_to_token[i] for i in ids), tokens=ids, path=path)

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
            batch = np.stack([preprocess(im, self.manifest.image_size) for im in chunk])  # (n,3,S,S)
            tokens = self.generate(batch, beam_size=beam_size, max_length=max_length, length_penalty=length_penalty)
            for im, row in zip(chunk, tokens):
                out.append(self.to_caption(row, str(im) if isinstance(im, (str, Path)) else None))
        return out

