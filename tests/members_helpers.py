"""Shared helpers for the member-engine tests (not a test module): a tiny model, synthetic data, a reference loop.

`tiny_model()` uses rat_jax.models' "resnet_tiny" when it is importable, else a small Flax stand-in
with the same interface (params {'featurizer', 'classifier'}, frozen batch_stats, array dropout rate).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rat_jax import trees
from rat_jax.engine import members as members_lib
from rat_jax.engine import step as step_lib

NUM_CLASSES = 5
IMAGE = 16


class _ArrayDropout(nn.Module):
    @nn.compact
    def __call__(self, x, rate, deterministic):
        if deterministic:
            return x
        keep = 1.0 - rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, x.shape)
        return jnp.where(mask, x / jnp.maximum(keep, 1e-12), 0.0)


class _Featurizer(nn.Module):
    @nn.compact
    def __call__(self, x, train, dropout_rate):
        x = nn.Conv(8, (3, 3), padding=[(1, 1), (1, 1)], use_bias=False, name="conv1")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-5, name="bn1")(x)
        x = nn.relu(x)
        x = nn.Conv(16, (3, 3), strides=2, padding=[(1, 1), (1, 1)], use_bias=False,
                    name="conv2")(x)
        x = nn.BatchNorm(use_running_average=True, epsilon=1e-5, name="bn2")(x)
        x = nn.relu(x).mean(axis=(1, 2))
        return _ArrayDropout()(x, dropout_rate, deterministic=not train)


class StandInNet(nn.Module):
    num_classes: int
    num_features: int = 16

    @nn.compact
    def __call__(self, x, train=False, dropout_rate=0.0, features_only=False):
        f = _Featurizer(name="featurizer")(x, train, dropout_rate)
        if features_only:
            return f
        return nn.Dense(self.num_classes, name="classifier")(f)


def tiny_model(arch: str = "standin", num_classes: int = NUM_CLASSES):
    """The stand-in (compiles in seconds) or a rat_jax.models architecture such as "resnet_tiny"."""
    if arch == "standin":
        return StandInNet(num_classes)
    from rat_jax.models import create_model
    return create_model(arch, num_classes)


def init_variables(model, seed: int, image: int = IMAGE):
    v = model.init(jax.random.key(seed), jnp.zeros((1, image, image, 3), jnp.float32))
    return jax.tree.map(np.asarray, v)


def member_inits(model, m: int, image: int = IMAGE):
    """M different inits (as from M checkpoints) and the shared (frozen) batch_stats."""
    vs = [init_variables(model, 100 + i, image) for i in range(m)]
    # random-looking but fixed BN stats so frozen BN is exercised
    bs = jax.tree.map(lambda x: np.asarray(x) + 0.1, vs[0]["batch_stats"])
    return [v["params"] for v in vs], bs


def synthetic_batches(m: int, n: int, steps: int, seed: int = 0, image: int = IMAGE):
    """Per-member batches [M, N, H, W, 3] (each member its own data), deterministic."""
    rng = np.random.RandomState(seed)
    out = []
    for _ in range(steps):
        out.append({"images": rng.randn(m, n, image, image, 3).astype(np.float32),
                    "labels": rng.randint(0, NUM_CLASSES, size=(m, n)).astype(np.int32)})
    return out


class ListLoader:
    """A member loader over a list of batches with get_state/set_state (duck-typed like rat_jax.data)."""

    def __init__(self, batches):
        self.batches, self.pos = batches, 0

    def __iter__(self):
        return self

    def __next__(self):
        b = self.batches[self.pos % len(self.batches)]
        self.pos += 1
        return b

    def get_state(self):
        return {"pos": self.pos}

    def set_state(self, s):
        self.pos = int(s["pos"])


_REF_STEPS = {}


def reference_step(model, classifier_only=False):
    """One jitted single-member step (cached per model), batch_stats passed as an argument."""
    key = (id(model), classifier_only)
    if key not in _REF_STEPS:
        _REF_STEPS[key] = (model, jax.jit(lambda bs, member, hp, x, y: step_lib.train_step(
            model, bs, member, hp, x, y, step_lib.StepOptions(classifier_only=classifier_only))))
    return _REF_STEPS[key][1]


def reference_train(model, batch_stats, params_list, hparams, batches, *, classifier_only=False):
    """Each member trained on its own with one jitted single-member step (the 'loop')."""
    jitted = reference_step(model, classifier_only)
    step_fn = lambda member, hp, x, y: jitted(batch_stats, member, hp, x, y)
    finals, metrics = [], []
    for i, p in enumerate(params_list):
        member = step_lib.init_member(jax.tree.map(jnp.asarray, p))
        hp = trees.take(hparams, i)
        ms = []
        for b in batches:
            member, met = step_fn(member, hp, b["images"][i], b["labels"][i])
            ms.append(jax.tree.map(np.asarray, met))
        finals.append(jax.tree.map(np.asarray, member))
        metrics.append(ms)
    return finals, metrics


def unstack(tree, i):
    return trees.take(tree, i)


def max_abs_diff(a, b) -> float:
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


_ENGINES = {}


def engine_for(model, batch_stats, m: int, ndev: int, strategy: str | None = None,
               batch_size: int = 8, **kwargs):
    """A MemberEngine over the first `ndev` devices, cached so tests share compiled steps."""
    key = (id(model), id(batch_stats), m, ndev, strategy, batch_size, tuple(sorted(kwargs.items())))
    if key not in _ENGINES:
        _ENGINES[key] = members_lib.MemberEngine(
            model, batch_stats, m, members_lib.EngineConfig(
                batch_size=batch_size, devices=jax.devices()[:ndev], strategy=strategy, **kwargs))
    return _ENGINES[key]


def run_engine(engine, params_list, hparams, batches, snapshots: bool = False):
    """Train stacked members with `engine`; returns (host state, per-step metrics, per-step states)."""
    state = engine.place(members_lib.init_state(trees.stack(params_list)))
    hp = engine.place(hparams)
    metrics, snaps = [], []
    for b in batches:
        state, met = engine.train_step(state, hp, b)
        metrics.append(jax.tree.map(np.asarray, met))
        if snapshots:
            snaps.append(jax.tree.map(np.array, state["members"]))
    return jax.tree.map(np.asarray, state), metrics, snaps


def slice_hparams(hparams, idx):
    return jax.tree.map(lambda x: np.asarray(x)[np.asarray(idx)], hparams)


def slice_batches(batches, idx):
    idx = np.asarray(idx)
    return [{k: v[idx] for k, v in b.items()} for b in batches]
