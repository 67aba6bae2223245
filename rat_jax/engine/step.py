"""The single-member math: loss, one training update, evaluation. Knows nothing about parallelism.

A *member* is a dict {'params', 'opt_state', 'step', 'nonfinite'} for one network; its hparams are a
dict {'lr', 'weight_decay', 'dropout', 'lp_steps', 'key'} of scalars (one member's slice of the
stacked [M] arrays). `rat_jax.engine.members` lays many members on devices and calls these.
"""
from __future__ import annotations

import dataclasses

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from rat_jax.engine import optim


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Summed softmax cross-entropy (F.cross_entropy without the mean), computed in float32."""
    logits = logits.astype(jnp.float32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()


def init_member(params: Any) -> dict:
    """Training state of one member starting from `params`."""
    return {"params": params, "opt_state": optim.init_opt_state(params),
            "step": jnp.zeros([], jnp.int32), "nonfinite": jnp.zeros([], jnp.bool_)}


def dropout_key(hparams: dict, step: jax.Array) -> jax.Array:
    """The member's dropout key for update `step`: stateless, so a resumed run draws the same masks."""
    return jax.random.fold_in(jax.random.wrap_key_data(hparams["key"]), step)


def loss_fn(model, batch_stats: Any, params: Any, images: jax.Array, labels: jax.Array,
            dropout_rate: jax.Array, key: jax.Array, denominator) -> jax.Array:
    """Summed CE of this shard divided by the *global* batch size: the mean CE over the whole batch."""
    logits = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                         dropout_rate=dropout_rate, rngs={"dropout": key})
    return cross_entropy(logits, labels) / denominator


REMAT_POLICIES = {
    # keep convolution / matmul outputs, recompute the elementwise ops (BN, ReLU, ...) in backward
    "dots": jax.checkpoint_policies.dots_saveable,
    # keep nothing: the whole forward is recomputed during backward
    "nothing": jax.checkpoint_policies.nothing_saveable,
}


def remat_policy(remat: bool | str):
    """The jax.checkpoint policy for `remat` (True means "dots")."""
    name = "dots" if remat is True else remat
    if name not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}: use False, True or one of {sorted(REMAT_POLICIES)}")
    return REMAT_POLICIES[name]


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """How one member's update runs. `classifier_only`: the linear-probe stage (the featurizer
    is never stepped); `remat`: a rematerialization policy (remat_policy). `global_batch`, `key`
    and `reduce_loss` let a caller split the batch across devices (summed CE / global batch
    size, a per-shard dropout key, a sum of the shard losses); the defaults are the plain
    single-device step."""
    classifier_only: bool = False
    remat: bool | str = False
    global_batch: int | None = None
    key: jax.Array | None = None
    reduce_loss: Callable[[jax.Array], jax.Array] = lambda x: x


def train_step(model, batch_stats: Any, member: dict, hparams: dict, images: jax.Array,
               labels: jax.Array, options: StepOptions = StepOptions()) -> tuple[dict, dict]:
    """One update of one member on its batch (mean CE over the concatenated per-domain batch;
    StepOptions). A member whose loss, grads or new params are not finite is frozen: params and
    optimizer state stay as they were, and `nonfinite` is set for good.
    Returns (new_member, metrics) with metrics {'loss', 'grad_norm'}.
    """
    classifier_only, remat = options.classifier_only, options.remat
    global_batch, key, reduce_loss = options.global_batch, options.key, options.reduce_loss
    params, step = member["params"], member["step"]
    denominator = jnp.float32(global_batch or labels.shape[0])
    key = dropout_key(hparams, step) if key is None else key
    fn = lambda p: loss_fn(model, batch_stats, p, images, labels, hparams["dropout"], key,
                           denominator)
    if remat:
        fn = jax.checkpoint(fn, policy=remat_policy(remat))
    if classifier_only:  # the featurizer is never stepped: do not backprop into it
        feat = jax.lax.stop_gradient(params["featurizer"])
        loss, g_cls = jax.value_and_grad(
            lambda c: fn({"featurizer": feat, "classifier": c}))(params["classifier"])
        grads = {"featurizer": jax.tree.map(jnp.zeros_like, params["featurizer"]),
                 "classifier": g_cls}
    else:
        loss, grads = jax.value_and_grad(fn)(params)
    loss = reduce_loss(loss)
    new_params, new_opt = optim.apply_updates(
        params, member["opt_state"], grads, lr=hparams["lr"], weight_decay=hparams["weight_decay"],
        step=step, lp_steps=hparams["lp_steps"], classifier_only=classifier_only)
    # A finite loss and gradient norm (one reduction the metrics need anyway) mean finite grads,
    # and torch-Adam's update of finite params with finite grads, lr and wd is finite. Checking
    # every leaf of the grads and new params instead makes XLA:CPU compile the step much longer.
    grad_norm = optax.global_norm(grads)
    ok = ((~member["nonfinite"]) & jnp.isfinite(loss) & jnp.isfinite(grad_norm)
          & jnp.isfinite(hparams["lr"]) & jnp.isfinite(hparams["weight_decay"]))
    new_member = {
        "params": optim.tree_where(ok, new_params, params),
        "opt_state": optim.tree_where(ok, new_opt, member["opt_state"]),
        "step": step + 1,
        "nonfinite": ~ok,
    }
    metrics = {"loss": loss, "grad_norm": grad_norm}
    return new_member, metrics
