"""Bundles shipped with captool: `shapes-attention`, the default of `captool run` (see models/README.md)."""
