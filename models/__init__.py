"""Bundles shipped with captool: `shapes-rnn`, the default of `captool run` (see models/README.md)."""
