"""`caption_dataset`: files to a Ray Dataset of records (path, caption, tokens, error, bundle), with safe defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence, Union

import ray

from captool.preprocess import IMAGE_EXTENSIONS
from captool.ray.actor import BundleFiles, CaptionActor
from captool.records import bundle_id

# Reading a file's bytes waits on storage, not on a core; the actors do the decoding. A read task
# that asks for a whole CPU could never start once the actors hold every CPU of a node, and the job
# would hang with no error (measured: 2 actors at num_cpus=1 and one read task on a 2-CPU node).
READ_CPUS = 0.0
READ_CONCURRENCY = 2  # read tasks at once: enough to keep a few actors fed without flooding the store


def caption_dataset(paths: Union[str, Sequence[str]], bundle: Union[str, Path, BundleFiles, None] = None, *,
                    by_value: bool = True, device: str = "cpu", actors: int = 2, cpus_per_actor: float = 1.0,
                    gpus_per_actor: float = 0.0, threads: Optional[int] = None, batch_size: int = 32,
                    beam_size: int = 1, max_length: Optional[int] = None, length_penalty: float = 0.0,
                    read_concurrency: int = READ_CONCURRENCY, actor: type = CaptionActor) -> "ray.data.Dataset":
    """Image files (or folders of them, or s3://... URIs) captioned by `actors` CaptionActors.

    Files are read with `read_binary_files(include_paths=True)` and decoded by captool's own
    preprocessing on the actors, never Ray's `read_images`: the same pixels and errors as `captool
    run`, and a corrupt file is its error row instead of a failed job. Folders keep the files whose
    suffix is one of captool's IMAGE_EXTENSIONS.

    Args:
        paths: files, folders or URIs that every node can read.
        bundle: a bundle directory (default: the shipped one), or BundleFiles. With by_value (the
            default) a directory's files are read here and shipped to the workers; by_value=False
            means every node reads the same path (shared storage), checked against this one's id.
        device: "cpu", or "cuda" with gpus_per_actor > 0 (e.g. 1, or 0.5 for two actors per GPU).
        actors: CaptionActors at once (the pool's size).
        cpus_per_actor: Ray CPUs each actor holds; its onnxruntime threads default to this many.
            The read tasks hold none, so actors x cpus_per_actor may be all of a node's CPUs.
        batch_size: images per actor call (per onnxruntime batch).
        actor: the class the actors run: CaptionActor, or a subclass (one that adds metrics, say).
    """
    if actors < 1:
        raise ValueError(f"actors must be >= 1, got {actors}")
    if device == "cuda" and gpus_per_actor <= 0:
        raise ValueError("device='cuda' needs gpus_per_actor > 0 (1, or 0.5 for two actors per GPU)")
    if isinstance(bundle, BundleFiles):
        shipped, expect = bundle, bundle.id
    else:
        if bundle is None:
            from captool.models import default_bundle

            bundle = default_bundle()
        shipped = BundleFiles.read(bundle) if by_value else str(bundle)
        expect = bundle_id(bundle)
    ds = ray.data.read_binary_files(paths, include_paths=True, num_cpus=READ_CPUS, concurrency=read_concurrency,
                                    file_extensions=[e.lstrip(".") for e in IMAGE_EXTENSIONS])
    return ds.map_batches(
        actor,
        fn_constructor_kwargs={"bundle": shipped, "device": device, "threads": threads or max(1, round(cpus_per_actor)),
                               "beam_size": beam_size, "max_length": max_length, "length_penalty": length_penalty,
                               "expect": expect},
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor or None,
    )
