"""Transforms: torchvision semantics on PIL, determinism, normalization."""
import numpy as np
import pytest
from PIL import Image, ImageEnhance

from rat_jax.data import transforms as T


def _photo(w=120, h=90, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 6 + 1, w // 6 + 1, 3), dtype=np.uint8)
    return Image.fromarray(base).resize((w, h), Image.BILINEAR)


def test_crop_params_in_range():
    rng = np.random.default_rng(0)
    for _ in range(300):
        top, left, h, w = T.crop_params(rng, 227, 180)
        assert 0 <= top and top + h <= 180 and 0 <= left and left + w <= 227
        assert 0.69 <= h * w / (227 * 180) <= 1.01
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02


@pytest.mark.parametrize("width,height,expected", [
    (1000, 10, (0, (1000 - 13) // 2, 10, 13)),   # too wide: h=height, w=round(h*4/3)
    (10, 1000, ((1000 - 13) // 2, 0, 13, 10)),   # too tall: w=width, h=round(w/(3/4))
])
def test_crop_params_fallback(width, height, expected):
    assert T.crop_params(np.random.default_rng(0), width, height) == expected


class _MaxRng:
    """Always the upper bound: full area at ratio 4/3, never fits a square."""
    def uniform(self, low, high):
        return high


def test_crop_params_fallback_whole_image():
    assert T.crop_params(_MaxRng(), 50, 50) == (0, 0, 50, 50)


def _hue_reference(img, factor):
    # torchvision F_pil.adjust_hue
    h, s, v = img.convert("HSV").split()
    np_h = np.array(h, dtype=np.uint8)
    np_h += np.uint8(int(factor * 255) % 256)
    return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB")


@pytest.mark.parametrize("factor", [-0.3, -0.11, 0.0, 0.07, 0.3])
def test_adjust_hue_matches_torchvision(factor):
    img = _photo()
    assert np.array_equal(np.asarray(T.adjust_hue(img, factor)), np.asarray(_hue_reference(img, factor)))


def test_color_jitter_is_the_pil_ops_in_drawn_order():
    img, seed = _photo(), 3
    got = T.color_jitter(img, np.random.default_rng(seed))
    rng = np.random.default_rng(seed)
    order = rng.permutation(4)
    b, c, s = (rng.uniform(0.7, 1.3) for _ in range(3))
    hue = rng.uniform(-0.3, 0.3)
    ops = [lambda x: ImageEnhance.Brightness(x).enhance(b),
           lambda x: ImageEnhance.Contrast(x).enhance(c),
           lambda x: ImageEnhance.Color(x).enhance(s),
           lambda x: _hue_reference(x, hue)]
    ref = img
    for i in order:
        ref = ops[i](ref)
    assert np.array_equal(np.asarray(got), np.asarray(ref))


def test_train_transform_deterministic_and_varied():
    img = _photo()
    a = T.train_transform_uint8(img, 32, np.random.default_rng(7))
    b = T.train_transform_uint8(img, 32, np.random.default_rng(7))
    c = T.train_transform_uint8(img, 32, np.random.default_rng(8))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_grayscale_and_flip_rates():
    img = _photo(64, 64)
    rng = np.random.default_rng(0)
    gray = sum(np.ptp(T.train_transform_uint8(img, 16, rng).astype(int), axis=-1).max() == 0
               for _ in range(600))
    assert 30 <= gray <= 95  # p = 0.1 (a colour image is grey only after RandomGrayscale)
    flips = sum(np.random.default_rng(s).random() < 0.5 for s in range(10))  # sanity of draw
    assert 0 < flips < 10


def test_eval_transform_is_pil_bilinear_resize():
    img = _photo(120, 90)
    ref = np.asarray(img.resize((48, 48), Image.BILINEAR))
    assert np.array_equal(T.eval_transform_uint8(img, 48), ref)


def test_normalize():
    x = np.array([[[0, 128, 255]]], np.uint8)
    ref = (x / 255.0 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    out = T.normalize(x)
    assert out.dtype == np.float32 and np.allclose(out, ref, atol=1e-6)
