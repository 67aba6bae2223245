"""Mixed precision: `create_model(..., dtype="bfloat16")` computes in bf16 with float32 params,
gradients and optimizer state, and stays close to float32 (logits, a short training run)."""
from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rat_jax import trees
from rat_jax.engine import make_hparams
from rat_jax.engine import step as step_lib
from rat_jax.models import ARCHS, create_model

MATMULS = ("conv_general_dilated", "dot_general")


def matmul_dtypes(closed_jaxpr) -> collections.Counter:
    """Output dtypes of every convolution / matmul in a jaxpr, nested jaxprs included."""
    counts = collections.Counter()

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name in MATMULS:
                counts[str(eqn.outvars[0].aval.dtype)] += 1
            for sub in jax.core.jaxprs_in_params(eqn.params):
                walk(sub)
    walk(closed_jaxpr.jaxpr)
    return counts


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_switch_casts_compute_not_params(arch):
    """Tracing only (no compile): every conv/matmul of forward and backward is bf16, while params,
    outputs and gradients are float32; the float32 model has no bf16 op at all."""
    images = jnp.zeros((2, 32, 32, 3), jnp.float32)
    labels = jnp.zeros((2,), jnp.int32)
    for dtype in ("float32", "bfloat16"):
        model = create_model(arch, 5, dtype=dtype)
        variables = jax.eval_shape(model.init, jax.random.key(0), images)
        assert {x.dtype for x in jax.tree.leaves(variables)} == {jnp.dtype("float32")}

        def loss(params, batch_stats):
            logits = model.apply({"params": params, "batch_stats": batch_stats},
                                 images, train=True, dropout_rate=jnp.float32(0.1),
                                 rngs={"dropout": jax.random.key(1)})
            assert logits.dtype == jnp.float32
            return step_lib.cross_entropy(logits, labels)
        args = (variables["params"], variables["batch_stats"])
        traced = jax.make_jaxpr(jax.value_and_grad(loss))(*args)
        grads = jax.eval_shape(jax.grad(loss), *args)
        assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype("float32")}
        counts = matmul_dtypes(traced)
        want = "bfloat16" if dtype == "bfloat16" else "float32"
        assert set(counts) == {want}, (arch, dtype, counts)
        assert counts[want] >= 6  # forward and backward convolutions


def test_unknown_compute_dtype_is_refused():
    with pytest.raises(ValueError, match="compute dtype"):
        create_model("resnet_tiny", 5, dtype="float16")
    assert create_model("resnet_tiny", 5, dtype=jnp.bfloat16).dtype == "bfloat16"
    assert create_model("resnet_tiny", 5).dtype == "float32"


def numpy_variables(model, image: int, seed: int = 0):
    """Random float32 variables without compiling model.init (torch-like scales)."""
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, image, image, 3)))
    rng = np.random.RandomState(seed)

    def fill(path, s):
        name = jax.tree_util.keystr(path)
        if name.endswith(("['scale']", "['var']")):
            return (1.0 + 0.1 * np.abs(rng.randn(*s.shape))).astype(np.float32)
        if name.endswith(("['bias']", "['mean']")):
            return (0.01 * rng.randn(*s.shape)).astype(np.float32)
        fan_in = int(np.prod(s.shape[:-1]))
        gain = 1.0 if "classifier" in name else 2.0
        return (rng.randn(*s.shape) * np.sqrt(gain / fan_in)).astype(np.float32)
    return jax.tree_util.tree_map_with_path(fill, shapes)


def test_bf16_logits_close_to_float32():
    """Same float32 params, 32-px images: bf16 logits within 5% of the logit scale, same top-1 on
    (nearly) every image, float32 features to ~2e-2 relative."""
    rng = np.random.RandomState(0)
    images = rng.randn(16, 32, 32, 3).astype(np.float32)
    out = {}
    for dtype in ("float32", "bfloat16"):
        model = create_model("resnet_tiny", 10, conv_impl="xla", dtype=dtype)
        variables = numpy_variables(model, 32)
        out[dtype] = jax.tree.map(np.asarray, jax.jit(lambda v, x: (
            model.apply(v, x), model.apply(v, x, features_only=True)))(variables, images))
    (a, fa), (b, fb) = out["float32"], out["bfloat16"]
    assert b.dtype == fb.dtype == np.float32
    scale = np.abs(a).max()
    assert np.abs(a - b).max() <= 0.05 * scale, (np.abs(a - b).max(), scale)
    assert np.mean(a.argmax(-1) == b.argmax(-1)) >= 0.85
    rel = np.linalg.norm(fa - fb) / np.linalg.norm(fa)
    assert rel < 2e-2, rel


def _task(n, rng, classes=4, image=16):
    """A learnable toy task: the class sets a colour pattern, plus noise."""
    patterns = np.random.RandomState(123).randn(classes, 1, 1, 3).astype(np.float32)
    labels = rng.randint(0, classes, n).astype(np.int32)
    images = patterns[labels] + 0.8 * rng.randn(n, image, image, 3).astype(np.float32)
    return images, labels


def test_bf16_training_tracks_float32():
    """12 Adam steps of one resnet_tiny member in float32 and in bf16 from the same init: params and
    Adam moments stay float32, the loss curves stay within 0.1 and accuracy within 10 points."""
    rng = np.random.RandomState(0)
    train = [_task(32, rng) for _ in range(12)]
    test_x, test_y = _task(128, rng)
    curves, accs = {}, {}
    for dtype in ("float32", "bfloat16"):
        model = create_model("resnet_tiny", 4, conv_impl="xla", dtype=dtype)
        variables = numpy_variables(model, 16)
        bs = variables["batch_stats"]
        member = step_lib.init_member(variables["params"])
        hp = trees.take(make_hparams(1, lr=1e-3, dropout=0.0), 0)
        step = jax.jit(lambda m, x, y: step_lib.train_step(model, bs, m, hp, x, y))
        losses = []
        for x, y in train:
            member, metrics = step(member, x, y)
            losses.append(float(metrics["loss"]))
        leaves = jax.tree.leaves((member["params"], member["opt_state"]))
        assert {x.dtype for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)} == \
            {jnp.dtype("float32")}
        logits = jax.jit(model.apply)({"params": member["params"], "batch_stats": bs}, test_x)
        curves[dtype] = np.array(losses)
        accs[dtype] = float(np.mean(np.asarray(logits).argmax(-1) == test_y))
    assert np.all(np.isfinite(curves["bfloat16"]))
    assert np.abs(curves["float32"] - curves["bfloat16"]).max() < 0.1, curves
    assert curves["float32"][-3:].mean() < curves["float32"][:3].mean()  # it does learn
    assert abs(accs["float32"] - accs["bfloat16"]) <= 0.10, accs
    assert accs["float32"] > 0.4, accs  # chance is 0.25
