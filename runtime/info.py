"""`captool info`: a bundle described from its manifest and files, without opening a session."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .bundle import load_manifest


def bundle_info(bundle_dir: str | Path) -> dict[str, Any]:
    """The manifest's facts a user asks first, with the files checked against their hashes."""
    from .sessions import place

    m = load_manifest(bundle_dir)
    raw = m.raw
    parity = raw.get("parity") if isinstance(raw.get("parity"), dict) else {}
    files = {name: (m.root / name).stat().st_size for name in raw["files"]}
    placement = place("auto")
    return {
        "bundle": str(m.root),
        "cell_type": m.cell_type,
        "precision": m.precision,
        "dims": dict(raw.get("dims", {})),
        "vocab_size": len(m.vocab),
        "image_size": m.image_size,
        "resize": m.resize_policy,
        "jpeg_decode": m.jpeg_decode,
        "jpeg_decode_measured": (parity.get("jpeg_decode") or {}).get("summary"),
        "max_length": m.max_length,
        "opset": raw.get("opset"),
        "attention_cache": m.has_attention_cache,
        "files": files,
        "bytes": sum(files.values()),
        "parity": {key: parity.get(key) for key in ("ok", "precision", "atol", "rtol", "agreement")
                   if key in parity},
        "parity_batches": [{"source": b.get("source"), "batch_size": b.get("batch_size"), "equal": b.get("equal")}
                           for b in parity.get("batches", []) if isinstance(b, dict)],
        "tools": dict(raw.get("tools", {})),
        "created": raw.get("created"),
        "device": placement.device,
        "providers": [p if isinstance(p, str) else p[0] for p in placement.providers],
        "notice": placement.notice,
    }


def info_text(info: dict[str, Any]) -> str:
    """The summary `captool info` prints: one fact per line."""
    dims = ", ".join(f"{k} {v}" for k, v in info["dims"].items())
    lines = [
        f"bundle      {info['bundle']}",
        f"model       {info['cell_type']} ({dims}), {info['precision']}",
        f"vocabulary  {info['vocab_size']} tokens; captions of at most {info['max_length']} tokens",
        f"image       {info['image_size']}x{info['image_size']} RGB, {info['resize']}, JPEG decode {info['jpeg_decode']}",
        f"graphs      opset {info['opset']}" + (", with the attention cache" if info["attention_cache"] else ""),
    ]
    for name, size in info["files"].items():
        lines.append(f"  {name:<26} {size / 1e6:7.2f} MB")
    lines.append(f"  {'total':<26} {info['bytes'] / 1e6:7.2f} MB")
    parity = info["parity"]
    if parity:
        verdict = "passed" if parity.get("ok") else "FAILED"
        batches = info["parity_batches"]
        rows = sum(b["batch_size"] for b in batches if isinstance(b.get("batch_size"), int))
        extra = f", caption agreement {parity['agreement']:.1%}" if isinstance(parity.get("agreement"), float) else ""
        lines.append(f"parity      {verdict} at export ({len(batches)} batches, {rows} images{extra})")
    if info.get("jpeg_decode_measured"):
        lines.append(f"            {info['jpeg_decode_measured']}")
    tools = ", ".join(f"{k} {v}" for k, v in info["tools"].items())
    if tools:
        lines.append(f"exported by {tools}" + (f" on {info['created']}" if info.get("created") else ""))
    lines.append(f"runs on     {info['device']} here ({', '.join(info['providers'])})")
    if info.get("notice"):
        lines.append(f"            {info['notice']}")
    return "\n".join(lines)
