"""rat_jax.evaluation: split loading, jitted logits with one compile, accuracy and loss."""
import os

import jax
import numpy as np
import optax
import pytest
from PIL import Image

from rat_jax import evaluation as E
from rat_jax.data import iterate_eval, load_folder
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
    x, y = E.load_split(tiny, trial_seed=1, envs=[2, 0], split="in", image_size=SIZE,
                        cache_dir=cache)
    ref = [b for b in iterate_eval(tiny, trial_seed=1, envs=[2, 0], splits=("in",),
                                   image_size=SIZE, pad=False, output="uint8", cache_dir=cache)]
    assert x.dtype == np.uint8 and y.dtype == np.int32 and x.shape[1:] == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(x, np.concatenate([b["images"] for b in ref]))
    np.testing.assert_array_equal(y, np.concatenate([b["labels"] for b in ref]))
    assert [b["env"] for b in ref][0] == 2
    xa, ya = E.load_split(tiny, envs=None, split="all", image_size=SIZE, cache_dir=cache)
    assert len(xa) == len(ya) == sum(tiny.env_sizes())
    xo, _ = E.load_split(tiny, trial_seed=1, envs=[2, 0], split="out", image_size=SIZE,
                         cache_dir=cache)
    assert len(xo) + len(x) == tiny.env_sizes()[2] + tiny.env_sizes()[0]
    with pytest.raises(ValueError, match="split"):
        E.load_split(tiny, split="val", image_size=SIZE, cache_dir=cache)


def test_predict_logits_matches_apply_and_compiles_once(net):
    model, v = net
    x = np.random.default_rng(1).integers(0, 256, (70, SIZE, SIZE, 3), dtype=np.uint8)
    # reference: the plain model on host-normalized float images (same batch shape)
    apply = jax.jit(lambda v, im: model.apply(v, im, train=False))
    xf = normalize(x)
    ref = np.concatenate([np.asarray(apply(v, xf[:32])), np.asarray(apply(v, xf[32:64])),
                          np.asarray(apply(v, np.concatenate([xf[64:], xf[:26]])))[:6]])
    fn = E._get_fn(model)
    before = fn._cache_size()
    got = E.predict_logits(model, v, x, batch_size=32)          # 32 + 32 + 6 (padded)
    after = fn._cache_size()
    assert after - before <= 1        # one shape, at most one compile (another test may have)
    got2 = E.predict_logits(create_model("resnet_tiny", 5), v, x[:50], batch_size=32)
    assert fn._cache_size() == after                            # same shape: no new compile
    assert E._get_fn(create_model("resnet_tiny", 5)) is fn      # equal modules share it
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
