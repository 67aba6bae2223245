"""The functional API end to end on real (embedded) data with a tiny random net."""
import jax
import numpy as np

import rat_jax as rj


def test_api_train_average_evaluate_greedy_export(tmp_path):
    featurizer, batch_stats, fhash = rj.load_foundation("random", "resnet_tiny", tmp_path / "f", 16)
    assert fhash == "random:resnet_tiny"
    ds = rj.dataset("digits")
    assert ds.num_classes == 10 and ds.envs[:2] == ["mnist", "optdigits"]
    model = rj.create_model("resnet_tiny", ds.num_classes)
    head = jax.tree.map(np.asarray, model.init(jax.random.key(1),
                                               np.zeros((1, 16, 16, 3), np.float32))
                        ["params"]["classifier"])
    inits = [{"featurizer": featurizer, "classifier": head}] * 2
    hp = rj.member_hparams([0, 1], 0, ds.name, 0, lr_scale=100.0)
    settings = rj.TrainSettings(arch="resnet_tiny", image_size=16, batch_size=4, quiet=True,
                                max_eval_images=32, eval_batch_size=16)
    res = rj.train(ds, inits, hp, test_envs=[0], batch_stats=batch_stats, steps=4,
                   checkpoint_freq=2, settings=settings)
    assert res.best_score.shape == (2,) and np.all(np.isfinite(res.best_score))
    assert len(res.records) == 2 and res.records[0][-1]["step"] == 3
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), res.final_params["featurizer"],
                         featurizer)
    assert max(jax.tree.leaves(moved)) > 0
    soup = rj.average(res.best_params)
    acc = rj.evaluate(soup, batch_stats, ds, envs=[1], split="out", settings=settings)
    assert 0.0 <= acc <= 1.0
    members = rj.evaluate_members(res.best_params, batch_stats, ds, envs=[1], split="out",
                                  settings=settings)
    one = rj.evaluate(rj.take(res.best_params, 1), batch_stats, ds, envs=[1], split="out",
                      settings=settings)
    assert members.shape == (2,) and members[1] == one
    ens = rj.ensemble(res.best_params, batch_stats, ds, envs=[1], split="out", settings=settings)
    assert 0.0 <= ens <= 1.0
    path = rj.export_torch(tmp_path / "soup.safetensors", {"params": soup, "batch_stats": batch_stats},
                     "resnet_tiny")
    back = rj.convert_torch_checkpoint(path, "resnet_tiny")
    np.testing.assert_array_equal(back["params"]["classifier"]["kernel"],
                                  np.asarray(soup["classifier"]["kernel"]))


def test_api_call_and_engine_package_are_distinct():
    """`rat_jax.train(...)` is the API function; the training engine is `rat_jax.engine`."""
    import importlib

    import rat_jax
    from rat_jax import api
    assert rat_jax.train is api.train
    assert importlib.import_module("rat_jax.engine.members").MemberEngine is not None
    assert sorted(rat_jax.__all__) == sorted(api.__all__)
