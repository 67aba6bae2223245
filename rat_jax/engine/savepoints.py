"""When a members run saves its resume checkpoint, and how it stops on SIGTERM.

A run (rat_jax.engine.loop.run_loop) saves its checkpoint (rat_jax.engine.resume, written in the
background by Orbax) after a step when
  - `save_minutes` of wall-clock time have passed since its last save (or its start);
  - `save_every` > 0 divides the number of steps done: a fixed step period, off by default, for
    deterministic save points (the CPU configs, the tests);
  - it is the last step;
  - the process received SIGTERM (a scheduler's preemption or time limit: SLURM, a preemptible
    TPU VM, `kill PID`): the run finishes the step under way, saves, waits until the checkpoint is
    on disk, prints where it is and raises `Preempted`, a SystemExit whose exit code is 143
    (128 + SIGTERM, what a shell reports for a process that SIGTERM ended). Rerunning the same
    command resumes from that checkpoint, with the same bits as a run never stopped.
A clock or step-period save that falls one step before an evaluation point is made at that point
instead, after the evaluation, so the checkpoint's write in flight and the evaluation's buffers are
not resident together (`save_every=50` with an evaluation every 50 steps saves at steps 50, 100...).

`sigterm_guard()` installs the SIGTERM handler for the duration of a run, from the main thread only,
and puts the previous handler back afterwards; a SIGTERM that no run acted on (it came after the
run's last check) is then delivered again, to that handler. A program that runs members loops in
other threads enters `sigterm_guard()` in its main thread around them: the loops read its flag.
The scheduler (rat_jax.schedule.run_jobs) does, around all its jobs: on SIGTERM it starts no new
job, the runs under way stop as above, and a stop between jobs raises `Preempted` as well.

Several processes (jax.distributed): a save is a collective, so every process must decide the same.
The clock and SIGTERM flags of all processes are OR-ed (distributed.AnyProcess) and take effect one
step after they were raised, at the same step on every process; the step period and the last step
need no agreement. The loop's fold of the step losses for the progress line (a collective too) is
agreed the same way.
"""
from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import threading
import time
from typing import Callable, NamedTuple

import jax

import rat_jax.distributed as distributed

SAVE_MINUTES = 20.0   # the default wall-clock period of resume checkpoints
EXIT_CODE = 143       # 128 + SIGTERM

__all__ = ["EXIT_CODE", "SAVE_MINUTES", "Decision", "Preempted", "SavePoints", "sigterm_agreed",
           "sigterm_guard", "sigterm_requested", "stop_between_jobs"]


class Preempted(SystemExit):
    """A run stopped by SIGTERM once its checkpoint was on disk; uncaught, the interpreter exits
    with EXIT_CODE (`message`, already printed, says where the checkpoint is)."""

    def __init__(self, message: str):
        super().__init__(EXIT_CODE)
        self.message = message

    def __str__(self) -> str:
        return self.message


_requested = threading.Event()
_guards = 0


def _on_sigterm(signum, frame) -> None:
    _requested.set()


def sigterm_requested() -> bool:
    """Whether this process received SIGTERM inside `sigterm_guard()`."""
    return _requested.is_set()


_votes: list = []


def sigterm_agreed() -> bool:
    """Whether any process received SIGTERM, the same answer on every process (several
    processes: a blocking collective, so every process asks at the same points, e.g. between the
    jobs of a serial schedule)."""
    if jax.process_count() == 1:
        return sigterm_requested()
    if not _votes:
        _votes.append(distributed.AnyProcess(1))
    _votes[0].submit(None, (sigterm_requested(),))
    return bool(_votes[0].collect()[1][0])


def stop_between_jobs(left: int) -> None:
    """SIGTERM between the jobs of a schedule (rat_jax.schedule): say so and raise Preempted."""
    text = (f"[schedule] SIGTERM: stopped with {left} job(s) not done; finished runs are kept and "
            "an interrupted one resumes from its checkpoint: rerun the same command to continue "
            f"(exit code {EXIT_CODE})")
    if distributed.is_main_process():
        print(text, file=sys.stderr, flush=True)
    raise Preempted(text)


@contextlib.contextmanager
def sigterm_guard():
    """While inside, SIGTERM sets a flag (`sigterm_requested`) instead of ending the process. Main
    thread only (elsewhere, and nested, it does nothing); the previous handler is put back on exit
    and, unless a `Preempted` went through, receives a SIGTERM that came meanwhile."""
    global _guards
    if threading.current_thread() is not threading.main_thread() or _guards:
        yield
        return
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    _requested.clear()
    _guards += 1
    acted = False
    try:
        yield
    except Preempted:
        acted = True
        raise
    finally:
        _guards -= 1
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
        pending = _requested.is_set() and not acted
        _requested.clear()
        if pending:
            os.kill(os.getpid(), signal.SIGTERM)


class Decision(NamedTuple):
    """What the loop does after a step: `save` a checkpoint, `stop` (SIGTERM, after the save),
    `flush` the step losses into its sums (the progress line is due)."""
    save: bool
    stop: bool
    flush: bool


class SavePoints:
    """The save decisions of one run of `num_steps` steps (module docstring). `at(step, ...)` after
    each step, `saved(step)` after each save, `stop_requested()` once after the last step."""

    def __init__(self, num_steps: int, save_minutes: float | None = SAVE_MINUTES,
                 save_every: int | None = 0, clock: Callable[[], float] = time.monotonic,
                 eval_every: int = 0):
        self.num_steps = num_steps
        self.period = 60.0 * save_minutes if save_minutes and save_minutes > 0 else math.inf
        self.save_every = int(save_every or 0)
        self.eval_every = int(eval_every or 0)
        self.clock = clock
        self.moved = False  # a save moved from the step before an evaluation onto it
        self.last_time, self.last_step = clock(), -1
        self.vote = distributed.AnyProcess(3) if jax.process_count() > 1 else None

    def at(self, step: int, progress_due: bool = False) -> Decision:
        """The decision after `step`; `progress_due`: this process's progress line wants the
        losses."""
        local = (self.clock() - self.last_time >= self.period, sigterm_requested(), progress_due)
        if self.vote is None:
            raised_at, flags = step, local
        else:  # the flags of the previous step, OR-ed over the processes
            got = self.vote.collect()
            self.vote.submit(step, local)
            raised_at, flags = got if got is not None else (step, (False, False, False))
        timed = bool(flags[0]) and raised_at > self.last_step  # not one a save already answered
        periodic = self.save_every > 0 and (step + 1) % self.save_every == 0
        stop, last = bool(flags[1]), step == self.num_steps - 1
        due, self.moved = timed or periodic or self.moved, False
        if due and not (stop or last or self.is_eval(step)) and self.is_eval(step + 1):
            due, self.moved = False, True  # made after the evaluation of the next step
        return Decision(save=due or last or stop, stop=stop, flush=bool(flags[2]))

    def is_eval(self, step: int) -> bool:
        """Whether `step` is an evaluation point: every `eval_every` steps and the last (none when
        `eval_every` is 0)."""
        return self.eval_every > 0 and (step % self.eval_every == 0
                                        or step == self.num_steps - 1)

    def saved(self, step: int) -> None:
        self.last_time, self.last_step = self.clock(), step

    def stop_requested(self) -> bool:
        """Whether any process received SIGTERM (after the last step; blocks on the others)."""
        if self.vote is None:
            return sigterm_requested()
        while self.vote.collect() is not None:
            pass
        self.vote.submit(None, (False, sigterm_requested(), False))
        return bool(self.vote.collect()[1][1])
