"""Progress with an ETA for long passes (training, feature extraction, evaluation, probes).

On a terminal a tqdm bar. When stderr is not a terminal (a log file, a batch job, a pipe) a
bar's carriage returns make an unreadable log, and silence looks like a hang, so plain lines
instead: one whenever another 10 % is done or 30 s have passed since the last line, and one
at the end, e.g.
``cmae knn: train features 6000/50000 img (12%), 310.2 img/s, 19s elapsed, ETA 2m22s``.
Both wait GRACE_SECONDS before their first sign: a pass shorter than that (a small
evaluation every epoch) stays silent.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Sized
from typing import TextIO

from tqdm import tqdm

LINE_FRACTION = 0.10  # a plain line per 10 % done ...
LINE_SECONDS = 30.0  # ... or per 30 s, whichever comes first
GRACE_SECONDS = 5.0


def format_seconds(s: float) -> str:
    s = int(round(s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


class Progress:
    """``with Progress(total, "cmae knn: train features") as p: ... p.update(len(batch))``.

    ``stream``: where it writes (default stderr); ``tty``: force the bar (True) or the plain
    lines (False), default whether ``stream`` is a terminal; ``clock``: for tests.
    ``total`` may be None (unknown): the lines then show the count and rate only.
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "img",
        initial: int = 0,
        stream: TextIO | None = None,
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.n = self.start_n = initial
        self.stream = stream or sys.stderr
        self.clock = clock
        if tty is None:
            tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = None
        if tty:
            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit=unit,
                unit_scale=True,
                dynamic_ncols=True,
                file=self.stream,
                leave=False,
                delay=GRACE_SECONDS,
            )
        self.t0 = self.last_t = clock()
        self.last_n = initial
        self.closed = self.spoke = False
        self.shown: dict[str, str] = {}

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = self.clock()
        if now - self.t0 < GRACE_SECONDS or (self.total and self.n >= self.total):
            return  # too early to speak, or the end, which close() reports
        step = LINE_FRACTION * self.total if self.total else float("inf")
        due = self.n - self.last_n >= step or now - self.last_t >= LINE_SECONDS
        if due or not self.spoke:
            self._line(now)

    def set_postfix(self, **shown: str) -> None:
        """Values shown after the count (a training loss): on the bar, or in the next line."""
        self.shown = shown
        if self.bar is not None:
            self.bar.set_postfix(**shown)

    def _line(self, now: float | None = None, done: bool = False) -> None:
        now = self.clock() if now is None else now
        self.last_t, self.last_n, self.spoke = now, self.n, True
        elapsed = now - self.t0
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        count = f"{self.n}/{self.total}" if self.total else f"{self.n}"
        parts = [f"{self.desc} {count} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        parts += [f"{k} {v}" for k, v in self.shown.items()]
        if self.n > self.start_n:
            parts.append(f"{rate:.1f} {self.unit}/s")
        parts.append(f"{format_seconds(elapsed)} elapsed")
        if done:
            parts.append("done")
        elif self.total and rate > 0:
            parts.append(f"ETA {format_seconds((self.total - self.n) / rate)}")
        print(", ".join(parts), file=self.stream, flush=True)

    def close(self, done: bool = True) -> None:
        """The last line ("done", or without it when the pass was cut short)."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
        elif self.spoke and (done or self.n != self.last_n):
            # a pass that never spoke ends silently too, and a cut-short one that made no
            # progress since its last line does not repeat it
            self._line(done=done)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(done=exc_type is None)


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def __enter__(self) -> _Silent:
        return self

    def __exit__(self, *exc) -> None:
        pass


def optional_progress(items: Sized | Iterable, desc: str | None, unit: str = "img"):
    """A ``Progress`` over ``len(items)`` (unknown for a stream) labelled ``desc``; a
    do-nothing stand-in when ``desc`` is None."""
    if desc is None:
        return _Silent()
    try:
        total = len(items)
    except TypeError:  # a stream of unknown length
        total = None
    return Progress(total, desc, unit)
