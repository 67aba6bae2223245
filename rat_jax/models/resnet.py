"""torchvision-layout ResNets (v1.5: stride on the 3x3 conv) with frozen BatchNorm.

Submodules are named after the torch keys ("layer1.0.conv1" -> "layer1_0/conv1"), so converting a
torchvision state_dict is renames plus transposes. Paddings are explicit and symmetric, as torch's.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from rat_jax.models.layers import Conv, FrozenBatchNorm


def _pad(p: int):
    return ((p, p), (p, p))


class _Block(nn.Module):
    planes: int
    stride: int = 1
    downsample: bool = False
    conv_impl: str = "auto"
    expansion = 1

    def residual(self, x, y):
        """relu(y + x), with x projected (1x1 conv + BN, torch's downsample.0/.1) when needed."""
        if self.downsample:
            x = Conv(self.planes * self.expansion, 1, self.stride, impl=self.conv_impl,
                     name="downsample_0")(x)
            x = FrozenBatchNorm(name="downsample_1")(x)
        return nn.relu(y + x)


class BasicBlock(_Block):
    expansion = 1

    @nn.compact
    def __call__(self, x):
        y = Conv(self.planes, 3, self.stride, _pad(1), impl=self.conv_impl, name="conv1")(x)
        y = nn.relu(FrozenBatchNorm(name="bn1")(y))
        y = Conv(self.planes, 3, 1, _pad(1), impl=self.conv_impl, name="conv2")(y)
        return self.residual(x, FrozenBatchNorm(name="bn2")(y))


class Bottleneck(_Block):
    expansion = 4

    @nn.compact
    def __call__(self, x):
        y = Conv(self.planes, 1, impl=self.conv_impl, name="conv1")(x)
        y = nn.relu(FrozenBatchNorm(name="bn1")(y))
        y = Conv(self.planes, 3, self.stride, _pad(1), impl=self.conv_impl, name="conv2")(y)
        y = nn.relu(FrozenBatchNorm(name="bn2")(y))
        y = Conv(self.planes * 4, 1, impl=self.conv_impl, name="conv3")(y)
        return self.residual(x, FrozenBatchNorm(name="bn3")(y))


class ResNet(nn.Module):
    """ResNet featurizer: returns the global-average-pooled feature (torchvision with fc=Identity)."""
    block: type
    layers: Sequence[int]
    width: int = 64
    conv_impl: str = "auto"

    @property
    def num_features(self) -> int:
        return self.width * 8 * self.block.expansion

    @nn.compact
    def __call__(self, x, capture_stages: bool = False):
        x = Conv(self.width, 7, 2, _pad(3), impl=self.conv_impl, name="conv1")(x)
        x = nn.relu(FrozenBatchNorm(name="bn1")(x))
        x = nn.max_pool(x, (3, 3), (2, 2), padding=_pad(1))
        stages = [x]
        in_ch = self.width
        for i, n_blocks in enumerate(self.layers):
            planes = self.width * 2 ** i
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                out_ch = planes * self.block.expansion
                x = self.block(planes, stride, downsample=(j == 0 and (stride != 1 or in_ch != out_ch)),
                               conv_impl=self.conv_impl, name=f"layer{i + 1}_{j}")(x)
                in_ch = out_ch
            stages.append(x)
        feats = jnp.mean(x, axis=(1, 2))
        return (feats, stages) if capture_stages else feats


def resnet18(conv_impl="auto"):
    return ResNet(BasicBlock, (2, 2, 2, 2), conv_impl=conv_impl)


def resnet50(conv_impl="auto"):
    return ResNet(Bottleneck, (3, 4, 6, 3), conv_impl=conv_impl)


def resnet_tiny(conv_impl="auto"):
    """A small torchvision-shaped ResNet (one BasicBlock per stage, width 16) for tests and benches."""
    return ResNet(BasicBlock, (1, 1, 1, 1), width=16, conv_impl=conv_impl)
