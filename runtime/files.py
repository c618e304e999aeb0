"""Files captool writes and reads back: atomic writes, versioned JSON, and directories swapped into place.

Every stage that saves something (synth, checkpoints, training state, bundles, run output) writes
through `atomic_write`, so an interruption leaves the old file or the new one, never half of one;
every stage that reads a JSON file of its own or a user's goes through `read_json` (`read_versioned`
for our own formats), so a damaged or hostile file is an error naming the file, never a traceback.
A stage that builds a directory (a bundle, a dataset) builds it in a temporary directory beside the
target, holds `lock` on it while it works, and puts it in place with `swap_into_place`; the next run's
`remove_stale` removes what a kill -9 left behind, never a directory another process still holds.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Type, Union

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; stale directories are then left for the user
    fcntl = None

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


Writer = Callable[[Path], None]


def atomic_write(path: str | os.PathLike, data: Union[bytes, str, Writer], *, durable: bool = True) -> None:
    """Write `data` to `path` so that readers see the old content or the new, never a part.

    `data` is bytes, text, or a function that writes the file it is given (safetensors' save_file).
    A temporary file beside `path` is written, flushed to disk and renamed over it; on any error
    (a full disk, Ctrl-C) the temporary file is removed and `path` is left as it was.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        if callable(data):
            os.close(fd)
            data(Path(tmp))
            fd = os.open(tmp, os.O_RDWR)
        with os.fdopen(fd, "rb+" if callable(data) else "wb") as f:
            if not callable(data):
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a saved file is as readable as any other
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
        raise error(f"{path}: not UTF-8 text, so not a usable {what}{tail}") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}), so not a usable "
                    f"{what}{tail}") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply to be a {what}{tail}") from None
    except OSError as e:
        raise error(f"{path}: cannot read the {what} ({e.strerror or e}){tail}") from None


def read_versioned(path: str | os.PathLike, kind: str, version: int, *, error: Type[CaptoolError] = CaptoolError,
                   what: str = "file", fix: str = "", key: str = "version") -> dict:
    """`read_json` of one of our own formats: a JSON object with "format": kind and `key`: version."""
    doc = read_json(path, what=what, fix=fix, error=error)
    tail = f"; {fix}" if fix else ""
    if not isinstance(doc, dict) or doc.get("format") != kind:
        raise error(f"{path}: not a {what} (no \"format\": \"{kind}\"){tail}")
    if doc.get(key) != version:
        raise error(f"{path}: {what} format version {doc.get(key)!r}, this captool reads version {version}; "
                    f"use the captool that wrote it")
    return doc


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_temp_dir(target: Path, tag: str = "") -> Path:
    """An empty directory `.NAME.[tag]XXXXXXXX.tmp` beside `target`, with a plain directory's mode."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.{tag}", suffix=".tmp", dir=target.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700
    return tmp


def hold(path: Path, in_use: Optional[CaptoolError] = None) -> int:
    """Lock the directory `path` for this process (the kernel releases it even on kill -9); close the fd to release.

    `in_use` is raised when another process holds it; `remove_stale` never removes a held directory.
    """
    fd = os.open(path, os.O_RDONLY)
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if in_use is not None:
                os.close(fd)
                raise in_use from None
    return fd


@contextlib.contextmanager
def lock(path: Path, in_use: Optional[CaptoolError] = None) -> Iterator[None]:
    """`hold` for the length of a `with` block."""
    fd = hold(path, in_use)
    try:
        yield
    finally:
        os.close(fd)


def _held(path: Path) -> bool:
    """Whether another process holds `lock` on `path` (no locks where the platform has none)."""
    if fcntl is None:
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def remove_stale(target: Path, tag: str = "", *, older_than: float) -> list[Path]:
    """Remove the temporary directories `make_temp_dir(target, tag)` made that a killed run left behind.

    Only exact `.NAME.[tag]XXXXXXXX.tmp` names are considered (never another target's), and of those
    only directories that no live process holds with `lock` and that are older than `older_than`
    (a time.time() stamp: this run's start), so a run that is still starting is never touched.
    """
    pattern = re.compile(rf"\.{re.escape(target.name)}\.{re.escape(tag)}[a-z0-9_]{{8}}\.tmp")
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(target.parent):
            path = Path(entry.path)
            if not (pattern.fullmatch(entry.name) and entry.is_dir(follow_symlinks=False)):
                continue
            with contextlib.suppress(OSError):
                if entry.stat(follow_symlinks=False).st_mtime < older_than and not _held(path):
                    shutil.rmtree(path)
                    removed.append(path)
    return removed


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where that is unavailable."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):  # kernel or file system without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_into_place(tmp: Path, target: Path) -> None:
    """Put the finished directory `tmp` at `target`, replacing a directory there.

    At every instant `target` holds the old directory or the new one: where the system can swap two
    paths at once it does; elsewhere the old one is renamed aside to `.NAME.old-XXXXXXXX.tmp` for
    the moment between two renames, and `restore_aside` puts it back if a kill strikes there.
    """
    if not target.exists():
        os.rename(tmp, target)
    elif _exchange(tmp, target):
        shutil.rmtree(tmp, ignore_errors=True)  # now the old directory; a kill here leaves it stale
    else:
        aside = make_temp_dir(target, "old-")
        os.rename(target, aside / target.name)
        try:
            os.rename(tmp, target)
        except BaseException:
            os.rename(aside / target.name, target)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    fsync_dir(target.parent)


def restore_aside(target: Path) -> None:
    """After a kill between `swap_into_place`'s two renames: put the old directory back at `target`."""
    if target.exists():
        return
    pattern = re.compile(rf"\.{re.escape(target.name)}\.old-[a-z0-9_]{{8}}\.tmp")
    asides = [p / target.name for p in target.parent.glob(f".{target.name}.old-*.tmp")
              if pattern.fullmatch(p.name) and (p / target.name).is_dir()]
    if asides:
        newest = max(asides, key=lambda p: p.stat().st_mtime)
        os.rename(newest, target)
        with contextlib.suppress(OSError):
            newest.parent.rmdir()
