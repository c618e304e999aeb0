"""`Captioner`: a loaded bundle and its two onnxruntime sessions, from images to captions."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .bundle import DECODER_STEP, ENCODER, Manifest, graph_signature, load_manifest
from .decode import greedy
from .errors import BundleError, CaptoolError
from .preprocess import ImageSource, preprocess


@dataclass(frozen=True)
class Caption:
    """One image's result: the caption text and its word ids (before `<END>`)."""

    text: str
    tokens: list[int]
    path: Optional[str] = None


class Captioner:
    """Runs a bundle: `encode` and `step` are the graphs, `generate` and `caption` the decoding loops."""

    def __init__(self, bundle_dir: str | Path, device: str = "auto", threads: Optional[int] = None):
        import onnxruntime as ort  # imported here so that `import captool` stays cheap

        self.manifest: Manifest = load_manifest(bundle_dir)
        self.vocab = self.manifest.vocab
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        providers = ["CPUExecutionProvider"]
        self._encoder = ort.InferenceSession(str(self.manifest.root / ENCODER), opts, providers=providers)
        self._decoder = ort.InferenceSession(str(self.manifest.root / DECODER_STEP), opts, providers=providers)
        self.providers = self._encoder.get_providers()
        self._check_graphs()

    def _check_graphs(self) -> None:
        want = graph_signature(self.manifest.cell_type)
        for graph, sess in (("encoder", self._encoder), ("decoder_step", self._decoder)):
            got_in = [i.name for i in sess.get_inputs()]
            got_out = [o.name for o in sess.get_outputs()]
            if sorted(got_in) != sorted(want[graph]["inputs"]) or sorted(got_out) != sorted(want[graph]["outputs"]):
                raise BundleError(
                    f"{self.manifest.root}: {graph} graph has inputs {got_in} and outputs {got_out}, "
                    f"but a {self.manifest.cell_type} bundle needs {want[graph]}; re-export the bundle"
                )
        logits = next(o for o in self._decoder.get_outputs() if o.name == "logits")
        if isinstance(logits.shape[-1], int) and logits.shape[-1] != len(self.vocab):
            raise BundleError(
                f"{self.manifest.root}: decoder_step gives {logits.shape[-1]} logits but the manifest's "
                f"vocabulary has {len(self.vocab)} tokens; the bundle is inconsistent, re-export it"
            )
        self._step_outputs = [o.name for o in self._decoder.get_outputs()]
        self._encoder_outputs = [o.name for o in self._encoder.get_outputs()]

    def encode(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 [N,3,S,S] -> the encoder's outputs by name (h0, plus c0 and features where present)."""
        s = self.manifest.image_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (3, s, s):
            raise CaptoolError(f"encoder input must be uint8 [N,3,{s},{s}], got {images.dtype} {list(images.shape)}")
        return dict(zip(self._encoder_outputs, self._encoder.run(self._encoder_outputs, {"image": images})))

    def step(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One decoder step: token and state in, logits and next state out, by name."""
        return dict(zip(self._step_outputs, self._decoder.run(self._step_outputs, feeds)))

    def generate(self, images: np.ndarray, beam_size: int = 1, max_length: Optional[int] = None) -> np.ndarray:
        """uint8 [N,3,S,S] -> int64 [N, L] token ids (`<END>` kept, `<NULL>` after it)."""
        if beam_size != 1:
            raise CaptoolError("beam search is not available yet; use beam_size=1")
        v = self.vocab
        return greedy(
            self.encode(images), self.step,
            start_id=v.start_id, end_id=v.end_id, null_id=v.null_id,
            max_length=max_length or self.manifest.max_length,
        )

    def caption(self, images: Sequence[ImageSource] | ImageSource, beam_size: int = 1,
                max_length: Optional[int] = None) -> list[Caption]:
        """Caption paths, PIL images or H×W×3 uint8 arrays; one `Caption` per image, in order."""
        if not isinstance(images, (list, tuple)):
            images = [images]
        batch = np.stack([preprocess(im, self.manifest.image_size) for im in images])  # (N,3,S,S)
        tokens = self.generate(batch, beam_size=beam_size, max_length=max_length)
        out = []
        for im, row in zip(images, tokens):
            words = self.vocab.words(row)
            ids = [self.vocab.token_to_idx[w] for w in words]
            out.append(Caption(text=" ".join(words), tokens=ids, path=str(im) if isinstance(im, (str, Path)) else None))
        return out
