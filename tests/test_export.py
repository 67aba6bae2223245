"""Export of a (soup) model: torch state dict (.pth / .safetensors) and standalone Orbax checkpoint.

Round trips start from the torch reference networks with random weights *and* random BN statistics
(so a swapped scale/bias/mean/var cannot cancel out), converted to Flax: export -> the exported
file loads strictly into the torch network and gives bit-identical torch logits, and
`convert_torch_checkpoint` of it gives back bit-identical Flax variables (hence identical logits;
computed for resnet_tiny and EfficientNet-Lite0 at 16/32 px).
"""
import numpy as np
import pytest
import torch

import jax
from flax.traverse_util import flatten_dict

from rat_jax import export as X
from rat_jax.convert import convert_torch_checkpoint
from rat_jax.convert.reader import read_torch_file
from rat_jax.evaluation import predict_logits
from rat_jax.models import create_model

import torch_reference as R

torch.set_num_threads(2)
C = 7


def _reference(arch, tmp_path, seed=0):
    """(torch model with random weights and BN stats, its Flax variables via the converter)."""
    model = R.randomize_(R.REFERENCES[arch](C), seed)
    path = tmp_path / f"{arch}_ref.pth"
    torch.save(model.state_dict(), path)
    return model, convert_torch_checkpoint(path, arch)


def _torch_logits(model, x_nhwc):
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))).numpy()


def _load_into_torch(arch, path):
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(str(path))
    else:
        state = torch.load(path, weights_only=True)
    model = R.REFERENCES[arch](C)
    model.load_state_dict(state, strict=True)       # every key, no extra one, same shapes
    return model.eval(), state


def _assert_same_tree(a, b):
    fa, fb = flatten_dict(a), flatten_dict(b)
    assert set(fa) == set(fb)
    for k in fa:
        assert np.asarray(fa[k]).dtype == np.asarray(fb[k]).dtype, k
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


@pytest.mark.parametrize("arch,suffix", [("resnet_tiny", ".pth"), ("resnet_tiny", ".safetensors"),
                                         ("efficientnet_lite0", ".pth")])
def test_torch_round_trip(arch, suffix, tmp_path):
    ref_model, variables = _reference(arch, tmp_path)
    out = X.export_torch(tmp_path / f"soup{suffix}", variables, arch)
    assert out.suffix == suffix and out.stat().st_size > 0
    model, state = _load_into_torch(arch, out)
    x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
    np.testing.assert_array_equal(_torch_logits(model, x), _torch_logits(ref_model, x))
    assert all(int(v) == 0 for k, v in state.items() if k.endswith("num_batches_tracked"))
    assert set(state) == set(ref_model.state_dict())
    _assert_same_tree(convert_torch_checkpoint(out, arch), variables)


def test_flax_logits_identical_after_round_trip(tmp_path):
    _, variables = _reference("resnet_tiny", tmp_path, seed=3)
    back = convert_torch_checkpoint(X.export_torch(tmp_path / "s.pth", variables, "resnet_tiny"),
                                    "resnet_tiny")
    model = create_model("resnet_tiny", C)
    x = np.random.default_rng(1).integers(0, 256, (16, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(predict_logits(model, back, x, 16),
                                  predict_logits(model, variables, x, 16))


def test_flax_logits_identical_after_round_trip_efficientnet(tmp_path):
    ref_model, variables = _reference("efficientnet_lite0", tmp_path, seed=4)
    back = convert_torch_checkpoint(X.export_torch(tmp_path / "e.safetensors", variables,
                                                   "efficientnet_lite0"), "efficientnet_lite0")
    model = create_model("efficientnet_lite0", C)
    x = np.random.default_rng(1).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(predict_logits(model, back, x, 4),
                                  predict_logits(model, variables, x, 4))


def test_key_names_and_layouts(tmp_path):
    _, v = _reference("efficientnet_lite0", tmp_path)
    sd = X.to_torch_state_dict(v, "efficientnet_lite0")
    assert sd["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)
    assert sd["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert sd["_fc.weight"].shape == (C, 1280) and sd["_fc.bias"].shape == (C,)
    assert sd["_bn0.num_batches_tracked"].dtype == np.int64
    assert "_blocks.15._bn2.running_var" in sd
    assert X.flax_path_to_torch_key(("params", "featurizer", "layer1_0", "downsample_0", "kernel"),
                                    "resnet18") == "layer1.0.downsample.0.weight"
    assert X.flax_path_to_torch_key(("batch_stats", "featurizer", "bn1", "var"),
                                    "resnet50") == "bn1.running_var"
    assert X.flax_path_to_torch_key(("params", "classifier", "kernel"), "resnet18") == "fc.weight"
    with pytest.raises(ValueError, match="unexpected"):
        X.flax_path_to_torch_key(("params", "other", "kernel"), "resnet18")


def test_auto_format_without_torch_writes_safetensors(tmp_path, monkeypatch):
    _, v = _reference("resnet_tiny", tmp_path)
    monkeypatch.setattr(X, "_torch_available", lambda: False)
    out = X.export_torch(tmp_path / "soup", v, "resnet_tiny")
    assert out.name == "soup.safetensors"
    _assert_same_tree(convert_torch_checkpoint(out, "resnet_tiny"), v)
    with pytest.raises(RuntimeError, match="safetensors"):
        X.export_torch(tmp_path / "soup.pth", v, "resnet_tiny")


def test_write_safetensors_round_trips_with_metadata(tmp_path):
    tensors = {"a.weight": np.arange(12, dtype=np.float32).reshape(3, 4),
               "a.num_batches_tracked": np.zeros((), np.int64), "b": np.array([1, 2], np.int32)}
    path = X.write_safetensors(tmp_path / "t.safetensors", tensors, {"format": "pt", "run": 3})
    back = read_torch_file(path, raw=True)
    for k, v in tensors.items():
        np.testing.assert_array_equal(back[k], v)
        assert back[k].dtype == v.dtype
    import safetensors
    with safetensors.safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == {"format": "pt", "run": "3"}
    assert not list(tmp_path.glob("*.tmp"))


def test_export_flax_round_trip(tmp_path):
    _, v = _reference("resnet_tiny", tmp_path)
    out = X.export_flax(tmp_path / "flax_soup", v, {"arch": "resnet_tiny", "image_size": 16,
                                                     "envs": (0, 1), "lr": np.float32(1e-3)})
    back, meta = X.load_flax_export(out)
    _assert_same_tree(jax.tree.map(np.asarray, back), v)
    assert meta["arch"] == "resnet_tiny" and meta["num_classes"] == C
    assert meta["format"] == X.EXPORT_FORMAT
    assert meta["config"]["envs"] == [0, 1] and abs(meta["config"]["lr"] - 1e-3) < 1e-9
    with pytest.raises(ValueError, match="arch"):
        X.export_flax(tmp_path / "x", v, {})
