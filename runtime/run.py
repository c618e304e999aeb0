"""`captool run`'s machinery: inputs to image paths, a loader thread, one output record per input.

Images are decoded and preprocessed on a loader thread, a bounded queue of batches ahead of the
decoder, so memory stays flat however many inputs there are, and a bad input becomes its record
while the inputs around it are still captioned, in input order.
"""

from __future__ import annotations

import collections
import contextlib
import os
import queue
import stat
import sys
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np
from PIL.Image import DecompressionBombWarning

from .errors import CaptoolError, ImageError
from .inputs import Item, expand_inputs
from .preprocess import preprocess
from .progress import Progress, on_terminal
from .records import Record, printable, records_of  # noqa: F401  (Record, printable: captool.run's names too)

PROGRESS_MIN = 50  # inputs from which a progress bar is worth drawing (on a terminal only)
OUTPUT_ERROR_EXIT = 3  # `captool run`'s exit status when the records cannot be written


class OutputError(CaptoolError):
    """The records cannot be written (a full disk, a closed or read-only stdout)."""


@dataclass
class Batch:
    items: list[Item]  # every input of this batch, in order, errors included
    images: np.ndarray  # uint8 (n, 3, S, S): the readable ones, in order
    readable: list[int]  # index into items of each row of images


def _read(item: Item, size: int, jpeg_decode: str) -> tuple[Item, Optional[np.ndarray]]:
    if item.error:
        return item, None
    try:
        return item, preprocess(item.path, size, jpeg_decode)
    except ImageError as e:
        return Item(item.path, str(e)), None
    except Exception as e:  # the last line of defence: no traceback for any input
        return Item(item.path, f"{item.path}: cannot read image ({type(e).__name__}: {e})"), None


DECODERS = min(4, os.cpu_count() or 1)  # decode threads per loader: Pillow releases the GIL in decode and resize


def load_batches(items: Iterable[Item], size: int, batch_size: int, depth: int = 2,
                 decoders: Optional[int] = None, jpeg_decode: str = "full") -> Iterator[Batch]:
    """Batches of preprocessed images, in input order, made at most `depth` batches ahead of the consumer.
    `size` and `jpeg_decode` are the bundle's (manifest image.size, image.jpeg_decode).

    A loader thread hands each input to a pool of `decoders` threads (default DECODERS) and collects
    the results in input order. Pillow releases the GIL while it decodes and resizes, so the decodes
    overlap one another and the consumer's inference. Memory stays bounded: besides the `depth`
    queued batches, only the batch being read (at most `batch_size` inputs submitted or collected,
    and at most 4 per decode thread submitted and not collected), and each decode thread holds one
    full-size image at a time.
    """
    from concurrent.futures import ThreadPoolExecutor

    workers = decoders if decoders is not None else DECODERS
    if workers < 1:
        raise ValueError(f"decoders must be >= 1, got {workers}")
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(thing) -> bool:
        while not stop.is_set():
            try:
                q.put(thing, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def make(chunk: list[tuple[Item, Optional[np.ndarray]]]) -> Batch:
        readable = [i for i, (_, a) in enumerate(chunk) if a is not None]
        images = np.stack([chunk[i][1] for i in readable]) if readable else np.zeros((0, 3, size, size), np.uint8)
        return Batch([it for it, _ in chunk], images, readable)

    def loader() -> None:
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="captool-decode")
        pending: collections.deque = collections.deque()  # futures of _read, in input order
        cap = 4 * workers  # submitted and not collected: enough to keep every decode thread busy
        chunk: list = []

        def collect() -> bool:  # the oldest input's result into the batch; False once the consumer left
            chunk.append(pending.popleft().result())
            if len(chunk) < batch_size:
                return True
            batch = make(chunk)
            chunk.clear()
            return put(batch)

        try:
            # preprocess turns Pillow's DecompressionBombWarning into an error inside a
            # warnings.catch_warnings, which swaps one process-wide filter list: with several decode
            # threads, one thread's exit could restore a list without that filter while another
            # decodes. Set here, around the pool, every list a thread saves and restores carries it.
            with warnings.catch_warnings():
                warnings.simplefilter("error", DecompressionBombWarning)
                for item in items:
                    if stop.is_set():
                        return
                    pending.append(pool.submit(_read, item, size, jpeg_decode))
                    # Beyond the queued batches, only the batch being read: submitted + collected <= batch_size.
                    while pending and (len(pending) >= cap or len(pending) + len(chunk) >= batch_size):
                        if not collect():
                            return
                while pending:
                    if not collect():
                        return
                if chunk and not put(make(chunk)):
                    return
                put(done)
        except BaseException as e:  # a bug, not a bad input: hand it to the consumer to raise
            put(e)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    thread = threading.Thread(target=loader, name="captool-loader", daemon=True)
    thread.start()
    try:
        while True:
            got = q.get()
            if got is done:
                return
            if isinstance(got, BaseException):
                raise got
            yield got
    finally:
        stop.set()
        thread.join(timeout=5)


def caption_items(captioner, items: Sequence[Item], *, batch_size: int = 32, beam_size: int = 1,
                  max_length: Optional[int] = None, length_penalty: float = 0.0,
                  bundle: Optional[str] = None) -> Iterator[Record]:
    """One Record per item, in order, while the loader thread reads the next batch. A batch that
    fails to caption (an onnxruntime error) gives its inputs error records; the others go on."""
    for batch in load_batches(items, captioner.manifest.image_size, batch_size,
                              jpeg_decode=captioner.manifest.jpeg_decode):
        yield from records_of(captioner, [it.path for it in batch.items], batch.images, batch.readable,
                              [it.error for it in batch.items], beam_size=beam_size, max_length=max_length,
                              length_penalty=length_penalty, bundle=bundle)


def progress_bar(total: int, stream: IO[str], enabled: Optional[bool] = None) -> Progress:
    """`captool run`'s bar: drawn only for many inputs on a terminal; never lines in a log (stderr carries errors)."""
    if enabled is None:
        enabled = total >= PROGRESS_MIN and on_terminal(stream)
    return Progress(total=total, unit="images", stream=stream, live=enabled, lines=False)


class Output:
    """Whole records to a stream. Where the stream has a file descriptor, each record is written
    with os.write in full before the next, and on a regular file a failed write (a full disk) is cut
    back with ftruncate to the end of the last whole record, so no partial line is ever left."""

    def __init__(self, stream: IO[str]):
        self.stream, self.fd, self.end, self.count, self.partial = stream, None, None, 0, 0
        self.name = getattr(stream, "name", None) if isinstance(getattr(stream, "name", None), str) else "the output"
        try:
            fd = stream.fileno()
        except (AttributeError, OSError, ValueError):  # io.StringIO, a test runner's stream
            return
        self._guard(stream.flush)  # what was written before goes first
        self.fd = fd
        self.end = self._start_of_records(fd)

    @staticmethod
    def _start_of_records(fd: int) -> Optional[int]:
        """Where the first record will land in a regular file; None where nothing may be cut back."""
        try:
            import fcntl  # POSIX; elsewhere a failed write is reported but not cut back
        except ImportError:
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            # `>> file` opens with O_APPEND at offset 0: the records start at the file's end, not at 0.
            return st.st_size if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND else os.lseek(fd, 0, os.SEEK_CUR)
        except OSError:
            return None

    def write(self, line: str) -> None:
        if self.fd is None:
            self._guard(lambda: (self.stream.write(line), self.stream.flush()))
        else:
            self._guard(lambda: self._write_all(line.encode("utf-8")))
            if self.end is not None:
                self.end = os.lseek(self.fd, 0, os.SEEK_CUR)  # with O_APPEND too: where this record ended
        self.count += 1

    def _write_all(self, data: bytes) -> None:
        view, self.partial = memoryview(data), 0
        while view:
            n = os.write(self.fd, view)
            self.partial += n  # a full disk may take part of a record before it refuses the rest
            view = view[n:]

    def _guard(self, write: Callable[[], object]) -> None:
        try:
            write()
        except BrokenPipeError:
            raise  # the reader left (`captool run | head`): not an error, the CLI exits 0
        except OSError as e:
            cut = self._cut_back()
            raise OutputError(f"cannot write the records to {self.name}: {e.strerror or e}; {self.count} whole "
                              f"records written{cut}; free some space or write elsewhere") from None

    def _cut_back(self) -> str:
        if self.fd is None or not self.partial:
            return ""
        if self.end is None:
            return ", the last one partial"
        try:
            os.ftruncate(self.fd, self.end)
            os.lseek(self.fd, self.end, os.SEEK_SET)
        except OSError:
            return ", the last one partial"
        return ", the partial one removed"


def write_records(records: Iterable[Record], out: IO[str], err: IO[str], as_json: bool, progress: Progress) -> int:
    """Write each record as it comes (whole, for pipes and files alike); returns how many inputs failed.

    With --json every record goes to `out`; as text, captions go to `out` as `path<TAB>caption`
    and failures to `err`, so that stdout stays two clean columns. A record that cannot be written
    raises OutputError (BrokenPipeError when the reader has gone).
    """
    failed = 0
    out_on_terminal = hasattr(out, "isatty") and out.isatty()
    output = Output(out)
    try:
        for record in records:
            if out_on_terminal or record.error is not None:
                progress.clear()
            if as_json or record.error is None:
                output.write((record.to_json() if as_json else record.to_text()) + "\n")
            else:
                err.write(f"captool: {printable(record.error)}\n")
                err.flush()
            failed += record.error is not None
            progress.update()
    finally:
        progress.close()
    return failed


def run_inputs(inputs: Sequence[str], *, model: Optional[str | Path] = None, device: str = "auto",
               batch_size: int = 32, beam_size: int = 1, max_length: Optional[int] = None,
               length_penalty: float = 0.0, threads: Optional[int] = None, as_json: bool = False,
               verbose: bool = False, out: Optional[IO[str]] = None, err: Optional[IO[str]] = None,
               progress: Optional[bool] = None, on_start: Optional[Callable[[], None]] = None,
               io_binding: bool = True, attention_cache: Optional[bool] = None, spin: bool = True) -> int:
    """`captool run` as a function: 0 all captioned, 1 some input failed. Bundle and device
    problems raise (BundleError, DeviceError) before any image is read; the CLI makes them exit 2.
    A record that cannot be written raises OutputError (exit OUTPUT_ERROR_EXIT). `on_start` is
    called once start-up (bundle, sessions, inputs) is over, before the first image is read."""
    out = out or sys.stdout  # looked up now, not at import: the CLI's test runner swaps them
    err = err or sys.stderr
    if out is None:  # Python sets sys.stdout to None when it was closed (`captool run ... >&-`)
        raise OutputError("stdout is closed: nowhere to write the records; run with stdout open, or "
                          "redirect it to a file")
    from .captioner import Captioner

    captioner = Captioner(model, device=device, threads=threads, verbose=verbose, io_binding=io_binding,
                          attention_cache=attention_cache, spin=spin)  # model None: the shipped bundle
    if captioner.notice:
        err.write(f"captool: {captioner.notice}\n")
    if verbose:
        err.write(f"captool: bundle {captioner.manifest.root} ({captioner.manifest.cell_type}), "
                  f"providers {captioner.providers}, io_binding={captioner.io_binding}\n")
    items = expand_inputs(inputs)
    if on_start is not None:
        on_start()
    records = caption_items(captioner, items, batch_size=batch_size, beam_size=beam_size,
                            max_length=max_length, length_penalty=length_penalty)
    with contextlib.closing(records):  # stop the loader thread at once on an error
        failed = write_records(records, out, err, as_json, progress_bar(len(items), err, progress))
    return 1 if failed else 0
