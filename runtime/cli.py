"""The `captool` command: a thin typer layer over functions that can be imported and tested.

Heavy packages (torch for train/export) are imported inside the commands that need them, so
`captool run` starts fast and works on a box that has no torch.
"""

from __future__ import annotations

import contextlib
import importlib
import sys
from pathlib import Path
from typing import Annotated, Iterator, Optional

import typer

from .errors import CaptoolError, MissingExtraError

app = typer.Typer(
    name="captool",
    help="Train a small image captioner, export it to a verified ONNX bundle, caption images anywhere.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# Which extra provides each heavy module, for the "install captool[...]" message.
_EXTRA_OF = {"torch": "train", "torchvision": "train", "safetensors": "train", "onnx": "export",
             "onnxscript": "export", "pycocoevalcap": "eval", "matplotlib": "bench", "psutil": "bench"}


def fail(message: str, code: int = 2) -> "typer.Exit":
    """Print one line to stderr and return the Exit to raise (2: usage or bundle error, 1: failed)."""
    typer.echo(f"captool: error: {message}", err=True)
    return typer.Exit(code=code)


def need(module: str):
    """Import a heavy package module, or fail naming the extra that installs what is missing."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = (e.name or "").split(".")[0]
        if missing in _EXTRA_OF:
            raise MissingExtraError(_EXTRA_OF[missing], missing) from None
        raise


@contextlib.contextmanager
def errors_to_exit(code: int = 2) -> Iterator[None]:
    """Domain errors become a one-line message and an exit code here, and only here."""
    try:
        yield
    except CaptoolError as e:
        raise fail(str(e), code) from None


@app.command()
def synth(
    out: Annotated[Path, typer.Argument(help="Directory to write the dataset into (COCO captions format).")],
    train: Annotated[int, typer.Option(help="Number of training images.")] = 2000,
    val: Annotated[int, typer.Option(help="Number of validation images.")] = 200,
    seed: Annotated[int, typer.Option(help="Generator seed; the same seed gives the same files.")] = 0,
) -> None:
    """Write a procedurally generated dataset of shape scenes with reference captions and scene facts."""
    from .synth import write_dataset

    with errors_to_exit():
        summary = write_dataset(out, train=train, val=val, seed=seed)
    typer.echo(summary)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
