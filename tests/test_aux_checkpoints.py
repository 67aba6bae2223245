"""`config.aux_checkpoints`: auxiliary fine-tunings brought as files instead of trained.

The pipeline test trains the smoke config's pool once, exports it as files and reruns from those
files in a fresh workdir with no `config.aux`: the target table and the target members' weights
are the same. The other test checks the loader on its own: formats, the fingerprint, the
combination rules and one clear error per bad file.
"""
import dataclasses
import importlib.util
import json
import pathlib
import shutil

import jax
import ml_collections
import numpy as np
import pytest

from rat_jax import checkpoint
from rat_jax.aux_checkpoints import (INDEX_FILE, PoolCheck, export_aux_pool, load_aux_checkpoints,
                                     merge_pools, pool_runs)
from rat_jax.data import load_dataset
from rat_jax.export import export_flax, to_torch_state_dict, write_safetensors
from rat_jax.foundation import load_foundation
from rat_jax.pipeline import Pipeline
from rat_jax.specs import AuxRuns
from rat_jax.stages import Foundation

REPO = pathlib.Path(__file__).resolve().parents[1]
ARCH = "resnet_tiny"


def _smoke_config():
    spec = importlib.util.spec_from_file_location("demo_cfg", REPO / "configs" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("smoke")
    c.target.test_envs, c.trials, c.make_plots = (0,), (0,), False
    return c


def _assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_exported_pool_as_checkpoints_gives_the_same_table(tmp_path):
    c = _smoke_config()
    first = Pipeline(c, tmp_path / "trained")
    rows_trained = first.run()
    pool = first.pool
    assert sorted(pool) == ["glyphs", "textures"]
    featurizer, batch_stats, fhash = load_foundation(c.foundation, c.arch, tmp_path / "f",
                                                     c.image_size)
    entries = export_aux_pool(pool, c.arch, tmp_path / "export", batch_stats=batch_stats)
    assert len(entries) == 4 and (tmp_path / "export" / INDEX_FILE).exists()

    c2 = _smoke_config()
    c2.aux = ml_collections.ConfigDict()
    c2.aux_checkpoints = tuple(f"{e['path']}={e['name']}" for e in entries)  # PATH=DATASET
    second = Pipeline(c2, tmp_path / "files")
    rows_files = second.run()
    assert not (tmp_path / "files" / "aux").exists()          # no auxiliary training
    assert json.dumps(rows_files, sort_keys=True) == json.dumps(rows_trained, sort_keys=True)
    result = "target/digits_test0_trial0/result"
    _assert_same_tree(checkpoint.restore_pytree(tmp_path / "trained" / result),
                      checkpoint.restore_pytree(tmp_path / "files" / result))
    for name in pool:
        for a, b in zip(pool[name].featurizers, second.pool[name].featurizers):
            _assert_same_tree(a, b)
        manifest = json.loads((tmp_path / "files" / "aux_checkpoints" / name /
                               "manifest.json").read_text())
        trained = pool[name].manifest
        assert [m["run"] for m in manifest] == [0, 1]
        assert {m["identity"] for m in manifest} == {trained[0]["identity"]}
        assert all(m["foundation"] == fhash and len(m["sha256"]) == 64
                   and m["path"].endswith(f"{name}_run{m['run']}.safetensors") for m in manifest)
    assert "Auxiliary checkpoints (config.aux_checkpoints" in (
        tmp_path / "files" / "results.md").read_text()

    # A real torch .pth (torch.save of a state_dict) loads to the same featurizer.
    torch = pytest.importorskip("torch")
    state = to_torch_state_dict({"params": {"featurizer": pool["textures"].featurizers[1]},
                                 "batch_stats": batch_stats}, c.arch)
    pth = tmp_path / "textures_run1.pth"
    torch.save({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, pth)
    loaded = load_aux_checkpoints([f"{pth}=textures"], PoolCheck(
        c.arch, Foundation(featurizer, batch_stats, fhash), load_dataset("digits")))
    _assert_same_tree(loaded["textures"].featurizers[0], pool["textures"].featurizers[1])
    assert loaded["textures"].manifest[0]["format"] == "torch-zip"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("aux_ckpt")
    featurizer, batch_stats, fhash = load_foundation("random", ARCH, d / "f", 16)
    pool = {name: AuxRuns([jax.tree.map(lambda x, r=r: x + 0.01 * (r + 1), featurizer)
                           for r in range(2)],
                          manifest=[{"identity": load_dataset(name).identity,
                                     "foundation": fhash}] * 2)
            for name in ("glyphs", "textures")}
    entries = export_aux_pool(pool, ARCH, d / "export", batch_stats=batch_stats)
    check = PoolCheck(ARCH, Foundation(featurizer, batch_stats, fhash), load_dataset("digits"))
    return d, pool, entries, check


def test_formats_fingerprint_and_combination_rules(setup):
    d, pool, entries, check = setup
    by_index = load_aux_checkpoints([str(d / "export" / INDEX_FILE)], check)   # the index
    as_dicts = load_aux_checkpoints(tuple({"path": e["path"], "identity": e["identity"]}
                                          for e in entries), check)            # identity strings
    for loaded in (by_index, as_dicts):
        for name in pool:
            for a, b in zip(loaded[name].featurizers, pool[name].featurizers):
                _assert_same_tree(a, b)
    assert as_dicts["glyphs"].fingerprint == by_index["glyphs"].fingerprint

    # The fingerprint follows the files' content, not their paths.
    src = pathlib.Path(entries[0]["path"])
    moved = d / "moved.safetensors"
    shutil.copy(src, moved)
    one = lambda p: load_aux_checkpoints([f"{p}=glyphs"], check)["glyphs"]  # noqa: E731
    assert one(moved).fingerprint == one(src).fingerprint
    changed = d / "changed.safetensors"
    f = pool["glyphs"].featurizers[0]
    write_safetensors(changed, to_torch_state_dict(
        {"params": {"featurizer": jax.tree.map(lambda x: x * 1.001, f)},
         "batch_stats": check.foundation.batch_stats}, ARCH))
    assert one(changed).fingerprint != one(src).fingerprint

    # An Orbax dir (export_flax, with a head of another task: dropped).
    orbax = export_flax(d / "orbax", {"params": {"featurizer": f, "classifier": {
        "kernel": np.zeros((32, 5), np.float32), "bias": np.zeros(5, np.float32)}},
        "batch_stats": check.foundation.batch_stats}, arch=ARCH)
    got = one(orbax)
    _assert_same_tree(got.featurizers[0], f)
    assert got.manifest[0]["format"] == "orbax" and got.manifest[0]["head_dropped"] == 5

    # Combination with config.aux, and the run count of the init rule.
    paths = [f"{e['path']}={e['name']}" for e in entries]
    with pytest.raises(ValueError, match="'glyphs' is also a trained auxiliary dataset"):
        load_aux_checkpoints(paths, dataclasses.replace(check, reserved_names=["glyphs"]))
    with pytest.raises(ValueError, match=r"config.n_aux_hparams=3 runs per dataset"):
        load_aux_checkpoints(paths, dataclasses.replace(check, n_runs=3))
    with pytest.raises(ValueError, match=r"files per auxiliary dataset \{'glyphs': 2, "
                                         r"'textures': 1\} differ"):
        load_aux_checkpoints(paths[:3], check)
    assert pool_runs(by_index, 4) == 2 and pool_runs({}, 4) == 4
    with pytest.raises(ValueError, match=r"\['glyphs'\] are both in config.aux"):
        merge_pools({"glyphs": pool["glyphs"]}, by_index)
    with pytest.raises(ValueError, match="PATH=DATASET"):
        load_aux_checkpoints([str(src)], check)


def test_bad_files_each_give_one_clear_error(setup):
    d, pool, entries, check = setup
    good = pathlib.Path(entries[0]["path"])
    truncated = d / "truncated.safetensors"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    unknown = d / "notes.txt"
    unknown.write_text("not a checkpoint")
    # another architecture: resnet18's tensors (more keys, other shapes)
    from rat_jax.convert import expected_shapes
    from flax.traverse_util import unflatten_dict
    r18 = unflatten_dict({p: np.zeros(s, np.float32) for p, s in expected_shapes("resnet18").items()
                          if p[:2] != ("params", "classifier")})
    other_arch = write_safetensors(d / "resnet18.safetensors", to_torch_state_dict(r18, "resnet18"))

    with pytest.raises(ValueError) as err:
        load_aux_checkpoints([f"{truncated}=glyphs", f"{unknown}=glyphs", f"{other_arch}=glyphs",
                              f"{good}=digits"], check)
    lines = str(err.value).splitlines()
    assert lines[0] == "config.aux_checkpoints: 4 bad auxiliary checkpoint(s):"
    msg = {line.strip().split(": ", 1)[0]: line for line in lines[1:]}
    assert "unreadable file: truncated or corrupt safetensors file" in msg[str(truncated)]
    assert "Fix: copy the file again" in msg[str(truncated)]
    assert "unknown or unsupported format" in msg[str(unknown)]
    wrong = msg[str(other_arch)]
    assert "does not match the foundation's architecture 'resnet_tiny'" in wrong
    assert "40 extra keys, e.g. layer1.1." in wrong and "wrong shapes, e.g. bn1.bias" in wrong
    assert "its tensors match arch 'resnet18'" in wrong
    leak = msg[str(good)]
    assert "leakage: trained on 'digits:" in leak and "the target dataset 'digits'" in leak
    assert "Fix: remove it from config.aux_checkpoints" in leak

    # A DomainBed-style file whose own args say it was trained on the target is refused too.
    torch = pytest.importorskip("torch")
    state = to_torch_state_dict({"params": {"featurizer": pool["glyphs"].featurizers[0]},
                                 "batch_stats": check.foundation.batch_stats}, ARCH)
    pkl = d / "model_best.pkl"
    torch.save({"args": {"dataset": "digits", "test_envs": [0]},
                "model_dict": {f"featurizer.{k}": torch.from_numpy(np.array(v))
                               for k, v in state.items()}}, pkl)
    with pytest.raises(ValueError, match=rf"{pkl}: leakage: trained on 'digits' \(the file's "
                                         r"own metadata, dataset\)"):
        load_aux_checkpoints([f"{pkl}=glyphs"], check)

    missing = d / "nowhere" / "run0.pth"
    with pytest.raises(FileNotFoundError, match=rf"no such file or directory: {missing}"):
        load_aux_checkpoints([f"{missing}=glyphs", f"{good}=glyphs"], check)
