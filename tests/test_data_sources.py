"""Folder and DomainBed sources through load_dataset: ImageFolder order, named datasets,
identity, bad input, PACS."""
import os

import pytest
from PIL import Image

from rat_jax.data import DatasetError, ImageDecodeError, ImageStore, load_dataset, load_folder
from rat_jax.data import domainbed


def _png(path, value=0, size=(6, 5)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, (value, value, value)).save(path)


def make_tree(root, envs=("d1", "d0"), classes=("b", "a"), per_class=2):
    for e in envs:
        for c in classes:
            for i in range(per_class):
                _png(os.path.join(root, e, c, f"img{i}.png"), 10 * i)
    return root


def test_imagefolder_order(tmp_path):
    make_tree(tmp_path, envs=("location_38", "location_100"))
    d = tmp_path / "location_38" / "a"
    _png(str(d / "Z.JPG"))            # upper-case extension counts
    _png(str(d / "sub" / "x.png"))    # nested folder, walked after the class folder's files
    (d / "notes.txt").write_text("not an image")
    ds = load_folder(tmp_path)
    assert ds.envs == ["location_100", "location_38"]  # string sort, like DomainBed
    assert ds.classes == ["a", "b"] and ds.num_classes == 2
    rel = [os.path.relpath(p, tmp_path / "location_38") for p, _ in ds.samples[1]]
    assert rel == ["a/Z.JPG", "a/img0.png", "a/img1.png", "a/sub/x.png", "b/img0.png", "b/img1.png"]
    assert [y for _, y in ds.samples[1]] == [0, 0, 0, 0, 1, 1]


def test_identity_stable_and_content_sensitive(tmp_path):
    make_tree(tmp_path)
    a, b = load_folder(tmp_path), load_folder(tmp_path)
    assert a.identity == b.identity and a.identity.startswith(os.path.basename(tmp_path))
    _png(str(tmp_path / "d0" / "a" / "img9.png"))
    assert load_folder(tmp_path).identity != a.identity


def test_named_dataset_and_aliases(tmp_path):
    make_tree(tmp_path / "office_home", envs=("Art", "Clipart", "Product", "Real World"))
    for name in ("OfficeHome", "office_home", "officehome"):
        ds = load_dataset(name, tmp_path)
        assert ds.name == "OfficeHome" and ds.envs == ["Art", "Clipart", "Product", "Real World"]
    assert load_dataset("OfficeHome", tmp_path / "office_home").envs[3] == "Real World"
    assert domainbed.SPECS["DomainNet"].n_steps == 15001


def test_domain_net_duplicates_excluded(tmp_path):
    envs = domainbed.SPECS["DomainNet"].envs
    make_tree(tmp_path / "domain_net", envs=envs)
    dup = tmp_path / "dups.txt"
    dup.write_text("clipart/a/img1.png\nreal/b/img0.png\n")
    ds = load_dataset("DomainNet", tmp_path, domainnet_duplicates=dup)
    assert ds.excluded == 2 and ds.env_sizes() == [3, 4, 4, 4, 3, 4]
    assert load_dataset("DomainNet", tmp_path, domainnet_duplicates=dup,
                        exclude_duplicates=False).env_sizes() == [4] * 6
    assert load_dataset("DomainNet", tmp_path).excluded == 0  # cleaned folder: no list needed
    with pytest.raises(DatasetError, match="duplicate list .*nope.txt.* not found"):
        load_dataset("DomainNet", tmp_path, domainnet_duplicates=tmp_path / "nope.txt")


def test_domain_net_uncleaned_folder_needs_list(tmp_path):
    make_tree(tmp_path / "domain_net", envs=domainbed.SPECS["DomainNet"].envs)
    _png(str(tmp_path / "domain_net" / "clipart" / "couch" / "clipart_081_000001.jpg"))
    with pytest.raises(DatasetError, match="still contains files.*clipart_081_000001.*domainnet_duplicates="):
        load_dataset("DomainNet", tmp_path)


# ---------------------------------------------------------------- bad input -------------
def test_missing_root(tmp_path, monkeypatch):
    with pytest.raises(DatasetError, match="does not exist.*one sub-folder per domain"):
        load_folder(tmp_path / "nope")
    with pytest.raises(DatasetError, match=r"PACS: folder .* not found; download it"):
        load_dataset("PACS", tmp_path)
    monkeypatch.delenv("DOMAINBED_DATA", raising=False)
    with pytest.raises(DatasetError, match=r"pass root=.*or set \$DOMAINBED_DATA"):
        load_dataset("PACS")


def test_domainbed_data_env_is_the_default_root(tmp_path, monkeypatch):
    make_tree(tmp_path / "PACS", envs=domainbed.SPECS["PACS"].envs)
    monkeypatch.setenv("DOMAINBED_DATA", str(tmp_path))
    ds = load_dataset("pacs")
    assert ds.name == "PACS" and ds.identity == load_dataset("PACS", tmp_path).identity


def test_folder_path_relative_to_root(tmp_path):
    make_tree(tmp_path / "mine")
    ds = load_dataset("mine", tmp_path)
    assert ds.name == "mine" and ds.identity == load_dataset(tmp_path / "mine").identity
    assert ds.identity == load_folder(tmp_path / "mine").identity


def test_missing_or_extra_domain(tmp_path):
    make_tree(tmp_path / "PACS", envs=("art_painting", "cartoon", "photo"))
    with pytest.raises(DatasetError, match=r"missing \['sketch'\], unexpected \[\]"):
        load_dataset("PACS", tmp_path)
    make_tree(tmp_path / "PACS", envs=("sketch", "zz_extra"))
    with pytest.raises(DatasetError, match=r"unexpected \['zz_extra'\].*test_env index"):
        load_dataset("PACS", tmp_path)


def test_empty_root_and_domain(tmp_path):
    with pytest.raises(DatasetError, match="no domain sub-folders"):
        load_folder(tmp_path)
    (tmp_path / "d0").mkdir()
    with pytest.raises(DatasetError, match="d0.*no class sub-folders"):
        load_folder(tmp_path)


def test_empty_class_folder(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "d1" / "c").mkdir()
    (tmp_path / "d1" / "c" / "readme.txt").write_text("x")
    with pytest.raises(DatasetError, match=r"class folder\(s\) \['c'\] in .*d1.* hold no image"):
        load_folder(tmp_path)


def test_classes_differ_across_domains(tmp_path):
    make_tree(tmp_path)
    _png(str(tmp_path / "d1" / "extra" / "x.png"))
    with pytest.raises(DatasetError, match=r"domain 'd1' has classes 3 \(incl. \['extra'\].*same class"):
        load_folder(tmp_path)


def test_corrupt_image_raises_naming_file(tmp_path):
    make_tree(tmp_path)
    bad = tmp_path / "d0" / "a" / "broken.png"
    bad.write_bytes(b"not a png at all")
    ds = load_folder(tmp_path)
    idx = [p for p, _ in ds.samples[0]].index(str(bad))
    store = ImageStore(ds, cache_dir=None)
    with pytest.raises(ImageDecodeError, match=r"broken\.png.*on_bad_image='skip'"):
        store.original(0, idx)
    with pytest.raises(ImageDecodeError, match=r"broken\.png"):  # cache build too
        ImageStore(ds, cache_dir=str(tmp_path / "cache")).warm(envs=[0], eval_size=8)


def test_corrupt_image_skipped_and_counted(tmp_path):
    make_tree(tmp_path)
    (tmp_path / "d0" / "a" / "broken.png").write_bytes(b"\x89PNG garbage")
    ds = load_folder(tmp_path, on_bad_image="skip")
    assert ds.env_sizes() == [4, 4] and len(ds.skipped) == 1 and ds.skipped[0].endswith("broken.png")
    with pytest.raises(DatasetError, match="on_bad_image='ignore'"):
        load_folder(tmp_path, on_bad_image="ignore")


def test_unknown_dataset_name(tmp_path):
    with pytest.raises(DatasetError, match=r"unknown dataset 'PAC'.*PACS.*digits.*tfds:NAME"):
        load_dataset("PAC", tmp_path)


def test_env_index_errors(tmp_path):
    ds = load_folder(make_tree(tmp_path))
    assert ds.env_index("d1") == 1 and ds.env_index(-1) == 1
    with pytest.raises(DatasetError, match="unknown env 'x'"):
        ds.env_index("x")
    with pytest.raises(DatasetError, match="out of range"):
        ds.env_index(5)


# ---------------------------------------------------------------- real data -------------
def test_pacs(pacs_root):
    ds = load_dataset("PACS", pacs_root.parent)
    assert ds.envs == ["art_painting", "cartoon", "photo", "sketch"]
    assert ds.classes == ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
    assert ds.env_sizes() == [2048, 2344, 1670, 3929] and ds.num_classes == 7
    assert load_dataset(pacs_root).identity == ds.identity
    out_idx, in_idx = ds.splits(0)[1]
    assert len(out_idx) == 468 and len(in_idx) == 1876
    first = ds.samples[0][0][0]
    assert first.endswith(os.path.join("art_painting", "dog", "pic_001.jpg"))
    img = ImageStore(ds, cache_dir=None).original(2, 0)
    assert img.mode == "RGB" and min(img.size) > 0
