"""Member loader and eval iteration: shapes, determinism, resume, cache, eval coverage."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from rat_jax.data import ImageStore, load_folder
from rat_jax.evaluation import SplitSpec, eval_split
from rat_jax.data import transforms as T

from loader_helpers import member_loader


@pytest.fixture
def tiny(tmp_path):
    """3 envs x 2 classes of small random RGB images (sizes vary, some above the cache cap)."""
    rng = np.random.default_rng(0)
    root = tmp_path / "tiny"
    for e, n in (("e0", 7), ("e1", 9), ("e2", 5)):
        for c in ("a", "b"):
            os.makedirs(root / e / c)
            for i in range(n):
                w, h = int(rng.integers(12, 40)), int(rng.integers(12, 40))
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                    root / e / c / f"{i}.png")
    return load_folder(root)


def _loader(ds, tmp_path, **kw):
    args = dict(batch_size=4, image_size=16, cache_dir=str(tmp_path / "cache"), workers=2)
    args.update(kw)
    return member_loader(ds, [0, 2], [11, 22], **args)


def test_shapes_and_env_order(tiny, tmp_path):
    with _loader(tiny, tmp_path) as loader:
        batch = next(loader)
        assert batch["images"].shape == (2, 8, 16, 16, 3) and batch["images"].dtype == np.float32
        assert batch["labels"].shape == (2, 8) and batch["labels"].dtype == np.int32
        plan = loader.plan(0)
    assert [p[2] for p in plan if p[0] == 0] == [0] * 4 + [2] * 4  # env order, B per env
    assert abs(float(batch["images"].mean())) < 2


def test_samples_in_split_with_replacement(tiny, tmp_path):
    loader = _loader(tiny, tmp_path, batch_size=32)
    pools = [set(p.tolist()) for p in loader.stream.pools[0]]
    picks = {0: [], 2: []}
    for step in range(3):
        for m, _, env, idx, _ in loader.plan(step):
            picks[env].append(idx)
    assert set(picks[0]) <= pools[0] and set(picks[2]) <= pools[1]
    assert len(picks[2]) > len(pools[1])  # 96 draws from 8 in-split images: repeats


def test_deterministic_and_members_differ(tiny, tmp_path):
    a = [next(_loader(tiny, tmp_path)) for _ in range(1)][0]
    b = next(_loader(tiny, tmp_path, workers=1, prefetch=0))
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["labels"], b["labels"])
    assert not np.array_equal(a["images"][0], a["images"][1])


def test_load_only_decodes_just_those_members(tiny, tmp_path, monkeypatch):
    full = _loader(tiny, tmp_path, output="uint8", workers=1, prefetch=0).batch(3)
    part = _loader(tiny, tmp_path, output="uint8", workers=1, prefetch=0)
    sampled = []
    real = part.store.train_image
    monkeypatch.setattr(part.store, "train_image", lambda *a: sampled.append(a) or real(*a))
    part.load_only([1])
    got = part.batch(3)
    np.testing.assert_array_equal(got["images"][1], full["images"][1])  # same rows as all-loaded
    np.testing.assert_array_equal(got["labels"][1], full["labels"][1])
    assert not got["images"][0].any() and len(sampled) == 8  # member 0 never decoded
    with pytest.raises(ValueError, match="outside 0..1"):
        part.load_only([2])


def test_resume_state(tiny, tmp_path):
    loader = _loader(tiny, tmp_path)
    for _ in range(3):
        next(loader)
    state = json.loads(json.dumps(loader.get_state()))
    expected = next(loader)
    loader.close()
    fresh = _loader(tiny, tmp_path)
    fresh.set_state(state)
    got = next(fresh)
    assert np.array_equal(got["images"], expected["images"]) and fresh.get_state()["step"] == 4
    other = member_loader(tiny, [0, 2], [11, 23], batch_size=4, image_size=16, cache_dir=None)
    with pytest.raises(ValueError, match=r"state differs in \['seeds'\]"):
        other.set_state(state)


def test_cache_second_run_decodes_nothing(tiny, tmp_path, monkeypatch):
    first = next(_loader(tiny, tmp_path))                       # builds the cache
    cold = next(_loader(tiny, tmp_path, cache_dir=None))        # decodes every file
    monkeypatch.setattr(T, "decode", lambda p: (_ for _ in ()).throw(AssertionError(p)))
    second = next(_loader(tiny, tmp_path))
    assert np.array_equal(first["images"], second["images"])
    assert np.array_equal(first["labels"], cold["labels"])  # same draws; pixels differ only
    assert np.abs(first["images"] - cold["images"]).mean() < 0.5  # by the capped resampling


def test_cached_eval_is_exact(tiny, tmp_path):
    spec = SplitSpec(image_size=16)
    cold = eval_split(tiny, spec, cache_dir=None).images()
    warm = eval_split(tiny, spec, cache_dir=str(tmp_path / "c")).images()
    assert len(cold) == sum(tiny.env_sizes()) and np.array_equal(cold, warm)


def test_uncapped_train_cache_is_exact(tiny, tmp_path):
    # cache_side larger than every image: the cached image is the original.
    kw = dict(cache_side=64)
    a = next(_loader(tiny, tmp_path, **kw))
    b = next(_loader(tiny, tmp_path, cache_dir=None, **kw))
    assert np.array_equal(a["images"], b["images"])


def test_eval_splits_cover_each_env_once(tiny, tmp_path):
    cache = str(tmp_path / "c")
    for env, n in enumerate(tiny.env_sizes()):
        size = {s: len(eval_split(tiny, SplitSpec(envs=[env], split=s, image_size=8),
                                  cache_dir=cache)) for s in ("in", "out")}
        assert size == {"out": int(n * 0.2), "in": n - int(n * 0.2)}
    whole = eval_split(tiny, SplitSpec(envs=[1], split="all", image_size=8), cache_dir=None)
    batches = list(whole.batches(4))
    assert [len(b["labels"]) for b in batches] == [4, 4, 4, 4, 2]
    assert batches[0]["images"].shape == (4, 8, 8, 3)
    assert np.concatenate([b["labels"] for b in batches]).tolist() == tiny.labels(1).tolist()


def test_bad_arguments(tiny):
    with pytest.raises(ValueError, match="at least one member"):
        member_loader(tiny, [0], [], cache_dir=None)
    with pytest.raises(ValueError, match="train_envs is empty"):
        member_loader(tiny, [], [1], cache_dir=None)
    with pytest.raises(ValueError, match="trial_seeds has 3 entries for 2 members"):
        member_loader(tiny, [0], [1, 2], trial_seeds=[0, 1, 2], cache_dir=None)
    with pytest.raises(ValueError, match="split='val'"):
        SplitSpec(split="val")


def test_pacs_loader_subset(pacs_root, tmp_path):
    from rat_jax.data import load_dataset
    ds = load_dataset("PACS", pacs_root.parent)
    with member_loader(ds, [1, 2, 3], [5], batch_size=2, image_size=32, cache_dir=None) as loader:
        batch = next(loader)
    assert batch["images"].shape == (1, 6, 32, 32, 3)
    assert batch["labels"].max() < 7


@pytest.mark.slow
def test_pacs_full_cache(pacs_root, tmp_path, monkeypatch):
    """Decode all of PACS once into the cache, then read every split without decoding a JPEG."""
    from rat_jax.data import load_dataset
    ds = load_dataset("PACS", pacs_root.parent)
    store = ImageStore(ds, str(tmp_path))
    store.warm(eval_size=32)
    monkeypatch.setattr(T, "decode", lambda p: (_ for _ in ()).throw(AssertionError(p)))
    counts = [sum(len(b["labels"]) for b in eval_split(
        ds, SplitSpec(envs=[e], split="all", image_size=32), store=store).batches(256))
              for e in range(4)]
    assert counts == [2048, 2344, 1670, 3929]


@pytest.mark.parametrize("canvas", [None, 16])
def test_device_mode_batches_finish_to_the_host_images(tiny, tmp_path, canvas):
    """augment_on="device": uint8 windows + drawn parameters, finished by augment.model_input
    in a compiled function, give the host (PIL) mode's float32 images bit for bit; windows
    larger than the canvas are resized on the host (most windows with canvas 16)."""
    import jax
    from rat_jax.data import augment
    host = _loader(tiny, tmp_path, prefetch=0).batch(3)
    loader = _loader(tiny, tmp_path, prefetch=0, augment_on="device", canvas=canvas)
    dev = loader.batch(3)
    c = loader.stream.canvas
    assert dev["images"].shape == (2, 8, c, c, 3) and dev["images"].dtype == np.uint8
    assert dev["image_size"] == 16 and np.array_equal(dev["labels"], host["labels"])
    assert sorted(dev["augment"]) == sorted(T.WINDOW_PARAMS)
    h, w = dev["augment"]["height"], dev["augment"]["width"]
    assert (h <= c).all() and (w <= c).all()
    finish = jax.jit(jax.vmap(lambda x, a: augment.model_input(x, a, 16)))
    out = np.asarray(finish(dev["images"], dev["augment"]))
    np.testing.assert_array_equal(out, host["images"])
    # nothing outside a window is shipped (the canvas is zero there)
    m, s = 1, 5
    assert not dev["images"][m, s, h[m, s]:].any() and not dev["images"][m, s, :, w[m, s]:].any()


def test_device_mode_rejects_bad_settings(tiny, tmp_path):
    with pytest.raises(ValueError, match="augment_on='gpu'"):
        _loader(tiny, tmp_path, augment_on="gpu")
    with pytest.raises(ValueError, match="canvas=8 is smaller than image_size=16"):
        _loader(tiny, tmp_path, augment_on="device", canvas=8)


def test_device_mode_resizes_large_windows_on_the_host(tiny, tmp_path):
    dev = _loader(tiny, tmp_path, prefetch=0, augment_on="device", canvas=16).batch(0)
    # windows of the capped 20-px cached images mostly exceed 16 px: resized to 16 x 16
    assert (dev["augment"]["height"] == 16).mean() > 0.5


def _reference_batch(ds, loader, step):
    """The batch of `step` computed from the decoded original files, without any cache."""
    size = loader.stream.spec.image_size
    want = np.zeros((loader.num_members, loader.stream.rows, size, size, 3), np.uint8)
    for m, slot, env, idx, sseed in loader.plan(step):
        img = T.decode(ds.samples[env][idx][0])
        want[m, slot] = T.train_transform_uint8(img, size, np.random.default_rng(sseed))
    return T.normalize(want)


def test_default_train_cache_keeps_originals(tiny, tmp_path):
    """Crops are cut from the originals (resampled once, as the reference), although many
    images here are larger than the 1.25 x size cap the cache used before."""
    loader = _loader(tiny, tmp_path, prefetch=0)
    np.testing.assert_array_equal(loader.batch(2)["images"], _reference_batch(tiny, loader, 2))
    cached = os.listdir(os.path.join(loader.store.env_dir(), "train_s0"))
    assert "env0.u8" in cached and "env2.u8" in cached
    capped = _loader(tiny, tmp_path, prefetch=0, cache_side=20)
    assert not np.array_equal(capped.batch(2)["images"], loader.batch(2)["images"])


def test_originals_too_big_for_the_disk_are_decoded_instead(tiny, tmp_path, monkeypatch):
    import shutil
    from rat_jax.data import store as store_mod
    monkeypatch.setattr(store_mod.shutil, "disk_usage",
                        lambda path: shutil._ntuple_diskusage(10**6, 10**6 - 100, 100))
    loader = _loader(tiny, tmp_path, prefetch=0)
    with pytest.warns(UserWarning, match=r"train_cache_side"):
        got = loader.batch(1)["images"]
    np.testing.assert_array_equal(got, _reference_batch(tiny, loader, 1))
    assert not os.path.exists(os.path.join(loader.store.env_dir(), "train_s0", "env0.u8"))


def test_two_stores_building_one_cache_side_by_side(tiny, tmp_path):
    """Jobs running side by side open their own ImageStore over one cache dir: building the
    same env's caches at once in two threads leaves one complete cache (each writes its own
    temporary file and renames it)."""
    import concurrent.futures
    cache = str(tmp_path / "c")
    stores = [ImageStore(tiny, cache) for _ in range(4)]
    with concurrent.futures.ThreadPoolExecutor(4) as ex:
        list(ex.map(lambda s: s.warm([0, 1, 2], eval_size=16, train=True), stores))
    ref = ImageStore(tiny, None)
    for env in range(3):
        for idx in (0, len(tiny.samples[env]) - 1):
            np.testing.assert_array_equal(stores[0].eval_array(env, idx, 16),
                                          ref.eval_array(env, idx, 16))
    assert not [p for p in (tmp_path / "c").rglob("*tmp*")]
