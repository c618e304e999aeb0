"""The PyTorch side that `captool eval` and `captool bench` measure the runtime against.

The runtime package never imports torch; what it needs of the PyTorch model for a side-by-side
comparison lives here. Run as a module it is the cold-start job of `captool bench`: the plain
PyTorch way to caption one image (`python -m captool.training.reference CHECKPOINT IMAGE`).
"""

from __future__ import annotations

import sys
from typing import Callable, Optional

import numpy as np
import torch

from captool.preprocess import preprocess
from captool.vocab import Vocab

from .checkpoint import load_checkpoint
from .model import CaptioningRNN


def load_reference(path, threads: Optional[int] = None) -> CaptioningRNN:
    """The checkpoint's model (CPU, float32, eval), torch on `threads` intra-op threads if given."""
    if threads:
        torch.set_num_threads(threads)
    return load_checkpoint(path)


def sampler(model: CaptioningRNN) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 [N,3,S,S] numpy -> int64 [N,L] numpy through the model's own greedy `sample`."""
    def generate(images: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return model.sample(torch.from_numpy(images), max_length=model.config.max_length).numpy()

    return generate


def bench_calls(model: CaptioningRNN, max_length: int) -> dict:
    """What `captool bench` times on this side: sample, encode and step on torch tensors."""
    return {"generate": lambda x: model.sample(x, max_length=max_length), "encode": model.encode,
            "step": lambda feeds: model.step(**feeds), "as_input": torch.from_numpy,
            "context": torch.inference_mode}


def versions() -> dict:
    return {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}


def main(argv: list[str]) -> None:
    """Caption one image file with a checkpoint and print the caption."""
    checkpoint, image = argv
    model = load_checkpoint(checkpoint)
    pixels = torch.from_numpy(preprocess(image, model.config.image_size, model.config.jpeg_decode))[None]  # (1, 3, S, S)
    with torch.inference_mode():
        ids = model.sample(pixels)[0].tolist()
    print(Vocab(model.idx_to_token).decode(ids))


if __name__ == "__main__":
    main(sys.argv[1:])
