"""`captool run --engine ray`: a folder of JSON Lines with exactly one record per input, across failures and reruns.

The driver is the only writer. Ray retries a failed task or a dead actor's batches, and hands each
output block to the driver once; the driver writes it to a hidden temporary file and renames it into
place (a part is whole or absent), so a crash never leaves half a part. A rerun into the same folder
reads the committed parts and sends only the inputs they lack. `_captool.json` names the bundle
once for the whole folder (a rerun with another bundle is refused) and, when every input has its
record, says the folder is complete.
"""

from __future__ import annotations

import collections
import json
import os
import re
from pathlib import Path
from typing import Callable, Optional, Sequence

from captool.bundle import load_manifest
from captool.errors import CaptoolError
from captool.inputs import Item, expand_inputs
from captool.preprocess import _one_line
from captool.records import Record, bundle_id

STATE = "_captool.json"  # the folder's bundle id and progress
PART = "part-{:06d}.jsonl"


def written_paths(out: Path) -> collections.Counter:
    """The record paths in the committed parts of `out` (a path may be an input more than once)."""
    done: collections.Counter = collections.Counter()
    for part in sorted(out.glob("part-*.jsonl")):
        with open(part, encoding="utf-8") as f:
            for line in f:
                done[json.loads(line)["path"]] += 1
    return done


def commit(out: Path, index: int, records: Sequence[Record]) -> Path:
    """Write one part whole: to a hidden temporary file, fsync'ed, then renamed into place."""
    final = out / PART.format(index)
    temporary = out / f".{final.name}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write("".join(r.to_json() + "\n" for r in records))
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, final)
    return final


def write_state(out: Path, state: dict) -> None:
    temporary = out / f".{STATE}.tmp"
    temporary.write_text(json.dumps(state, indent=1) + "\n", encoding="utf-8")
    os.replace(temporary, out / STATE)


def open_folder(out: Path, bundle: str) -> dict:
    """The folder's state, made if new; refused if its records came from another bundle."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".part-*.tmp"):  # a part that a crashed run never committed
        stale.unlink()
    path = out / STATE
    if path.is_file():
        state = json.loads(path.read_text(encoding="utf-8"))
        if state.get("bundle") != bundle:
            raise CaptoolError(f"{out} holds records of bundle {str(state.get('bundle'))[:12]}..., not this "
                               f"bundle's {bundle[:12]}...; write to another --out folder")
        return state
    if any(out.glob("part-*.jsonl")):
        raise CaptoolError(f"{out} holds parts but no {STATE}; it was not written by captool: use another --out")
    state = {"bundle": bundle, "complete": False}
    write_state(out, state)
    return state


def ray_reason(e: Exception) -> str:
    """The line of a Ray error that says what went wrong on the worker (its last `...Error: ...` line)."""
    lines = [line.strip() for line in str(e).splitlines()]
    causes = [line for line in lines if re.match(r"^[\w.]+(Error|Exception): ", line)]
    return _one_line(Exception(causes[-1] if causes else lines[0] if lines else type(e).__name__))


def table_records(table, given: dict, out: Path) -> list[Record]:
    """A block of rows as Records, each named by the input as it was given (Ray names the absolute path)."""
    records = []
    for row in table.to_pylist():
        record = Record.from_row(row)
        if not given.get(record.path):
            raise CaptoolError(f"Ray returned a record for {record.path}, which was not asked for; "
                               f"the parts in {out} are whole: run the same command again")
        name = given[record.path].popleft()
        if name != record.path:  # the same error text, naming the input as given
            record = Record(name, record.caption, record.tokens,
                            record.error.replace(record.path, name) if record.error else None, record.bundle)
        records.append(record)
    return records


def caption_to_folder(inputs: Sequence[str], out: str | Path, *, address: Optional[str] = None,
                      bundle: str | Path | None = None, by_value: bool = True, actors: int = 2,
                      cpus_per_actor: float = 1.0, gpus_per_actor: float = 0.0, device: str = "cpu",
                      threads: Optional[int] = None,
                      batch_size: int = 32, beam_size: int = 1, max_length: Optional[int] = None,
                      length_penalty: float = 0.0, on_part: Optional[Callable[[int], None]] = None,
                      actor: Optional[type] = None) -> dict:
    """Caption `inputs` (captool run's arguments: files, folders, globs) into the folder `out`.

    Inputs are expanded here by captool's own rule, so the records are `captool run --json`'s; those
    already in `out` are skipped. Joins the cluster at `address` ("auto", "ray://...", host:port;
    None: the running one or a new local one). Returns the folder's summary
    (inputs, written now, failed, parts). `on_part(n)` is called after each committed part, with the
    records written so far; `actor` replaces CaptionActor (a subclass of it).
    """
    import ray

    from captool.ray.dataset import caption_dataset

    if bundle is None:
        from captool.models import default_bundle

        bundle = default_bundle()
    load_manifest(bundle)  # a missing or damaged bundle is a BundleError before anything starts
    out = Path(out)
    state = open_folder(out, bundle_id(bundle))
    items = expand_inputs(list(inputs))
    state.update(complete=False, inputs=len(items))
    write_state(out, state)
    done = written_paths(out)
    todo: list[Item] = []
    for item in items:  # an input named n times needs n records
        if done[item.path] > 0:
            done[item.path] -= 1
        else:
            todo.append(item)
    index = len(list(out.glob("part-*.jsonl")))
    written = failed = 0

    def write(records: list[Record]) -> None:
        nonlocal index, written, failed
        while (out / PART.format(index)).exists():
            index += 1
        commit(out, index, records)
        index += 1
        written += len(records)
        failed += sum(r.error is not None for r in records)
        if on_part is not None:
            on_part(written)

    unreadable = [Record(it.path, error=it.error) for it in todo if it.error]
    if unreadable:
        write(unreadable)
    files = [it for it in todo if not it.error]
    if files:
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        # Ray reports the absolute path of what it read; records name the input as it was given.
        given: dict[str, collections.deque] = collections.defaultdict(collections.deque)
        for it in files:
            given[os.path.abspath(it.path)].append(it.path)
        ds = caption_dataset([os.path.abspath(it.path) for it in files], bundle, by_value=by_value, actors=actors,
                             cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor, device=device,
                             threads=threads,
                             batch_size=batch_size, beam_size=beam_size, max_length=max_length,
                             length_penalty=length_penalty, **({"actor": actor} if actor else {}))
        gpus = ray.cluster_resources().get("GPU", 0)
        if gpus_per_actor > gpus:
            raise CaptoolError(f"the Ray cluster has {gpus:g} GPUs, {gpus_per_actor:g} needed per actor: add GPU nodes, "
                               f"or caption on CPU (--device cpu)")
        try:
            for table in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                write(table_records(table, given, out))
        except ray.exceptions.RayError as e:  # an actor that cannot start (a bundle, CUDA), a lost node
            reason = ray_reason(e)
            raise CaptoolError(f"the Ray job failed ({type(e).__name__}: {reason}); the parts written so far stay "
                               f"in {out}: fix the cause and run the same command again") from None
    missing = sum(len(q) for q in given.values()) if files else 0
    if missing:
        raise CaptoolError(f"Ray returned no record for {missing} inputs; run the same command again to "
                           f"caption only those")
    state.update(complete=True, inputs=len(items))
    write_state(out, state)
    return {"inputs": len(items), "written": written, "failed": failed, "skipped": len(items) - len(todo),
            "parts": len(list(out.glob("part-*.jsonl")))}
