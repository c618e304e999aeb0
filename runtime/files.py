"""Files captool writes and reads back: atomic writes, and JSON read with one-line errors.

Every stage that saves something (synth, checkpoints, training state, bundles, run output) writes
through `atomic_write`, so an interruption leaves the old file or the new one, never half of one;
every stage that reads a JSON file of its own or a user's goes through `read_json`, so a damaged or
hostile file is an error naming the file, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional, Type

from .errors import CaptoolError

# Far beyond any manifest, checkpoint config or training state; a user's annotation file passes a larger cap.
MAX_JSON_BYTES = 64 << 20


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable (a no-op where directories cannot be opened, as on Windows)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | os.PathLike, data: bytes | str, *, durable: bool = True) -> None:
    """Write `data` to `path` so that readers see the old content or the new, never a part.

    A temporary file beside `path` is written, flushed to disk and renamed over it; on any error
    (a full disk, Ctrl-C) the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def write_json(path: str | os.PathLike, doc: Any, *, indent: Optional[int] = 2, durable: bool = True) -> None:
    """`atomic_write` of a JSON document (UTF-8, a trailing newline)."""
    atomic_write(path, json.dumps(doc, indent=indent, ensure_ascii=False) + "\n", durable=durable)


def read_json(path: str | os.PathLike, *, what: str = "JSON file", fix: str = "",
              error: Type[CaptoolError] = CaptoolError, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file; anything wrong with it is `error` with one line naming the file and the fix.

    Covers a missing or unreadable file, a file that is not a regular file (a FIFO would block), a
    file over `max_bytes`, bytes that are not UTF-8, invalid JSON and nesting too deep for Python.
    """
    path = Path(path)
    tail = f"; {fix}" if fix else ""
    try:
        if not path.is_file():
            state = "does not exist" if not path.exists() else "is not a regular file"
            raise error(f"{path}: {what} {state}{tail}")
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{path}: {what} is {size} bytes, more than the {max_bytes} a {what} may have{tail}")
        with open(path, "rb") as f:
            text = f.read(max_bytes + 1).decode("utf-8")
        return json.loads(text)
    except CaptoolError:
        raise
    except UnicodeDecodeError:
        raise error(f"{path}: {what} is not UTF-8 text{tail}") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: {what} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}){tail}") from None
    except RecursionError:
        raise error(f"{path}: {what} is nested too deeply to be a {what}{tail}") from None
    except OSError as e:
        raise error(f"{path}: cannot read the {what} ({e.strerror or e}){tail}") from None
