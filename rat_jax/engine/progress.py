"""A live progress line per stage: step/total, steps/s, images/s, ETA and the members' loss range.

On a TTY the line is redrawn in place (carriage return); otherwise a plain line is printed every
`interval` seconds. `quiet=True` prints nothing.
"""
from __future__ import annotations

import math
import sys
import time
from typing import TextIO

import numpy as np


def _fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    def __init__(self, stage: str, total: int, *, start: int = 0, quiet: bool = False,
                 stream: TextIO | None = None, interval: float | None = None,
                 clock=time.monotonic):
        self.stage, self.total, self.quiet = stage, total, quiet
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.5 if self.tty else 30.0)
        self.clock = clock
        self.start_step = start
        self.t0 = self.last_print = clock()
        self.images = 0
        self._printed = False
        self.last_line = ""
        self.last_step = None

    def line(self, step: int, losses=None) -> str:
        """The status after `step` updates of this stage (`step` counts from 0 at stage start)."""
        elapsed = max(self.clock() - self.t0, 1e-9)
        done = step - self.start_step
        rate = done / elapsed
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        text = (f"[{self.stage}] {step}/{self.total}  {rate:.2f} steps/s  "
                f"{self.images / elapsed:.1f} img/s  ETA {_fmt_duration(eta)}")
        if losses is not None:
            finite = np.asarray(losses, np.float64)
            finite = finite[np.isfinite(finite)]
            if finite.size:
                text += f"  loss {finite.min():.4f}..{finite.max():.4f}"
            if finite.size < np.size(losses):
                text += f"  ({np.size(losses) - finite.size} non-finite)"
        return text

    def update(self, step: int, images: int = 0, losses=None, force: bool = False) -> None:
        """Count `images` processed; redraw/print the line if due. `step` = updates done so far."""
        self.images += images
        if self.quiet:
            return
        now = self.clock()
        if not force and now - self.last_print < self.interval:
            return
        self.last_print = now
        self.last_step = step
        self.last_line = self.line(step, losses)
        if self.tty:
            self.stream.write("\r\033[K" + self.last_line)
        else:
            self.stream.write(self.last_line + "\n")
        self.stream.flush()
        self._printed = True

    def due(self) -> bool:
        return not self.quiet and self.clock() - self.last_print >= self.interval

    def close(self, step: int, losses=None) -> None:
        """Print the final line (unless the last one printed was already for `step`)."""
        if self.quiet or (self.last_step == step and self._printed):
            if self.tty and self._printed and not self.quiet:
                self.stream.write("\n")
                self.stream.flush()
            return
        self.update(step, 0, losses, force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
