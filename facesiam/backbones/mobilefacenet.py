"""MobileFaceNet (Chen et al. 2018) as in arcface_torch's ``backbones/mobilefacenet.py`` (``get_mbf``: blocks
(1, 4, 6, 2), width scale 2; ~0.45 GFLOPs at 112 px).

Written here with arcface_torch's module names, so its ``backbone.pth`` maps tensor for tensor. Its output block
GDC is a 7x7 depthwise convolution (a learned global pooling), BatchNorm, flatten, Linear without bias, BatchNorm1d.
The trunk ends with that depthwise convolution (512 values per face); the rest is exactly facesiam's ``face`` head
with dropout 0: GDC's BatchNorm2d over a 1x1 map normalises over the batch alone, as BatchNorm1d does.
"""

from __future__ import annotations

import torch
import torch.nn as nn

INPUT_SIZE = 112
"""GDC's 7x7 depthwise convolution reads a 7x7 map: 112 px in, four stride-2 layers."""


class ConvBlock(nn.Module):
    """Conv (no bias) -> BN -> PReLU."""

    def __init__(self, in_c: int, out_c: int, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups: int = 1):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups,
                                              bias=False),
                                    nn.BatchNorm2d(out_c), nn.PReLU(out_c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LinearBlock(nn.Module):
    """Conv (no bias) -> BN, no activation."""

    def __init__(self, in_c: int, out_c: int, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups: int = 1):
        super().__init__()
        self.layers = nn.Sequential(nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
                                    nn.BatchNorm2d(out_c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to ``groups`` channels, depthwise kxk (stride), 1x1 linear projection;
    with a residual connection when ``residual``."""

    def __init__(self, in_c: int, out_c: int, residual: bool = False, kernel=(3, 3), stride=(2, 2), padding=(1, 1),
                 groups: int = 1):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(ConvBlock(in_c, groups), ConvBlock(groups, groups, kernel, stride, padding, groups),
                                    LinearBlock(groups, out_c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.layers(x) if self.residual else self.layers(x)


class Residual(nn.Module):
    """``num_block`` residual DepthWise blocks at stride 1."""

    def __init__(self, c: int, num_block: int, groups: int, kernel=(3, 3), stride=(1, 1), padding=(1, 1)):
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(c, c, True, kernel, stride, padding, groups) for _ in range(num_block)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNetTrunk(nn.Module):
    """arcface_torch's MobileFaceNet up to GDC's depthwise 7x7 convolution; returns B x 512."""

    feature_shape = (512,)
    num_features = 512

    def __init__(self, blocks: tuple[int, int, int, int] = (1, 4, 6, 2), scale: int = 2):
        super().__init__()
        c1, c2 = 64 * scale, 128 * scale
        self.layers = nn.ModuleList([ConvBlock(3, c1, (3, 3), (2, 2), (1, 1))])
        if blocks[0] == 1:
            self.layers.append(ConvBlock(c1, c1, (3, 3), (1, 1), (1, 1), groups=64))
        else:
            self.layers.append(Residual(c1, blocks[0], groups=128))
        self.layers.extend([
            DepthWise(c1, c1, groups=128),
            Residual(c1, blocks[1], groups=128),
            DepthWise(c1, c2, groups=256),
            Residual(c2, blocks[2], groups=256),
            DepthWise(c2, c2, groups=512),
            Residual(c2, blocks[3], groups=256),
        ])
        self.conv_sep = ConvBlock(c2, 512)
        self.gdc = nn.Conv2d(512, 512, (7, 7), groups=512, bias=False)  # arcface_torch: features.layers.0.layers.0
        # arcface_torch's initialisation: Kaiming-normal (fan_out) convolutions, unit BN.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return torch.flatten(self.gdc(self.conv_sep(x)), 1)


_GDC = {"features.layers.0.layers.0.": "trunk.gdc.", "features.layers.0.layers.1.": "head.0.",
        "features.layers.2.": "head.2.", "features.layers.3.": "head.3."}


def from_arcface(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An arcface_torch MobileFaceNet state dict -> facesiam EmbeddingModel keys (trunk.*, the face head's head.*)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        prefix = next((p for p in _GDC if key.startswith(p)), None)
        out[(_GDC[prefix] + key[len(prefix):]) if prefix else "trunk." + key] = value
    return out


def identify_arcface(state: dict[str, torch.Tensor]) -> str | None:
    """'mobilefacenet' for an arcface_torch ``get_mbf`` state dict (its stem has 128 channels), else None."""
    stem = state.get("layers.0.layers.0.weight")
    is_mbf = stem is not None and stem.shape[0] == 128 and "conv_sep.layers.0.weight" in state
    return "mobilefacenet" if is_mbf else None
