"""The members loop: evaluation schedule, records, strict best-so-far selection, progress, resume."""
import gc
import io
import json
import os
import signal
import threading
import time
import weakref

import jax
import numpy as np
import pytest

from rat_jax import distributed, trees
from rat_jax.engine import loop as loop_lib
from rat_jax.engine import savepoints
from rat_jax.engine import members as members_lib
from rat_jax.engine.progress import Progress
from rat_jax.engine.resume import RunCheckpoints
from members_helpers import (IMAGE, NUM_CLASSES, ListLoader, engine_for, max_abs_diff,
                             member_inits, run_engine, synthetic_batches, tiny_model, unstack)

M, N = 2, 8


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    params, bs = member_inits(model, M)
    batches = synthetic_batches(M, N, 6, seed=3)
    hp = members_lib.make_hparams(M, lr=[1e-2, 3e-2], weight_decay=[0.0, 1e-3],
                                  dropout=[0.0, 0.1], lp_steps=[-1, 1], seed=[5, 6])
    rng = np.random.RandomState(7)

    def split(n):  # ragged: batches of 10 then n - 10
        x = rng.randn(n, IMAGE, IMAGE, 3).astype(np.float32)
        y = rng.randint(0, NUM_CLASSES, n).astype(np.int32)
        return [{"images": x[:10], "labels": y[:10]}, (x[10:], y[10:])]
    eval_sets = {f"env{e}_{s}": split(13 if s == "out" else 17) for e in range(3)
                 for s in ("in", "out")}
    return dict(model=model, params=params, bs=bs, batches=batches, hp=hp, eval_sets=eval_sets)


def _engine(s, **kwargs):
    return engine_for(s["model"], s["bs"], M, 1, "map", **kwargs)


def _run(s, workdir=None, loader=None, num_steps=6, engine=None, save_every=None, **loop_kw):
    eng = engine or _engine(s)
    state = members_lib.init_state(trees.stack(s["params"]))
    loop = loop_lib.LoopConfig(num_steps, 2, eval_sets=s["eval_sets"],
                               val_names=loop_lib.id_val_names(3, [2]), save_every=save_every,
                               steps_per_epoch=4.0, **loop_kw)
    output = loop_lib.RunOutput(workdir=workdir, quiet=True,
                                member_info=[{"args": {"i": 0}}, {"args": {"i": 1}}])
    return loop_lib.run_loop(eng, state, s["hp"], loader or ListLoader(s["batches"]), loop,
                             output)


def _direct_acc(s, params, name):
    correct = total = 0
    for b in s["eval_sets"][name]:
        x, y = (b["images"], b["labels"]) if isinstance(b, dict) else b
        logits = s["model"].apply({"params": params, "batch_stats": s["bs"]}, x)
        correct += int((np.argmax(logits, -1) == y).sum())
        total += len(y)
    return correct / total


def test_records_schedule_accuracy_and_strict_best(setup, tmp_path):
    s = setup
    res = _run(s, workdir=tmp_path)
    _, metrics, _ = run_engine(_engine(s), s["params"], s["hp"], s["batches"])
    assert loop_lib.id_val_names(3, [2]) == ["env0_out", "env1_out"]
    for i in range(M):
        recs = res.records[i]
        assert [r["step"] for r in recs] == [0, 2, 4, 5]  # step 0 after its update, last step
        on_disk = [json.loads(l) for l in (tmp_path / f"member_{i}" / "results.jsonl").open()]
        assert on_disk == recs
        r = recs[1]
        assert r["member"] == i and r["args"] == {"i": i} and r["epoch"] == 0.5
        assert r["hparams"]["lr"] == pytest.approx(float(s["hp"]["lr"][i]))
        assert r["loss"] == pytest.approx(np.mean([metrics[t]["loss"][i] for t in (1, 2)]), rel=1e-6)
        assert r["step_time"] > 0 and r["nonfinite"] is False
        for rec in recs:
            assert rec["score"] == pytest.approx((rec["env0_out_acc"] + rec["env1_out_acc"]) / 2)
        final = unstack(res.final_params, i)
        for name in s["eval_sets"]:
            assert recs[-1][f"{name}_acc"] == pytest.approx(_direct_acc(s, final, name))
        scores = [rec["score"] for rec in recs]
        first_best = int(np.argmax(scores))  # argmax returns the first maximum: strict improvement
        assert res.best_step[i] == recs[first_best]["step"]
        assert res.best_score[i] == pytest.approx(scores[first_best])


def test_train_members_keeps_no_host_copy_of_the_initial_state_during_the_run(setup,
                                                                              monkeypatch):
    """The initial state's host arrays (stacked params, Adam state, best params) are dropped
    once run_loop has placed them: nothing keeps them beside the live members for the run. (On
    CPU the placed members may alias them until the first update donates those buffers.) Once
    the last update is done, the live members' parts are dropped for the stacked state that
    holds them; an evaluation point joins only the entries it reads. The pages such copies
    leave free are handed back to the OS (runtime.trim_heap)."""
    s = setup
    parts, parts_alive = [], []
    real_step, real_fill_final = members_lib.LiveMembers.step, loop_lib._Run.fill_final

    def recording_step(live, batch):
        out = real_step(live, batch)
        parts[:] = [weakref.ref(x) for x in jax.tree.leaves(tuple(live._parts))]
        return out

    def recording_fill_final(run, state):
        gc.collect()
        parts_alive.append(sum(r() is not None for r in parts))
        return real_fill_final(run, state)
    evaluated = []  # the members' entries joined for each evaluation (no checkpoint here)
    real_evaluate = loop_lib._Run.evaluate

    def recording_evaluate(run, state, live, step):
        evaluated.append(sorted(state["members"]))
        return real_evaluate(run, state, live, step)
    monkeypatch.setattr(members_lib.LiveMembers, "step", recording_step)
    monkeypatch.setattr(loop_lib._Run, "fill_final", recording_fill_final)
    monkeypatch.setattr(loop_lib._Run, "evaluate", recording_evaluate)
    refs = []
    real_init_state = loop_lib.init_state

    def recording_init_state(stacked):
        state = real_init_state(stacked)
        refs.extend(weakref.ref(x) for x in jax.tree.leaves(state) if isinstance(x, np.ndarray))
        return state
    monkeypatch.setattr(loop_lib, "init_state", recording_init_state)
    alive, trims = [], []
    monkeypatch.setattr(loop_lib.runtime, "trim_heap", lambda: trims.append(len(alive) - 1))

    class Loader(ListLoader):
        def __next__(self):  # called at every step, after the state was placed
            gc.collect()
            alive.append(sum(r() is not None for r in refs))
            return super().__next__()
    loop = loop_lib.LoopConfig(3, 2, eval_sets=s["eval_sets"],
                               val_names=loop_lib.id_val_names(3, [2]))
    # "loop" with both members on one device: two parts, joined into a copy for the result; no
    # device prefetch: each batch is pulled at the step that reads it
    engine = members_lib.EngineConfig(batch_size=N, devices=jax.devices()[:1], strategy="loop",
                                      device_prefetch=0)
    result = loop_lib.train_members(s["model"], s["params"], s["bs"], s["hp"],
                                    Loader(s["batches"]), loop, loop_lib.RunOutput(quiet=True),
                                    engine)
    # the state is made once the step is compiled on the first batch and dropped once placed
    assert refs and alive == [0, 0, 0]
    # freed pages go back to the OS after compiling, once the state is placed, after the first
    # update and after each evaluation (steps 0 and 2) instead of staying resident for the run
    assert trims == [0, 0, 0, 0, 2]
    assert parts and parts_alive == [0]
    assert evaluated == [["nonfinite", "params"]] * 2  # not Adam's moments
    assert trees.num_members(result.best_params) == M


def test_the_train_step_is_compiled_before_the_state_is_placed_and_reused(setup, monkeypatch):
    """A new run compiles its train step from the state's shapes and the first batch before the
    state is placed, and train_members makes the state (params, Adam moments, best params) only
    then (the compiler's memory and the state's do not add up), and the first
    update reuses that program (one compiled step: the abstract members' shapes, dtypes and
    shardings are the placed parts')."""
    s = setup
    events = []
    real_compile = members_lib.MemberEngine.compile_train
    real_init_state = loop_lib.init_state

    def init_state(params):
        events.append("make state")
        return real_init_state(params)
    monkeypatch.setattr(loop_lib, "init_state", init_state)
    real_place = members_lib.MemberEngine.place

    def compile_train(engine, members, hparams, batch):
        events.append("compile")
        return real_compile(engine, members, hparams, batch)

    def place(engine, stacked):
        if isinstance(stacked, dict) and "best_params" in stacked:
            events.append("place state")
        return real_place(engine, stacked)
    monkeypatch.setattr(members_lib.MemberEngine, "compile_train", compile_train)
    monkeypatch.setattr(members_lib.MemberEngine, "place", place)
    for strategy in ("loop", "map"):  # 'loop' with both members on one device: two parts
        events.clear()
        engine = members_lib.MemberEngine(s["model"], s["bs"], M, members_lib.EngineConfig(
            batch_size=N, devices=jax.devices()[:1], strategy=strategy))
        _run(s, engine=engine)  # run_loop given the state: compiled before it is placed
        assert events == ["compile", "place state"], strategy
        assert len(engine.train_program._compiled) == 1, strategy
    events.clear()  # train_members: the state is made after compiling (InitialState)
    result = loop_lib.train_members(s["model"], s["params"], s["bs"], s["hp"],
                                    ListLoader(s["batches"]), loop_lib.LoopConfig(2, 1),
                                    engine=members_lib.EngineConfig(batch_size=N))
    assert events == ["compile", "make state", "place state"]
    assert trees.num_members(result.final_params) == M


def test_the_last_checkpoint_is_written_before_the_final_state_is_joined(setup, tmp_path,
                                                                        monkeypatch):
    """The run's last checkpoint is written (its host copy freed) before the final stacked state
    is joined and the final sets are evaluated, not beside them."""
    s = setup
    events = []
    real_wait, real_fill_final = loop_lib.RunCheckpoints.wait, loop_lib._Run.fill_final

    def wait(ckpts):
        events.append("wait")
        return real_wait(ckpts)

    def fill_final(run, state):
        events.append("fill_final")
        return real_fill_final(run, state)
    monkeypatch.setattr(loop_lib.RunCheckpoints, "wait", wait)
    monkeypatch.setattr(loop_lib._Run, "fill_final", fill_final)
    _run(s, workdir=tmp_path, num_steps=3)
    assert "wait" in events and events.index("wait") < events.index("fill_final")


def test_update_best_is_strict(setup):
    s = setup
    eng = _engine(s)
    state = eng.place(members_lib.init_state(trees.stack(s["params"])))
    seen = []
    for step, score in enumerate([[0.5, 0.2], [0.5, 0.3], [0.7, 0.3], [0.6, 0.1]]):
        marker = jax.tree.map(lambda x: x * 0 + step, state["members"]["params"])
        state = {**state, "members": {**state["members"], "params": marker}}
        state = eng.update_best(state, np.asarray(score, np.float32), step)
        seen.append(np.asarray(state["best_step"]).tolist())
    assert seen == [[0, 0], [0, 1], [2, 1], [2, 1]]
    np.testing.assert_array_equal(np.asarray(state["best_params"]["classifier"]["bias"]),
                                  np.array([[2.0] * NUM_CLASSES, [1.0] * NUM_CLASSES]))
    np.testing.assert_allclose(np.asarray(state["best_score"]), [0.7, 0.3])


class _CrashingLoader(ListLoader):
    def __init__(self, batches, crash_at):
        super().__init__(batches)
        self.crash_at = crash_at

    def __next__(self):
        if self.pos == self.crash_at:
            raise RuntimeError("simulated crash")
        return super().__next__()


def test_crash_and_resume_in_process_is_bit_identical(setup, tmp_path):
    s = setup
    full = _run(s, workdir=tmp_path / "full", save_every=3)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(s, workdir=tmp_path / "crash", save_every=3,
             loader=_CrashingLoader(s["batches"], crash_at=5))
    # the crash came after the checkpoint at step 2 and the record at step 4: that record is
    # dropped on resume and written again
    resumed = _run(s, workdir=tmp_path / "crash", save_every=3)
    assert max_abs_diff(resumed.state, full.state) == 0.0
    strip = lambda recs: [{k: v for k, v in r.items() if k != "step_time"} for r in recs]
    for i in range(M):
        assert strip(resumed.records[i]) == strip(full.records[i])
    again = _run(s, workdir=tmp_path / "crash", save_every=3)  # finished: nothing left to do
    assert max_abs_diff(again.state, full.state) == 0.0 and len(again.records[0]) == 4


class _Clock:
    """A wall clock that the loader below moves (LoopConfig.clock)."""

    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _at_its_step(s):
    return _engine(s, device_prefetch=0)


class _ClockedLoader(ListLoader):
    """Step s runs at minute s of `clock`; a crash or a SIGTERM (as from a scheduler) while the
    batch of step `crash_at` / `sigterm_at` is fetched. Runs with it use `_at_its_step(s)`, an
    engine without device prefetch, so each batch is fetched at the step that reads it."""

    def __init__(self, batches, clock, crash_at=None, sigterm_at=None):
        super().__init__(batches)
        self.clock, self.crash_at, self.sigterm_at = clock, crash_at, sigterm_at

    def __next__(self):
        if self.pos == self.crash_at:
            raise RuntimeError("simulated crash")
        if self.pos == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        self.clock.t = 60.0 * self.pos
        return super().__next__()


def _saved_steps(workdir):
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _assert_same_run(got, want):
    assert max_abs_diff(got.state, want.state) == 0.0
    strip = lambda recs: [{k: v for k, v in r.items() if k != "step_time"} for r in recs]
    for i in range(M):
        assert strip(got.records[i]) == strip(want.records[i])


def test_clock_saves_every_period_and_resumes_bit_identically(setup, tmp_path):
    """save_minutes=1.5 with step s at minute s and no step period: checkpoints after steps 2
    and 4 (90 s since the last save) and after the last step; a run that crashes at step 4
    resumes from the checkpoint of step 2 (written in the background, complete once the error
    left the run) and ends with the bits and records of a run that saved nothing."""
    s = setup
    ref = _run(s)  # no workdir: no checkpoint at all
    clock = _Clock()
    full = _run(s, workdir=tmp_path / "full", engine=_at_its_step(s), loader=_ClockedLoader(s["batches"], clock),
                save_minutes=1.5, clock=clock, max_to_keep=10)
    assert _saved_steps(tmp_path / "full") == [2, 4, 5]
    _assert_same_run(full, ref)
    clock = _Clock()
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(s, workdir=tmp_path / "crash", save_minutes=1.5, clock=clock, max_to_keep=10,
             engine=_at_its_step(s), loader=_ClockedLoader(s["batches"], clock, crash_at=4))
    assert _saved_steps(tmp_path / "crash") == [2]
    clock = _Clock()
    resumed = _run(s, workdir=tmp_path / "crash", save_minutes=1.5, clock=clock,
                   engine=_at_its_step(s), loader=_ClockedLoader(s["batches"], clock))
    _assert_same_run(resumed, ref)


def test_sigterm_saves_the_step_under_way_then_a_rerun_resumes(setup, tmp_path, capsys):
    """SIGTERM while step 3's batch is fetched: the run ends step 3, saves it (the only
    checkpoint: no period elapsed), says where, and raises Preempted (exit code 143); the
    handler is the run's only; the same call again resumes to the bits of a run never stopped."""
    s = setup
    ref = _run(s)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(savepoints.Preempted) as stop:
        _run(s, workdir=tmp_path, engine=_at_its_step(s), loader=_ClockedLoader(s["batches"], _Clock(), sigterm_at=3))
    assert stop.value.code == savepoints.EXIT_CODE == 143
    assert _saved_steps(tmp_path) == [3]
    err = capsys.readouterr().err
    assert (f"SIGTERM: stopped after step 3 of 6; its checkpoint of step 3 is in "
            f"{tmp_path / 'checkpoints'}; rerun the same command to resume") in err
    assert signal.getsignal(signal.SIGTERM) is before
    resumed = _run(s, workdir=tmp_path)
    _assert_same_run(resumed, ref)


def test_sigterm_guard_hands_an_unanswered_sigterm_to_the_previous_handler():
    got = []
    previous = signal.signal(signal.SIGTERM, lambda *args: got.append("previous"))
    try:
        with savepoints.sigterm_guard():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            assert savepoints.sigterm_requested() and got == []
        time.sleep(0.01)
        assert got == ["previous"] and not savepoints.sigterm_requested()
        with pytest.raises(savepoints.Preempted):
            with savepoints.sigterm_guard():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.01)
                raise savepoints.Preempted("answered")
        time.sleep(0.01)
        assert got == ["previous"]  # a run answered that one
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_save_points_with_and_without_the_processes_vote(monkeypatch):
    """One process decides at the step; with the vote of several processes (AnyProcess, here its
    one-process form driven the same way) a clock or SIGTERM flag acts one step later, at the
    same step everywhere, and a save is not repeated for a flag it already answered."""
    def saves(vote, sigterm_from=None):
        clock = _Clock()
        points = savepoints.SavePoints(10, save_minutes=1.0, clock=clock)
        if vote:
            points.vote = distributed.AnyProcess(3)
        monkeypatch.setattr(savepoints, "sigterm_requested",
                            lambda: sigterm_from is not None and step >= sigterm_from)
        out = []
        for step in range(10):
            clock.t = 25.0 * step  # 60 s elapse after 3 steps
            due = points.at(step)
            if due.save:
                points.saved(step)
                out.append(step)
            if due.stop:
                out.append("stop")
                break
        return out
    assert saves(vote=False) == [3, 6, 9]
    assert saves(vote=True) == [4, 8, 9]
    assert saves(vote=False, sigterm_from=5) == [3, 5, "stop"]
    assert saves(vote=True, sigterm_from=5) == [4, 6, "stop"]


def test_a_save_one_step_before_an_evaluation_is_made_at_it(monkeypatch):
    """A step-period or clock save due one step before an evaluation point is made at that point
    (after its evaluation), once; a save at an evaluation point, the last step's and SIGTERM's
    are not moved."""
    def saves(save_every=0, eval_every=0, minutes=None, sigterm_at=None):
        clock = _Clock()
        points = savepoints.SavePoints(10, save_minutes=minutes, save_every=save_every,
                                       clock=clock, eval_every=eval_every)
        monkeypatch.setattr(savepoints, "sigterm_requested", lambda: step == sigterm_at)
        out = []
        for step in range(10):
            clock.t = 25.0 * step  # 60 s elapse after 3 steps
            if points.at(step).save:
                points.saved(step)
                out.append(step)
        return out
    assert saves(save_every=2) == [1, 3, 5, 7, 9]                     # no evaluation points
    assert saves(save_every=2, eval_every=3) == [1, 3, 6, 7, 9]       # 5 -> 6; 3 is one
    assert saves(save_every=2, eval_every=1) == [1, 3, 5, 7, 9]       # every step is one
    assert saves(save_every=5, eval_every=5) == [5, 9]                # 4 -> 5; 9 is the last
    assert saves(minutes=1.0, eval_every=4) == [4, 8, 9]              # the clock's 3 -> 4, 7 -> 8
    assert saves(save_every=5, eval_every=5, sigterm_at=3) == [3, 5, 9]  # SIGTERM at once


def test_an_evaluation_period_below_one_step_is_a_clear_error(setup):
    s = setup
    state = members_lib.init_state(trees.stack(s["params"]))
    with pytest.raises(ValueError, match=r"checkpoint_freq=0: .* at least 1 step"):
        loop_lib.run_loop(_engine(s), state, s["hp"], ListLoader(s["batches"]),
                          loop_lib.LoopConfig(6, 0, eval_sets=s["eval_sets"]))


def test_async_save_holds_its_own_copy(tmp_path):
    """RunCheckpoints.save (asynchronous) returns once the arrays are copied to the host: deleting
    them at once (as the next train step donates them) leaves the checkpoint intact."""
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:2]), ("model",))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("model"))
    want = {"w": np.arange(2 * 300_000, dtype=np.float32).reshape(2, -1),
            "step": np.array([3, 4], np.int32)}
    state = jax.device_put(want, split)
    ckpts = RunCheckpoints(tmp_path)
    ckpts.save(7, state, {"step": 7})
    for x in jax.tree.leaves(state):
        x.delete()
    ckpts.wait()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=split), want)
    got, meta = ckpts.restore(7, target)
    ckpts.close()
    assert meta == {"step": 7}
    for k in want:
        np.testing.assert_array_equal(np.asarray(got[k]), want[k])


def test_async_saves_of_runs_side_by_side(tmp_path):
    """Two runs' checkpoints saved from two threads (a parallel schedule) beside standalone
    pytree saves: Orbax numbers its operations process-wide, so rat_jax.checkpoint.exclusive()
    keeps them apart; every checkpoint restores to what was saved."""
    from rat_jax import checkpoint
    errors = []

    def run(name):
        try:
            ckpts = RunCheckpoints(tmp_path / name, max_to_keep=10)
            for step in range(4):
                ckpts.save(step, {"w": jax.numpy.full((50_000,), step, np.float32)},
                           {"step": step})
                checkpoint.save_pytree(tmp_path / f"{name}_tree{step}", {"v": np.arange(step + 1)})
            ckpts.wait()
            for step in range(4):
                got, meta = ckpts.restore(step, {"w": jax.ShapeDtypeStruct((50_000,), np.float32)})
                assert meta == {"step": step} and float(got["w"][0]) == step
            ckpts.close()
        except BaseException as err:  # noqa: BLE001 -- reported by the test
            errors.append(err)
    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert not any(t.is_alive() for t in threads)


def test_resume_refuses_other_settings(setup, tmp_path):
    s = setup
    _run(s, workdir=tmp_path, num_steps=2)
    other = {**s["hp"], "lr": s["hp"]["lr"] * 2}
    with pytest.raises(ValueError, match="other member settings"):
        loop_lib.run_loop(_engine(s), members_lib.init_state(trees.stack(s["params"])),
                          other, ListLoader(s["batches"]), loop_lib.LoopConfig(2, 2),
                          loop_lib.RunOutput(workdir=tmp_path, quiet=True))


def test_progress_plain_lines_tty_and_quiet():
    clock, out = _Clock(), io.StringIO()
    p = Progress("target", 100, stream=out, interval=10.0, clock=clock)
    for step in range(1, 41):
        clock.t += 0.5
        p.update(step, images=96, losses=np.array([0.5, 1.25, np.nan]))
    lines = out.getvalue().splitlines()
    assert len(lines) == 2  # every 10 s of the 20 s
    assert lines[-1].startswith("[target] 40/100  2.00 steps/s  192.0 img/s  ETA 30 s")
    assert "loss 0.5000..1.2500" in lines[-1] and "(1 non-finite)" in lines[-1]

    class Tty(io.StringIO):
        def isatty(self):
            return True
    tty, clock2 = Tty(), _Clock()
    p = Progress("lp", 10, stream=tty, clock=clock2)
    clock2.t = 1.0
    p.update(1, images=8)
    p.close(10)
    assert tty.getvalue().startswith("\r") and tty.getvalue().endswith("\n")
    # the final line is printed once, whether or not the last update already printed it
    plain, clock3 = io.StringIO(), _Clock()
    p = Progress("aux", 4, stream=plain, interval=0.0, clock=clock3)
    for step in range(1, 5):
        clock3.t += 1.0
        p.update(step, images=8)
    p.close(4)
    assert [l.split()[1] for l in plain.getvalue().splitlines()] == ["1/4", "2/4", "3/4", "4/4"]
    quiet = io.StringIO()
    q = Progress("x", 5, stream=quiet, quiet=True, clock=clock2)
    q.update(1, force=True)
    q.close(5)
    assert quiet.getvalue() == ""


def test_loop_strategy_run_loop_equals_map_and_resumes(setup, tmp_path):
    """run_loop on a 'loop' engine with 2 members on one device (trained in parts): the same
    records, best and final params as the 'map' engine; a run stopped at step 4 and resumed from
    its checkpoint ends the same."""
    s = setup
    eng = engine_for(s["model"], s["bs"], M, 1, "loop")
    assert eng.strategy == "loop" and eng.local_members == M
    ref = _run(s)
    res = _run(s, engine=eng, workdir=tmp_path / "whole", save_every=2)
    for i in range(M):
        assert len(res.records[i]) == len(ref.records[i])
        for got, want in zip(res.records[i], ref.records[i]):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
            rest = lambda r: {k: v for k, v in r.items() if k not in ("loss", "step_time")}
            assert rest(got) == rest(want)  # steps, scores, accuracies, hparams, flags
    assert max_abs_diff(res.final_params, ref.final_params) <= 1e-5
    assert max_abs_diff(res.best_params, ref.best_params) <= 1e-5
    np.testing.assert_array_equal(res.best_step, ref.best_step)
    _run(s, engine=eng, workdir=tmp_path / "split", num_steps=4, save_every=2)
    resumed = _run(s, engine=eng, workdir=tmp_path / "split", save_every=2)
    assert max_abs_diff(resumed.final_params, res.final_params) == 0.0
    assert max_abs_diff(resumed.best_params, res.best_params) == 0.0


# ----------------------------------------------------------------------------------------------
# The device feed: batches placed ahead of their step
# ----------------------------------------------------------------------------------------------
class _CountingLoader(ListLoader):
    """A ListLoader that counts the batches pulled from it (by any thread)."""

    def __init__(self, batches, fail_at=None):
        super().__init__(batches)
        self.fail_at = fail_at

    def __next__(self):
        if self.pos == self.fail_at:
            raise RuntimeError(f"no batch {self.pos}")
        return super().__next__()


def _wait_for(cond, timeout=10.0):
    import time
    end = time.monotonic() + timeout
    while not cond() and time.monotonic() < end:
        time.sleep(0.01)
    return cond()


@pytest.mark.parametrize("strategy", ["map", "loop"])
def test_feed_places_ahead_in_order_and_reports_the_consumers_position(setup, strategy):
    """depth 2: batches are pulled and placed two ahead of the consumer, never more and never
    past `limit`; each served batch is the source's batch in the step's layout (one slice per
    part in the 'loop' strategy's split form); get_state() is the consumer's position."""
    s = setup
    eng = engine_for(s["model"], s["bs"], M, 1, strategy)
    source = _CountingLoader(s["batches"])
    feed = eng.feed(source, limit=5, stateful=source, depth=2)
    assert _wait_for(lambda: source.pos == 2) and feed.get_state() == {"pos": 0}
    for k in range(5):
        placed = next(feed)
        assert feed.get_state() == {"pos": k + 1}
        assert _wait_for(lambda: source.pos == min(k + 3, 5))
        want = eng.place_train(s["batches"][k])
        assert len(placed.parts) == (M if strategy == "loop" else 1)
        for got_part, want_part in zip(placed.parts, want.parts):
            for a, b in zip(jax.tree.leaves(got_part), jax.tree.leaves(want_part)):
                assert a.sharding == b.sharding
                np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert placed.num_images == M * N
    with pytest.raises(StopIteration):
        next(feed)
    assert source.pos == 5
    feed.close()


def test_feed_raises_the_sources_error_at_its_step_and_closes(setup):
    s = setup
    eng = _engine(s)
    source = _CountingLoader(s["batches"], fail_at=2)
    feed = eng.feed(source, stateful=source, depth=3)
    next(feed), next(feed)  # batches 0 and 1 are served although batch 2 failed ahead
    for _ in range(2):
        with pytest.raises(RuntimeError, match="no batch 2"):
            next(feed)
    feed.close()
    held = eng.feed(_CountingLoader(s["batches"]), depth=2)
    thread = held._thread
    assert _wait_for(lambda: not held._queue.empty())
    held.close()  # the thread stops though nobody consumes
    assert not thread.is_alive()
    with pytest.raises(StopIteration):
        next(held)


def _checkpoint_meta(workdir):
    import orbax.checkpoint as ocp
    manager = ocp.CheckpointManager(workdir / "checkpoints")
    step = manager.latest_step()
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    manager.close()
    return step, meta


@pytest.mark.parametrize("depth", [0, 1, 3])
def test_checkpoints_record_the_next_batch_a_step_reads(setup, tmp_path, depth):
    """However far the feed has read ahead, a checkpoint after step k holds the loader's state
    at batch k + 1: a run that fails at batch 7 (its last checkpoint after step 6: the save due
    at step 5 is made after the evaluation of step 6) resumes at batch 7 and ends with the bits
    of an uninterrupted run with depth 0."""
    s = setup
    eng = engine_for(s["model"], s["bs"], M, 1, "map", device_prefetch=depth)
    with pytest.raises(RuntimeError, match="no batch 7"):
        _run(s, workdir=tmp_path, num_steps=10, engine=eng, save_every=3,
             loader=_CountingLoader(s["batches"], fail_at=7))
    step, meta = _checkpoint_meta(tmp_path)
    assert step == 6 and meta["loader"] == {"pos": 7}
    resumed = _run(s, workdir=tmp_path, num_steps=10, engine=eng, save_every=3)
    ref = _run(s, num_steps=10, engine=engine_for(s["model"], s["bs"], M, 1, "map",
                                                  device_prefetch=0))
    assert max_abs_diff(resumed.state, ref.state) == 0.0
