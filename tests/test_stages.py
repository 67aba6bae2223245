"""The pipeline and the functional API run the same stage code: `rj.linear_probe` + `rj.train`
reproduce, bit for bit, the members the pipeline trains for one (test env, trial)."""
import importlib.util
import json
import pathlib

import jax
import numpy as np
import pytest

import rat_jax as rj
from rat_jax import runtime, schedule, stages, trees
from rat_jax.pipeline import Pipeline
from rat_jax.specs import MemberSpec

REPO = pathlib.Path(__file__).resolve().parents[1]


def _smoke_config(**changes):
    """configs/demo.py:smoke without auxiliary tasks, one trial, no plots, no LMC gate."""
    spec = importlib.util.spec_from_file_location("demo_cfg", REPO / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("smoke")
    c.aux = {}
    c.trials = (0,)
    c.make_plots = False
    c.lmc_gate.threshold = 0.0
    for k, v in changes.items():
        setattr(c, k, v)
    return c


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_api_train_reproduces_the_pipelines_target_members(tmp_path, monkeypatch):
    events = []  # members runs and memory releases, in order
    real_release, real_train = runtime.release_memory, stages.train_group

    def release(compiled=False):
        events.append(("release", compiled))
        real_release(compiled)

    def train(*args, **kwargs):
        events.append(("train", args[4].stage))
        return real_train(*args, **kwargs)
    kept = {}  # what the schedule keeps of each job until it ends

    def run_jobs(*args, **kwargs):
        kept.update(real_run_jobs(*args, **kwargs))
        return kept
    real_run_jobs = schedule.run_jobs
    monkeypatch.setattr(runtime, "release_memory", release)
    monkeypatch.setattr(stages, "train_group", train)
    monkeypatch.setattr(schedule, "run_jobs", run_jobs)
    c = _smoke_config()
    pipe = Pipeline(c, tmp_path / "run")
    rows = pipe.run()
    # no members run's params stay with the schedule (the selection loads them from the store)
    runs_kept = {n: out for n, out in kept.items() if n.split("/")[0] in ("lp", "aux", "target")}
    assert runs_kept and all(out is None for out in runs_kept.values())
    trains = [i for i, e in enumerate(events) if e[0] == "train"]
    # compiled programs are dropped once no later run uses them: the auxiliary pool's before
    # the test env's probe, the probe's before the members, the test env's after its selection
    assert ("release", True) in events[:trains[0]]
    assert ("release", True) in events[trains[0] + 1:trains[1]]
    assert events[-1] == ("release", True)
    assert {r["method"] for r in rows} == {"ERM (vanilla fine-tuning)", "Soups/DiWA"}
    run_dir = tmp_path / "run" / "target" / "digits_test0_trial0"
    stored = stages.GroupResult.load(run_dir, [])

    settings = rj.TrainSettings.from_config(c)
    featurizer, batch_stats, _ = rj.load_foundation(c.foundation, c.arch, tmp_path / "f",
                                                    c.image_size)
    ds = rj.dataset("digits")
    w_lp = rj.linear_probe(ds, featurizer, batch_stats, test_envs=[0], steps=c.lp_probe_steps,
                           checkpoint_freq=c.target.checkpoint_freq, settings=settings)
    hp = rj.member_hparams(range(c.n_hparams), 0, ds.name, 0, lr_scale=c.lr_scale)
    res = rj.train(ds, [w_lp] * c.n_hparams, hp, test_envs=[0], batch_stats=batch_stats,
                   steps=c.target.steps, checkpoint_freq=c.target.checkpoint_freq,
                   settings=settings)
    _assert_trees_equal(trees.to_host(res.best_params), stored.best_params)
    assert stored.final_params is None  # target runs keep only what selection reads
    np.testing.assert_array_equal(np.asarray(res.best_score), stored.best_score)

    # A rerun on the same workdir trains nothing and gives the same rows.
    again = Pipeline(c, tmp_path / "run")
    assert again.run() == rows and again.trained_members == 0


def test_member_hparams_follow_the_registry_and_scale_lr():
    hp = rj.member_hparams([0, 1], 0, "digits", 0, lr_scale=100.0)
    assert np.allclose([h["lr"] for h in hp], [5e-3, 3e-3])  # h=0 default 5e-5; h=1, t=0: 3e-5
    assert hp[0]["seed"] == rj.run_seed("digits", 0, 0, 0) != hp[1]["seed"]


def test_settings_reject_a_bad_data_parallel_value():
    with pytest.raises(ValueError, match="data_parallel"):
        rj.TrainSettings(arch="resnet_tiny", data_parallel="sometimes")


def test_train_needs_one_hparams_entry_per_init():
    ds = rj.dataset("digits")
    with pytest.raises(ValueError, match="2 initial param trees but 1 hparams"):
        rj.train(ds, [{}, {}], rj.member_hparams([0], 0, ds.name, 0), test_envs=[0],
                 batch_stats={}, steps=1, arch="resnet_tiny")


def _fake_result(value: float) -> stages.GroupResult:
    params = {"w": np.full((2, 3), value, np.float32)}
    return stages.GroupResult(params, params, np.array([0.5, 0.6], np.float32),
                              np.zeros(2, bool), [MemberSpec({"seed": 1}), MemberSpec({"seed": 2})])


def test_workdir_store_loads_done_runs_prunes_checkpoints_and_retrains_changed_ones(tmp_path, caplog):
    calls = []

    def train(value):
        def fn(directory, tensorboard):
            calls.append(directory)
            (directory / "checkpoints" / "7").mkdir(parents=True)
            return _fake_result(value)
        return fn
    store = stages.WorkdirStore(tmp_path)
    first = store.run("target/x", "fp1", [{}, {}], train(1.0))
    run_dir = tmp_path / "target" / "x"
    assert calls == [run_dir] and store.trained_members == 2
    assert not (run_dir / "checkpoints").exists()  # resume-only state pruned once done
    assert (run_dir / "done.json").exists() and (run_dir / "result").exists()

    specs = [MemberSpec({}, h=0), MemberSpec({}, h=1)]
    again = store.run("target/x", "fp1", specs, train(2.0))
    assert len(calls) == 1 and again.info == specs
    np.testing.assert_array_equal(again.best_params["w"], first.best_params["w"])

    with caplog.at_level("WARNING", logger="rat_jax"):
        changed = store.run("target/x", "fp2", [{}, {}], train(3.0))
    assert len(calls) == 2 and "inputs changed" in caplog.text
    assert float(changed.best_params["w"][0, 0]) == 3.0

    keep = stages.WorkdirStore(tmp_path, aux_root=tmp_path / "shared", keep_checkpoints=True)
    keep.run("aux/glyphs_notest", "fp", [{}, {}], train(4.0), keep=("final",))
    assert (tmp_path / "shared" / "glyphs_notest" / "checkpoints").exists()
    kept = stages.GroupResult.load(tmp_path / "shared" / "glyphs_notest", [{}, {}])
    assert kept.best_params is not None and kept.final_params is not None  # everything kept

    # one copy: only the params later stages read are written, and kept in memory
    trained = store.run("aux/textures_notest", "fp", [{}, {}], train(5.0), keep=("final",))
    final_only = stages.GroupResult.load(tmp_path / "aux" / "textures_notest", [{}, {}])
    assert final_only.best_params is None and float(final_only.final_params["w"][0, 0]) == 5.0
    assert trained.best_params is None and float(trained.final_params["w"][0, 0]) == 5.0
    assert final_only.subset([1]).best_params is None
    with pytest.raises(ValueError, match="unknown"):
        _fake_result(1.0).save(tmp_path / "bad", keep=("last",))


def _domainbed_training_domain_validation(records, test_env):
    """DomainBed's model_selection.IIDAccuracySelectionMethod on one (dataset, algorithm, test
    env, trial): per run (hparams_seed) the record with the best mean train-env out accuracy
    (first maximum), then the run with the best such value; its test-env in accuracy."""
    runs = {}
    for r in records:
        runs.setdefault(r["args"]["hparams_seed"], []).append(r)
    best = None
    for h in sorted(runs):
        recs = runs[h]
        envs = [int(k[3:-len("_out_acc")]) for k in recs[0] if k.endswith("_out_acc")]
        envs = [i for i in envs if i not in recs[0]["args"]["test_envs"]]
        val = lambda r: float(np.mean([r[f"env{i}_out_acc"] for i in envs]))
        top = max(recs, key=val)
        if best is None or val(top) > best[0]:
            best = (val(top), top[f"env{test_env}_in_acc"])
    return best[1]


def test_member_records_are_domainbed_records_that_reproduce_the_erm_row(tmp_path):
    c = _smoke_config(eval_all_splits=True, max_eval_images=0)
    rows = Pipeline(c, tmp_path).run()
    erm = next(r for r in rows if r["method"] == "ERM (vanilla fine-tuning)")
    run_dir = tmp_path / "target" / "digits_test0_trial0"
    records = [json.loads(line) for f in sorted(run_dir.glob("member_*/results.jsonl"))
               for line in f.read_text().splitlines()]
    assert len({r["args"]["hparams_seed"] for r in records}) == c.n_hparams
    for r in records:
        args = r["args"]
        assert args["dataset"] == "digits" and args["algorithm"] == "ERM"
        assert args["test_envs"] == [0] and args["trial_seed"] == 0
        assert args["seed"] == rj.run_seed("digits", 0, args["hparams_seed"], 0)
        assert args["holdout_fraction"] == 0.2 and "lr" in args["hparams"]
        assert {"step", "env0_in_acc", "env1_out_acc", "env2_out_acc"} <= set(r)
    assert _domainbed_training_domain_validation(records, 0) == erm["accuracy"]
    _check_soup_files(tmp_path, c, rows)


def _check_soup_files(workdir, c, rows):
    """Every soup row is written as safetensors (torch layout) + Orbax + card; loading the
    safetensors back reproduces the row's accuracy."""
    from rat_jax.convert import convert_torch_checkpoint
    from rat_jax.export import load_flax_export, soup_name
    soup_rows = [r for r in rows if r["selection"] in ("Uniform", "Greedy", "Uniform†")]
    assert soup_rows
    settings = rj.TrainSettings.from_config(c)
    ds = rj.dataset("digits")
    for row in soup_rows:
        directory = workdir / "models" / soup_name(row)
        card = json.loads((directory / "card.json").read_text())
        assert card["accuracy"] == row["accuracy"] and card["dataset_identity"] == ds.identity
        assert len(card["members"]) == row["n_members"]
        assert all({"init", "hparams", "score"} <= set(m) for m in card["members"])
        back = convert_torch_checkpoint(directory / "model.safetensors", c.arch)
        flax_vars, meta = load_flax_export(directory / "flax")
        assert meta["arch"] == c.arch
        _assert_trees_equal(back["params"], flax_vars["params"])
        acc = rj.evaluate(back["params"], back["batch_stats"], ds, envs=[row["test_env"]],
                          split="all", settings=settings)
        assert acc == row["accuracy"], (soup_name(row), acc, row["accuracy"])
