"""The captioner as a Ray Data actor: a bundle opened once per worker, batches of image files in, records out.

Nothing here imports Ray: the actor is a plain class that `map_batches` instantiates on each worker,
and that tests and other engines may call directly.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from captool.bundle import MANIFEST, load_manifest
from captool.errors import BundleError
from captool.records import COLUMNS, Record, bundle_id, caption_batch


@dataclass(frozen=True)
class BundleFiles:
    """A bundle by value, for workers that share no storage with the driver: its files' bytes and its
    id (the sha256 of manifest.json, whose entries hold the sha256 of every other file)."""

    id: str
    files: dict[str, bytes]  # file name -> contents, manifest.json included

    @classmethod
    def read(cls, bundle_dir: Union[str, Path]) -> "BundleFiles":
        """Every file the bundle's manifest lists, checked against its hashes before it is shipped."""
        root = Path(bundle_dir)
        manifest = load_manifest(root)
        names = [MANIFEST, *manifest.raw["files"]]
        files = {name: (root / name).read_bytes() for name in names}
        return cls(bundle_id(root), files)

    def write(self, directory: Union[str, Path]) -> Path:
        """The files into `directory` (a worker's local disk), refused unless the manifest is the one
        named by `id`; load_manifest then checks every other file against the manifest's hashes."""
        import hashlib

        manifest = self.files.get(MANIFEST)
        if manifest is None or hashlib.sha256(manifest).hexdigest() != self.id:
            raise BundleError(f"the shipped bundle's {MANIFEST} is not bundle {self.id[:12]}... (damaged in "
                              f"transit?); ship it again with BundleFiles.read(BUNDLE_DIR)")
        root = Path(directory)
        for name, data in self.files.items():
            if Path(name).name != name or name in (".", ".."):
                raise BundleError(f"the shipped bundle names a file {name!r} outside its folder; re-export the "
                                  f"bundle with `captool export`")
            (root / name).write_bytes(data)
        return root


def ray_cpus() -> Optional[int]:
    """The CPUs Ray gave this actor (rounded, at least 1); None outside a Ray worker."""
    try:
        import ray
    except ImportError:
        return None
    if not ray.is_initialized():
        return None
    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    return max(1, round(cpus)) if cpus else None


class CaptionActor:
    """Captions batches of image files; for `Dataset.map_batches(CaptionActor, fn_constructor_kwargs=...)`.

    A batch is a mapping with a "path" column and, as `ray.data.read_binary_files(...,
    include_paths=True)` gives it, a "bytes" column; without "bytes" the paths are read here (shared
    storage). Each input becomes one row of COLUMNS (path, caption, tokens, error, bundle), a bad
    input an error row: the actor never raises for an image.

    Args:
        bundle: a bundle directory every worker can read (shared storage), or BundleFiles (the bytes,
            written to a local temporary folder); default: the bundle shipped with captool. Either way
            every file is checked against the manifest's sha256 on the worker.
        device: "cpu" or "cuda" (with num_gpus=1 in map_batches), or "auto".
        threads: onnxruntime threads; default: the CPUs Ray gives the actor (num_cpus), else one per core.
        beam_size, max_length, length_penalty: decoding, as `captool run`'s options.
        expect: a bundle id (records.bundle_id) the worker's bundle must have: a path on shared storage
            that holds another version on some node is refused.
    """

    def __init__(self, bundle: Union[str, Path, BundleFiles, None] = None, *, device: str = "cpu",
                 threads: Optional[int] = None, beam_size: int = 1, max_length: Optional[int] = None,
                 length_penalty: float = 0.0, expect: Optional[str] = None):
        from captool.captioner import Captioner

        if isinstance(bundle, BundleFiles):
            local = tempfile.mkdtemp(prefix="captool-bundle-")
            weakref.finalize(self, shutil.rmtree, local, True)  # the worker's copy goes with the actor
            root = bundle.write(local)
            expect = expect or bundle.id
        elif bundle is None:
            from captool.models import default_bundle

            root = default_bundle()
        else:
            root = Path(bundle)
        # The actors of a node share its cores: threads that spin between ops would take each other's.
        self.captioner = Captioner(root, device=device, threads=threads or ray_cpus(), spin=False)
        self.bundle = bundle_id(root)
        if expect is not None and self.bundle != expect:
            raise BundleError(f"bundle {root} on this worker is {self.bundle[:12]}..., not the driver's "
                              f"{expect[:12]}...: give every node the same bundle, or ship it by value (BundleFiles)")
        self.beam_size, self.max_length, self.length_penalty = beam_size, max_length, length_penalty

    def records(self, batch: Mapping[str, Sequence]) -> list[Record]:
        """The batch's records, in order (Ray-free: paths, or paths and bytes)."""
        paths = [str(p) for p in batch["path"]]
        sources = list(batch["bytes"]) if "bytes" in batch else paths
        return caption_batch(self.captioner, sources, paths, beam_size=self.beam_size, max_length=self.max_length,
                             length_penalty=self.length_penalty, bundle=self.bundle)

    def __call__(self, batch: Mapping[str, Sequence]):
        """The batch's records as a pyarrow Table of one fixed schema (an all-error batch too)."""
        return records_table([r.to_row() for r in self.records(batch)])


def records_table(rows: Sequence[dict]):
    """Rows of COLUMNS as a pyarrow Table whose schema never depends on the values (no null-typed columns)."""
    import pyarrow as pa

    schema = pa.schema([("path", pa.string()), ("caption", pa.string()), ("tokens", pa.list_(pa.int64())),
                        ("error", pa.string()), ("bundle", pa.string())])
    return pa.Table.from_pylist([{k: row[k] for k in COLUMNS} for row in rows], schema=schema)
