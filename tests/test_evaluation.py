"""rat_jax.evaluation: split loading, jitted logits with one compile, accuracy and loss."""
import os

import jax
import numpy as np
import optax
import pytest
from PIL import Image

from rat_jax import evaluation as E
from rat_jax.engine import programs
from rat_jax.data import ImageStore, eval_indices, load_folder
from rat_jax.data.transforms import normalize

from model_helpers import random_variables
from rat_jax.models import create_model

SIZE = 16


@pytest.fixture(scope="module")
def net():
    return create_model("resnet_tiny", 5), random_variables(0)


@pytest.fixture
def tiny(tmp_path):
    """3 envs x 2 classes of small random RGB PNGs."""
    rng = np.random.default_rng(0)
    root = tmp_path / "tiny"
    for e, n in (("e0", 6), ("e1", 8), ("e2", 5)):
        for c in ("a", "b"):
            os.makedirs(root / e / c)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
                    root / e / c / f"{i}.png")
    return load_folder(root)


def test_load_split_concatenates_envs_in_order(tiny, tmp_path):
    cache = str(tmp_path / "cache")
    spec = E.SplitSpec(trial_seed=1, envs=[2, 0], split="in", image_size=SIZE)
    x, y = E.load_split(tiny, spec, cache_dir=cache)
    store, index = ImageStore(tiny, None), eval_indices(tiny, 1)
    rows = [(e, int(i)) for e in (2, 0) for i in index[(e, "in")]]
    assert x.dtype == np.uint8 and y.dtype == np.int32 and x.shape[1:] == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(x, np.stack([store.eval_array(e, i, SIZE) for e, i in rows]))
    np.testing.assert_array_equal(y, [tiny.labels(e)[i] for e, i in rows])
    xa, ya = E.load_split(tiny, E.SplitSpec(split="all", image_size=SIZE), cache_dir=cache)
    assert len(xa) == len(ya) == sum(tiny.env_sizes())
    xo, _ = E.load_split(tiny, spec.replace(split="out"), cache_dir=cache)
    assert len(xo) + len(x) == tiny.env_sizes()[2] + tiny.env_sizes()[0]
    with pytest.raises(ValueError, match="split"):
        E.SplitSpec(split="val")


def test_augmented_draws_are_per_member_and_position_seeded(tiny):
    """load_members: member m's draw of a row depends only on (its seed, step, env, split,
    position), not on the batch, the other members or the row's place in the request."""
    data = E.eval_split(tiny, E.SplitSpec(trial_seed=1, envs=[2, 0], split="out",
                                          image_size=SIZE), cache_dir=None)
    rows = np.arange(len(data))
    both = data.load_members(rows, [3, 4], step=7)
    assert both.shape == (2, len(data), SIZE, SIZE, 3)
    assert not np.array_equal(both[0], both[1])
    np.testing.assert_array_equal(data.load_members(rows[::-1], [4], step=7)[0], both[1][::-1])
    assert not np.array_equal(data.load_members(rows, [3], step=8)[0], both[0])
    x, _ = E.load_split(tiny, data.spec, augment_seed=3, cache_dir=None)
    np.testing.assert_array_equal(x, data.load_members(rows, [3])[0])
    batches = list(data.batches(4, seeds=[3, 4], step=7))
    np.testing.assert_array_equal(np.concatenate([b["images"] for b in batches], axis=1), both)
    assert batches[0]["labels"].shape == (2, 4)


def test_predict_logits_matches_apply_and_compiles_once(net):
    model, v = net
    x = np.random.default_rng(1).integers(0, 256, (70, SIZE, SIZE, 3), dtype=np.uint8)
    # reference: the plain model on host-normalized float images (same batch shape)
    apply = jax.jit(lambda v, im: model.apply(v, im, train=False))
    xf = normalize(x)
    ref = np.concatenate([np.asarray(apply(v, xf[:32])), np.asarray(apply(v, xf[32:64])),
                          np.asarray(apply(v, np.concatenate([xf[64:], xf[:26]])))[:6]])
    eng = E.StackEvaluator(model, v["batch_stats"], devices=jax.local_devices()).engine(1)
    program = lambda m: programs.forward_program(m, eng.mesh, eng.strategy)
    fn = program(model)       # the engine's one evaluation program
    before = fn._cache_size()
    got = E.predict_logits(model, v, x, batch_size=32)          # 32 + 32 + 6 (padded)
    after = fn._cache_size()
    assert after - before <= 1        # one shape, at most one compile (another test may have)
    got2 = E.predict_logits(create_model("resnet_tiny", 5), v, x[:50], batch_size=32)
    assert fn._cache_size() == after                            # same shape: no new compile
    assert program(create_model("resnet_tiny", 5)) is fn       # equal modules share it
    assert got.shape == (70, 5) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(got2, ref[:50], atol=1e-5, rtol=1e-5)
    assert E.predict_logits(model, v, x[:0]).shape == (0, 5)


def test_predict_logits_stacked(net):
    model, v = net
    v2 = random_variables(1)
    stacked = jax.tree.map(lambda *xs: np.stack(xs), v["params"], v2["params"])
    x = np.random.default_rng(2).integers(0, 256, (40, SIZE, SIZE, 3), dtype=np.uint8)
    out = E.predict_logits_stacked(model, stacked, v["batch_stats"], x, batch_size=32)
    assert out.shape == (2, 40, 5)
    np.testing.assert_allclose(out[0], E.predict_logits(model, v, x, 32), atol=1e-6)
    np.testing.assert_allclose(
        out[1], E.predict_logits(model, {"params": v2["params"], "batch_stats": v["batch_stats"]},
                                 x, 32), atol=1e-6)


def test_accuracy_and_loss():
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [0.5, 0.2, 0.1]])
    labels = np.array([0, 1, 1, 2])
    assert E.accuracy(logits, labels) == 0.5
    ref = float(np.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels)))
    assert abs(E.mean_loss(logits, labels) - ref) < 1e-6
    assert np.isnan(E.accuracy(np.zeros((0, 3)), np.zeros((0,), int)))


@pytest.mark.parametrize("canvas", [None, 16])
def test_member_batches_in_the_device_mode_finish_to_the_host_draws(tiny, canvas):
    """A run's per-member ID-val batch as its training stream prepares it (MemberStream): in
    the device mode, crop windows and parameters finished on the device by augment.model_input
    (as the evaluation program does) are the host mode's images bit for bit, and the host mode
    is load_members' draw."""
    from rat_jax.data import MemberStream, StreamSpec, augment
    data = E.eval_split(tiny, E.SplitSpec(trial_seed=1, envs=[0, 2], split="out",
                                          image_size=SIZE), cache_dir=None)
    rows = np.arange(len(data))
    stream = lambda mode: MemberStream(tiny, [0, 2], [3, 4], 1, StreamSpec(
        image_size=SIZE, augment_on=mode, canvas=canvas))
    host = data.member_batch(rows, stream("host"), step=5)
    np.testing.assert_array_equal(host["images"], data.load_members(rows, [3, 4], step=5))
    np.testing.assert_array_equal(host["labels"], np.stack([data.labels] * 2))
    dev = data.member_batch(rows, stream("device"), step=5)
    assert dev["image_size"] == SIZE and sorted(dev["augment"]) == sorted(augment.WINDOW_PARAMS)
    finish = jax.jit(jax.vmap(jax.vmap(lambda x, a: augment.model_input(x[None], jax.tree.map(
        lambda v: v[None], a), SIZE)[0])))
    np.testing.assert_array_equal(np.asarray(finish(dev["images"], dev["augment"])),
                                  normalize(host["images"]))
