"""IResNet (Deng et al., ArcFace, CVPR 2019; "improved residual unit" BN-Conv-BN-PReLU-Conv-BN) as in arcface_torch.

Written here (arcface_torch is not a package) with the module names of arcface_torch's ``backbones/iresnet.py``, so
its ``backbone.pth`` files map tensor for tensor. The trunk is the convolutional body: a 112x112 face becomes a
512x7x7 map (``feature_shape``). arcface_torch's output block -- BatchNorm2d over that map, dropout, flatten, a fully
connected layer over all 7x7x512 values and BatchNorm1d -- is facesiam's ``face`` head built for a spatial feature
(model.build_head): ``bn2`` -> head.0, ``fc`` -> head.3, ``features`` -> head.4 (``from_arcface``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
}
"""Blocks per stage; arcface_torch's r18 ... r200."""

INPUT_SIZE = 112
"""The fully connected layer of the head reads a 7x7 map: 112 px in, four stride-2 stages."""


class IBasicBlock(nn.Module):
    """BN -> 3x3 conv -> BN -> PReLU -> 3x3 conv (stride) -> BN, plus the (projected) shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=1e-5)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes, eps=1e-5)
        self.prelu = nn.PReLU(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes, eps=1e-5)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return out + (self.downsample(x) if self.downsample is not None else x)


class IResNetTrunk(nn.Module):
    """Stem (3x3 conv, BN, PReLU at full resolution) and four stages of IBasicBlocks (64, 128, 256, 512 channels, each
    starting with stride 2); returns the B x 512 x 7 x 7 map of a 112 px face."""

    feature_shape = (512, 7, 7)

    def __init__(self, layers: tuple[int, int, int, int]):
        super().__init__()
        self.num_features = 512 * 7 * 7
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1])
        self.layer3 = self._make_layer(256, layers[2])
        self.layer4 = self._make_layer(512, layers[3])
        # arcface_torch's initialisation (it trains from it): N(0, 0.1) convolutions, unit BN.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int) -> nn.Sequential:
        downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes, 1, stride=2, bias=False),
                                   nn.BatchNorm2d(planes, eps=1e-5))
        layers = [IBasicBlock(self.inplanes, planes, 2, downsample)]
        self.inplanes = planes
        layers += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def from_arcface(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An arcface_torch IResNet state dict -> facesiam EmbeddingModel keys (trunk.* and the face head's head.*).

    arcface_torch's ``fc`` has a bias and is followed by BatchNorm1d (``features``); facesiam's head Linear has none.
    The bias is folded into the BatchNorm's running mean (BN(Wx + b) with mean mu is BN(Wx) with mean mu - b): the
    same function in eval mode, and in training mode the batch mean removes any bias anyway.
    """
    out: dict[str, torch.Tensor] = {}
    head = {"bn2.": "head.0.", "fc.": "head.3.", "features.": "head.4."}
    for key, value in state.items():
        prefix = next((p for p in head if key.startswith(p)), None)
        out[(head[prefix] + key[len(prefix):]) if prefix else "trunk." + key] = value
    bias = out.pop("head.3.bias", None)
    if bias is not None and "head.4.running_mean" in out:
        out["head.4.running_mean"] = out["head.4.running_mean"] - bias.to(out["head.4.running_mean"].dtype)
    return out


def identify_arcface(state: dict[str, torch.Tensor]) -> str | None:
    """The facesiam name of an arcface_torch IResNet state dict (from its blocks per stage), or None."""
    blocks = []
    for stage in range(1, 5):
        ids = {int(k.split(".")[1]) for k in state if k.startswith(f"layer{stage}.") and k.split(".")[1].isdigit()}
        blocks.append(max(ids) + 1 if ids else 0)
    return next((name for name, layers in IRESNET_LAYERS.items() if tuple(blocks) == layers), None)
