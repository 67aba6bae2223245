"""Backbones: conv paths agree with lax.conv (forward and gradient), frozen BN, array dropout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from rat_jax.models import create_model
from rat_jax.models.layers import conv2d, dropout, tf_same_pads

CASES = [  # (hw, cin, cout, k, stride, groups, pads)
    (9, 8, 16, 3, 1, 1, ((1, 1), (1, 1))),
    (9, 8, 16, 3, 2, 1, ((1, 1), (1, 1))),
    (16, 3, 8, 7, 2, 1, ((3, 3), (3, 3))),
    (8, 16, 32, 1, 2, 1, ((0, 0), (0, 0))),
    (8, 16, 32, 1, 1, 1, ((0, 0), (0, 0))),
    (2, 32, 32, 3, 1, 1, ((1, 1), (1, 1))),
    (11, 12, 12, 5, 2, 12, tf_same_pads((11, 11), 5, 2)),
    (10, 12, 12, 3, 1, 12, tf_same_pads((10, 10), 3, 1)),
]


def _reference(x, k, stride, pads, groups):
    return lax.conv_general_dilated(x, k, (stride, stride), pads,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                    feature_group_count=groups, precision=lax.Precision.HIGHEST)


@pytest.mark.parametrize("impl", ["im2col", "shift", "auto"])
@pytest.mark.parametrize("case", CASES)
def test_conv_paths_match_lax_forward_and_grad(impl, case):
    hw, cin, cout, k, stride, groups, pads = case
    kx, kk = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (2, hw, hw, cin))
    w = jax.random.normal(kk, (k, k, cin // groups, cout)) * 0.1
    out = conv2d(x, w, stride, pads, groups, impl)
    ref = _reference(x, w, stride, pads, groups)
    np.testing.assert_allclose(out, ref, atol=2e-5, rtol=1e-5)

    def loss(fn):
        return lambda x, w: jnp.sum(jnp.sin(fn(x, w)))
    g = jax.grad(loss(lambda x, w: conv2d(x, w, stride, pads, groups, impl)), (0, 1))(x, w)
    gr = jax.grad(loss(lambda x, w: _reference(x, w, stride, pads, groups)), (0, 1))(x, w)
    for a, b in zip(g, gr):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_tf_same_pads_put_extra_pixel_at_end():
    assert tf_same_pads((224, 224), 3, 2) == ((0, 1), (0, 1))
    assert tf_same_pads((112, 112), 5, 1) == ((2, 2), (2, 2))
    assert tf_same_pads((7, 7), 5, 2) == ((2, 2), (2, 2))


@pytest.mark.parametrize("arch", ["resnet_tiny", "efficientnet_lite0"])
def test_param_tree_is_identical_for_every_conv_impl_and_logits_agree(arch):
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
    ref_model = create_model(arch, 5, conv_impl="xla")
    variables = jax.jit(ref_model.init)(jax.random.key(0), x)
    ref = jax.jit(ref_model.apply)(variables, x)
    for impl in ("im2col", "auto"):
        model = create_model(arch, 5, conv_impl=impl)
        shapes = jax.eval_shape(model.init, jax.random.key(0), x)
        assert jax.tree.structure(shapes) == jax.tree.structure(variables)
        assert jax.tree.map(lambda a: a.shape, shapes) == jax.tree.map(lambda a: a.shape, variables)
        np.testing.assert_allclose(jax.jit(model.apply)(variables, x), ref, atol=1e-4, rtol=1e-4)


def test_frozen_bn_stats_do_not_change_and_scale_bias_get_gradients():
    model = create_model("resnet_tiny", 3, conv_impl="xla")
    x = jax.random.normal(jax.random.key(1), (4, 32, 32, 3))
    v = jax.jit(model.init)(jax.random.key(0), x)
    out, mutated = jax.jit(lambda v, x: model.apply(v, x, train=True, rngs={"dropout": jax.random.key(2)},
                                                    mutable=["batch_stats"]))(v, x)
    for a, b in zip(jax.tree.leaves(mutated["batch_stats"]), jax.tree.leaves(v["batch_stats"])):
        np.testing.assert_array_equal(a, b)
    grads = jax.jit(jax.grad(lambda p: model.apply({**v, "params": p}, x).sum()))(v["params"])
    assert float(jnp.abs(grads["featurizer"]["bn1"]["scale"]).sum()) > 0
    assert float(jnp.abs(grads["featurizer"]["layer1_0"]["bn2"]["bias"]).sum()) > 0


def test_dropout_rate_is_an_array_and_scales_kept_units():
    x = jnp.ones((1000, 64))
    y = jax.jit(dropout)(x, jnp.float32(0.5), jax.random.key(0))
    kept = np.asarray(y) != 0
    assert 0.45 < kept.mean() < 0.55
    np.testing.assert_allclose(np.asarray(y)[kept], 2.0)
    np.testing.assert_array_equal(dropout(x, jnp.float32(0.0), jax.random.key(0)), x)
    # Per-member rates through vmap: no Python comparison of the traced rate.
    rates = jnp.array([0.0, 0.9])
    ys = jax.vmap(dropout, in_axes=(None, 0, 0))(x, rates, jax.random.split(jax.random.key(1), 2))
    assert float((ys[0] == 0).mean()) == 0.0 and float((ys[1] == 0).mean()) > 0.85


def test_features_only_and_train_dropout_paths():
    model = create_model("resnet_tiny", 4, conv_impl="xla")
    x = jax.random.normal(jax.random.key(1), (3, 32, 32, 3))
    v = jax.jit(model.init)(jax.random.key(0), x)
    feats = jax.jit(lambda v, x: model.apply(v, x, features_only=True))(v, x)
    assert feats.shape == (3, model.num_features) == (3, 128)
    logits = jax.jit(model.apply)(v, x)
    np.testing.assert_allclose(feats @ v["params"]["classifier"]["kernel"]
                               + v["params"]["classifier"]["bias"], logits, atol=1e-5)
    same = jax.jit(lambda v, x: model.apply(v, x, train=True, dropout_rate=0.0,
                                            rngs={"dropout": jax.random.key(3)}))(v, x)
    np.testing.assert_allclose(same, logits, atol=1e-6)


def test_create_model_rejects_bad_arch_and_impl():
    with pytest.raises(ValueError, match="Unknown arch 'resnet34'.*resnet18"):
        create_model("resnet34", 3)
    with pytest.raises(ValueError, match="Unknown conv_impl 'fast'"):
        create_model("resnet18", 3, conv_impl="fast")
