"""The device scheduler (rat_jax.schedule): dependency order, device sizing, parallel execution on
device subsets, failures named, and the simulated schedule of --plan."""
import os
import signal
import threading
import time

import pytest

from rat_jax import schedule
from rat_jax.engine import savepoints
from rat_jax.schedule import Job


def _graph():
    return [Job("lp/a", "run", members=1, cost=1), Job("aux/a", "run", ("lp/a",), 4, 8),
            Job("lp/t0", "run", members=1, cost=1), Job("t0", "run", ("lp/t0", "aux/a"), 6, 30),
            Job("t1", "run", ("lp/t0", "aux/a"), 6, 30), Job("sel", "selection", ("t0", "t1")),
            Job("table", "table", ("sel",))]


def test_devices_are_sized_to_the_members():
    assert Job("x", "run", members=56).devices_wanted(8) == 8
    assert Job("x", "run", members=4).devices_wanted(8) == 4
    assert Job("x", "run", members=6).devices_wanted(4) == 3      # divides the members
    assert Job("x", "run", members=1).devices_wanted(8) == 1
    assert Job("x", "selection").devices_wanted(8) == 8


def test_serial_order_keeps_the_given_order_where_the_inputs_allow():
    jobs = _graph()
    assert [j.name for j in schedule.order(jobs)] == [j.name for j in jobs]
    swapped = [jobs[1], jobs[0]] + jobs[2:]                      # aux/a before its probe
    assert [j.name for j in schedule.order(swapped)][:2] == ["lp/a", "aux/a"]
    with pytest.raises(ValueError, match="cycle"):
        schedule.order([Job("a", "run", ("b",)), Job("b", "run", ("a",))])
    with pytest.raises(ValueError, match="not jobs"):
        schedule.check_graph([Job("a", "run", ("nope",))])


def test_parallel_jobs_run_side_by_side_on_disjoint_devices_after_their_inputs():
    jobs = _graph()
    log, lock, active = [], threading.Lock(), {}

    def fn(name):
        def run(devices):
            with lock:
                assert not set(devices) & {d for ds in active.values() for d in ds}
                active[name] = devices
                log.append(("start", name, devices))
            time.sleep(0.05)
            with lock:
                del active[name]
                log.append(("end", name, devices))
            return name.upper()
        return run
    out = schedule.run_jobs(jobs, {j.name: fn(j.name) for j in jobs}, list(range(8)), True)
    assert out == {j.name: j.name.upper() for j in jobs}
    pos = {(kind, name): i for i, (kind, name, _) in enumerate(log)}
    for j in jobs:
        for d in j.deps:
            assert pos[("end", d)] < pos[("start", j.name)]
    devices = {name: devs for kind, name, devs in log if kind == "start"}
    assert len(devices["aux/a"]) == 4 and len(devices["t0"]) == 6 and len(devices["lp/a"]) == 1
    # the two probes ran at once
    assert pos[("start", "lp/t0")] < pos[("end", "lp/a")]


def test_a_failing_job_is_named_and_stops_new_jobs():
    jobs = _graph()
    ran = []

    def fn(name):
        def run(devices):
            ran.append(name)
            if name == "aux/a":
                raise RuntimeError("RESOURCE_EXHAUSTED: out of memory allocating 9 GiB")
            return name
        return run
    for parallel in (False, True):
        ran.clear()
        with pytest.raises(schedule.JobFailed, match=r"aux/a failed .*remat.*rerun the same"):
            schedule.run_jobs(jobs, {j.name: fn(j.name) for j in jobs}, list(range(8)), parallel)
        assert "t0" not in ran and "table" not in ran


def test_simulated_schedule_packs_devices():
    jobs = _graph()
    sim = schedule.simulate(jobs, 8, lambda j, d: j.cost / d if j.kind == "run" else 0.0)
    starts = sim["starts"]
    assert starts["lp/a"][0] == starts["lp/t0"][0] == 0.0          # side by side
    # lp/a (1 s), then aux/a on 4 devices (8 / 4 = 2 s); t0 takes 6 of 8 devices for 5 s and t1,
    # which needs 6 too, starts when t0 ends
    assert starts["t0"] == (3.0, [0, 1, 2, 3, 4, 5]) and starts["t1"][0] == 8.0
    assert sim["makespan"] == 13.0
    assert sim["busy"][0] == pytest.approx((1 + 2 + 5 + 5) / 13)
    assert sim["makespan"] > 0 and all(0 <= b <= 1 for b in sim["busy"])


def test_mode():
    assert schedule.resolve_mode("auto", "gpu", 1) and not schedule.resolve_mode("auto", "cpu", 1)
    assert schedule.resolve_mode("parallel", "cpu", 1)
    assert not schedule.resolve_mode("parallel", "gpu", 2)       # processes: one job at a time
    with pytest.raises(ValueError, match="config.engine.schedule"):
        schedule.resolve_mode("fast", "gpu", 1)


def _job(name, calls, sigterm=False, trains=False):
    """A job that records its start; `sigterm`: sends SIGTERM to this process (as a scheduler's
    preemption); `trains`: polls the flag at every "step" and stops with Preempted, as a members
    run does; else it returns (a selection, a table)."""
    def run(devices):
        calls.append(name)
        if sigterm:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        for _ in range(500 if trains else 0):
            if savepoints.sigterm_requested():
                raise savepoints.Preempted(f"{name} stopped")
            time.sleep(0.01)
        return name
    return run


@pytest.mark.parametrize("parallel", [False, True])
def test_sigterm_starts_no_new_job_and_exits_with_143(parallel, capsys):
    """SIGTERM during job a: in parallel, the run b under way stops (Preempted) and c, waiting
    for a device, never starts; serially b never starts. Either way Preempted (exit code 143)
    goes on and the SIGTERM handler is the one from before."""
    before = signal.getsignal(signal.SIGTERM)
    calls = []
    jobs = [Job("a", "selection"), Job("b", "run", members=1), Job("c", "run", members=1)]
    fns = {"a": _job("a", calls, sigterm=True), "b": _job("b", calls, trains=True),
           "c": _job("c", calls, trains=True)}
    devices = [0, 1] if parallel else [0]
    if parallel:  # a and b side by side on the two devices, c waits for one
        jobs[0] = Job("a", "run", members=1, cost=2)
    with pytest.raises(savepoints.Preempted) as stop:
        schedule.run_jobs(jobs, fns, devices, parallel)
    assert stop.value.code == savepoints.EXIT_CODE == 143
    assert sorted(calls) == (["a", "b"] if parallel else ["a"])
    if not parallel:
        assert "[schedule] SIGTERM: stopped with 2 job(s) not done" in capsys.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is before and not savepoints.sigterm_requested()
