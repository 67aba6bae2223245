"""Backbones + classifier: `create_model(arch, num_classes)`.

Parameters: {"featurizer": ..., "classifier": {"kernel", "bias"}}; frozen BN statistics live in
"batch_stats" and never change. Features only (DomainBed drops `fc`):
`model.apply(variables, images, features_only=True)`.
"""
from __future__ import annotations

from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from rat_jax.models import efficientnet_lite, resnet
from rat_jax.models.layers import CONV_IMPLS, conv2d, dropout, torch_linear_init

FEATURIZERS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet.resnet18,
    "resnet50": resnet.resnet50,
    "resnet_tiny": resnet.resnet_tiny,
    "efficientnet_lite0": lambda conv_impl="auto": efficientnet_lite.EfficientNetLite0(conv_impl),
}
ARCHS = tuple(FEATURIZERS)


class Classifier(nn.Module):
    """nn.Linear with PyTorch's default init (U(+-1/sqrt(fan_in)) for weight and bias)."""
    num_classes: int

    @nn.compact
    def __call__(self, x):
        init = torch_linear_init(x.shape[-1])
        kernel = self.param("kernel", init, (x.shape[-1], self.num_classes))
        bias = self.param("bias", init, (self.num_classes,))
        return x @ kernel.astype(x.dtype) + bias.astype(x.dtype)


class ImageClassifier(nn.Module):
    """featurizer -> dropout(rate array) -> linear classifier, as DomainBed's ERM network.

    `dtype`: the compute dtype. "bfloat16" casts the images, hence every activation (each layer
    casts its float32 params to its input's dtype), and returns float32 outputs; params, gradients
    and optimizer state stay float32 (mixed precision).
    """
    featurizer: nn.Module
    num_classes: int
    dtype: str = "float32"

    @property
    def num_features(self) -> int:
        return self.featurizer.num_features

    @nn.compact
    def __call__(self, images, train: bool = False, dropout_rate=0.0, features_only: bool = False,
                 capture_stages: bool = False):
        mixed = self.dtype != "float32"  # float32: inputs and outputs untouched
        out = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t) if mixed else t
        if mixed:
            images = jnp.asarray(images).astype(self.dtype)
        if capture_stages:  # (pooled features, [stem output, stage 1, ..., last stage])
            return out(self.featurizer(images, capture_stages=True))
        feats = self.featurizer(images)
        if features_only:
            return out(feats)
        if train:
            feats = dropout(feats, dropout_rate, self.make_rng("dropout"))
        return out(Classifier(self.num_classes, name="classifier")(feats))


COMPUTE_DTYPES = ("float32", "bfloat16")


def create_model(arch: str, num_classes: int, conv_impl: str = "auto",
                 dtype: str = "float32") -> ImageClassifier:
    """The network for `arch` in ARCHS with a `num_classes`-way linear head; `dtype` is the compute
    dtype ("bfloat16": bf16 activations, float32 params and outputs)."""
    if arch not in FEATURIZERS:
        raise ValueError(f"Unknown arch {arch!r}; choose one of {', '.join(ARCHS)}.")
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f"Unknown conv_impl {conv_impl!r}; choose one of {', '.join(CONV_IMPLS)}.")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}.")
    dtype = jnp.dtype(dtype).name
    if dtype not in COMPUTE_DTYPES:
        raise ValueError(f"Unknown compute dtype {dtype!r}; choose one of "
                         f"{', '.join(COMPUTE_DTYPES)}.")
    return ImageClassifier(FEATURIZERS[arch](conv_impl=conv_impl), num_classes, dtype=dtype,
                           name=None)


def init_variables(model: ImageClassifier, key, image_size: int = 32):
    """Random variables (torch-style init) for `model` at a given input size."""
    return model.init(key, jnp.zeros((1, image_size, image_size, 3), jnp.float32))


__all__ = ["ARCHS", "COMPUTE_DTYPES", "CONV_IMPLS", "create_model", "init_variables", "conv2d",
           "dropout"]
