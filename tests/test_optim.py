"""Optimizer semantics: torch Adam with coupled L2, per-member arrays, the LP schedule (docs/protocol.md §1.4)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rat_jax.engine import optim

torch = pytest.importorskip("torch")

X = np.random.RandomState(0).randn(6, 4).astype(np.float32)


def _params(seed=0):
    r = np.random.RandomState(seed)
    return {"featurizer": {"w": r.randn(4, 3).astype(np.float32),
                           "bn": {"scale": r.rand(3).astype(np.float32) + 0.5}},
            "classifier": {"kernel": r.randn(3, 2).astype(np.float32),
                           "bias": r.randn(2).astype(np.float32)}}


def _loss(p):
    h = jnp.tanh(X @ p["featurizer"]["w"]) * p["featurizer"]["bn"]["scale"]
    return jnp.sum((h @ p["classifier"]["kernel"] + p["classifier"]["bias"]) ** 2) / 6.0


@jax.jit
def _jax_step(p, opt, step, lr, wd, lp_steps):
    g = jax.grad(_loss)(p)
    return optim.apply_updates(p, opt, g, lr=lr, weight_decay=wd, step=step, lp_steps=lp_steps)


def _run_jax(n, lr, wd, lp_steps, trace=False):
    p = jax.tree.map(jnp.asarray, _params())
    opt = optim.init_opt_state(p)
    hist = []
    for t in range(n):
        p, opt = _jax_step(p, opt, jnp.int32(t), jnp.float32(lr), jnp.float32(wd),
                           jnp.int32(lp_steps))
        hist.append((jax.tree.map(np.asarray, p), int(optim.adam_count(opt))))
    return (hist if trace else jax.tree.map(np.asarray, p))


def _run_torch(n, lr, wd, lp_steps):
    """The MR code path: Adam over the classifier for updates 0..L, then a new Adam over all."""
    p0 = _params()
    t = {k: {kk: torch.tensor(vv, requires_grad=True) for kk, vv in _flat(v).items()}
         for k, v in p0.items()}
    xs = torch.tensor(X)

    def loss():
        h = torch.tanh(xs @ t["featurizer"]["w"]) * t["featurizer"]["bn/scale"]
        return ((h @ t["classifier"]["kernel"] + t["classifier"]["bias"]) ** 2).sum() / 6.0

    all_params = list(t["featurizer"].values()) + list(t["classifier"].values())
    if lp_steps >= 0:
        opt = torch.optim.Adam(list(t["classifier"].values()), lr=lr, weight_decay=wd)
    else:
        opt = torch.optim.Adam(all_params, lr=lr, weight_decay=wd)
    for step in range(n):
        opt.zero_grad()
        for q in all_params:
            q.grad = None
        loss().backward()
        opt.step()
        if step == lp_steps:
            opt = torch.optim.Adam(all_params, lr=lr, weight_decay=wd)
    return {"featurizer": {"w": t["featurizer"]["w"].detach().numpy(),
                           "bn": {"scale": t["featurizer"]["bn/scale"].detach().numpy()}},
            "classifier": {k: v.detach().numpy() for k, v in t["classifier"].items()}}


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + k + "/"))
        else:
            out[prefix + k] = v
    return out


def _maxdiff(a, b):
    return max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("lr,wd,lp_steps", [(1e-2, 0.0, -1), (3e-2, 1e-1, -1), (2e-2, 5e-2, 2)])
def test_matches_torch_adam_with_coupled_l2_and_lp_switch(lr, wd, lp_steps):
    ours, ref = _run_jax(6, lr, wd, lp_steps), _run_torch(6, lr, wd, lp_steps)
    assert _maxdiff(ours, ref) < 2e-6


def test_coupled_l2_is_not_adamw():
    """torch Adam(weight_decay) adds wd*p to the gradient; AdamW would decay outside the moments."""
    import optax
    p = jax.tree.map(jnp.asarray, _params())
    g = jax.grad(_loss)(p)
    ours, _ = optim.torch_adam(1e-2, 0.1).update(g, optim.init_opt_state(p), p)
    adamw = optax.adamw(1e-2, weight_decay=0.1, eps=1e-8)
    theirs, _ = adamw.update(g, adamw.init(p), p)
    assert _maxdiff(ours, theirs) > 1e-4


def test_lp_schedule_freezes_featurizer_then_resets_adam():
    lp = 3
    hist = _run_jax(7, 1e-2, 1e-1, lp, trace=True)
    init = _params()
    for t in range(lp + 1):  # updates 0..L: featurizer bit-identical, classifier moves
        p, count = hist[t]
        for a, b in zip(jax.tree.leaves(p["featurizer"]), jax.tree.leaves(init["featurizer"])):
            np.testing.assert_array_equal(a, b)
        assert count == t + 1
        assert not np.array_equal(p["classifier"]["kernel"], init["classifier"]["kernel"])
    p, count = hist[lp + 1]  # update L+1: fresh Adam (count restarts) and the featurizer moves
    assert count == 1
    assert not np.array_equal(p["featurizer"]["w"], init["featurizer"]["w"])
    assert hist[lp + 2][1] == 2


def test_no_lp_trains_everything_from_step_zero():
    p, count = _run_jax(1, 1e-2, 0.0, -1, trace=True)[0]
    assert count == 1
    assert not np.array_equal(p["featurizer"]["w"], _params()["featurizer"]["w"])


def test_classifier_only_never_steps_featurizer_even_with_weight_decay():
    p = jax.tree.map(jnp.asarray, _params())
    opt = optim.init_opt_state(p)
    for t in range(3):
        g = jax.grad(_loss)(p)
        p, opt = optim.apply_updates(p, opt, g, lr=1e-2, weight_decay=0.5, step=jnp.int32(t),
                                     lp_steps=jnp.int32(-1), classifier_only=True)
    init = _params()
    np.testing.assert_array_equal(p["featurizer"]["w"], init["featurizer"]["w"])
    np.testing.assert_array_equal(p["featurizer"]["bn"]["scale"], init["featurizer"]["bn"]["scale"])
    assert int(optim.adam_count(opt)) == 3


def test_lr_and_weight_decay_are_arrays_vmapped_per_member():
    """One compiled update serves members with different lr / wd (no recompilation)."""
    stacked = jax.tree.map(lambda x: jnp.stack([x] * 3), jax.tree.map(jnp.asarray, _params()))
    opt = jax.vmap(optim.init_opt_state)(stacked)
    grads = jax.vmap(jax.grad(_loss))(stacked)
    lr = jnp.array([0.0, 1e-2, 1e-2], jnp.float32)
    wd = jnp.array([0.0, 0.0, 0.5], jnp.float32)
    upd = jax.vmap(lambda p, o, g, a, b: optim.apply_updates(
        p, o, g, lr=a, weight_decay=b, step=jnp.int32(0), lp_steps=jnp.int32(-1)))
    new, _ = upd(stacked, opt, grads, lr, wd)
    w0, w = np.asarray(stacked["featurizer"]["w"]), np.asarray(new["featurizer"]["w"])
    np.testing.assert_array_equal(w[0], w0[0])  # lr = 0: unchanged
    assert not np.array_equal(w[1], w0[1])
    assert not np.array_equal(w[1], w[2])       # only wd differs between members 1 and 2
