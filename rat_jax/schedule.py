"""The device scheduler: the jobs of a run or a sweep, each on a set of devices sized to it.

A `Job` is one unit of the stage graph (rat_jax.runs.planned_runs gives the members runs;
selection and the per-target table are jobs too): its name, the jobs whose results it reads
(`deps`), how many devices it wants (`devices`: the largest divisor of its member count that the
machine has, so members spread evenly and no member's batch is split over devices) and its cost
(training-image units, runs.PlannedRun.cost). Jobs start when their inputs exist (selections and
tables first, then the longest run), each on free devices of its size; `run_jobs` executes them (threads of this process, one
per running job) and `simulate` replays the same policy on costs for `--plan`'s schedule.

Members are independent (each member's data stream, dropout and evaluation draws depend only on
its seeds and step, and a job never splits a member's batch), so which devices a job gets and
which jobs run beside it change no number.

One process (any number of local devices) schedules. Several processes (jax.distributed) run
the jobs one after another, each over every process's devices (the SPMD programs over the
global mesh); a rerun after a host died continues from the workdir (finished runs load, the
interrupted one resumes from its checkpoint).
"""
from __future__ import annotations

import dataclasses
import heapq
import threading
from typing import Callable, Mapping, Sequence

MODES = ("auto", "serial", "parallel")


@dataclasses.dataclass(frozen=True)
class Job:
    """One job of the stage graph. `run`: the members run it trains (runs.PlannedRun; None
    for selection and tables), `members` its member count (devices are sized by it)."""
    name: str
    kind: str                       # "run", "selection" or "table"
    deps: tuple[str, ...] = ()
    members: int = 1
    cost: float = 0.0
    run: object = None
    env: int | None = None          # a selection's test env

    def devices_wanted(self, available: int) -> int:
        """The largest divisor of the member count not above `available` (selection and tables:
        every device)."""
        if self.kind != "run":
            return available
        return max(k for k in range(1, min(available, self.members) + 1)
                   if self.members % k == 0)


class JobFailed(RuntimeError):
    """A job raised: its name, the error and what to do next."""


def check_graph(jobs: Sequence[Job]) -> None:
    """Every dependency exists and the graph has no cycle."""
    names = {j.name for j in jobs}
    if len(names) != len(jobs):
        raise ValueError("jobs with the same name: " + ", ".join(
            sorted({j.name for j in jobs if [k.name for k in jobs].count(j.name) > 1})))
    for j in jobs:
        missing = [d for d in j.deps if d not in names]
        if missing:
            raise ValueError(f"job {j.name} depends on {missing}, which are not jobs")
    order(jobs)


def order(jobs: Sequence[Job]) -> list[Job]:
    """The order of a serial schedule: the given order where it respects the dependencies
    (a target's runs, its selections and its table before the next target's), else the
    earliest given job whose inputs exist."""
    by_name = {j.name: j for j in jobs}
    waiting = {j.name: set(j.deps) for j in jobs}
    index = {j.name: i for i, j in enumerate(jobs)}
    ready = [index[j.name] for j in jobs if not j.deps]
    heapq.heapify(ready)
    out = []
    while ready:
        job = jobs[heapq.heappop(ready)]
        out.append(job)
        for other, deps in waiting.items():
            if job.name in deps:
                deps.discard(job.name)
                if not deps:
                    heapq.heappush(ready, index[other])
    if len(out) != len(jobs):
        stuck = sorted(set(by_name) - {j.name for j in out})
        raise ValueError(f"the jobs {stuck[:5]} depend on each other (a cycle)")
    return out


def priority(job: Job, index: int) -> tuple:
    """Which ready job a parallel schedule starts first: selections and tables (short, and they
    finish a target's table), then the longest run."""
    return (job.kind == "run", -job.cost, index)


def simulate(jobs: Sequence[Job], num_devices: int, seconds: Callable[[Job, int], float],
             parallel: bool = True) -> dict:
    """Replay the scheduler's policy on `num_devices` devices with `seconds(job, devices)` as each
    job's duration (`parallel=False`: one job at a time, in `order`): {"makespan" s, "busy"
    [per-device fraction], "starts" {name: (t, devices)}}."""
    if not parallel:
        now, busy, starts = 0.0, [0.0] * num_devices, {}
        for job in order(jobs):
            want = job.devices_wanted(num_devices)
            took = seconds(job, want)
            starts[job.name] = (now, list(range(want)))
            for d in range(want):
                busy[d] += took
            now += took
        return {"makespan": now, "busy": [b / now if now else 0.0 for b in busy],
                "starts": starts}
    check_graph(jobs)
    by_name = {j.name: j for j in jobs}
    index = {j.name: i for i, j in enumerate(jobs)}
    remaining = {j.name: set(j.deps) for j in jobs}
    free = list(range(num_devices))
    busy = [0.0] * num_devices
    ready = sorted((j for j in jobs if not j.deps), key=lambda j: priority(j, index[j.name]))
    running: list = []          # (end time, index, name, devices)
    starts, now = {}, 0.0
    while ready or running:
        started = True
        while started:
            started = False
            for j in list(ready):
                want = j.devices_wanted(num_devices)
                if want <= len(free):
                    devs, free = free[:want], free[want:]
                    end = now + seconds(j, want)
                    for d in devs:
                        busy[d] += end - now
                    heapq.heappush(running, (end, index[j.name], j.name, devs))
                    starts[j.name] = (now, devs)
                    ready.remove(j)
                    started = True
                    break
        if not running:
            break
        now, _, name, devs = heapq.heappop(running)
        free = sorted(free + devs)
        for other, deps in remaining.items():
            if name in deps:
                deps.discard(name)
                if not deps:
                    ready.append(by_name[other])
        ready.sort(key=lambda j: priority(j, index[j.name]))
    makespan = now
    return {"makespan": makespan,
            "busy": [b / makespan if makespan else 0.0 for b in busy], "starts": starts}


def run_jobs(jobs: Sequence[Job], fns: Mapping[str, Callable[[tuple], object]], devices: Sequence,
             parallel: bool) -> dict:
    """Execute every job: `fns[name](devices)` once its dependencies have finished, on a tuple of
    free devices of its size; with `parallel`, every job whose inputs exist and whose devices
    are free runs at once (one thread each), else one at a time on all `devices` in `order`.
    Returns {name: what its function returned}. A failing job stops the scheduling of new
    ones; the jobs already running finish, and JobFailed names the failed job (the first one).
    SIGTERM (rat_jax.engine.savepoints) starts no new job either: the members runs under way
    stop after their current step with a checkpoint, and `Preempted` (exit code 143) goes on."""
    from rat_jax.engine import savepoints  # here: this module imports no JAX (status, --plan)
    check_graph(jobs)
    devices = tuple(devices)
    with savepoints.sigterm_guard():
        if not parallel:
            results: dict = {}
            for job in order(jobs):
                if savepoints.sigterm_agreed():
                    savepoints.stop_between_jobs(len(jobs) - len(results))
                results[job.name] = _call(job, fns[job.name], devices)
            stop = savepoints.sigterm_agreed()
        else:
            results = _run_parallel(jobs, fns, devices, savepoints)
            stop = savepoints.sigterm_requested()
        if stop:  # after the last job: the same exit, with nothing left to do
            savepoints.stop_between_jobs(len(jobs) - len(results))
        return results


def _run_parallel(jobs: Sequence[Job], fns: Mapping[str, Callable[[tuple], object]],
                  devices: tuple, savepoints) -> dict:
    """run_jobs with `parallel` (one thread per running job)."""
    results: dict = {}
    by_name = {j.name: j for j in jobs}
    index = {j.name: i for i, j in enumerate(jobs)}
    remaining = {j.name: set(j.deps) for j in jobs}
    ready = [j for j in jobs if not j.deps]
    free = list(devices)
    cond = threading.Condition()
    running: dict = {}
    errors: list = []

    def work(job: Job, devs: tuple):
        try:
            out = _call(job, fns[job.name], devs)
        except (JobFailed, savepoints.Preempted) as err:
            out, failure = None, err
        else:
            failure = None
        with cond:
            running.pop(job.name)
            free.extend(devs)
            if failure is not None:
                errors.append(failure)
            else:
                results[job.name] = out
                for other, deps in remaining.items():
                    if job.name in deps:
                        deps.discard(job.name)
                        if not deps:
                            ready.append(by_name[other])
            cond.notify_all()

    with cond:
        while True:
            if not errors and not savepoints.sigterm_requested():
                ready.sort(key=lambda j: priority(j, index[j.name]))
                for job in list(ready):
                    want = job.devices_wanted(len(devices))
                    if want <= len(free):
                        devs = tuple(sorted(free, key=devices.index)[:want])
                        for d in devs:
                            free.remove(d)
                        ready.remove(job)
                        thread = threading.Thread(target=work, args=(job, devs),
                                                  name=f"job {job.name}", daemon=True)
                        running[job.name] = thread
                        thread.start()
            if not running:
                break
            cond.wait()
    if errors:
        raise errors[0]
    return results


def _call(job: Job, fn: Callable[[tuple], object], devices: tuple):
    try:
        return fn(devices)
    except JobFailed:
        raise
    except Exception as err:                     # noqa: BLE001 -- named and re-raised
        raise JobFailed(_failure_text(job, devices, err)) from err


def _failure_text(job: Job, devices: tuple, err: Exception) -> str:
    text = (f"{job.name} failed on {len(devices)} device(s): {type(err).__name__}: "
            f"{str(err)[:2000]}")
    if "RESOURCE_EXHAUSTED" in str(err) or "out of memory" in str(err).lower():
        text += (". Its members do not fit its devices' memory: --config.engine.remat=True, "
                 "--config.engine.compute_dtype=bfloat16, a smaller --config.batch_size, or "
                 "fewer members per run (--config.n_hparams)")
    return text + (". Finished runs are kept: rerun the same command to continue from them "
                   "(the failed run resumes from its last checkpoint).")


def resolve_mode(mode: str, platform: str, process_count: int) -> bool:
    """Whether jobs run in parallel: "parallel" / "serial" as given; "auto" in parallel on
    accelerators in a single process, serially on CPU (emulated CPU devices share the same cores,
    and a run beside another holds its memory too) and across processes."""
    mode = str(mode).lower()
    if mode not in MODES:
        raise ValueError(f"config.engine.schedule={mode!r}: use one of {MODES}")
    if process_count > 1:
        return False
    if mode == "auto":
        return platform != "cpu"
    return mode == "parallel"
