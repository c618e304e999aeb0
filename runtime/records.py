"""One record per input, whatever runs the captioner: `captool run --json` and the engines (captool.ray) alike.

A record is a caption or the reason there is none; a bad input never raises, it becomes its record.
The schema: path, caption, tokens, error, and the bundle that captioned it (its manifest's sha256).
`Record.to_json` is `captool run --json`'s line (path, caption, tokens, or path, error); an engine
writes the same lines and names the bundle once per output (captool.ray's `_captool.json`), and
`Record.to_row` gives all five fields as columns for a columnar engine.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
from PIL.Image import DecompressionBombWarning

from .bundle import MANIFEST
from .errors import ImageError
from .preprocess import EncodedImage, _one_line, preprocess

# What caption_batch reads: a path, or an image file's bytes (with the name it goes by).
Source = Union[str, Path, bytes, EncodedImage]

COLUMNS = ("path", "caption", "tokens", "error", "bundle")  # Record.to_row's keys, in this order


def printable(text: str) -> str:
    """`text` as valid UTF-8 for the records: a file name's bytes that are not UTF-8 (which Python
    holds as the surrogates U+DC80..U+DCFF) are written as the four characters `\\xHH`."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return "".join(f"\\x{ord(ch) - 0xDC00:02x}" if "\udc80" <= ch <= "\udcff" else
                       f"\\u{ord(ch):04x}" if "\ud800" <= ch <= "\udfff" else ch for ch in text)


@dataclass(frozen=True)
class Record:
    """One output line: a caption, or the reason there is none; `bundle` names the bundle that made it."""

    path: str
    caption: Optional[str] = None
    tokens: Optional[list[int]] = None
    error: Optional[str] = None
    bundle: Optional[str] = None

    def to_json(self) -> str:
        """`captool run --json`'s line: {"path", "caption", "tokens"} or {"path", "error"}."""
        if self.error is not None:
            return json.dumps({"path": printable(self.path), "error": printable(self.error)}, ensure_ascii=False)
        return json.dumps({"path": printable(self.path), "caption": printable(self.caption), "tokens": self.tokens},
                          ensure_ascii=False)

    def to_text(self) -> str:
        # A tab or newline in a name would break the two columns: written as \t, \n, \r.
        path = printable(self.path).replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
        return f"{path}\t{printable(self.caption)}"

    def to_row(self) -> dict:
        """Every field, keyed by COLUMNS (None where a field does not apply)."""
        return {"path": self.path, "caption": self.caption, "tokens": self.tokens, "error": self.error,
                "bundle": self.bundle}

    @classmethod
    def from_row(cls, row: dict) -> "Record":
        """The inverse of to_row; tokens may come back as any sequence of integers (an Arrow list)."""
        tokens = row.get("tokens")
        caption, error = row.get("caption"), row.get("error")
        return cls(str(row["path"]), caption if error is None else None,
                   [int(t) for t in tokens] if tokens is not None and error is None else None,
                   error, row.get("bundle"))


def bundle_id(bundle_dir: Union[str, Path]) -> str:
    """A bundle's identity: the sha256 of its manifest.json, which holds the sha256 of every other file."""
    return hashlib.sha256((Path(bundle_dir) / MANIFEST).read_bytes()).hexdigest()


def records_of(captioner, paths: Sequence[str], images: np.ndarray, readable: Sequence[int],
               errors: Sequence[Optional[str]], *, beam_size: int = 1, max_length: Optional[int] = None,
               length_penalty: float = 0.0, bundle: Optional[str] = None) -> list[Record]:
    """One batch's records, in order: row j of `images` (uint8 (n, 3, S, S)) is input readable[j], every
    other input carries its error. A batch that fails to caption (an onnxruntime error) gives its
    readable inputs error records saying so."""
    captions, failure = {}, None
    if len(readable):
        try:
            tokens = captioner.generate(images, beam_size=beam_size, max_length=max_length,
                                        length_penalty=length_penalty)  # (n, L)
            captions = {i: captioner.to_caption(row) for i, row in zip(readable, tokens)}
        except Exception as e:
            failure = f"captioning failed ({type(e).__name__}: {_one_line(e)})"
    records = []
    for i, (path, error) in enumerate(zip(paths, errors)):
        if i in captions:
            records.append(Record(path, captions[i].text, captions[i].tokens, bundle=bundle))
        else:
            records.append(Record(path, error=error or f"{path}: {failure}", bundle=bundle))
    return records


def read_source(source: Source, name: str, size: int,
                jpeg_decode: str = "full") -> tuple[Optional[np.ndarray], Optional[str]]:
    """(uint8 (3, size, size), None) for a readable image, (None, the one-line reason) for any other."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = EncodedImage(bytes(source), name)
    try:
        with warnings.catch_warnings():  # a bomb is an error here too (see run.load_batches)
            warnings.simplefilter("error", DecompressionBombWarning)
            return preprocess(source, size, jpeg_decode), None
    except ImageError as e:
        return None, str(e)
    except Exception as e:  # the last line of defence: no traceback for any input
        return None, f"{name}: cannot read image ({type(e).__name__}: {_one_line(e)})"


def caption_batch(captioner, sources: Sequence[Source], names: Optional[Sequence[str]] = None, *,
                  beam_size: int = 1, max_length: Optional[int] = None, length_penalty: float = 0.0,
                  bundle: Optional[str] = None) -> list[Record]:
    """One Record per source, in order; never raises for a bad input.

    Args:
        captioner: a captool.Captioner.
        sources: paths, or image files' bytes (bytes or EncodedImage), decoded by captool's own
            preprocessing: the same pixels and the same errors as `captool run` gives the files.
        names: the path each record reports; default: the path itself (required for bytes).
        bundle: the id the records carry; default: bundle_id of the captioner's bundle.
    """
    if names is None:
        if any(isinstance(s, (bytes, bytearray, memoryview)) for s in sources):
            raise ValueError("caption_batch: bytes sources need names (the path each record reports)")
        names = [s.name if isinstance(s, EncodedImage) else str(s) for s in sources]
    if len(names) != len(sources):
        raise ValueError(f"caption_batch: {len(sources)} sources but {len(names)} names; give one name per source")
    size = captioner.manifest.image_size
    read = [read_source(s, str(n), size, captioner.manifest.jpeg_decode) for s, n in zip(sources, names)]
    readable = [i for i, (a, _) in enumerate(read) if a is not None]
    images = np.stack([read[i][0] for i in readable]) if readable else np.zeros((0, 3, size, size), np.uint8)
    return records_of(captioner, [str(n) for n in names], images, readable, [e for _, e in read],
                      beam_size=beam_size, max_length=max_length, length_penalty=length_penalty,
                      bundle=bundle if bundle is not None else bundle_id(captioner.manifest.root))
