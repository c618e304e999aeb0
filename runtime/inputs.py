"""Finding images: `captool run`'s arguments as a list of inputs, and the one rule for walking folders.

The rule, for every folder captool searches (`captool run DIR`, `**` globs, export's `--images` and
`--calibration` folders, `captool bench --image-dir`):
- recursive, sorted by path components (`a/sub/1.png` before `a/z.png`);
- only regular files whose suffix is one of IMAGE_EXTENSIONS (any case); FIFOs, devices, sockets and
  dangling links are not image files and are left out;
- names starting with "." are skipped (hidden folders such as `.git`, macOS `._x.jpg` resource forks),
  as a shell's glob skips them; a hidden file named on the command line is still read;
- symbolic links are followed, but each real folder is walked once and each real file listed once
  (identity is the (st_dev, st_ino) pair; the first path in walk order wins), so a link loop or a
  self-link cannot repeat or run forever;
- sub-folders that cannot be listed (permissions, names too long) are skipped.
"""

from __future__ import annotations

import fnmatch
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

from .preprocess import IMAGE_EXTENSIONS

_GLOB_CHARS = frozenset("*?[")


@dataclass(frozen=True)
class Item:
    """One input as the user will see it: a path, or a path with the reason it gives no image."""

    path: str
    error: Optional[str] = None


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _sorted_entries(directory: Path) -> list[os.DirEntry]:
    with os.scandir(directory) as entries:
        return sorted((e for e in entries if not e.name.startswith(".")), key=lambda e: e.name)


def _walk(directory: Path, seen_dirs: set, seen_files: set, top: bool = False) -> Iterator[Path]:
    """The image files under `directory` (already marked seen), depth first in name order."""
    try:
        entries = _sorted_entries(directory)
    except OSError:
        if top:
            raise  # the folder asked for cannot be listed: say so
        return  # a sub-folder that cannot be listed is skipped, as rglob does
    for entry in entries:
        try:
            st = entry.stat()  # follows links; one stat per entry, as Path.is_file() took
        except OSError:
            continue  # a dangling link or a link loop
        key = (st.st_dev, st.st_ino)
        if stat.S_ISDIR(st.st_mode):
            if key not in seen_dirs:
                seen_dirs.add(key)
                yield from _walk(directory / entry.name, seen_dirs, seen_files)
        elif stat.S_ISREG(st.st_mode) and _is_image_name(entry.name) and key not in seen_files:
            seen_files.add(key)
            yield directory / entry.name


def _find(root: Path, seen_dirs: set, seen_files: set) -> list[Path]:
    st = os.stat(root)
    seen_dirs.add((st.st_dev, st.st_ino))
    return list(_walk(root, seen_dirs, seen_files, top=True))


def find_images(root: str | os.PathLike) -> list[Path]:
    """The image files under the folder `root`, by this module's rule: recursive, sorted, each real
    file once, hidden names and non-image files left out. Raises OSError if `root` cannot be listed."""
    return _find(Path(root), set(), set())


# ---- globs ----------------------------------------------------------------------------------------

def _magic(part: str) -> bool:
    return bool(_GLOB_CHARS & set(part))


def _glob_parts(directory: Path, parts: Sequence[str], seen_dirs: set) -> Iterator[Path]:
    """Paths under `directory` matching the pattern components `parts` (`**`: zero or more folders)."""
    if not parts:
        yield directory
        return
    part, rest = parts[0], parts[1:]
    if part == "**":
        try:
            st = os.stat(directory)
            seen_dirs.add((st.st_dev, st.st_ino))
            entries = _sorted_entries(directory)
        except OSError:
            return
        yield from _glob_parts(directory, rest, seen_dirs)  # zero folders
        for entry in entries:
            try:
                st = entry.stat()
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) not in seen_dirs:  # each real folder once
                yield from _glob_parts(directory / entry.name, parts, seen_dirs)
    elif _magic(part):
        try:
            with os.scandir(directory) as listing:  # "." names match only a pattern that starts with "."
                entries = sorted((e for e in listing if part.startswith(".") or not e.name.startswith(".")),
                                 key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            if fnmatch.fnmatchcase(entry.name, part) and (not rest or _is_dir(entry)):
                yield from _glob_parts(directory / entry.name, rest, seen_dirs)
    else:
        path = directory / part
        if rest or os.path.lexists(path):
            yield from _glob_parts(path, rest, seen_dirs)


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def expand_glob(pattern: str) -> list[str]:
    """The paths matching a glob (`*`, `?`, `[...]`, `**` for any depth of folders), sorted by path
    components. Names starting with "." match only a pattern part starting with "."; `**` walks each
    real folder once (links followed), so a link loop ends. Nothing raises: what cannot be looked at
    (a name too long, a loop) matches nothing."""
    absolute = pattern.startswith("/")
    parts = [p for p in pattern.split("/") if p]
    literal = 0
    while literal < len(parts) - 1 and not _magic(parts[literal]):
        literal += 1
    base = Path(("/" if absolute else "") + "/".join(parts[:literal]) or ".")
    try:
        return [str(path) for path in _glob_parts(base, parts[literal:], set())] if os.path.isdir(base) else []
    except (OSError, ValueError):  # ValueError: a NUL byte in the pattern
        return []


# ---- `captool run`'s arguments --------------------------------------------------------------------

def _identity(path: str) -> Optional[tuple[int, int]]:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _folder_items(arg: str, seen_dirs: set, seen_files: set) -> list[Item]:
    try:
        return [Item(str(p)) for p in _find(Path(arg), seen_dirs, seen_files)]
    except OSError as e:
        return [Item(arg, f"{arg}: cannot list this directory ({e.strerror or e})")]


def _glob_items(pattern: str) -> list[Item]:
    """A glob's matches: files as they are, folders as their image files, each real file once."""
    matches = expand_glob(pattern)
    if not matches:
        return [Item(pattern, f"{pattern}: no files match this pattern")]
    items: list[Item] = []
    seen_dirs: set = set()
    seen_files: set = set()
    for match in matches:
        key = _identity(match)
        if os.path.isdir(match):
            if key not in seen_dirs:
                items += _folder_items(match, seen_dirs, seen_files)
        elif key is None or key not in seen_files:  # a dangling link still gets its record
            if key is not None:
                seen_files.add(key)
            items.append(Item(match))
    return items or [Item(pattern, f"{pattern}: no image files in the folders this pattern matches")]


def expand_inputs(inputs: Sequence[str]) -> list[Item]:
    """INPUTs as items, in the order given: files as they are, directories as their image files
    (find_images' rule), globs as their matches (expand_glob; for shells that do not expand them).
    Each argument's expansion holds a real file once; an argument given twice is read twice. A
    directory without images or a glob without matches is an item with an error; so is a directory
    that cannot be listed. Nothing here raises: a name too long or a link loop is passed on as a
    file, and the loader's record says what is wrong with it."""
    items: list[Item] = []
    for arg in inputs:
        try:
            is_dir = stat.S_ISDIR(os.stat(arg).st_mode)
        except (OSError, ValueError):  # ValueError: a NUL byte in the name
            is_dir = False
        if is_dir:
            items += _folder_items(arg, set(), set()) or [Item(arg, f"{arg}: no image files in this directory")]
        elif not (_GLOB_CHARS & set(arg)) or os.path.lexists(arg):
            items.append(Item(arg))  # missing, odd or too long: the loader gives its record
        else:
            items += _glob_items(arg)
    return items
