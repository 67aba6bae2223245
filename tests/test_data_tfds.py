"""TFDS as a user runs it (issue 17, item 8): configs/tfds_aux.py's auxiliary entry resolves
through the pipeline's own dataset lookup, in TFDS's default data directory, with labels read
without decoding a single image; an unprepared dataset is a DatasetError saying what to run.

The first tests use a stand-in `tensorflow_datasets` module (the package is optional); the last
ones build a tiny Fashion-MNIST-shaped dataset with the real package into a temporary data
directory and skip when tensorflow_datasets is not installed."""
import importlib.util
import io
import pathlib
import sys
import types

import numpy as np
import pytest

from rat_jax.data import DatasetError, ImageStore
from rat_jax.data.protocol import aux_init_assignment
from rat_jax.data.tfds_source import load_tfds, parse

REPO = pathlib.Path(__file__).resolve().parents[1]


def tfds_aux_module():
    spec = importlib.util.spec_from_file_location("tfds_aux", REPO / "configs" / "tfds_aux.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def resolve(config, entry, workdir):
    """The dataset of a config entry, exactly as `python -m rat_jax.main` looks it up."""
    from rat_jax.pipeline import Pipeline
    return Pipeline(config, workdir).dataset(entry)


# ------------------------------------------------------------ stand-in tensorflow_datasets ---
class _Skip:
    """Stands for tfds.decode.SkipDecoding."""


class _Source:
    def __init__(self, records, decoders, log):
        self.records, self.decoders, self.log = records, decoders or {}, log

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        image, label = self.records[i]
        if isinstance(self.decoders.get("image"), _Skip):
            return {"image": b"\x89PNG encoded", "label": label}
        self.log["decoded"] += 1
        return {"image": image, "label": label}

    def __getitems__(self, keys):
        self.log["batched"] += 1
        return [self[i] for i in keys]


class _Builder:
    def __init__(self, name, data_dir, log, prepared):
        self.name, self.log, self.prepared = name, log, prepared
        self.data_dir_root = data_dir or log["default_dir"]   # TFDS's default when None
        self.data_dir = f"{self.data_dir_root}/{name}/3.0.1"
        classes = types.SimpleNamespace(names=[f"c{i}" for i in range(10)])
        self.info = types.SimpleNamespace(features={"image": object(), "label": classes},
                                          splits={"train": None, "test": None}, version="3.0.1")
        rng = np.random.default_rng(0)
        self.splits = {s: [(rng.integers(0, 255, (28, 28, 1), dtype=np.uint8), i % 10)
                           for i in range(n)] for s, n in (("train", 30), ("test", 10))}

    def is_prepared(self):
        return self.prepared

    def as_data_source(self, split, decoders=None):
        return _Source(self.splits[split], decoders, self.log)


def fake_tfds(prepared=True):
    log = {"decoded": 0, "batched": 0, "builder_calls": [],
           "default_dir": "/home/u/tensorflow_datasets"}

    def builder(name, data_dir=None):
        log["builder_calls"].append((name, data_dir))
        return _Builder(name, data_dir, log, prepared)
    return types.SimpleNamespace(builder=builder, decode=types.SimpleNamespace(SkipDecoding=_Skip),
                                 log=log)


def test_worked_config_loads_and_every_aux_source_feeds_a_member():
    module = tfds_aux_module()
    for variant in (None, "smoke"):
        c = module.get_config(variant)
        entry = c.aux[module.TFDS_AUX]
        assert entry.name == "tfds:fashion_mnist:train" and parse(entry.name)[1] == ["train"]
        assert entry.root == "" and c.data_root == ""   # TFDS's default data directory
        assert c.target.name == "digits" and sorted(c.aux) == ["fashion_mnist", "textures"]
        used = {aux_init_assignment(h, sorted(c.aux), c.n_aux_hparams) for h in range(c.n_hparams)}
        assert {u if u == "imagenet" else u[0] for u in used} == {"imagenet", *c.aux}
    with pytest.raises(ValueError, match="tfds_aux.py"):
        module.get_config("cpu")


def test_worked_config_entry_resolves_labels_without_decoding(tmp_path, monkeypatch):
    fake = fake_tfds()
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    module = tfds_aux_module()
    c = module.get_config()
    ds = resolve(c, c.aux[module.TFDS_AUX], tmp_path)
    assert fake.log["builder_calls"] == [("fashion_mnist", None)]   # no data dir of our own
    assert ds.envs == ["train"] and ds.classes == [f"c{i}" for i in range(10)]
    assert ds.labels(0).tolist() == [i % 10 for i in range(30)]
    assert ds.root == "/home/u/tensorflow_datasets/fashion_mnist/3.0.1"
    assert fake.log["decoded"] == 0 and fake.log["batched"] >= 1   # labels: no image decoded
    img = ImageStore(ds, cache_dir=None).original(0, 3)
    assert img.mode == "RGB" and img.size == (28, 28) and fake.log["decoded"] == 1


def test_unprepared_dataset_names_dataset_data_dir_and_command(tmp_path, monkeypatch):
    fake = fake_tfds(prepared=False)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)
    module = tfds_aux_module()
    c = module.get_config()
    with pytest.raises(DatasetError) as err:
        resolve(c, c.aux[module.TFDS_AUX], tmp_path)
    msg = str(err.value)
    assert ("'fashion_mnist' is not prepared in the data directory "
            "/home/u/tensorflow_datasets") in msg
    assert ("`tfds build fashion_mnist --data_dir=/home/u/tensorflow_datasets "
            "--file_format=array_record`") in msg


def test_spec_parsing_keeps_sliced_splits():
    assert parse("tfds:cifar10:train[:5000],test") == ("cifar10", ["train[:5000]", "test"])
    assert parse("tfds:mnist") == ("mnist", ["train"])
    for bad in ("tfds:", "tfds:x:", "mnist:train"):
        with pytest.raises(DatasetError, match="write tfds:NAME"):
            parse(bad)


# ------------------------------------------------------------ the real tensorflow_datasets ---
def _tiny_fashion_mnist(tfds, data_dir):
    """A 24 + 8 image dataset in Fashion-MNIST's catalog name, version and features, prepared as
    `tfds build fashion_mnist --file_format=array_record` would (PNG bytes: no TensorFlow). Image
    pixels are 20 * label + 5, so a label can be checked against its image."""
    from PIL import Image
    catalog = tfds.builder_cls("fashion_mnist")

    class FashionMnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = catalog.VERSION

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(28, 28, 1)),
                "label": tfds.features.ClassLabel(num_classes=10)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(24, 0), "test": self._generate_examples(8, 1)}

        def _generate_examples(self, n, offset):
            for i in range(n):
                label = (3 * i + offset) % 10
                buf = io.BytesIO()
                Image.fromarray(np.full((28, 28), 20 * label + 5, np.uint8)).save(buf, "PNG")
                buf.seek(0)
                yield i, {"image": buf, "label": label}

    FashionMnist(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


@pytest.fixture
def real_tfds(tmp_path, monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    default = tmp_path / "tensorflow_datasets"
    default.mkdir()
    # what $TFDS_DATA_DIR sets when tensorflow_datasets is imported; read by every lookup
    monkeypatch.setattr(tfds.core.constants, "DATA_DIR", str(default))
    return tfds, default


def test_real_tfds_worked_config_reads_labels_without_decoding(real_tfds, tmp_path, monkeypatch):
    tfds, default = real_tfds
    _tiny_fashion_mnist(tfds, default)
    decoded = []
    image_decode = tfds.features.Image.decode_example_np
    monkeypatch.setattr(tfds.features.Image, "decode_example_np",
                        lambda self, *a, **k: decoded.append(1) or image_decode(self, *a, **k))
    module = tfds_aux_module()
    c = module.get_config()
    ds = resolve(c, c.aux[module.TFDS_AUX], tmp_path / "work")
    assert ds.envs == ["train"] and ds.env_sizes() == [24] and len(ds.classes) == 10
    labels = ds.labels(0).tolist()   # in TFDS's record order (it shuffles when preparing)
    assert sorted(labels) == sorted((3 * i) % 10 for i in range(24))
    assert ds.root.startswith(str(default)) and not decoded   # labels: no image decoded
    store = ImageStore(ds, cache_dir=None)
    for i in (0, 5, 23):
        img = store.original(0, i)
        assert img.mode == "RGB" and img.size == (28, 28)
        assert np.asarray(img)[0, 0].tolist() == [20 * labels[i] + 5] * 3   # label matches image
    assert len(decoded) == 3
    sliced = load_tfds("tfds:fashion_mnist:train[:10],test")
    assert sliced.envs == ["train[:10]", "test"] and sliced.env_sizes() == [10, 8]


def test_real_tfds_unprepared_dataset_error(real_tfds, tmp_path):
    _, default = real_tfds
    module = tfds_aux_module()
    c = module.get_config()
    with pytest.raises(DatasetError) as err:
        resolve(c, c.aux[module.TFDS_AUX], tmp_path / "work")
    msg = str(err.value)
    assert f"'fashion_mnist' is not prepared in the data directory {default}" in msg
    assert f"tfds build fashion_mnist --data_dir={default} --file_format=array_record" in msg
    with pytest.raises(DatasetError, match=r"tfds build"):
        load_tfds("tfds:this_dataset_does_not_exist")


def test_real_tfds_other_features_stay_encoded_nested_ones_decode(real_tfds, monkeypatch):
    """Text, ids, boxes next to the image (as detection-style catalog datasets have): labels
    still load without an image decode, and nested features (no SkipDecoding) do not break it."""
    tfds, default = real_tfds
    from PIL import Image

    class Shapes(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(None, None, 3)),
                "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
                "file_name": tfds.features.Text(),
                "objects": tfds.features.Sequence({"bbox": tfds.features.BBoxFeature()})}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(6):
                buf = io.BytesIO()
                Image.fromarray(np.full((5, 4, 3), 40 * (i % 3), np.uint8)).save(buf, "PNG")
                buf.seek(0)
                yield i, {"image": buf, "label": i % 3, "file_name": f"{i}.png",
                          "objects": {"bbox": [tfds.features.BBox(0.1, 0.2, 0.5, 0.6)]}}

    Shapes(data_dir=str(default), file_format="array_record").download_and_prepare()
    decoded = []
    image_decode = tfds.features.Image.decode_example_np
    monkeypatch.setattr(tfds.features.Image, "decode_example_np",
                        lambda self, *a, **k: decoded.append(1) or image_decode(self, *a, **k))
    ds = load_tfds("tfds:shapes")                       # TFDS's default data directory
    assert sorted(ds.labels(0).tolist()) == [0, 0, 1, 1, 2, 2] and not decoded
    assert ds.arrays[0][1][0, 0].tolist() == [40 * int(ds.labels(0)[1])] * 3 and decoded
