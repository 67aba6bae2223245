"""What a person follows on the console, and optional TensorBoard scalars.

`Progress`: a live line per stage (step/total, steps/s, images/s, ETA, the members' loss range).
On a TTY the line is redrawn in place (carriage return); otherwise a plain line is printed every
`interval` seconds. The rate and ETA count from the end of the first update (`restart`), so
compilation does not inflate the ETA; the compile time is reported once (`compiled`).
`Console`: permanent lines (`message`: evaluation summaries, skip/resume notices) and
rate-limited status lines (`status`: evaluation and selection progress). `quiet=True` prints
nothing. Callers pass `quiet=True` on every process but the main one.
`ScalarWriter`: TensorBoard event files through tensorboardX.
"""
from __future__ import annotations

import sys
import time
from typing import Mapping, TextIO

import numpy as np

from rat_jax.report import duration


class Console:
    """Lines for one stage on `stream` (default stderr): permanent `message`s and rate-limited
    `status` lines (redrawn in place on a TTY, else printed at most every `interval` s)."""

    def __init__(self, stage: str, *, quiet: bool = False, stream: TextIO | None = None,
                 interval: float | None = None, clock=time.monotonic):
        self.stage, self.quiet = stage, quiet
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (0.5 if self.tty else 30.0)
        self.clock = clock
        self.last_print = clock()
        self.last_line = ""
        self._open = False  # TTY: the cursor is at the end of a status line that will be redrawn

    def _write(self, text: str, transient: bool) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text + ("" if transient else "\n"))
            self._open = transient
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """A permanent line, `[stage] text` (unless quiet)."""
        if not self.quiet:
            self._write(f"[{self.stage}] {text}", transient=False)

    def due(self) -> bool:
        return not self.quiet and self.clock() - self.last_print >= self.interval

    def status(self, text: str, force: bool = False) -> bool:
        """`[stage] text` if `interval` has passed since the last status line (or `force`);
        returns whether it was shown."""
        if self.quiet or not (force or self.due()):
            return False
        self.last_print = self.clock()
        self.last_line = f"[{self.stage}] {text}"
        self._write(self.last_line, transient=self.tty)
        return True

    def end_line(self) -> None:
        """Close an open TTY status line (before other output, or at the end)."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False


class Progress(Console):
    def __init__(self, stage: str, total: int, *, start: int = 0, quiet: bool = False,
                 stream: TextIO | None = None, interval: float | None = None,
                 clock=time.monotonic):
        super().__init__(stage, quiet=quiet, stream=stream, interval=interval, clock=clock)
        self.total = total
        self.start_step = start
        self.t0 = self.last_print
        self.images = 0
        self.compile_seconds = None
        self._printed = False
        self.last_step = None

    def compiled(self, seconds: float) -> None:
        """Report the first update's compile time, once."""
        if self.compile_seconds is None:
            self.compile_seconds = float(seconds)
            self.message(f"compiled in {self.compile_seconds:.1f} s")

    def restart(self, step: int) -> None:
        """Count the rate, images/s and ETA from now, after `step` updates (the loop calls it
        once the first update, which compiles, and its evaluation are done)."""
        self.t0 = self.last_print = self.clock()
        self.start_step, self.images = step, 0

    def line(self, step: int, losses=None) -> str:
        """The status after `step` updates of this stage (`step` counts from 0 at stage start)."""
        elapsed = max(self.clock() - self.t0, 1e-9)
        done = step - self.start_step
        rate = done / elapsed
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        text = (f"[{self.stage}] {step}/{self.total}  {rate:.2f} steps/s  "
                f"{self.images / elapsed:.1f} img/s  ETA {duration(eta)}")
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
        self._write(self.last_line, transient=self.tty)
        self._printed = True

    def close(self, step: int, losses=None) -> None:
        """Print the final line (unless the last one printed was already for `step`)."""
        if not self.quiet and not (self.last_step == step and self._printed):
            self.update(step, 0, losses, force=True)
        self.end_line()


# ----------------------------------------------------------------------------------------------
# TensorBoard scalars
# ----------------------------------------------------------------------------------------------
NO_WRITER = ("tensorboard=True needs tensorboardX: pip install tensorboardX "
             "(or pip install 'rat_jax[tensorboard]')")


def have_tensorboard() -> bool:
    """Whether tensorboardX (the `tensorboard` extra) is importable."""
    import importlib.util
    return importlib.util.find_spec("tensorboardX") is not None


class ScalarWriter:
    """Scalars to TensorBoard event files in `logdir` through tensorboardX."""

    def __init__(self, logdir: str):
        if not have_tensorboard():
            raise ImportError(NO_WRITER)
        from tensorboardX import SummaryWriter
        self.logdir = str(logdir)
        self._w = SummaryWriter(self.logdir)

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        for tag, v in values.items():
            if v is not None:
                self._w.add_scalar(tag, float(v), step)
        self._w.flush()

    def close(self) -> None:
        self._w.close()
