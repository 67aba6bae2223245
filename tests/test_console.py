"""The console a person can follow: one line per evaluation point and member group, skip and
resume notices, selection progress, an ETA that starts after compilation, optional TensorBoard
scalars; and the augmented ID-val set's fresh (seeded) draw at each evaluation point."""
import contextlib
import importlib.util
import io
import pathlib
import re
import struct

import jax
import numpy as np

from rat_jax.data import MemberStream, StreamSpec
import pytest

import rat_jax as rj
from rat_jax import selection, stages
from rat_jax.engine import loop as loop_lib
from rat_jax.engine import (EngineConfig, LoopConfig, RunOutput, make_hparams,
                            train_members)
from rat_jax.engine.progress import Progress, have_tensorboard

from members_helpers import ListLoader, StandInNet, member_inits, synthetic_batches

REPO = pathlib.Path(__file__).resolve().parents[1]
EVAL_LINE = re.compile(r"\[(?P<stage>[^\]]+)\] step (?P<step>\d+)  (?P<group>\w+) \((?P<n>\d+) "
                       r"members?\)  train loss (?P<loss>[\d.]+)  ID-val mean (?P<mean>[\d.]+) "
                       r"best (?P<best>[\d.]+) \(member (?P<member>\d+)\)")


def _smoke_config():
    spec = importlib.util.spec_from_file_location("demo_cfg", REPO / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("smoke")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 3-member run in two groups (a: members 0, 1; b: member 2) on the embedded digits, with
    augmented ID validation and (when a writer is installed) TensorBoard; stderr captured."""
    tmp = tmp_path_factory.mktemp("console")
    c = _smoke_config()
    settings = rj.TrainSettings.from_config(c).replace(
        quiet=False, validation_augment=True, tensorboard=have_tensorboard())
    featurizer, batch_stats, _ = rj.load_foundation(c.foundation, c.arch, tmp / "f", c.image_size)
    ds = rj.dataset("digits")
    hp = rj.member_hparams(range(3), 0, ds.name, 0, lr_scale=c.lr_scale)
    for i, h in enumerate(hp):
        h["group"] = "a" if i < 2 else "b"
    init = {"featurizer": featurizer, "classifier": rj.new_head(c.arch, ds.num_classes)}
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        res = stages.train_group(ds, [init] * 3, hp, batch_stats,
                                 stages.GroupRun([0], 0, 4, 2, stage="tiny"), settings,
                                 workdir=tmp / "run")
    return dict(res=res, out=err.getvalue(), hp=hp, ds=ds, settings=settings,
                batch_stats=batch_stats, workdir=tmp / "run")


def test_one_line_per_evaluation_point_and_group_matches_the_records(run):
    records = run["res"].records
    lines = [m.groupdict() for m in map(EVAL_LINE.match, run["out"].splitlines()) if m]
    assert [(int(l["step"]), l["group"]) for l in lines] == [
        (s, g) for s in (0, 2, 3) for g in ("a", "b")]
    for line in lines:
        step = int(line["step"])
        idx = [0, 1] if line["group"] == "a" else [2]
        recs = [next(r for r in records[i] if r["step"] == step) for i in idx]
        scores = [r["score"] for r in recs]
        assert line["stage"] == "tiny" and int(line["n"]) == len(idx)
        assert line["mean"] == f"{np.mean(scores):.4f}"
        assert line["best"] == f"{np.max(scores):.4f}"
        assert int(line["member"]) == idx[int(np.argmax(scores))]
        assert line["loss"] == f"{np.mean([r['loss'] for r in recs]):.4f}"
    out = run["out"]
    assert out.count("compiled in") == 1 and "[tiny] 3 members, 4 steps, evaluation every 2" in out
    assert re.search(r"\[tiny\] 4/4 .* ETA 0 s", out)


def test_eta_counts_from_after_compilation():
    class Clock:
        t = 0.0

        def __call__(self):
            return self.t
    clock, out = Clock(), io.StringIO()
    p = Progress("target", 101, stream=out, interval=0.0, clock=clock)
    clock.t = 60.0                     # the first update compiles for a minute
    p.compiled(58.2)
    p.compiled(1.0)                    # reported once
    p.update(1, images=8)
    p.restart(1)
    for step in range(2, 12):          # then 2 steps/s
        clock.t += 0.5
        p.update(step, images=8)
    lines = out.getvalue().splitlines()
    assert lines[0] == "[target] compiled in 58.2 s" and "compiled" not in "".join(lines[1:])
    assert lines[-1].startswith("[target] 11/101  2.00 steps/s  16.0 img/s  ETA 45 s")


def test_resume_notice_and_quiet(tmp_path, capsys):
    model = StandInNet(5)
    params, bs = member_inits(model, 2)
    batches = synthetic_batches(2, 8, 6, seed=1)
    hp = make_hparams(2, lr=[1e-2, 2e-2], dropout=[0.0, 0.1], seed=[1, 2])
    ev = {"env0_out": [{"images": np.zeros((4, 16, 16, 3), np.float32),
                        "labels": np.arange(4) % 5}]}
    loop = LoopConfig(6, 2, eval_sets=ev, val_names=["env0_out"], save_every=2)
    out = RunOutput(workdir=tmp_path, stage="rs")
    engine = EngineConfig(batch_size=8, devices=jax.devices()[:2])

    class Killed(ListLoader):  # the run dies before step 4: the checkpoint of step 2 is kept (the
                               # save due at step 1 is made after the evaluation of step 2)
        def __next__(self):
            if self.pos == 4:
                raise KeyboardInterrupt
            return super().__next__()
    with pytest.raises(KeyboardInterrupt):
        train_members(model, params, bs, hp, Killed(batches), loop, out.replace(quiet=True),
                      engine)
    assert capsys.readouterr().err == ""   # quiet: nothing at all
    train_members(model, params, bs, hp, ListLoader(batches), loop, out, engine)
    err = capsys.readouterr().err
    assert "[rs] resuming from the checkpoint of step 2: 3/6 updates done" in err
    assert re.search(r"\[rs\] step 4  2 members  train loss [\d.]+  ID-val mean", err)


def _group(n=2):
    return stages.GroupResult({"w": np.zeros((n, 3), np.float32)},
                              {"w": np.ones((n, 3), np.float32)}, np.linspace(0.5, 0.6, n),
                              np.zeros(n, bool), [stages.MemberSpec({}, h=i) for i in range(n)])


def test_skip_notice_and_tensorboard_folder_of_a_stored_run(tmp_path, capsys):
    store = stages.WorkdirStore(tmp_path)
    seen = []

    def train(directory, tensorboard):
        seen.append(tensorboard)
        return _group()
    store.run("target/x_test0_trial0", "fp1", [{}] * 2, train)
    assert seen == [tmp_path / "tensorboard" / "target" / "x_test0_trial0"]
    capsys.readouterr()
    store.run("target/x_test0_trial0", "fp1", [{}] * 2, train)
    assert len(seen) == 1
    err = capsys.readouterr().err
    assert err.startswith("[target/x_test0_trial0] skipped: already done with the same inputs")
    stages.WorkdirStore(tmp_path, quiet=True).run("target/x_test0_trial0", "fp1", [{}] * 2, train)
    assert capsys.readouterr().err == ""


def test_tensorboard_flag_is_read_and_leaves_fingerprints_alone():
    c = _smoke_config()
    assert c.tensorboard is False
    s = rj.TrainSettings.from_config(c)
    assert s.tensorboard is False
    if not have_tensorboard():
        with pytest.raises(ImportError, match="pip install tensorboardX"):
            s.replace(tensorboard=True)
    else:
        assert s.replace(tensorboard=True).fingerprint() == s.fingerprint()


def _read_scalars(folder):
    from tensorboardX.proto import event_pb2
    out = {}
    for path in sorted(pathlib.Path(folder).rglob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
            pos += 12 + n + 4
            for v in event.summary.value:
                out[(v.tag, event.step)] = v.simple_value
    return out


def test_tensorboard_scalars_per_member_land_in_the_event_files(run):
    if not have_tensorboard():
        pytest.skip("tensorboardX is not installed")
    scalars = _read_scalars(run["workdir"] / "tensorboard")
    for i, recs in enumerate(run["res"].records):
        for r in recs:
            assert scalars[(f"train_loss/member_{i}", r["step"])] == pytest.approx(r["loss"])
            assert scalars[(f"id_val_acc/member_{i}", r["step"])] == pytest.approx(r["score"])
    assert len(scalars) == 2 * 3 * 3


def test_selection_reports_its_progress(run, capsys):
    res = run["res"]
    group = stages.GroupResult.from_train(res, run["hp"])
    rows = selection.select_and_evaluate(run["ds"], 0, {0: {"noaux": group}}, run["batch_stats"],
                                         settings=run["settings"], progress_interval=0.0)
    err = capsys.readouterr().err
    assert err.splitlines()[0] == "[selection env0] trials [0]: scoring members, soups and ensembles"
    for k in (1, 2, 3):
        assert f"[selection env0] trial 0 Soups/DiWA: greedy soup {k}/3 members" in err
    assert re.search(rf"\[selection env0\] done in [\d.]+ s: {len(rows)} rows", err)
    selection.select_and_evaluate(run["ds"], 0, {0: {"noaux": group}}, run["batch_stats"],
                                  settings=run["settings"].replace(quiet=True))
    assert capsys.readouterr().err == ""


def test_augmented_id_val_draws_afresh_per_member_and_evaluation_step():
    ds = rj.dataset("digits")
    settings = rj.TrainSettings(arch="resnet_tiny", image_size=16, eval_batch_size=16,
                                max_eval_images=16)
    run = stages.GroupRun(test_envs=[0], trial=0, steps=1, checkpoint_freq=1)
    stream = lambda seeds: MemberStream(ds, [1, 2], seeds, 0, StreamSpec(image_size=16))
    sets, final = stages.eval_sets(ds, run, settings, stream([5, 9]))

    def images(name, step, table=sets):
        return np.concatenate([b["images"] for b in table[name](step=step)], axis=-4)
    a0, a2, a2_again = (images("env1_out", s) for s in (0, 2, 2))
    assert a0.shape[:2] == (2, 16) and not np.array_equal(a0, a2)
    assert not np.array_equal(a0[0], a0[1])                # each member its own draw
    np.testing.assert_array_equal(a2, a2_again)            # seeded: the same after a resume
    alone, _ = stages.eval_sets(ds, run, settings, stream([9]))
    np.testing.assert_array_equal(images("env1_out", 2, alone)[0], a2[1])  # independent members
    assert sorted(final) == ["env0_in", "env0_out"] and "env0_out" not in sets
    np.testing.assert_array_equal(images("env0_out", 0, final), images("env0_out", 2, final))

    class Engine:                                          # loop.evaluate hands the step over
        num_members = 1

        def prepare_eval(self, params):
            return params

        def evaluate_batch(self, params, images, labels, mask, augment=None, image_size=None):
            return np.array([int(mask.sum())])
    got = []

    def with_step(step=None):
        got.append(step)
        return [{"images": np.zeros((2, 1)), "labels": np.zeros(2, np.int32)}]
    accs = loop_lib.evaluate(Engine(), None, {"a": with_step, "b": lambda: with_step()}, step=7)
    assert got == [7, None] and accs["a"][0] == accs["b"][0] == 1.0
