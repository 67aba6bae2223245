"""Plain-torch reference networks (no torchvision) with the torchvision / efficientnet_pytorch key
layouts, used to check the converter and the Flax models numerically.

* ``resnet18()``, ``resnet50()``, ``resnet_tiny()``: torchvision ResNet v1.5 (stride on the 3x3 conv
  of Bottleneck; downsample = Sequential(1x1 conv, BN)); keys ``conv1.weight``,
  ``layer1.0.downsample.0.weight``, ``fc.weight`` ... exactly as torchvision's.
* ``efficientnet_lite0()``: efficientnet_pytorch-style EfficientNet-Lite0 (keys ``_conv_stem``,
  ``_bn0``, ``_blocks.i._expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2``, ``_conv_head``,
  ``_bn1``, ``_fc``): B0 block arguments without squeeze-excitation, ReLU6, stem 32 / head 1280,
  BatchNorm eps 1e-3, TensorFlow 'SAME' padding (efficientnet_pytorch's static same-padding conv:
  the odd pixel at the bottom/right). ``padding="symmetric"`` gives torch-style k//2 padding instead,
  to show which one the real weights were trained with.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


# ------------------------------------------------------------------------------------------------
# ResNet (torchvision layout)
# ------------------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)  # v1.5: stride here
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    def __init__(self, block, layers, num_classes=1000, width=64):
        super().__init__()
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, width * 2, layers[1], stride=2)
        self.layer3 = self._make_layer(block, width * 4, layers[2], stride=2)
        self.layer4 = self._make_layer(block, width * 8, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(width * 8 * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stages(self, x):
        """[after stem+maxpool, layer1, layer2, layer3, layer4] (NCHW)."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        out = [x]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            out.append(x)
        return out

    def features(self, x):
        return torch.flatten(self.avgpool(self.stages(x)[-1]), 1)

    def forward(self, x):
        return self.fc(self.features(x))


def resnet18(num_classes=1000):
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes)


def resnet50(num_classes=1000):
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes)


def resnet_tiny(num_classes=10):
    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes, width=16)


# ------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 (efficientnet_pytorch layout)
# ------------------------------------------------------------------------------------------------
# (repeats, kernel, stride, expand_ratio, in, out): EfficientNet-B0's block arguments.
LITE0_BLOCKS = [(1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320)]
BN_EPS = 1e-3


class SameConv2d(nn.Conv2d):
    """Conv2d with TensorFlow 'SAME' padding computed from the input size (pad extra at the end),
    or torch-style symmetric k//2 padding when ``padding_mode_ref='symmetric'``."""

    def __init__(self, *args, padding_mode_ref="tf_same", **kwargs):
        super().__init__(*args, padding=0, **kwargs)
        self.padding_mode_ref = padding_mode_ref

    def forward(self, x):
        k, s = self.kernel_size[0], self.stride[0]
        if self.padding_mode_ref == "symmetric":
            p = k // 2
            x = F.pad(x, [p, p, p, p])
        else:
            ih, iw = x.shape[-2:]
            ph = max((math.ceil(ih / s) - 1) * s + k - ih, 0)
            pw = max((math.ceil(iw / s) - 1) * s + k - iw, 0)
            if ph or pw:
                x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class MBConvBlock(nn.Module):
    def __init__(self, kernel, stride, expand, cin, cout, padding="tf_same"):
        super().__init__()
        mid = cin * expand
        self.expand, self.skip = expand, (stride == 1 and cin == cout)
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1, bias=False, padding_mode_ref=padding)
            self._bn0 = nn.BatchNorm2d(mid, momentum=0.01, eps=BN_EPS)
        self._depthwise_conv = SameConv2d(mid, mid, kernel, stride, groups=mid, bias=False,
                                          padding_mode_ref=padding)
        self._bn1 = nn.BatchNorm2d(mid, momentum=0.01, eps=BN_EPS)
        self._project_conv = SameConv2d(mid, cout, 1, bias=False, padding_mode_ref=padding)
        self._bn2 = nn.BatchNorm2d(cout, momentum=0.01, eps=BN_EPS)

    def forward(self, inputs):
        x = inputs
        if self.expand != 1:
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.skip else x


class EfficientNetLite(nn.Module):
    def __init__(self, num_classes=1000, padding="tf_same", dropout=0.2):
        super().__init__()
        self._conv_stem = SameConv2d(3, 32, 3, 2, bias=False, padding_mode_ref=padding)
        self._bn0 = nn.BatchNorm2d(32, momentum=0.01, eps=BN_EPS)
        blocks, self.stage_ends = [], []
        for repeats, k, s, e, cin, cout in LITE0_BLOCKS:
            for r in range(repeats):
                blocks.append(MBConvBlock(k, s if r == 0 else 1, e, cin if r == 0 else cout, cout, padding))
            self.stage_ends.append(len(blocks) - 1)
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1, bias=False, padding_mode_ref=padding)
        self._bn1 = nn.BatchNorm2d(1280, momentum=0.01, eps=BN_EPS)
        self._avg_pooling = nn.AdaptiveAvgPool2d(1)
        self._dropout = nn.Dropout(dropout)
        self._fc = nn.Linear(1280, num_classes)

    def stages(self, x):
        """[stem, each of the 7 block groups, head conv+BN+ReLU6] (NCHW), as rat_jax captures them."""
        x = F.relu6(self._bn0(self._conv_stem(x)))
        out = [x]
        for i, block in enumerate(self._blocks):
            x = block(x)
            if i in self.stage_ends:
                out.append(x)
        out.append(F.relu6(self._bn1(self._conv_head(x))))
        return out

    def features(self, x):
        return torch.flatten(self._avg_pooling(self.stages(x)[-1]), 1)

    def forward(self, x):
        return self._fc(self._dropout(self.features(x)))


def efficientnet_lite0(num_classes=1000, padding="tf_same"):
    return EfficientNetLite(num_classes, padding)


REFERENCES = {"resnet18": resnet18, "resnet50": resnet50, "resnet_tiny": resnet_tiny,
              "efficientnet_lite0": efficientnet_lite0}


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights and random BN statistics/affine parameters, so that a wrong mapping of
    scale/bias/mean/var (or a wrong eps) cannot cancel out. Returns the model in eval mode."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            m.weight.copy_(torch.randn(m.weight.shape, generator=g) * math.sqrt(2.0 / fan_in))
        elif isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.weight.copy_(0.5 + torch.rand(c, generator=g))
            m.bias.copy_(0.2 * torch.randn(c, generator=g))
            m.running_mean.copy_(0.2 * torch.randn(c, generator=g))
            m.running_var.copy_(0.5 + torch.rand(c, generator=g))
        elif isinstance(m, nn.Linear):
            bound = 1.0 / math.sqrt(m.in_features)
            m.weight.copy_((torch.rand(m.weight.shape, generator=g) * 2 - 1) * bound)
            m.bias.copy_((torch.rand(m.bias.shape, generator=g) * 2 - 1) * bound)
    # Damp each residual branch (its last BN) so activations stay O(1) through deep nets and a
    # fixed absolute tolerance on the logits stays meaningful.
    for m in model.modules():
        last_bn = {BasicBlock: "bn2", Bottleneck: "bn3", MBConvBlock: "_bn2"}.get(type(m))
        if last_bn is not None:
            bn = getattr(m, last_bn)
            bn.weight.mul_(0.2)
            bn.bias.mul_(0.2)
    return model.eval()
