"""DomainBed's training augmentation as pure jnp ops, for use inside a compiled step on device.

The same transform as `transforms.train_transform_uint8` + `transforms.normalize` (the PIL
reference mode): RandomResizedCrop(size, scale=(0.7, 1), ratio=(3/4, 4/3)) with PIL's bilinear
resize -> horizontal flip (p=0.5) -> ColorJitter(0.3, 0.3, 0.3, 0.3) with its four ops in a random
order -> RandomGrayscale(0.1) -> ImageNet normalization.

API
- `draw_params(key, height, width)` -> dict of jnp values: `top`, `left`, `height`, `width` (the
  crop window, torchvision's 10-attempt algorithm and fallback), `flip` (bool), `brightness`,
  `contrast`, `saturation` (factors ~ U[1-j, 1+j]), `hue` (~ U[-j, j]), `order` (int32[4], a
  permutation; 0 brightness, 1 contrast, 2 saturation, 3 hue, as in `transforms.color_jitter`),
  `grayscale` (bool). jit/vmap-able (static height/width).
- single-image ops, uint8 in, uint8 out (any integer array with values in [0, 255] is accepted):
  `resized_crop`, `hflip`, `adjust_brightness`, `adjust_contrast`, `adjust_saturation`,
  `adjust_hue`, `to_grayscale`; `apply_params(image, params, size)` chains them exactly as the
  reference does; `normalize(uint8) -> float32`.
- `augment(key, image, size)` -> float32 [size, size, 3] normalized; `augment_batch(keys [N],
  images [N, H, W, 3], size)` is its vmap (jitted, `size` static). Same key, same output.
- `reference_params(rng, width, height)` / `reference_apply(image, params, size)`: the PIL
  reference driven by explicit parameters (numpy draws in the order `train_transform_uint8`
  makes them; `reference_apply(img, reference_params(rng, ...), size)` equals
  `train_transform_uint8(img, size, rng)`). For tests and benchmarks.

Matching the PIL reference (Pillow's C code, emulated operation by operation):
- resize: Pillow's two-pass fixed-point resampler (uint8 between the passes) with the bilinear
  (triangle) filter whose support grows with the downscale factor. Pass order: horizontal
  first, except that newer Pillow (the installed 13.0 does; `pillow_vertical_first()` probes
  the installed one) resamples vertically first when the height shrinks by more than twice as
  many pixels as the width. The 22-bit integer coefficients are computed exactly in int32 (the
  rational weights, rounded as Pillow rounds them); each pass is a float32 matmul against the
  coefficients split into two small-integer parts, so every partial sum is an exactly
  representable integer (precision=HIGHEST). The crop window and the flip are folded into the
  coefficient matrices. Exact up to ~10,000 px crops (224-px output) and 100x downscaling;
  beyond, `resize_coefficients` raises.
- Brightness/Contrast/Color: Pillow's `Image.blend` (float32 `in1 + alpha*(in2-in1)`,
  truncated, clipped), the contrast mean `int(mean(L) + 0.5)` and L = (19595 R + 38470 G +
  7471 B + 2^15) >> 16 in integers. Products are formed from exact partial products, so that an
  FMA contraction by the compiler cannot change a rounding.
- hue: Pillow's RGB->HSV->RGB conversions (float32 divisions; its double-precision steps done
  exactly with split products, integer mantissas or float-float sums), the uint8 hue shift
  int(h*255) mod 256. XLA turns x / constant into x * (1 / constant), which is not correctly
  rounded; `_div_exact` corrects that.
- grayscale: Pillow's L conversion; normalize: the same float32 ops as `transforms.normalize`.

Checked against the PIL reference on XLA:CPU by tests/test_data_augment.py: every op is
bit-identical -- max abs diff 0 on the 0-255 scale -- for identical parameters
(brightness/contrast/saturation/hue factors incl. the range ends, downscale 40 -> 24 and
upscale 24 -> 40 crops, 100 random crop windows both pass orders, grayscale, flip), and so is
the whole transform with parameters from `draw_params` (random and smooth 48x40 images, PACS
photos at 224 px); normalized outputs equal `transforms.normalize` bit for bit. RGB->HSV and
HSV->RGB hold on all 2^24 inputs. On accelerators the result relies on IEEE float32 division
and true-f32 matmuls (GPUs have both; TPU division is not IEEE, so rare +-1 differences are
possible there). Its cost per image: docs/benchmarks.md.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from rat_jax.data.transforms import WINDOW_PARAMS, train_params, window_params  # noqa: F401
from rat_jax.data.transforms import (GRAYSCALE_P, IMAGENET_MEAN, IMAGENET_STD, JITTER, RATIO,
                                     SCALE, fallback_crop)

PRECISION_BITS = 22  # Pillow's Resample.c fixed point (32 - 8 - 2)
_F32 = jnp.float32
_I32 = jnp.int32
_U32 = jnp.uint32


# -- exact float32 building blocks -------------------------------------------------------------
def _split(x, low_bits):
    """x == hi + lo exactly; hi keeps 24 - low_bits significant bits, lo at most low_bits."""
    bits = lax.bitcast_convert_type(x, _I32)
    hi = lax.bitcast_convert_type(bits & _I32(-(1 << low_bits)), _F32)
    return hi, x - hi


def _two_sum(a, b):
    """s + err == a + b exactly (Knuth)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def _two_prod(a, b):
    """p + err == a * b exactly (Dekker, with bit-mask splits)."""
    p = a * b
    a1, a2 = _split(a, 12)
    b1, b2 = _split(b, 12)
    return p, ((a1 * b1 - p) + a1 * b2 + a2 * b1) + a2 * b2


def _floor_sum(a, b):
    """floor(a + b) of the exact sum of two float32 values (|a + b| < 2^23), as int32."""
    s, e = _two_sum(a, b)
    k = jnp.floor(s)
    return (k - ((s == k) & (e < 0)).astype(_F32)).astype(_I32)


def _floor_mul(x, c):
    """floor(x * c) of the exact product; c a constant with at most 8 significant bits."""
    hi, lo = _split(x, 8)
    return _floor_sum(hi * _F32(c), lo * _F32(c))


def _div_exact(x, c: int):
    """float32(x / c) correctly rounded, for c = 6 or 255 and the operands used here (a quotient
    that is never within 2^-40 of a rounding midpoint). XLA rewrites a division by a constant
    or a broadcast scalar into a multiplication by the reciprocal, which is not correctly
    rounded; the product is corrected once with its exact residual x - c * q."""
    q = x * np.float32(1.0 / c)
    hi, lo = _split(q, 8)
    residual = (x - hi * _F32(c)) - lo * _F32(c)  # exact
    return q + residual * np.float32(1.0 / c)


def _mul_rounded(x, alpha):
    """float32(x * alpha) correctly rounded, for x an integer-valued float32 with |x| < 2^8.
    Built from exact partial products, so a fused multiply-add cannot skip the rounding."""
    hi, lo = _split(alpha, 8)
    return hi * x + lo * x


def _ceil_mul_minus_half(v, p):
    """ceil(v * p - 1/2) for v int32 in [0, 255] and float32 p in [0, 1], exactly (integers)."""
    bits = lax.bitcast_convert_type(p, _I32)
    k = 150 - ((bits >> 23) & 0xFF)  # p == m * 2^-k (k >= 23)
    m = ((bits & 0x7FFFFF) | 0x800000).astype(_U32)
    vm = v.astype(_U32) * m  # < 2^32
    kc = jnp.clip(k, 1, 32).astype(_U32)
    shift = jnp.minimum(kc, _U32(31))
    n = jnp.where(kc >= 32, _U32(0), vm >> shift)
    rem = jnp.where(kc >= 32, vm, vm & ((_U32(1) << shift) - _U32(1)))
    half = _U32(1) << (kc - _U32(1))
    out = n.astype(_I32) + (rem > half).astype(_I32)
    return jnp.where((k > 32) | (p == 0), 0, out)  # k > 32: v * p < 1/2


def _as_int(image):
    return jnp.asarray(image).astype(_I32)


# -- resize ------------------------------------------------------------------------------------
def _round_div_2pow22(w, s):
    """floor(w * 2^22 / s + 1/2) in int32 (w < 2^20, 0 < s < 2^20), by two 11-bit long steps."""
    a = w << 11
    q1, r1 = a // s, a % s
    b = r1 << 11
    q2, r2 = b // s, b % s
    return (q1 << 11) + q2 + (2 * r2 >= s).astype(_I32)


def resize_coefficients(start, length, out_size: int, in_len: int):
    """Pillow's fixed-point bilinear coefficients [out_size, in_len] (int32) resampling the
    window [start, start + length) of an axis of in_len pixels to out_size pixels.

    Pillow: scale = length / out; filterscale = max(scale, 1); support = filterscale; the
    weight of input pixel j for output x is 1 - |j + 0.5 - (x + 0.5) * scale| / filterscale
    (clipped at 0), normalized to sum 1 and rounded to int(0.5 + k * 2^22). In integers:
    W_j = max(0, 2 max(length, out) - |(2j + 1) out - (2x + 1) length|)."""
    # int32 long division needs sum(W) < 2^20; the low-part matmul needs < 258 taps
    if (2 * in_len * in_len // out_size + 4 * (in_len + out_size) >= 2 ** 20
            or 2 * in_len // out_size + 3 >= 256):
        raise ValueError(f"resize of {in_len} px to {out_size} px is outside the exact range")
    start, length = jnp.asarray(start, _I32), jnp.asarray(length, _I32)
    j = jnp.arange(in_len, dtype=_I32) - start
    x = jnp.arange(out_size, dtype=_I32)
    d = (2 * j[None, :] + 1) * out_size - (2 * x[:, None] + 1) * length
    w = jnp.maximum(0, 2 * jnp.maximum(length, out_size) - jnp.abs(d))
    w = jnp.where((j >= 0) & (j < length), w, 0)
    s = jnp.maximum(w.sum(axis=1, keepdims=True), 1)
    return _round_div_2pow22(w, s)


def _resample(coeffs, image, axis: int):
    """One Pillow pass along `axis` (1: columns, 0: rows): sum_j c_j x_j + 2^21 >> 22, clipped
    to [0, 255], exactly. coeffs (int32 <= 2^22) = hi * 256 + lo: both float32 matmuls sum
    integers < 2^24."""
    n = coeffs.shape[0]
    both = jnp.concatenate([coeffs >> 8, coeffs & 255], axis=0).astype(_F32)
    spec = "ow,hwc->hoc" if axis == 1 else "ph,hoc->poc"
    out = jnp.einsum(spec, both, image.astype(_F32), precision=lax.Precision.HIGHEST,
                     preferred_element_type=_F32).astype(_I32)
    s_hi, s_lo = lax.slice_in_dim(out, 0, n, axis=axis), lax.slice_in_dim(out, n, 2 * n, axis=axis)
    total = (s_hi << 8) + s_lo + (1 << (PRECISION_BITS - 1))
    return jnp.clip(total >> PRECISION_BITS, 0, 255)


def _pillow_coefficients_np(n: int, out: int) -> np.ndarray:
    j, x = np.arange(n), np.arange(out)
    w = np.maximum(0, 2 * max(n, out) - np.abs((2 * j[None] + 1) * out - (2 * x[:, None] + 1) * n))
    s = w.sum(axis=1, keepdims=True)
    return (w * (1 << 23) + s) // (2 * s)


@functools.lru_cache(maxsize=None)
def pillow_vertical_first() -> bool:
    """Whether the installed Pillow resamples vertically first when the height shrinks by more
    than twice as many pixels as the width (newer Pillow does; older Pillow always resamples
    horizontally first). Probed once on a 40x12 -> 10x10 resize, where the two orders differ."""
    try:
        from PIL import Image
    except ImportError:  # no reference to match: the newer behaviour
        return True
    img = np.random.default_rng(0).integers(0, 256, (40, 12, 3), dtype=np.uint8)
    ref = np.asarray(Image.fromarray(img).resize((10, 10), Image.BILINEAR))

    def one_pass(k, x, spec):
        return np.clip((np.einsum(spec, k, x) + (1 << 21)) >> 22, 0, 255)
    tmp = one_pass(_pillow_coefficients_np(12, 10), img.astype(np.int64), "ow,hwc->hoc")
    return not np.array_equal(ref, one_pass(_pillow_coefficients_np(40, 10), tmp, "ph,hoc->poc"))


def _resized_crop(image, top, left, h, w, size, flip=False, vertical_first=None):
    """Crop + Pillow bilinear resize (+ flip of the result), int32 in and out."""
    image = _as_int(image)
    if vertical_first is None:
        vertical_first = pillow_vertical_first()
    if not vertical_first:
        kw = resize_coefficients(left, w, size, image.shape[1])
        kh = resize_coefficients(top, h, size, image.shape[0])
        kw = jnp.where(flip, kw[::-1], kw)  # flipping the output columns == hflip after resize
        return _resample(kh, _resample(kw, image, 1), 0)  # horizontal pass first, uint8 between
    # Pillow's order depends on the crop: run "first pass along columns" on the image or on its
    # transpose (padded square so both have one shape), then transpose back.
    side = max(image.shape[0], image.shape[1])
    image = jnp.pad(image, ((0, side - image.shape[0]), (0, side - image.shape[1]), (0, 0)))
    kw = resize_coefficients(left, w, size, side)
    kh = resize_coefficients(top, h, size, side)
    kw = jnp.where(flip, kw[::-1], kw)
    v_first = (h > size) & (h - size > 2 * (w - size))
    x = jnp.where(v_first, image.transpose(1, 0, 2), image)
    out = _resample(jnp.where(v_first, kw, kh), _resample(jnp.where(v_first, kh, kw), x, 1), 0)
    return jnp.where(v_first, out.transpose(1, 0, 2), out)


def resized_crop(image, top, left, h, w, size: int, *, vertical_first=None):
    """PIL `img.crop((left, top, left + w, top + h)).resize((size, size), BILINEAR)`.
    `vertical_first`: Pillow's pass-order rule (None: that of the installed Pillow)."""
    return _resized_crop(image, top, left, h, w, size,
                         vertical_first=vertical_first).astype(jnp.uint8)


def hflip(image):
    """PIL `transpose(FLIP_LEFT_RIGHT)`."""
    return jnp.asarray(image)[:, ::-1]


# -- colour ops (Pillow ImageEnhance / convert) ------------------------------------------------
def _luma(image):
    """Pillow RGB -> L: (19595 R + 38470 G + 7471 B + 0x8000) >> 16."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    return (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16


def _blend(base, image, alpha):
    """Pillow Image.blend(base, image, alpha): float32 base + alpha * (image - base), truncated."""
    alpha = jnp.asarray(alpha, _F32)
    temp = base.astype(_F32) + _mul_rounded((image - base).astype(_F32), alpha)
    return jnp.clip(jnp.floor(temp), 0, 255).astype(_I32)


def _brightness(image, factor):
    return _blend(jnp.zeros_like(image), image, factor)


def _contrast(image, factor):
    total = _luma(image).sum()
    count = image.shape[0] * image.shape[1]
    mean = (2 * total + count) // (2 * count)  # int(sum / count + 0.5)
    return _blend(jnp.broadcast_to(mean, image.shape), image, factor)


def _saturation(image, factor):
    return _blend(jnp.broadcast_to(_luma(image)[..., None], image.shape), image, factor)


def _grayscale(image):
    return jnp.broadcast_to(_luma(image)[..., None], image.shape)


def _rgb_to_hsv(image):
    """Pillow rgb2hsv on int32 [..., 3] -> (h, s, v) int32."""
    r, g, b = image[..., 0], image[..., 1], image[..., 2]
    maxc = jnp.maximum(r, jnp.maximum(g, b))
    minc = jnp.minimum(r, jnp.minimum(g, b))
    flat = maxc == minc
    cr = jnp.where(flat, 1, maxc - minc).astype(_F32)
    s = cr / jnp.maximum(maxc, 1).astype(_F32)
    rc = (maxc - r).astype(_F32) / cr
    gc = (maxc - g).astype(_F32) / cr
    bc = (maxc - b).astype(_F32) / cr
    # Pillow: h = bc - gc (float) | 2.0 + rc - bc | 4.0 + gc - rc (double, stored as float);
    # the channel at the minimum has coefficient exactly 1, so the double sum is one rounding.
    h_g = jnp.where(r == minc, 3.0 - bc, 1.0 + rc)
    h_b = jnp.where(r == minc, 3.0 + gc, 5.0 - rc)
    h = jnp.where(r == maxc, bc - gc, jnp.where(g == maxc, h_g, h_b))
    # Pillow: h = fmod(h / 6.0 + 1.0, 1.0) in double, stored in the float h, then
    # (int)(h * 255.0) (an exact double product). The stored float is the correctly rounded
    # h / 6 for h >= 0 and 1 + h / 6 for h < 0 (ties, which round-to-even, are exact doubles).
    d = _div_exact(h, 6)
    p6, e6 = _two_prod(_F32(6), d)
    s1, e1 = _two_sum(_F32(1), d)
    wrapped = s1 + (e1 + ((h - p6) - e6) * _F32(1 / 6))  # 1 + h / 6 rounded once
    hq = _floor_mul(jnp.where(h < 0, wrapped, d), 255.0)
    sq = _floor_mul(s, 255.0)  # (int)(s * 255.0): the double product is exact
    return jnp.where(flat, 0, hq), jnp.where(flat, 0, sq), maxc


def _round_t(v, fs, f):
    """Pillow's t = round(v * (1.0 - fs * (1.0 - f))) (double arithmetic), via float-float."""
    g1, g2 = _two_sum(_F32(1), -f)
    x1, e1 = _two_prod(fs, g1)
    x2 = e1 + fs * g2
    w1, e2 = _two_sum(_F32(1), -x1)
    w2 = e2 - x2
    vf = v.astype(_F32)
    w1h, w1l = _split(w1, 8)
    a, b, c = vf * w1h, vf * w1l, vf * w2  # a, b exact
    s1, e3 = _two_sum(a, _F32(0.5))
    s2, e4 = _two_sum(s1, b)
    k = jnp.floor(s2)
    frac = (s2 - k) + ((e3 + e4) + c)
    return k.astype(_I32) + (frac >= 1).astype(_I32) - (frac < 0).astype(_I32)


def _hsv_to_rgb(h, s, v):
    """Pillow hsv2rgb on int32 (h, s, v) -> int32 [..., 3]."""
    i = (2 * h) // 85  # floor(h * 6.0 / 255.0)
    f = _div_exact(((6 * h) % 255).astype(_F32), 255)  # (float)(h * 6.0 / 255.0 - i)
    fs = _div_exact(s.astype(_F32), 255)
    p = v - _ceil_mul_minus_half(v, fs)  # round(v * (1.0 - fs)), exact in double
    q = v - _ceil_mul_minus_half(v, fs * f)  # round(v * (1.0 - (float)(fs * f)))
    t = _round_t(v, fs, f)
    sector = i % 6

    def pick(opts):  # opts[sector]; s == 0: v
        out = opts[5]
        for k in range(4, -1, -1):
            out = jnp.where(sector == k, opts[k], out)
        return jnp.where(s == 0, v, out)
    return jnp.stack([pick([v, q, p, p, t, v]), pick([t, v, v, q, p, p]),
                      pick([p, p, t, v, v, q])], axis=-1)


def _hue_shift(hue_factor):
    """int(hue_factor * 255) % 256 (truncation toward zero, as the reference)."""
    hf = jnp.asarray(hue_factor, _F32)
    mag = _floor_mul(jnp.abs(hf), 255.0)
    return jnp.where(hf < 0, -mag, mag) % 256


def _hue(image, hue_factor=None, shift=None):
    """The hue op by its factor, or by its uint8 shift int(f * 255) mod 256 when given (the
    host computes it in double precision, exactly as the reference does)."""
    h, s, v = _rgb_to_hsv(image)
    shift = _hue_shift(hue_factor) if shift is None else jnp.asarray(shift, _I32)
    return _hsv_to_rgb((h + shift) % 256, s, v)


def adjust_brightness(image, factor):
    """PIL `ImageEnhance.Brightness(img).enhance(factor)`."""
    return _brightness(_as_int(image), factor).astype(jnp.uint8)


def adjust_contrast(image, factor):
    """PIL `ImageEnhance.Contrast(img).enhance(factor)` (blend with the mean of L)."""
    return _contrast(_as_int(image), factor).astype(jnp.uint8)


def adjust_saturation(image, factor):
    """PIL `ImageEnhance.Color(img).enhance(factor)` (blend with L)."""
    return _saturation(_as_int(image), factor).astype(jnp.uint8)


def adjust_hue(image, hue_factor):
    """`transforms.adjust_hue`: PIL HSV round trip with the hue shifted by int(f*255) mod 256."""
    return _hue(_as_int(image), hue_factor).astype(jnp.uint8)


def to_grayscale(image):
    """PIL `img.convert("L").convert("RGB")`."""
    return _grayscale(_as_int(image)).astype(jnp.uint8)


# -- parameters --------------------------------------------------------------------------------
def draw_params(key, height: int, width: int, *, scale=SCALE, ratio=RATIO, jitter=JITTER,
                grayscale_p=GRAYSCALE_P) -> dict:
    """One draw of every random choice of the training transform (see the module docstring).

    Crop: torchvision RandomResizedCrop.get_params -- 10 attempts of area fraction ~ U(scale)
    and log-uniform aspect ratio, w = round(sqrt(area * ratio)), h = round(sqrt(area / ratio));
    the first that fits is placed uniformly, else the centred fallback crop."""
    keys = jax.random.split(key, 11)
    area = float(height * width)
    frac = jax.random.uniform(keys[0], (10,), _F32, scale[0], scale[1])
    log_r = jax.random.uniform(keys[1], (10,), _F32, math.log(ratio[0]), math.log(ratio[1]))
    target, aspect = area * frac, jnp.exp(log_r)
    ws = jnp.round(jnp.sqrt(target * aspect)).astype(_I32)  # round half to even, as Python
    hs = jnp.round(jnp.sqrt(target / aspect)).astype(_I32)
    ok = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
    first = jnp.argmax(ok)
    found = ok.any()
    f_top, f_left, f_h, f_w = fallback_crop(height, width, ratio)
    h = jnp.where(found, hs[first], f_h)
    w = jnp.where(found, ws[first], f_w)
    top = jnp.where(found, jax.random.randint(keys[2], (), 0, height - h + 1), f_top)
    left = jnp.where(found, jax.random.randint(keys[3], (), 0, width - w + 1), f_left)
    lo = max(0.0, 1.0 - jitter)
    return {
        "top": top.astype(_I32), "left": left.astype(_I32), "height": h, "width": w,
        "flip": jax.random.bernoulli(keys[4], 0.5),
        "brightness": jax.random.uniform(keys[5], (), _F32, lo, 1.0 + jitter),
        "contrast": jax.random.uniform(keys[6], (), _F32, lo, 1.0 + jitter),
        "saturation": jax.random.uniform(keys[7], (), _F32, lo, 1.0 + jitter),
        "hue": jax.random.uniform(keys[8], (), _F32, -jitter, jitter),
        "order": jax.random.permutation(keys[9], 4).astype(_I32),
        "grayscale": jax.random.uniform(keys[10], (), _F32) < grayscale_p,
    }


# -- the whole transform -----------------------------------------------------------------------
def _blend_op(image, which, params):
    """brightness (0), contrast (1), saturation (2) or nothing (-1), as one Pillow blend:
    all three blend the image with a base (0, the mean of L, L); alpha 1 is the identity."""
    luma = _luma(image)
    count = image.shape[0] * image.shape[1]
    mean = (2 * luma.sum() + count) // (2 * count)  # int(sum / count + 0.5)
    base = jnp.where(which == 0, 0, jnp.where(which == 1, mean, luma))[..., None]
    factors = jnp.stack([params["brightness"], params["contrast"], params["saturation"]])
    alpha = jnp.where(which < 0, _F32(1), factors.astype(_F32)[jnp.clip(which, 0, 2)])
    return _blend(jnp.broadcast_to(base, image.shape), image, alpha)


def _color_jitter(image, params):
    """The four jitter ops in params["order"]; the hue op (the costly one) is computed once."""
    order = params["order"]
    hue_at = jnp.argmax(order == 3)
    rest = order[jnp.argsort(jnp.where(order == 3, 4, jnp.arange(4)))][:3]  # order without hue
    for i in range(3):
        image = _blend_op(image, jnp.where(i < hue_at, rest[i], -1), params)
    image = _hue(image, params.get("hue"), params.get("hue_shift"))
    for i in range(3):
        image = _blend_op(image, jnp.where(i >= hue_at, rest[i], -1), params)
    return image


def apply_params(image, params: dict, size: int):
    """The training transform with explicit parameters, before normalization: uint8 [H, W, 3]
    -> uint8 [size, size, 3]. Without `top` / `left` the window starts at (0, 0); `hue_shift`
    (int) may replace `hue`."""
    x = _resized_crop(image, params.get("top", 0), params.get("left", 0), params["height"],
                      params["width"], size, params["flip"])
    x = _color_jitter(x, params)
    x = jnp.where(params["grayscale"], _grayscale(x), x)
    return x.astype(jnp.uint8)


def normalize(images_uint8):
    """`transforms.normalize` in jnp (same float32 operations): uint8 [..., 3] -> float32."""
    x = _mul_rounded(jnp.asarray(images_uint8).astype(_F32), np.float32(1 / 255))
    x = x - jnp.asarray(IMAGENET_MEAN)
    return x * jnp.asarray((1 / IMAGENET_STD).astype(np.float32))


def augment(key, image_uint8, size: int):
    """The whole training transform of one image: uint8 [H, W, 3] -> float32 [size, size, 3]."""
    image = jnp.asarray(image_uint8)
    params = draw_params(key, image.shape[0], image.shape[1])
    return normalize(apply_params(image, params, size))


@functools.partial(jax.jit, static_argnames=("size",))
def augment_batch(keys, images_uint8, size: int):
    """`augment` over a batch: keys [N] (one per image), uint8 [N, H, W, 3] -> float32
    [N, size, size, 3]."""
    return jax.vmap(augment, in_axes=(0, 0, None))(keys, images_uint8, size)


# -- the loader's device mode: windows shipped by the host, the rest in the compiled step -------
def window_batch(canvases, params: dict, size: int):
    """Finish the training transform of a batch of crop windows on device.

    canvases: uint8 [N, C, C, 3], each holding its crop window at the top-left corner
    (params["height"], params["width"]: the window's size; a window the host already resized
    is (size, size), which resizes as the identity). params: WINDOW_PARAMS, each [N, ...].
    Returns normalized float32 [N, size, size, 3], equal to the reference transform of the
    same draws (see the module docstring for where equality is measured)."""
    one = lambda image, p: apply_params(image, p, size)
    return normalize(jax.vmap(one)(canvases, {k: params[k] for k in WINDOW_PARAMS}))


def model_input(images, params: dict | None = None, size: int | None = None):
    """What the compiled step feeds the network: float32 images as they are, uint8 images
    normalized, and crop-window canvases (params given) augmented and normalized."""
    if params:
        return window_batch(images, params, size)
    if images.dtype == jnp.uint8:
        return normalize(images)
    return images


# -- the PIL reference with explicit parameters -------------------------------------------------
def reference_params(rng: np.random.Generator, width: int, height: int) -> dict:
    """The parameters `transforms.train_transform_uint8` draws from `rng`, in its order."""
    return train_params(rng, width, height)


def reference_apply(image, params: dict, size: int) -> np.ndarray:
    """The PIL reference transform (no normalization) with explicit parameters (numpy or jnp
    values): uint8 [size, size, 3]."""
    from PIL import Image, ImageEnhance
    from rat_jax.data import transforms as T
    p = {k: np.asarray(v) for k, v in params.items()}
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    top, left, h, w = (int(p[k]) for k in ("top", "left", "height", "width"))
    img = img.crop((left, top, left + w, top + h)).resize((size, size), Image.BILINEAR)
    if bool(p["flip"]):
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    for fn in p["order"]:
        if fn == 0:
            img = ImageEnhance.Brightness(img).enhance(float(p["brightness"]))
        elif fn == 1:
            img = ImageEnhance.Contrast(img).enhance(float(p["contrast"]))
        elif fn == 2:
            img = ImageEnhance.Color(img).enhance(float(p["saturation"]))
        else:
            img = T.adjust_hue(img, float(p["hue"]))
    if bool(p["grayscale"]):
        img = img.convert("L").convert("RGB")
    return np.asarray(img, dtype=np.uint8)
