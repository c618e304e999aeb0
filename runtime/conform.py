"""`captool conform`: any runtime's output checked against the conformance vectors (docs/bundle-format.md).

The client is a command run once: the bundle directory as its last argument (none with
pixels_only), the images' absolute paths on stdin one per line, and on stdout one JSON line per
path in order: {"path", "sha256", "greedy", "beam3"} or {"path", "error"}.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from pathlib import Path

from .bundle import load_manifest
from .errors import CaptoolError
from .manifest import DEFAULT_PREPROCESSING


def load_vectors(folder: Path) -> dict:
    path = Path(folder) / "vectors.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CaptoolError(f"{path}: cannot read the conformance vectors ({e}); pass --vectors DIR, the "
                           f"repository's conformance/ folder") from None


def conform(bundle: Path, client: str, *, vectors: Path, pixels_only: bool = False,
            timeout: float = 600.0) -> tuple[int, list[str]]:
    """Run `client` on every vector image -> (images that agree, one line per disagreement)."""
    doc = load_vectors(vectors)
    manifest = load_manifest(bundle)
    version = manifest.raw["image"].get("preprocessing", DEFAULT_PREPROCESSING)
    if version != doc["preprocessing"] or manifest.image_size != doc["image_size"]:
        raise CaptoolError(f"{bundle}: preprocessing {version} at {manifest.image_size} px, the vectors are "
                           f"{doc['preprocessing']} at {doc['image_size']} px; use vectors made for this bundle")
    rule = doc.get("jpeg_decode", "full")
    if not pixels_only and manifest.jpeg_decode != rule:
        raise CaptoolError(f"{bundle}: JPEG decode {manifest.jpeg_decode}, the vectors' tokens were made with "
                           f"{rule}; use vectors made for this bundle, or --pixels-only (full decode)")
    if not pixels_only and manifest.raw["files"]["encoder.onnx"]["sha256"] != doc["bundle_encoder_sha256"]:
        raise CaptoolError(f"{bundle}: the vectors' tokens are those of {doc['bundle']}, not of this bundle; pass "
                           f"that bundle, or --pixels-only to check the pixels alone")
    entries = doc["vectors"]
    scaled = not pixels_only and rule == "scaled"  # the client decodes by the bundle's rule; alone, in full
    paths = [str((Path(vectors) / v["file"]).resolve()) for v in entries]
    argv = shlex.split(client) + ([] if pixels_only else [str(bundle)])
    try:
        done = subprocess.run(argv, input="".join(p + "\n" for p in paths), capture_output=True, text=True,
                              timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CaptoolError(f"client {client!r} could not be run ({e}); pass a command that reads paths on stdin") from None
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    if done.returncode != 0 or len(lines) != len(paths):
        tail = " ".join(done.stderr.split()[-30:])
        raise CaptoolError(f"client {client!r} exited {done.returncode} after {len(lines)} of {len(paths)} lines "
                           f"({tail or 'no message'}); it must write one JSON line per path")
    problems = []
    for v, line in zip(entries, lines):
        name = v["file"]
        try:
            got = json.loads(line)
        except ValueError:
            problems.append(f"{name}: not a JSON line: {line[:80]!r}")
            continue
        if v.get("error"):
            if "error" not in got:
                problems.append(f"{name}: must be refused ({v['what']}), the client gave pixels")
            continue
        if "error" in got:
            problems.append(f"{name}: refused by the client ({str(got['error'])[:120]}), expected pixels ({v['what']})")
        elif got.get("sha256") != (v.get("sha256_scaled", v["sha256"]) if scaled else v["sha256"]):
            problems.append(f"{name}: pixels differ ({v['what']}{', scaled JPEG decode' if scaled else ''})")
        elif not pixels_only:
            for key in ("greedy", "beam3"):
                if got.get(key) != v[key]:
                    problems.append(f"{name}: {key} tokens {got.get(key)} != {v[key]}")
    failed = {p.split(":")[0] for p in problems}
    return len(entries) - len(failed), problems
