"""captool's own runtime as a conformance client: the protocol of `captool conform --client`.

    python conformance/client.py [BUNDLE] < paths

Reads image paths, one per line, from stdin; writes one JSON line per path, in order, to stdout:
{"path", "sha256"} (the encoder input's bytes, uint8 [3, S, S] C order) plus, when a BUNDLE is
given, "greedy" and "beam3" (the word ids `captool run --json` prints as "tokens": no <END>); or
{"path", "error"} for an image the runtime refuses. Without a BUNDLE, JPEGs are decoded in full;
with one, by its manifest's image.jpeg_decode. Another runtime's client does the same.
"""

from __future__ import annotations

import hashlib
import json
import sys

from captool.errors import ImageError
from captool.preprocess import preprocess


def main() -> None:
    captioner = None
    if len(sys.argv) > 1:
        from captool import Captioner  # onnxruntime: only where tokens are asked for

        captioner = Captioner(sys.argv[1], device="cpu")
    size = captioner.manifest.image_size if captioner else 112
    for line in sys.stdin:
        path = line.rstrip("\n")
        try:
            x = captioner.preprocess(path) if captioner else preprocess(path, size)  # (3, S, S) uint8
        except ImageError as e:
            print(json.dumps({"path": path, "error": str(e)}), flush=True)
            continue
        record = {"path": path, "sha256": hashlib.sha256(x.tobytes()).hexdigest()}
        if captioner:
            for key, beam in (("greedy", 1), ("beam3", 3)):
                row = captioner.generate(x[None], beam_size=beam)[0]  # (L,) ids, <END> kept
                record[key] = captioner.to_caption(row).tokens
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
