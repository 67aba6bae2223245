"""torch-style Adam with coupled L2, per-member lr / weight decay as arrays, and the LP switch.

docs/protocol.md §4: `torch.optim.Adam(lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)` is
coupled L2, i.e. `chain(add_decayed_weights(wd), scale_by_adam(), scale(-lr))`, constant lr. `lr`
and `wd` may be traced scalars (one member's slice of a [M] array), so every member shares one
compiled step.

docs/protocol.md §1.4: a member with `lp_steps = L >= 0` updates only the classifier for updates
0..L (L+1 updates); right before update L+1 its Adam state is reset for all params (fresh moments
and count) and the whole net trains. `lp_steps = -1` trains everything from update 0.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

ADAM_B1, ADAM_B2, ADAM_EPS = 0.9, 0.999, 1e-8
CLASSIFIER = "classifier"


def torch_adam(lr: Any, weight_decay: Any) -> optax.GradientTransformation:
    """torch.optim.Adam(lr, weight_decay=wd): coupled L2 added to the gradient before the moments."""
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_adam(b1=ADAM_B1, b2=ADAM_B2, eps=ADAM_EPS),
        optax.scale(-lr),
    )


def init_opt_state(params: Any) -> Any:
    """Adam state for one member; its structure does not depend on lr / wd."""
    return torch_adam(0.0, 0.0).init(params)


def tree_where(pred: jax.Array, on_true: Any, on_false: Any) -> Any:
    """Leafwise `jnp.where` with a scalar predicate (no Python branching on traced values)."""
    return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def lp_phase(step: jax.Array, lp_steps: jax.Array) -> jax.Array:
    """True while update `step` (0-based) is a classifier-only linear-probe update."""
    return step <= lp_steps  # lp_steps = -1: never


def lp_reset(step: jax.Array, lp_steps: jax.Array) -> jax.Array:
    """True for the update right after the LP phase; Adam is re-created for all params before it."""
    return (lp_steps >= 0) & (step == lp_steps + 1)


def is_classifier_path(path) -> bool:
    return bool(path) and getattr(path[0], "key", None) == CLASSIFIER


def apply_updates(params: Any, opt_state: Any, grads: Any, *, lr: Any, weight_decay: Any,
                  step: jax.Array, lp_steps: jax.Array, classifier_only: bool = False):
    """One torch-Adam update of one member, honouring the LP schedule.

    `params` is {'featurizer': ..., 'classifier': ...}. While the member is in its LP phase (or always
    when `classifier_only`), featurizer params *and* their Adam moments are left exactly unchanged,
    so weight decay and updates touch only the classifier. Returns (new_params, new_opt_state).
    """
    fresh = init_opt_state(params)
    if classifier_only:
        frozen_featurizer = jnp.bool_(True)
    else:
        opt_state = tree_where(lp_reset(step, lp_steps), fresh, opt_state)
        frozen_featurizer = lp_phase(step, lp_steps)
    updates, new_opt = torch_adam(lr, weight_decay).update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)

    def keep_featurizer(path, new, old):
        return new if is_classifier_path(path) else jnp.where(frozen_featurizer, old, new)

    new_params = jax.tree_util.tree_map_with_path(keep_featurizer, new_params, params)
    # Adam moments live in trees shaped like params (under the ScaleByAdamState); mask those too.
    new_opt = _mask_moments(new_opt, opt_state, frozen_featurizer)
    return new_params, new_opt


def _mask_moments(new_opt: Any, old_opt: Any, frozen_featurizer: jax.Array) -> Any:
    def keep(path, new, old):
        in_featurizer = any(getattr(k, "key", None) == "featurizer" for k in path)
        return jnp.where(frozen_featurizer, old, new) if in_featurizer else new
    return jax.tree_util.tree_map_with_path(keep, new_opt, old_opt)


def adam_count(opt_state: Any) -> jax.Array:
    """The Adam step count (bias-correction t) of a single-member or stacked state."""
    for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState)):
        if isinstance(s, optax.ScaleByAdamState):
            return s.count
    raise ValueError("no ScaleByAdamState in this optimizer state")
