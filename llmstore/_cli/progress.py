"""Progress on the command line: one line redrawn in place on a terminal, plain lines
elsewhere (logs, pipes), so that output captured by a supervisor stays readable."""

from __future__ import annotations

import time
from typing import TextIO

_BAR_WIDTH = 30


class PurgeProgress:
    """One line rewritten in place on a terminal; elsewhere (logs, pipes) a line per batch."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._tty = out.isatty()
        self._start = time.monotonic()
        self._drawn = False

    def __call__(self, deleted: int, batches: int) -> None:
        if not self._tty:
            print(f"purged {deleted} row(s) in {batches} batch(es)", file=self._out, flush=True)
            return
        rate = deleted / max(time.monotonic() - self._start, 1e-6)
        line = f"purging: {deleted:,} row(s) deleted in {batches:,} batch(es), {rate:,.0f} rows/s"
        self._out.write(f"\r{line}\033[K")
        self._out.flush()
        self._drawn = True

    def end(self) -> None:
        if self._drawn:
            self._out.write("\n")
            self._out.flush()


class CopyProgress:
    """A bar for a copy of known size (pages, bytes); without a size, a start and an end.

    Elsewhere than a terminal, a line at each tenth of the way.
    """

    def __init__(self, out: TextIO, what: str) -> None:
        self._out = out
        self._what = what
        self._tty = out.isatty()
        self._drawn = False
        self._tenth = -1

    def __call__(self, done: int, total: int | None) -> None:
        if total is None or total <= 0:
            if not self._drawn:
                self._line(f"{self._what}...")
            return
        share = min(done / total, 1.0)
        if self._tty:
            filled = round(share * _BAR_WIDTH)
            bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
            self._out.write(f"\r{self._what}: [{bar}] {share:4.0%} ({done:,}/{total:,})\033[K")
            self._out.flush()
            self._drawn = True
            return
        tenth = int(share * 10)
        if tenth > self._tenth:
            self._tenth = tenth
            print(f"{self._what}: {share:.0%} ({done:,}/{total:,})", file=self._out, flush=True)

    def _line(self, text: str) -> None:
        if self._tty:
            self._out.write(f"\r{text}\033[K")
            self._out.flush()
            self._drawn = True
        else:
            print(text, file=self._out, flush=True)

    def end(self) -> None:
        if self._drawn:
            self._out.write("\n")
            self._out.flush()
            self._drawn = False


class StagedProgress:
    """A ``CopyProgress`` per stage of a longer command (``progress(stage, done, total)``):
    each stage's line is finished when the next one begins."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._stage = ""
        self._current: CopyProgress | None = None

    def __call__(self, stage: str, done: int, total: int | None) -> None:
        if self._current is None or stage != self._stage:
            self.end()
            self._stage, self._current = stage, CopyProgress(self._out, stage)
        self._current(done, total)

    def end(self) -> None:
        if self._current is not None:
            self._current.end()
