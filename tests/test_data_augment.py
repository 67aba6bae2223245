"""Device-side augmentation (rat_jax.data.augment) against the PIL reference (transforms.py).

Tolerance: every op is bit-identical to Pillow on x86-64 (TOL = 0 on the 0-255 scale); on other
machines Pillow itself may round differently (e.g. FMA contraction in its C code), so up to 1.
"""
import math
import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image, ImageEnhance
from scipy import stats

from rat_jax.data import augment as A
from rat_jax.data import transforms as T

TOL = 0 if platform.machine().lower() in ("x86_64", "amd64") else 1


def _photo(w, h, seed):
    """A smooth random colour image (closer to a photo than uniform noise)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (h // 6 + 2, w // 6 + 2, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR))


def _noise(w, h, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _check(got, ref, what):
    diff = np.abs(np.asarray(got).astype(int) - np.asarray(ref).astype(int))
    assert diff.max() <= TOL, f"{what}: max abs diff {diff.max()} at {np.argwhere(diff > TOL)[:3]}"


# -- exact arithmetic building blocks ---------------------------------------------------------
def test_div_exact_is_correctly_rounded():
    j = np.arange(256, dtype=np.float32)
    by_255 = jax.jit(lambda x: A._div_exact(x, 255))(j)
    assert np.array_equal(np.asarray(by_255), j / np.float32(255))
    x = np.random.default_rng(0).uniform(-1, 5, 200_000).astype(np.float32)
    x = np.concatenate([x, np.float32([0, 1, 2, 3, 4, 5, -1, 0.5, 2.5])])
    assert np.array_equal(np.asarray(jax.jit(lambda v: A._div_exact(v, 6))(x)), x / np.float32(6))


def test_hsv_conversions_match_pil():
    """Pillow's RGB->HSV and HSV->RGB (also checked offline on all 2^24 inputs)."""
    rng = np.random.default_rng(1)
    rand = rng.integers(0, 256, (1 << 17, 3), dtype=np.uint8)
    a, b = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    a, b = a.ravel(), b.ravel()
    ties = np.concatenate([np.stack(p, -1) for p in ((a, a, b), (a, b, a), (b, a, a))])
    rgb = np.concatenate([rand, ties.astype(np.uint8)])
    pix = rgb.reshape(1, -1, 3)
    hsv_ref = np.asarray(Image.fromarray(pix).convert("HSV"))[0]
    hsv = jax.jit(lambda x: jnp.stack(A._rgb_to_hsv(x.astype(jnp.int32)), -1))(rgb)
    assert np.array_equal(np.asarray(hsv), hsv_ref)

    hues = np.array([0, 1, 42, 43, 84, 85, 86, 127, 128, 170, 171, 212, 213, 254, 255])
    h, s, v = (m.ravel() for m in np.meshgrid(hues, np.arange(256), np.arange(256), indexing="ij"))
    hsv_in = np.concatenate([rng.integers(0, 256, (1 << 17, 3)), np.stack([h, s, v], -1)])
    hsv_in = hsv_in.astype(np.uint8)
    hsv_img = Image.frombytes("HSV", (len(hsv_in), 1), hsv_in.tobytes())
    rgb_ref = np.asarray(hsv_img.convert("RGB"))[0]
    back = jax.jit(lambda x: A._hsv_to_rgb(*(x.astype(jnp.int32)[:, k] for k in range(3))))(hsv_in)
    assert np.array_equal(np.asarray(back), rgb_ref)


# -- single ops, identical parameters ---------------------------------------------------------
IMAGES = [_noise(256, 256, 0), _photo(48, 40, 1), _photo(40, 48, 2)]
FACTORS = [0.7, np.nextafter(np.float32(0.7), np.float32(1)), 0.81, 0.999, 1.0, 1.0001, 1.17, 1.3]


@pytest.mark.parametrize("name", ["brightness", "contrast", "saturation"])
def test_enhance_ops_match_pil(name):
    op = jax.jit({"brightness": A.adjust_brightness, "contrast": A.adjust_contrast,
                  "saturation": A.adjust_saturation}[name])
    enhancer = {"brightness": ImageEnhance.Brightness, "contrast": ImageEnhance.Contrast,
                "saturation": ImageEnhance.Color}[name]
    factors = FACTORS + list(np.random.default_rng(3).uniform(0.7, 1.3, 6))
    for img in IMAGES:
        for f in np.float32(factors):
            got = op(img, f)
            assert got.dtype == jnp.uint8 and got.shape == img.shape
            _check(got, enhancer(Image.fromarray(img)).enhance(float(f)), f"{name} {f}")


def test_hue_matches_reference():
    op = jax.jit(A.adjust_hue)
    factors = [-0.3, -0.11, -1 / 255, 0.0, 1 / 255, 0.07, 0.3] + list(
        np.random.default_rng(4).uniform(-0.3, 0.3, 5))
    for img in IMAGES:
        for f in np.float32(factors):
            _check(op(img, f), T.adjust_hue(Image.fromarray(img), float(f)), f"hue {f}")


def test_grayscale_and_flip_match_pil():
    for img in IMAGES:
        _check(A.to_grayscale(img), Image.fromarray(img).convert("L").convert("RGB"), "gray")
        _check(A.hflip(img), Image.fromarray(img).transpose(Image.FLIP_LEFT_RIGHT), "flip")


def _pil_resized_crop(img, top, left, h, w, size):
    return Image.fromarray(img).crop((left, top, left + w, top + h)).resize((size, size),
                                                                           Image.BILINEAR)


@pytest.mark.parametrize("top,left,h,w,size", [
    (4, 0, 40, 40, 24),   # downscale 40 -> 24 (antialiased: support 1.67 px)
    (8, 0, 32, 37, 24),   # downscale, non-square crop
    (10, 12, 24, 24, 40),  # upscale 24 -> 40
    (0, 3, 17, 30, 24),   # up in one axis, down in the other
    (0, 0, 48, 40, 24),   # the whole image
    (0, 6, 48, 28, 24),   # height shrinks by > 2x the pixels width does: newer Pillow's
                          # vertical-first pass order
])
def test_resized_crop_matches_pil(top, left, h, w, size):
    img = _photo(40, 48, 5)
    _check(A.resized_crop(img, top, left, h, w, size),
           _pil_resized_crop(img, top, left, h, w, size), "resized_crop")


def test_resized_crop_random_windows_match_pil():
    rng = np.random.default_rng(6)
    for shape in ((48, 40), (40, 48)):
        img = _noise(shape[1], shape[0], 7)
        for size in (24, 40):
            op = jax.jit(lambda i, t, l, h, w: A.resized_crop(i, t, l, h, w, size))
            for _ in range(25):
                h, w = (int(rng.integers(1, n + 1)) for n in shape)
                t = int(rng.integers(0, shape[0] - h + 1))
                l = int(rng.integers(0, shape[1] - w + 1))  # noqa: E741
                _check(op(img, t, l, h, w), _pil_resized_crop(img, t, l, h, w, size),
                       f"crop {(t, l, h, w)} -> {size}")


def test_resize_pass_orders():
    """Both Pillow pass orders: horizontal first (older Pillow, always) against a numpy
    emulation of Pillow's integer resampler; the installed Pillow is probed."""
    assert isinstance(A.pillow_vertical_first(), bool)
    img = _noise(40, 48, 8)
    for (top, left, h, w, size) in [(0, 0, 48, 40, 24), (4, 6, 40, 20, 24), (2, 2, 20, 30, 32)]:
        crop = img[top:top + h, left:left + w].astype(np.int64)
        kw, kh = A._pillow_coefficients_np(w, size), A._pillow_coefficients_np(h, size)
        assert np.array_equal(np.asarray(A.resize_coefficients(0, w, size, w)), kw)

        def one(k, x, spec):
            return np.clip((np.einsum(spec, k, x) + (1 << 21)) >> 22, 0, 255)
        ref = one(kh, one(kw, crop, "ow,hwc->hoc"), "ph,hoc->poc")
        got = A.resized_crop(img, top, left, h, w, size, vertical_first=False)
        assert np.array_equal(np.asarray(got), ref)


def test_normalize_matches_reference():
    x = _noise(32, 16, 9)
    assert np.array_equal(np.asarray(jax.jit(A.normalize)(x)), T.normalize(x))


# -- the whole transform -------------------------------------------------------------------------
def _whole_transform_check(images, size, n_keys, seed):
    h, w = images[0].shape[:2]
    keys = jax.random.split(jax.random.key(seed), n_keys)
    params = jax.jit(jax.vmap(lambda k: A.draw_params(k, h, w)))(keys)
    apply = jax.jit(jax.vmap(lambda im, p: A.apply_params(im, p, size), in_axes=(None, 0)))
    for img in images:
        got = np.asarray(apply(img, params))
        for i in range(n_keys):
            p = {k: np.asarray(v[i]) for k, v in params.items()}
            _check(got[i], A.reference_apply(img, p, size), f"whole transform {p}")
    return params


def test_whole_transform_matches_reference():
    params = _whole_transform_check([_noise(40, 48, 10), _photo(40, 48, 11)], 32, 24, seed=0)
    assert params["grayscale"].any() and params["flip"].any() and not params["flip"].all()
    # augment = apply_params with draw_params(key) + normalize
    img = _photo(40, 48, 11)
    keys = jax.random.split(jax.random.key(0), 24)
    out = np.asarray(A.augment_batch(keys, np.stack([img] * 24), 32))
    ref = T.normalize(np.stack([A.reference_apply(img, {k: np.asarray(v[i]) for k, v in
                                                        params.items()}, 32) for i in range(24)]))
    assert out.dtype == np.float32 and np.abs(out - ref).max() <= TOL * 0.02


def test_whole_transform_on_pacs_photos(pacs_root):
    paths = [sorted((pacs_root / d / "dog").iterdir())[0] for d in ("photo", "art_painting",
                                                                      "cartoon")]
    images = [np.asarray(T.decode(str(p)).resize((227, 227), Image.BILINEAR)) for p in paths]
    _whole_transform_check(images, 224, 4, seed=1)


def test_reference_harness_is_the_reference_transform():
    for seed in range(12):
        img = Image.fromarray(_photo(40, 48, seed))
        rng = np.random.default_rng(seed)
        expected = T.train_transform_uint8(img, 24, np.random.default_rng(seed))
        assert np.array_equal(A.reference_apply(img, A.reference_params(rng, 40, 48), 24), expected)


# -- parameter distributions -----------------------------------------------------------------------
def test_parameter_distributions_match_reference():
    n, height, width = 4000, 120, 150
    p = jax.jit(jax.vmap(lambda k: A.draw_params(k, height, width)))(
        jax.random.split(jax.random.key(42), n))
    p = {k: np.asarray(v) for k, v in p.items()}
    rng = np.random.default_rng(42)
    r = [A.reference_params(rng, width, height) for _ in range(n)]
    r = {k: np.array([d[k] for d in r]) for k in r[0]}

    def ks(a, b, what, bound=0.05):
        stat = stats.ks_2samp(a, b).statistic
        assert stat < bound, f"{what}: KS statistic {stat:.3f}"
    area = lambda d: d["height"] * d["width"] / (height * width)  # noqa: E731
    ks(area(p), area(r), "crop area fraction")
    ks(p["width"] / p["height"], r["width"] / r["height"], "crop aspect ratio")
    rel = lambda d, k, n, m: d[k] / np.maximum(n - d[m], 1)  # noqa: E731
    ks(rel(p, "top", height, "height"), rel(r, "top", height, "height"), "relative top")
    ks(rel(p, "left", width, "width"), rel(r, "left", width, "width"), "relative left")
    assert 0.69 <= area(p).min() and area(p).max() <= 1.0
    assert 0.74 <= (p["width"] / p["height"]).min() and (p["width"] / p["height"]).max() <= 1.35
    for k, lo, hi in [("brightness", 0.7, 1.3), ("contrast", 0.7, 1.3), ("saturation", 0.7, 1.3),
                      ("hue", -0.3, 0.3)]:
        assert lo <= p[k].min() and p[k].max() <= hi, k
        ks(p[k], r[k], k)
        ks(p[k], stats.uniform(lo, hi - lo).rvs(n, random_state=0), f"{k} vs U({lo}, {hi})")
    se = lambda q: 4 * math.sqrt(q * (1 - q) / n)  # noqa: E731  (4 standard errors)
    assert abs(p["flip"].mean() - 0.5) < se(0.5) and abs(r["flip"].mean() - 0.5) < se(0.5)
    assert abs(p["grayscale"].mean() - 0.1) < se(0.1) and abs(r["grayscale"].mean() - 0.1) < se(0.1)
    for d in (p, r):  # a uniform permutation: each op at each position ~25%
        assert all(sorted(o) == [0, 1, 2, 3] for o in d["order"][:200])
        share = np.stack([(d["order"][:, pos] == op).mean() for pos in range(4) for op in range(4)])
        assert np.abs(share - 0.25).max() < se(0.25)


def test_fallback_crop_matches_reference():
    """No attempt fits a 10x200 image: the centred crop clamped to the ratio range."""
    for key in jax.random.split(jax.random.key(0), 3):
        p = A.draw_params(key, 10, 200)
        assert tuple(int(p[k]) for k in ("top", "left", "height", "width")) == \
            T.crop_params(np.random.default_rng(0), 200, 10)


# -- determinism, vmap, compilation ---------------------------------------------------------------
def test_deterministic_vmapped_and_compiled_once():
    images = np.stack([_photo(40, 48, s) for s in range(4)])
    keys = jax.random.split(jax.random.key(7), 4)
    before = A.augment_batch._cache_size()
    a = np.asarray(A.augment_batch(keys, images, 24))
    b = np.asarray(A.augment_batch(keys, images, 24))
    c = np.asarray(A.augment_batch(jax.random.split(jax.random.key(8), 4), images, 24))
    assert a.shape == (4, 24, 24, 3) and a.dtype == np.float32
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert A.augment_batch._cache_size() == before + 1  # one compilation for this batch shape
    single = np.stack([np.asarray(A.augment(k, im, 24)) for k, im in zip(keys, images)])
    assert np.array_equal(single, a)  # the batch is the per-image transform
    assert len({a[i].tobytes() for i in range(4)}) == 4
