"""Stacked members: same results as members trained one by one, on 1 and 8 emulated devices, with
each local strategy, per-member settings, data parallelism, the LP schedule, remat and fault
isolation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from rat_jax import trees
from rat_jax.engine import members as members_lib
from rat_jax.engine import mesh as mesh_lib
from rat_jax.engine import strategies
from members_helpers import (engine_for, max_abs_diff, member_inits, reference_train, run_engine,
                             slice_batches, slice_hparams, synthetic_batches, tiny_model, unstack)

TOL = 1e-5
STEPS = 4
N = 8  # images per member per step


@pytest.fixture(scope="module")
def setup():
    """8 members: different inits, data, lr, weight decay, dropout, LP schedules and seeds."""
    model = tiny_model()
    params, bs = member_inits(model, 8)
    batches = synthetic_batches(8, N, STEPS)
    hp = members_lib.make_hparams(
        8, lr=[1e-2, 3e-3, 0.0, 1e-2, 5e-3, 2e-2, 1e-3, 1e-2],
        weight_decay=[0.0, 1e-2, 0.0, 1e-1, 0.0, 1e-3, 0.0, 5e-2],
        dropout=[0.0, 0.5, 0.1, 0.0, 0.5, 0.0, 0.1, 0.5],
        lp_steps=[-1, 1, -1, 2, -1, 0, -1, 1], seed=[11, 12, 13, 14, 15, 16, 17, 18])
    hp_nodrop = {**hp, "dropout": np.zeros(8, np.float32)}
    ref, ref_metrics = reference_train(model, bs, params, hp, batches)
    ref_nodrop, ref_nodrop_metrics = reference_train(model, bs, params[:4], hp_nodrop,
                                                     slice_batches(batches, range(4)))
    return dict(model=model, params=params, bs=bs, batches=batches, hp=hp, hp_nodrop=hp_nodrop,
                ref=ref, ref_metrics=ref_metrics, ref_nodrop=ref_nodrop,
                ref_nodrop_metrics=ref_nodrop_metrics)


def _compare(state, ref, idx):
    for j, i in enumerate(idx):
        got = unstack(state["members"]["params"], j)
        assert max_abs_diff(got, ref[i]["params"]) <= TOL, f"member {i}"
        assert int(state["members"]["step"][j]) == int(ref[i]["step"])


@pytest.mark.parametrize("strategy", ["vmap", "map", "loop"])
def test_stacked_equals_one_by_one_on_one_device(setup, strategy):
    s = setup
    eng = engine_for(s["model"], s["bs"], 4, 1, strategy)
    assert dict(eng.mesh.shape) == {"model": 1, "data": 1}
    idx = range(4)
    state, _, _ = run_engine(eng, s["params"][:4], slice_hparams(s["hp"], idx),
                             slice_batches(s["batches"], idx))
    _compare(state, s["ref"], idx)


def test_stacked_equals_one_by_one_eight_members_on_eight_devices(setup):
    s = setup
    eng = engine_for(s["model"], s["bs"], 8, 8)  # default strategy, one member per device
    assert dict(eng.mesh.shape) == {"model": 8, "data": 1}
    state, metrics, _ = run_engine(eng, s["params"], s["hp"], s["batches"])
    _compare(state, s["ref"], range(8))
    np.testing.assert_allclose(metrics[-1]["loss"], [m[-1]["loss"] for m in s["ref_metrics"]],
                               rtol=1e-5)
    # lr = 0 member (index 2) unchanged while every other member moved
    np.testing.assert_array_equal(state["members"]["params"]["classifier"]["kernel"][2],
                                  s["params"][2]["classifier"]["kernel"])
    for i in (0, 1, 3, 4, 5, 6, 7):
        assert not np.array_equal(state["members"]["params"]["classifier"]["kernel"][i],
                                  s["params"][i]["classifier"]["kernel"])


def test_loop_strategy_keeps_member_order_over_device_groups(setup):
    """'loop' on 2 devices x 2 local members: call i updates member i of each device group; the
    per-call metrics and eval counts come back in member order."""
    s = setup
    eng = engine_for(s["model"], s["bs"], 4, 2, "loop")
    assert dict(eng.mesh.shape) == {"model": 2, "data": 1} and eng.local_members == 2
    idx = range(4)
    state, metrics, _ = run_engine(eng, s["params"][:4], slice_hparams(s["hp"], idx),
                                   slice_batches(s["batches"], idx))
    _compare(state, s["ref"], idx)
    for t in range(STEPS):
        np.testing.assert_allclose(metrics[t]["loss"], [s["ref_metrics"][i][t]["loss"] for i in idx],
                                   rtol=1e-5)
    images = np.asarray(s["batches"][0]["images"][0])
    labels = np.asarray(s["batches"][0]["labels"][0])
    got = np.asarray(eng.evaluate_batch(state["members"]["params"], images, labels))
    one = engine_for(s["model"], s["bs"], 4, 1, "map")
    want = np.asarray(one.evaluate_batch(state["members"]["params"], images, labels))
    np.testing.assert_array_equal(got, want)


def test_live_members_train_like_one_by_one_with_several_per_device(setup):
    """The training API with 'loop' (8 members, 2 device groups of 4): live.step equals the
    reference member by member, stacked() is in member order, evaluating params_for_eval() equals
    evaluating the stacked params, and train_step (one step of a stacked state) agrees."""
    s = setup
    eng = engine_for(s["model"], s["bs"], 8, 2, "loop")
    assert eng.local_members == 4
    stacked = members_lib.init_state(trees.stack(s["params"]))["members"]
    live = eng.start(stacked, s["hp"])
    for t, batch in enumerate(s["batches"]):
        metrics = live.step(batch)
        np.testing.assert_allclose(metrics["loss"], [m[t]["loss"] for m in s["ref_metrics"]],
                                   rtol=1e-5)
    state = {"members": jax.tree.map(np.asarray, live.stacked())}
    _compare(state, s["ref"], range(8))
    images = np.asarray(s["batches"][0]["images"][0])
    labels = np.asarray(s["batches"][0]["labels"][0])
    got = eng.evaluate_batch(live.params_for_eval(), images, labels)
    want = eng.evaluate_batch(state["members"]["params"], images, labels)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    prepared = eng.prepare_eval(state["members"]["params"])
    np.testing.assert_array_equal(np.asarray(eng.evaluate_batch(prepared, images, labels)),
                                  np.asarray(want))
    # the stacked input is left as it was (not donated): train_step from it again
    one, _ = eng.train_step({"members": stacked}, s["hp"], s["batches"][0])
    first = eng.start(stacked, s["hp"])
    first.step(s["batches"][0])
    assert max_abs_diff(jax.tree.map(np.asarray, one["members"]),
                        jax.tree.map(np.asarray, first.stacked())) == 0.0


def test_unknown_strategies_are_refused(setup):
    s = setup
    assert strategies.STRATEGIES == ("loop", "map", "vmap")
    for name in ("unroll", "chunk:2", "pmap"):
        with pytest.raises(ValueError, match="unknown member strategy"):
            members_lib.MemberEngine(s["model"], s["bs"], 2, members_lib.EngineConfig(
                devices=jax.devices()[:1], strategy=name))
    assert strategies.default_strategy("cpu") == "loop"
    assert strategies.default_strategy("gpu") == strategies.default_strategy("tpu") == "map"


def test_data_parallel_split_equals_one_by_one_and_grads_are_not_summed_twice(setup):
    """4 members on 8 devices: mesh (4 model x 2 data), each member's batch split over 2 devices.

    Under Adam, gradients scaled by 2 give (almost) the same update, so comparing params alone would
    not catch a double gradient reduction: compare the gradient norm and the loss too.
    """
    s = setup
    eng = engine_for(s["model"], s["bs"], 4, 8, data_parallel=True)
    assert dict(eng.mesh.shape) == {"model": 4, "data": 2}
    idx = range(4)
    state, metrics, _ = run_engine(eng, s["params"][:4], slice_hparams(s["hp_nodrop"], idx),
                                   slice_batches(s["batches"], idx))
    _compare(state, s["ref_nodrop"], idx)
    for t in range(STEPS):
        ref_gn = [s["ref_nodrop_metrics"][i][t]["grad_norm"] for i in idx]
        ref_loss = [s["ref_nodrop_metrics"][i][t]["loss"] for i in idx]
        np.testing.assert_allclose(metrics[t]["grad_norm"], ref_gn, rtol=1e-5)
        np.testing.assert_allclose(metrics[t]["loss"], ref_loss, rtol=1e-5)


def test_pitfall_explicit_reduction_on_top_of_check_vma_doubles_grads():
    """Why the engine adds no pmean/psum: with check_vma=True the grad of a parameter replicated
    over 'data' already comes back summed over 'data'; a psum on top multiplies it by the axis size."""
    mesh = Mesh(np.asarray(jax.devices()[:2]).reshape(1, 2), ("model", "data"))
    x = np.arange(8, dtype=np.float32).reshape(8, 1)
    w = np.ones((1,), np.float32)

    def grads(extra_psum):
        def local(w, x):
            g = jax.grad(lambda w: jnp.sum((x * w) ** 2) / 8.0)(w)  # shard sum / global batch
            return jax.lax.psum(g, "data") if extra_psum else g
        return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data")),
                                     out_specs=P()))(w, x)

    full = jax.grad(lambda w: jnp.mean((x * w) ** 2))(w)
    np.testing.assert_allclose(grads(False), full, rtol=1e-6)
    np.testing.assert_allclose(grads(True), 2 * full, rtol=1e-6)


def test_per_member_settings_are_not_shared(setup):
    """Identical inits and data; members differ in one setting each. Sharing would make them equal."""
    s = setup
    m = 7
    same_params = [s["params"][0]] * m
    same_batches = [{k: np.repeat(v[:1], m, axis=0) for k, v in b.items()} for b in s["batches"]]
    hp = members_lib.make_hparams(
        m, lr=[1e-2, 1e-2, 1e-2, 1e-2, 1e-2, 0.0, 1e-2],
        weight_decay=[0.0, 0.0, 0.0, 0.1, 0.0, 0.0, 0.0],
        dropout=[0.5, 0.5, 0.5, 0.5, 0.0, 0.5, 0.5],
        lp_steps=[-1, -1, -1, -1, -1, -1, 2], seed=[1, 1, 2, 1, 1, 1, 1])
    eng = engine_for(s["model"], s["bs"], m, 1, "map")
    state, _, snaps = run_engine(eng, same_params, hp, same_batches, snapshots=True)
    p = state["members"]["params"]
    get = lambda i: unstack(p, i)
    assert max_abs_diff(get(0), get(1)) == 0.0          # same everything: bit-identical
    assert max_abs_diff(get(0), get(2)) > 0.0           # other seed: other dropout masks
    assert max_abs_diff(get(0), get(3)) > 0.0           # weight decay
    assert max_abs_diff(get(0), get(4)) > 0.0           # dropout rate
    assert max_abs_diff(get(5), s["params"][0]) == 0.0  # lr = 0: unchanged
    # LP member (lp_steps=2): featurizer bit-identical for updates 0..2, moves at update 3;
    # Adam count 1..3 during LP, then restarts at 1.
    init_feat = s["params"][0]["featurizer"]
    counts = []
    for t, snap in enumerate(snaps):
        feat6 = unstack(snap["params"]["featurizer"], 6)
        moved = max_abs_diff(feat6, init_feat) > 0.0
        assert moved == (t >= 3), f"update {t}"
        assert not np.array_equal(snap["params"]["classifier"]["kernel"][6],
                                  s["params"][0]["classifier"]["kernel"])
        counts.append(int(snap["opt_state"][1].count[6]))
        assert max_abs_diff(unstack(snap["params"]["featurizer"], 0), init_feat) > 0.0
    assert counts == [1, 2, 3, 1]


def test_nonfinite_member_is_frozen_and_others_unaffected(setup):
    s = setup
    idx = list(range(4))
    hp = slice_hparams(s["hp"], idx)
    batches = slice_batches(s["batches"], idx)
    eng = engine_for(s["model"], s["bs"], 4, 1, "map")
    clean, _, _ = run_engine(eng, s["params"][:4], hp, batches)
    poisoned_hp = {**hp, "lr": hp["lr"].copy()}
    poisoned_hp["lr"][1] = np.nan                      # member 1: NaN learning rate
    params = list(s["params"][:4])
    params[3] = jax.tree.map(np.array, params[3])
    params[3]["classifier"]["kernel"][0, 0] = np.inf    # member 3: non-finite init
    state, metrics, _ = run_engine(eng, params, poisoned_hp, batches)
    np.testing.assert_array_equal(state["members"]["nonfinite"], [False, True, False, True])
    for i in (0, 2):  # the healthy members continue bit-for-bit
        assert max_abs_diff(unstack(state["members"]["params"], i),
                            unstack(clean["members"]["params"], i)) == 0.0
    # frozen members keep their last finite params (here: the init)
    assert max_abs_diff(unstack(state["members"]["params"], 1), s["params"][1]) == 0.0
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state["members"]["params"]["featurizer"]))
    # ... and as if absent: a 2-member run of the healthy ones gives the same bits
    eng2 = engine_for(s["model"], s["bs"], 2, 1, "map")
    alone, _, _ = run_engine(eng2, [s["params"][0], s["params"][2]], slice_hparams(hp, [0, 2]),
                             slice_batches(batches, [0, 2]))
    for j, i in enumerate((0, 2)):
        assert max_abs_diff(unstack(state["members"]["params"], i),
                            unstack(alone["members"]["params"], j)) == 0.0


def test_nonfinite_member_on_eight_devices(setup):
    s = setup
    idx = list(range(4))
    hp = slice_hparams(s["hp_nodrop"], idx)
    hp["lr"][2] = np.inf
    eng = engine_for(s["model"], s["bs"], 4, 8)
    state, _, _ = run_engine(eng, s["params"][:4], hp, slice_batches(s["batches"], idx))
    np.testing.assert_array_equal(state["members"]["nonfinite"], [False, False, True, False])
    _compare({"members": jax.tree.map(lambda x: x[np.array([0, 1, 3])], state["members"])},
             s["ref_nodrop"], [0, 1, 3])


def test_classifier_only_mode(setup):
    s = setup
    idx = [0, 1]
    hp = slice_hparams(s["hp"], idx)
    batches = slice_batches(s["batches"], idx)
    ref, _ = reference_train(s["model"], s["bs"], s["params"][:2], hp, batches,
                             classifier_only=True)
    eng = engine_for(s["model"], s["bs"], 2, 2, classifier_only=True)
    state, _, _ = run_engine(eng, s["params"][:2], hp, batches)
    _compare(state, ref, idx)
    for i in idx:
        assert max_abs_diff(unstack(state["members"]["params"]["featurizer"], i),
                            s["params"][i]["featurizer"]) == 0.0


@pytest.mark.parametrize("remat", [True, pytest.param("nothing", marks=pytest.mark.slow)])
def test_remat_gives_the_same_result(setup, remat):
    s = setup
    idx = range(3)
    eng = engine_for(s["model"], s["bs"], 3, 1, "map", remat=remat)
    state, _, _ = run_engine(eng, s["params"][:3], slice_hparams(s["hp"], idx),
                             slice_batches(s["batches"], idx))
    _compare(state, s["ref"], idx)


def test_plan_mesh():
    d = jax.devices()
    shape = lambda *a, **k: dict(mesh_lib.plan_mesh(*a, **k).shape)
    dp = lambda *a: shape(*a, data_parallel=True)
    assert dp(8, 96, d[:8]) == {"model": 8, "data": 1}
    assert dp(4, 96, d[:8]) == {"model": 4, "data": 2}
    assert dp(1, 96, d[:8]) == {"model": 1, "data": 8}
    assert dp(20, 96, d[:8]) == {"model": 4, "data": 2}
    assert dp(3, 96, d[:8]) == {"model": 1, "data": 8}
    assert dp(2, 6, d[:8]) == {"model": 2, "data": 3}   # 4 spare devices per member; 6 % 4 != 0
    with pytest.raises(ValueError, match="model_axis"):
        mesh_lib.plan_mesh(4, 96, d[:8], model_axis=3, data_parallel=True)
    # One CPU process: no batch split by default; members spread one per device where they divide.
    assert mesh_lib.default_data_parallel(d) is False
    assert shape(1, 96, d[:8]) == {"model": 1, "data": 1}
    assert shape(4, 96, d[:8]) == {"model": 4, "data": 1}
    assert shape(3, 96, d[:8]) == {"model": 3, "data": 1}
    assert shape(8, 96, d[:8]) == {"model": 8, "data": 1}
    assert shape(20, 96, d[:8]) == {"model": 5, "data": 1}
    assert shape(12, 96, d[:8]) == {"model": 6, "data": 1}
    with pytest.raises(ValueError, match="at most 8 devices"):
        mesh_lib.plan_mesh(16, 96, d[:8], model_axis=16)


def test_make_hparams_gives_distinct_keys_and_checks_batches(setup):
    hp = members_lib.make_hparams(3, lr=1e-3, seed=0)
    assert len({tuple(k) for k in hp["key"]}) == 3
    s = setup
    eng = engine_for(s["model"], s["bs"], 4, 1, "map")
    with pytest.raises(ValueError, match="members"):
        eng.place_batch(s["batches"][0])  # an 8-member batch for a 4-member engine
