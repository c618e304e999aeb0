"""The image encoder's CNN: MobileNetV2 features on uint8 images, and where its weights come from.

Normalization lives here, inside the module, so encoder.onnx takes the same uint8 pixels that
`captool.preprocess` produces and the runtime never normalizes on its own.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import Tensor, nn

from captool.preprocess import IMAGENET_MEAN, IMAGENET_STD

from .errors import TrainingError

# Prefixes a MobileNetV2 `features` state dict may carry: torchvision's full model, our own modules.
_KEY_PREFIXES = ("features.", "backbone.", "feature_extractor.backbone.", "")


class FeatureExtractor(nn.Module):
    """uint8 (N, 3, 112, 112) -> /255 -> ImageNet normalization -> MobileNetV2 features.

    pooling=True gives (N, C) (the seed's rnn/lstm input), pooling=False the (N, C, 4, 4) grid for
    attention; C = 1280 at width <= 1.0. Frozen (the default), the backbone stays in eval() even
    under train(), so BatchNorm uses its running statistics and is never updated.
    """

    def __init__(self, width: float = 1.0, pooling: bool = True, weights: str | os.PathLike | None = None,
                 device="cpu", dtype=torch.float32):
        super().__init__()
        self.pooling = pooling
        self.backbone = torchvision.models.mobilenet_v2(weights=None, width_mult=width).features
        if weights is not None and str(weights).lower() != "none":
            load_backbone_weights(self.backbone, weights, width)
        self.backbone.to(device=device, dtype=dtype)
        # Not persistent: they are constants of the preprocessing, not weights to checkpoint.
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN, device=device, dtype=dtype).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD, device=device, dtype=dtype).view(1, 3, 1, 1), persistent=False)
        self.trainable = True
        self.set_trainable(False)

    @property
    def out_channels(self) -> int:
        return self.backbone[-1][0].out_channels  # the last 1×1 conv of MobileNetV2

    def set_trainable(self, flag: bool, module_training: bool | None = None) -> None:
        self.trainable = bool(flag)
        for p in self.backbone.parameters():
            p.requires_grad_(self.trainable)
        self.train(self.training if module_training is None else module_training)

    def train(self, mode: bool = True) -> "FeatureExtractor":
        super().train(mode)
        if not self.trainable:
            self.backbone.eval()
        return self

    def forward(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise TrainingError(
                f"images must be uint8 (N, 3, H, W) RGB as captool.preprocess makes them, "
                f"got {images.dtype} of shape {tuple(images.shape)}"
            )
        x = images.to(self.mean.dtype) / 255.0  # (N, 3, S, S) in [0, 1]
        x = (x - self.mean) / self.std
        grid = self.backbone(x)  # (N, 3, 112, 112) -> (N, C, 4, 4)
        if self.pooling:
            return grid.mean(dim=(2, 3))  # (N, C, 4, 4) -> (N, C); the batch dim stays even for N = 1
        return grid


def imagenet_weights_path() -> Path:
    """Where torchvision's cache keeps MobileNet_V2_Weights.IMAGENET1K_V1 (it is never downloaded here)."""
    url = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def load_backbone_weights(backbone: nn.Module, source: str | os.PathLike, width: float) -> None:
    """Load "imagenet" (from torchvision's cache) or a local state-dict file into `backbone`."""
    if str(source).lower() == "imagenet":
        path = imagenet_weights_path()
        if width != 1.0:
            raise TrainingError(
                f"ImageNet weights exist for MobileNetV2 at width 1.0 only, not {width}: "
                f"use --backbone-width 1.0, or --backbone PATH with weights of that width"
            )
        if not path.is_file():
            raise TrainingError(
                f"ImageNet weights for MobileNetV2 are not in torchvision's cache: {path} does not exist; "
                f"copy {path.name} there from a machine that has it (torchvision downloads it with "
                f"`mobilenet_v2(weights='IMAGENET1K_V1')`), or pass the file with --backbone PATH"
            )
    else:
        path = Path(source)
        if not path.is_file():
            raise TrainingError(f"backbone weights file {path} does not exist: pass a torchvision mobilenet_v2 state-dict file, 'imagenet' or none")
    state = _read_state_dict(path)
    backbone.load_state_dict(_match_backbone_keys(state, backbone, path, width))


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    """A tensor dict from a .safetensors file, or a torch.save file read with weights_only (no code runs)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip, safetensors and torch all raise their own types
        raise TrainingError(
            f"cannot read backbone weights {path} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
            f"pass a torchvision mobilenet_v2 state dict (.pth) or a .safetensors file"
        ) from None
    for wrapper in ("state_dict", "model"):  # training scripts often nest the dict one level
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise TrainingError(f"{path} does not hold a state dict (name -> tensor); pass a torchvision mobilenet_v2 state dict")
    return state


def _match_backbone_keys(state: dict[str, Tensor], backbone: nn.Module, path: Path, width: float) -> dict[str, Tensor]:
    """The part of `state` that is MobileNetV2's `features`, with its keys as the backbone names them."""
    expected = backbone.state_dict()
    for prefix in _KEY_PREFIXES:
        found = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if set(expected) <= set(found):
            break
    else:
        example = next(iter(state), "(none)")
        raise TrainingError(
            f"{path} is not a MobileNetV2 state dict: expected keys like 'features.0.0.weight', found e.g. "
            f"{example!r}; pass the state dict of torchvision.models.mobilenet_v2"
        )
    for name, ref in expected.items():
        if found[name].shape != ref.shape:
            raise TrainingError(
                f"{path} holds MobileNetV2 weights of another width: {name} has shape {tuple(found[name].shape)}, "
                f"width {width} needs {tuple(ref.shape)}; set --backbone-width to the file's width"
            )
    return {name: found[name] for name in expected}
