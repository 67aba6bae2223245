"""Building blocks shared by every backbone: a convolution with switchable algorithm, frozen
BatchNorm, and dropout whose rate is an array.

The convolution algorithm never changes the parameter tree: every path reads the same HWIO
`kernel`, so converted torch weights load unchanged whichever path runs.
"""
from __future__ import annotations

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("auto", "xla", "im2col", "shift")
Pads = tuple[tuple[int, int], tuple[int, int]]


def tf_same_pads(in_hw: Sequence[int], kernel: int, stride: int) -> Pads:
    """TensorFlow 'SAME' padding (extra pixel at the end), as efficientnet_pytorch's same-pad convs."""
    pads = []
    for size in in_hw:
        out = math.ceil(size / stride)
        total = max((out - 1) * stride + kernel - size, 0)
        pads.append((total // 2, total - total // 2))
    return tuple(pads)


def _out_size(size: int, kernel: int, stride: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - kernel) // stride + 1


def _shifted_views(x, kh: int, kw: int, stride: int, pads: Pads):
    """The kh*kw strided windows of padded `x` that a convolution multiplies by kernel[i, j]."""
    x = jnp.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
    n, h, w, c = x.shape
    ho = (h - kh) // stride + 1
    wo = (w - kw) // stride + 1
    views = []
    for i in range(kh):
        for j in range(kw):
            views.append(lax.slice(
                x, (0, i, j, 0), (n, i + stride * (ho - 1) + 1, j + stride * (wo - 1) + 1, c),
                (1, stride, stride, 1)))
    return views


def choose_conv_impl(backend: str, in_hw: Sequence[int], kernel: int, stride: int,
                     cin: int, groups: int) -> str:
    """The default algorithm per backend and shape (measured by bench/conv_paths.py).

    Accelerators: XLA's native convolution. CPU: a 1x1 conv is a plain matmul; depthwise convs
    a sum of shifted elementwise products; strided k x k convs and k x k convs on tiny maps
    patches + matmul, where XLA:CPU's native conv is slow; XLA's own conv otherwise (it wins on
    larger stride-1 maps). Numbers: docs/benchmarks.md.
    """
    if backend != "cpu":
        return "xla"
    if groups > 1:
        return "shift"
    if kernel == 1 or stride > 1:
        return "im2col"
    return "im2col" if in_hw[0] * in_hw[1] <= CPU_IM2COL_MAX_PIXELS else "xla"


# Stride-1 k x k convs on feature maps up to this many pixels use patches + matmul on CPU.
CPU_IM2COL_MAX_PIXELS = 16


def conv2d(x, kernel, stride: int, pads: Pads, groups: int = 1, impl: str = "auto"):
    """NHWC x HWIO convolution with explicit padding; `impl` picks the algorithm."""
    kh, kw, cin_g, cout = kernel.shape
    cin = x.shape[-1]
    if impl == "auto":
        impl = choose_conv_impl(jax.default_backend(), x.shape[1:3], kh, stride, cin, groups)
    if impl not in CONV_IMPLS:
        raise ValueError(f"conv_impl={impl!r} is unknown; use one of {CONV_IMPLS}.")
    if impl == "xla":
        return lax.conv_general_dilated(
            x, kernel, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=groups)
    if groups == 1:
        if kh == kw == 1:
            (pt, pb), (pl, pr) = pads
            if pt or pb or pl or pr:
                x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
            if stride > 1:
                x = x[:, ::stride, ::stride, :]
            return jnp.einsum("nhwc,cd->nhwd", x, kernel[0, 0])
        views = _shifted_views(x, kh, kw, stride, pads)
        if impl == "shift":  # sum of per-offset matmuls: no kh*kw-wide patch tensor
            out = views[0] @ kernel[0, 0]
            for idx, v in enumerate(views[1:], start=1):
                out = out + v @ kernel[idx // kw, idx % kw]
            return out
        patches = jnp.concatenate(views, axis=-1)
        return patches @ kernel.reshape(kh * kw * cin, cout)
    if groups == cin == cout and cin_g == 1:  # depthwise
        views = _shifted_views(x, kh, kw, stride, pads)
        out = views[0] * kernel[0, 0, 0]
        for idx, v in enumerate(views[1:], start=1):
            out = out + v * kernel[idx // kw, idx % kw, 0]
        return out
    return lax.conv_general_dilated(  # other grouped convs: only XLA implements them
        x, kernel, (stride, stride), pads, dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=groups)


def torch_conv_init(key, shape, dtype=jnp.float32):
    """Kaiming-normal, fan_out, as torchvision initialises ResNet convs."""
    kh, kw, _, cout = shape
    std = math.sqrt(2.0 / (kh * kw * cout))
    return std * jax.random.normal(key, shape, dtype)


class Conv(nn.Module):
    """2-D convolution, no bias, explicit padding ((top, bottom), (left, right)) or "tf_same"."""
    features: int
    kernel_size: int
    stride: int = 1
    padding: Pads | str = ((0, 0), (0, 0))
    groups: int = 1
    impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        cin = x.shape[-1]
        kernel = self.param("kernel", torch_conv_init, (k, k, cin // self.groups, self.features))
        pads = (tf_same_pads(x.shape[1:3], k, self.stride) if self.padding == "tf_same"
                else self.padding)
        return conv2d(x, kernel.astype(x.dtype), self.stride, pads, self.groups, self.impl)


class FrozenBatchNorm(nn.Module):
    """BatchNorm in inference mode always (DomainBed): running stats fixed, scale/bias trainable."""
    epsilon: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,))
        bias = self.param("bias", nn.initializers.zeros, (c,))
        mean = self.variable("batch_stats", "mean", jnp.zeros, (c,)).value
        var = self.variable("batch_stats", "var", jnp.ones, (c,)).value
        mult = scale * lax.rsqrt(var + self.epsilon)
        return x * mult.astype(x.dtype) + (bias - mean * mult).astype(x.dtype)


def dropout(x, rate, rng):
    """Inverted dropout whose `rate` may be a traced array (one per member); rate 0 is identity."""
    keep = 1.0 - jnp.asarray(rate, jnp.float32)
    mask = jax.random.bernoulli(rng, keep, x.shape)
    return jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros_like(x))


def torch_linear_init(fan_in: int):
    """PyTorch nn.Linear default: weight and bias ~ U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return functools.partial(_uniform, bound=bound)


def _uniform(key, shape, dtype=jnp.float32, bound=1.0):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
