import math
import random

import jax.numpy as jnp
import numpy as np
import pytest

from rat_jax import soups


def _stacked():
    return {"a": jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 9.0]]), "b": {"c": jnp.array([0.0, 3.0, 6.0])}}


def test_average_is_arithmetic_mean_and_respects_members_and_weights():
    s = _stacked()
    avg = soups.average(s)
    np.testing.assert_allclose(avg["a"], [3.0, 5.0])
    np.testing.assert_allclose(avg["b"]["c"], 3.0)
    np.testing.assert_allclose(soups.average(s, members=[0, 2])["a"], [3.0, 5.5])
    np.testing.assert_allclose(soups.average(s, weights=[1, 0, 1])["a"], [3.0, 5.5])
    with pytest.raises(ValueError, match="empty member list"):
        soups.average(s, members=[])


def test_greedy_rejects_a_member_that_hurts_and_uses_ge():
    # Three members, scores rank 0 > 1 > 2. Member 1 is "bad": adding it lowers selection accuracy.
    s = {"w": jnp.array([1.0, -5.0, 1.2])}
    scores = [0.9, 0.8, 0.7]

    def evaluate(params):  # accuracy peaks when the averaged weight is near 1.1
        return 1.0 - abs(float(params["w"]) - 1.1)

    soup, selected, log = soups.greedy_soup(s, scores, evaluate)
    assert selected == [0, 2]
    assert [r["accept"] for r in log] == [True, False, True]
    np.testing.assert_allclose(soup["w"], 1.1)
    # Ties are accepted (>=): a member equal to the soup keeps the accuracy and is kept.
    soup, selected, _ = soups.greedy_soup({"w": jnp.array([1.0, 1.0])}, [0.5, 0.4], lambda p: 0.7)
    assert selected == [0, 1]


def test_greedy_order_is_by_descending_score_and_excludes_flagged():
    s = {"w": jnp.array([0.0, 1.0, 2.0])}
    _, selected, log = soups.greedy_soup(s, [0.1, 0.9, 0.5], lambda p: 1.0, exclude=[2])
    assert [r["member"] for r in log] == [1, 0]
    assert selected == [1, 0]


def test_fusing_coefficients_follow_python_random():
    lam = soups.fusing_coefficients(94828300, 4.0, 5)
    random.seed(94828300)
    kappa = [math.exp(4.0 * random.random()) for _ in range(5)]
    np.testing.assert_allclose(lam, [k / sum(kappa) for k in kappa])
    assert abs(sum(lam) - 1) < 1e-12
    fused = soups.fuse([{"w": jnp.array(1.0)}, {"w": jnp.array(3.0)}], [0.25, 0.75])
    np.testing.assert_allclose(fused["w"], 2.5)


def test_ensemble_logits_mean():
    logits = jnp.arange(12.0).reshape(3, 2, 2)
    np.testing.assert_allclose(soups.ensemble_logits(logits), logits.mean(0))
    np.testing.assert_allclose(soups.ensemble_logits(logits, [0, 1]), logits[:2].mean(0))
