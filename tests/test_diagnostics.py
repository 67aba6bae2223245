"""LMC curves, barriers and the gate; prediction diversity (disagreement, DiWA ratio-error).

Networks: resnet_tiny at 16 px with independent random featurizers (numpy, He-normal; no JAX init
to compile) whose heads are least-squares linear probes on a 10-class template task. Each endpoint
is ~100% accurate and the weight midpoint of two of them is ~chance (its features match neither
head), so the barrier is ~0.9: far from any threshold the tests use, and deterministic.
"""
import logging

import jax
import numpy as np
import pytest
from flax.traverse_util import unflatten_dict

from rat_jax import diagnostics as D
from rat_jax.convert.converter import expected_shapes
from rat_jax.data.augment import normalize as normalize_on_device
from rat_jax.models import create_model

ARCH, C, SIZE, BS = "resnet_tiny", 10, 16, 64


def random_variables(seed):
    """He-normal convs, identity BN, torch-style head: an independent init without JAX compiles."""
    rng = np.random.default_rng(seed)
    shapes = expected_shapes(ARCH, C)
    flat = {}
    for path, shape in shapes.items():
        if path[-1] == "kernel" and len(shape) == 4:
            v = rng.normal(0.0, np.sqrt(2.0 / np.prod(shape[:3])), shape)
        elif path[1] == "classifier":
            bound = 1 / np.sqrt(shapes[("params", "classifier", "kernel")][0])
            v = rng.uniform(-bound, bound, shape)
        elif path[-1] in ("scale", "var"):
            v = np.ones(shape)
        else:
            v = np.zeros(shape)
        flat[path] = v.astype(np.float32)
    tree = unflatten_dict(flat)
    return {"params": tree["params"], "batch_stats": tree["batch_stats"]}


@pytest.fixture(scope="module")
def task():
    """(model, images uint8, labels, probe(seed) -> variables with a fitted head)."""
    model = create_model(ARCH, C)
    rng = np.random.default_rng(0)
    templates = rng.integers(0, 256, (C, SIZE, SIZE, 3))
    labels = (np.arange(4 * BS) % C).astype(np.int32)
    images = np.clip(templates[labels] + rng.normal(0, 40, (len(labels), SIZE, SIZE, 3)),
                     0, 255).astype(np.uint8)
    feats = jax.jit(lambda v, x: model.apply(v, normalize_on_device(x), features_only=True))

    def probe(seed):
        v = random_variables(seed)
        f = np.asarray(feats(v, images), np.float64)
        f1 = np.concatenate([f, np.ones((len(f), 1))], 1)
        w, *_ = np.linalg.lstsq(f1, np.eye(C)[labels], rcond=None)
        v["params"]["classifier"] = {"kernel": w[:-1].astype(np.float32),
                                     "bias": w[-1].astype(np.float32)}
        return v
    return model, images, labels, probe


@pytest.fixture(scope="module")
def nets(task):
    model, images, labels, probe = task
    return probe(0), probe(1)


def np_stack(trees):
    return jax.tree.map(lambda *xs: np.stack(xs), *trees)


def test_interpolate_endpoints_and_midpoint():
    a = {"w": np.array([0.0, 2.0], np.float32), "b": {"c": np.float32(1.0)}}
    b = {"w": np.array([4.0, -2.0], np.float32), "b": {"c": np.float32(3.0)}}
    t0, tm, t1 = D.interpolate(a, b, [0.0, 0.5, 1.0])
    np.testing.assert_array_equal(t0["w"], a["w"])
    np.testing.assert_array_equal(t1["w"], b["w"])
    np.testing.assert_allclose(tm["w"], [2.0, 0.0])
    assert float(tm["b"]["c"]) == 2.0 and tm["w"].dtype == np.float32
    with pytest.raises(ValueError, match="structure"):
        D.interpolate(a, {"w": a["w"]}, [0.5])


def test_barrier_definition():
    assert D.barrier([1.0, 0.5, 1.0], [0, 0.5, 1]) == 0.5
    assert D.barrier([0.8, 0.7, 0.6]) == 0.0                       # on the line
    assert D.barrier([0.9, 0.95, 0.6]) == 0.0                      # above the line
    b = D.barrier([0.8, 0.2, 0.6, 0.4], [0, 1 / 3, 2 / 3, 1])   # line at 1/3: 0.8 - 0.4/3
    assert abs(b - (0.8 - 0.4 / 3 - 0.2)) < 1e-12
    assert D.barrier([1.0, 1.0, 0.0], [0.0, 1.0, 0.5]) == 1.0      # unsorted alphas
    assert D.barrier([1.0, 2.0, 1.0], metric="loss") == 1.0        # loss: above the line
    assert D.barrier([1.0, 0.5, 1.0], metric="loss") == 0.0
    assert np.isnan(D.barrier([np.nan, 1.0]))
    with pytest.raises(ValueError):
        D.barrier([1.0], [0.0])
    with pytest.raises(ValueError, match="metric"):
        D.barrier([1.0, 1.0], metric="f1")


def test_lmc_barrier_zero_with_itself_positive_between_independent_inits(task, nets):
    model, images, labels, _ = task
    a, b = nets
    alphas = [0.0, 0.25, 0.5, 0.75, 1.0]
    probe = D.LmcProbe(alphas, batch_size=BS)
    same = D.lmc_curve(model, a["batch_stats"], a["params"], a["params"], images, labels, probe)
    assert same["alphas"] == alphas and len(same["acc"]) == len(same["loss"]) == 5
    assert D.barrier(same["acc"], alphas) < 1e-9
    assert D.barrier(same["loss"], alphas, "loss") < 1e-5
    assert min(same["acc"]) > 0.9                                  # the probe fits the task
    cross = D.lmc_curve(model, a["batch_stats"], a["params"], b["params"], images, labels, probe)
    assert cross["acc"][0] > 0.9 and cross["acc"][-1] > 0.9
    assert D.barrier(cross["acc"], alphas) > 0.5                   # measured ~0.9
    assert D.barrier(cross["loss"], alphas, "loss") > 0.3          # measured ~0.96


def test_gate_warns_and_skips_member_above_threshold(task, nets, caplog):
    model, images, labels, _ = task
    a, b = nets
    stacked = np_stack([a["params"], a["params"], b["params"]])
    probe = D.LmcProbe((0, 0.5, 1), batch_size=BS)
    with caplog.at_level(logging.WARNING, logger="rat_jax.diagnostics"):
        soup, kept, records = D.lmc_gate(model, a["batch_stats"], stacked, [0, 1, 2], images,
                                         labels, D.GateConfig(0.1, skip=True, probe=probe))
    assert kept == [0, 1]
    assert [r["member"] for r in records] == [0, 1, 2]
    assert records[1]["barrier"] < 1e-9 and not records[1]["gated"]
    assert records[2]["gated"] and records[2]["excluded"] and records[2]["barrier"] > 0.5
    assert any("member 2" in m for m in caplog.messages)
    for x, y in zip(jax.tree.leaves(soup), jax.tree.leaves(a["params"])):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-7)
    # skip=False: warned and reported, but averaged in
    soup2, kept2, records2 = D.lmc_gate(model, a["batch_stats"], stacked, [2, 0, 1], images,
                                        labels, D.GateConfig(0.1, skip=False, probe=probe))
    assert kept2 == [2, 0, 1]
    assert records2[1]["gated"] and not records2[1]["excluded"]
    ref = jax.tree.map(lambda x: x.mean(0), stacked)
    for x, y in zip(jax.tree.leaves(soup2), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-6)


def test_diversity_counts_by_hand():
    labels = np.array([0, 0, 0, 0, 1])
    preds = np.array([[0, 1, 1, 0, 1],     # wrong on 1, 2
                      [1, 1, 0, 0, 1],     # wrong on 0, 1
                      [0, 1, 1, 0, 1]])    # identical to member 0
    d = D.diversity_from_logits(preds, labels, groups={"found": [0, 2], "aux": [1]},
                                names=["a", "b", "c"])
    dis, ratio, frac = (np.asarray(d[k]) for k in ("disagreement", "ratio_error",
                                                   "single_error_fraction"))
    assert dis[0, 1] == 2 / 5 and dis[0, 2] == 0.0                  # differ on samples 0 and 2
    assert ratio[0, 1] == 2.0                                      # single {0, 2} / both {1}
    assert abs(frac[0, 1] - 2 / 3) < 1e-12
    assert ratio[0, 2] == 0.0 and frac[0, 2] == 0.0
    for mat in (dis, ratio, frac):
        np.testing.assert_array_equal(mat, mat.T)
        np.testing.assert_array_equal(np.diag(mat), 0.0)
    assert d["accuracy"] == [0.6, 0.6, 0.6]
    assert d["per_member"]["ratio_error"] == [1.0, 2.0, 1.0]
    gs = d["group_stats"]
    assert gs["found"]["kind"] == "within" and gs["found"]["pairs"] == 1
    assert gs["found"]["disagreement"] == 0.0
    assert gs["found | aux"]["kind"] == "between" and gs["found | aux"]["pairs"] == 2
    assert gs["found | aux"]["ratio_error"] == 2.0
    assert np.isnan(gs["aux"]["ratio_error"]) and gs["aux"]["pairs"] == 0
    # never wrong together: infinite ratio-error, left out of the means
    d2 = D.diversity_from_logits(np.array([[1, 0], [0, 1]]), np.array([0, 0]))
    assert np.isinf(d2["ratio_error"][0][1]) and np.isnan(d2["per_member"]["ratio_error"][0])
    assert d2["single_error_fraction"][0][1] == 1.0
    with pytest.raises(ValueError, match="group"):
        D.diversity_from_logits(preds, labels, groups={"x": [5]})


def test_diversity_of_networks(task, nets):
    model, images, labels, _ = task
    a, b = nets
    stacked = np_stack([a["params"], b["params"], a["params"]])
    d = D.diversity(model, stacked, a["batch_stats"], images[:BS], labels[:BS],
                    groups={"foundation": [0, 2], "aux:x": [1]}, batch_size=BS)
    dis = np.asarray(d["disagreement"])
    assert dis.shape == (3, 3)
    np.testing.assert_array_equal(dis, dis.T)
    assert dis[0, 2] == 0.0 and d["ratio_error"][0][2] == 0.0       # identical members
    assert d["group_stats"]["foundation"]["disagreement"] == 0.0
    assert d["num_samples"] == BS and len(d["per_member"]["disagreement"]) == 3


# ------------------------------------------------------------------------------ plots -------
def test_plots_write_png_files(tmp_path):
    from rat_jax import plots as P
    al = np.linspace(0, 1, 11)
    paths = [
        P.plot_interpolation({"0 - 1": (al, 0.9 - 0.5 * np.sin(np.pi * al)),
                              "0 - soup": (al, 0.9 - 0.05 * np.sin(np.pi * al))},
                             tmp_path / "interp.png", barriers={"0 - 1": 0.5}),
        P.plot_soup_vs_members([0.6, 0.65, 0.7, 0.68], [0.6, 0.66, 0.71], tmp_path / "soup.png",
                               best_member=0.62),
        P.plot_member_scatter([0.8, 0.82, 0.79, 0.85], [0.6, 0.58, 0.63, 0.61],
                              tmp_path / "sub" / "scatter.png",
                              soups={"uniform": (0.86, 0.66), "greedy": (0.87, 0.65)},
                              groups={"foundation": [0, 2], "aux:textures": [1, 3]}),
        P.plot_diversity_heatmap([[0, 0.2, np.inf], [0.2, 0, 0.1], [np.inf, 0.1, 0]],
                                 tmp_path / "div.png", labels=["m0", "m1 aux", "m2"],
                                 metric="DiWA ratio-error"),
    ]
    for p in paths:
        data = p.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, p
    with pytest.raises(ValueError):
        P.plot_diversity_heatmap(np.zeros((2, 3)), tmp_path / "bad.png")
