"""Bundles shipped with captool: `shapes-attention`, the default of `captool run` and `Captioner()` (models/README.md)."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_BUNDLE = "shapes-attention"
# The one environment variable captool reads (README.md, "Environment"): another default bundle.
MODEL_VARIABLE = "CAPTOOL_MODEL"


def default_bundle() -> Path:
    """The bundle used when none is named: $CAPTOOL_MODEL if set, else the shipped `shapes-attention`.

    This package is the shipped bundles' folder wherever captool is installed: the wheel's package
    data, or models/ in a source checkout (an editable install maps it there).
    """
    from captool.errors import BundleError

    env = os.environ.get(MODEL_VARIABLE)
    if env is not None:
        path = Path(env)
        if not env.strip() or not path.is_dir():
            raise BundleError(f"{MODEL_VARIABLE}={env!r} is not a bundle directory: set it to a directory written "
                              f"by `captool export`, or unset it to use the shipped model")
        return path
    here = Path(__file__).resolve().parent / DEFAULT_BUNDLE
    if not (here / "manifest.json").is_file():
        raise BundleError(f"the shipped bundle is missing from this install ({here}); reinstall captool, or "
                          f"pass a bundle directory (--model BUNDLE, Captioner(BUNDLE))")
    return here
