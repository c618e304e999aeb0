"""Progress on stderr for work that takes more than a few seconds: one helper for every command.

On a terminal, a bar redrawn in place, with the rate and, where the total is known, the time left.
Elsewhere (a log file, a pipe, a CI job) the bar would be a wall of carriage returns: a line is
written every `every` seconds instead (30 by default) and one when the phase ends, so that logs
stay readable and a long phase still shows it is alive. Torch-free; used by `captool train`,
`export`, `eval`, `bench` and `run`.

    with Progress("warm-up 1/16", total=len(batches), unit="images") as bar:
        for batch in batches:
            ...
            bar.update(len(batch), note=f"loss {loss:.3f}")
        bar.finish(f"warm-up 1/16  loss {loss:.3f}")
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import IO, Iterator, Optional

REDRAW_S = 0.2  # a terminal bar is redrawn at most this often
EVERY_S = 30.0  # off a terminal, a progress line at most this often
WIDTH = 24  # characters of the bar


def on_terminal(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def duration(seconds: float) -> str:
    """1:05, 12:30, 1:02:03: short and unambiguous."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """One phase's progress on a stream (stderr by default).

    Args:
        label: what is being done ("epoch 2/10", "tracing encoder").
        total: how many units the phase has, or None where unknown (then no bar and no ETA).
        unit: the units' name in the line ("images", "samples", "batches").
        stream: where to write; sys.stderr as it is when the phase starts.
        live: draw the redrawn bar (default: when the stream is a terminal).
        lines: off a terminal, write a line every `every` seconds and at `finish` (default True).
            `captool run` passes False: its stderr carries error records, not a log.
        every: seconds between progress lines off a terminal.
    """

    def __init__(self, label: str = "", total: Optional[int] = None, *, unit: str = "", stream: Optional[IO[str]] = None,
                 live: Optional[bool] = None, lines: bool = True, every: float = EVERY_S):
        self.stream = stream if stream is not None else sys.stderr
        self.label, self.total, self.unit = label, total, unit
        self.live = on_terminal(self.stream) if live is None else live
        self.lines, self.every = lines, every
        self.done, self.note = 0, ""
        self.start = self._drawn_at = self._lined_at = time.perf_counter()
        self._drawn = False

    # -- what the caller calls ------------------------------------------------------------------

    def update(self, n: int = 1, *, note: Optional[str] = None) -> None:
        """`n` more units done; `note` (a running loss, say) replaces the previous one."""
        self.done += n
        if note is not None:
            self.note = note
        now = time.perf_counter()
        if self.live:
            if now - self._drawn_at >= REDRAW_S or not self._drawn or self.done == self.total:
                self._draw(now)
        elif self.lines and now - self._lined_at >= self.every:
            self._lined_at = now
            self._write(self.status(now) + "\n")

    def finish(self, line: Optional[str] = None) -> None:
        """End the phase: the bar's line is replaced by `line` (default: the final status)."""
        text = line if line is not None else self.status()
        if self.live or self.lines:
            self._write(("\r\033[K" if self._drawn else "") + text + "\n")
        self._drawn = False

    def clear(self) -> None:
        """Wipe the bar's line, so that a line written to a terminal starts clean; the next update redraws it."""
        if self._drawn:
            self._write("\r\033[K")
            self._drawn = False

    def close(self) -> None:
        """Leave the bar as it is and end its line (an interrupted or finished phase)."""
        if self._drawn:
            self._write("\n")
            self._drawn = False

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()  # after an error or Ctrl-C, the next message starts on its own line

    # -- the line -------------------------------------------------------------------------------

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def rate(self, now: Optional[float] = None) -> float:
        """Units per second so far."""
        return self.done / max((now if now is not None else time.perf_counter()) - self.start, 1e-9)

    def status(self, now: Optional[float] = None, bar: bool = False) -> str:
        """'label [####....] 40/100 images  12.3 images/s  ETA 0:05  note' (the bar only on a terminal)."""
        now = now if now is not None else time.perf_counter()
        rate, unit = self.rate(now), f" {self.unit}" if self.unit else ""
        parts = [self.label] if self.label else []
        if self.total:
            filled = WIDTH * min(self.done, self.total) // self.total
            if bar:
                parts.append(f"[{'#' * filled}{'.' * (WIDTH - filled)}]")
            parts.append(f"{self.done}/{self.total}{unit}" + ("" if bar else f" ({100 * self.done // self.total}%)"))
        elif self.done:
            parts.append(f"{self.done}{unit}")
        if self.total or self.done:  # a phase that counts nothing (tracing a graph) shows its time only
            parts.append(f"{rate:.1f}{unit or ' units'}/s" if rate < 10 else f"{rate:.0f}{unit or ' units'}/s")
        if self.total and self.done < self.total and self.done and rate > 0:
            parts.append(f"ETA {duration((self.total - self.done) / rate)}")
        else:
            parts.append(duration(now - self.start))
        if self.note:
            parts.append(self.note)
        return "  ".join(parts)

    def _draw(self, now: float) -> None:
        self._drawn_at, self._drawn = now, True
        self._write("\r\033[K" + self.status(now, bar=True))

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # a closed or full stderr must not stop the work it reports on
            pass


@contextlib.contextmanager
def phase(label: str, stream: Optional[IO[str]] = None) -> Iterator[Progress]:
    """A step that counts nothing (tracing a graph, scoring): its label while it runs on a terminal, then one
    line with the time it took. An error or Ctrl-C leaves the label's line ended, without the time."""
    bar = Progress(label, stream=stream)
    bar.update(0)  # on a terminal: show what runs now
    try:
        yield bar
    except BaseException:
        bar.close()
        raise
    bar.finish()
