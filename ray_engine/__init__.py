"""captool on Ray Data (the `ray` extra): caption millions of images across a cluster, one record per input.

`CaptionActor` is Ray-free (a plain class for `map_batches`); `caption_dataset` and `caption_to_folder`
import Ray when first used. docs/scale.md has the recipe.
"""

from __future__ import annotations

from captool.ray.actor import BundleFiles, CaptionActor, records_table

__all__ = ["BundleFiles", "CaptionActor", "records_table", "caption_dataset", "caption_to_folder"]


def __getattr__(name):
    # Ray itself is imported only by the functions that run a job: `import captool.ray` stays cheap.
    if name == "caption_dataset":
        from captool.ray.dataset import caption_dataset

        return caption_dataset
    if name == "caption_to_folder":
        from captool.ray.folder import caption_to_folder

        return caption_to_folder
    raise AttributeError(f"module 'captool.ray' has no attribute {name!r}")
