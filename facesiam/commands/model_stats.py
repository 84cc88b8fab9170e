"""facesiam model-stats: parameters and compute of embedding networks, for choosing a backbone.

    python tools/model_stats.py                          # every face backbone of facesiam/backbones at 112 px
    python tools/model_stats.py iresnet50 tf_efficientnetv2_b0 --image-size 112

GMACs (multiply-accumulates, what arcface_torch's model zoo and the papers call GFLOPs: "r50 6.3", "mbf 0.45G") and
GFLOPs (2 per multiply-add), counted by torch.utils.flop_counter.FlopCounterMode (convolutions and matrix products)
on the meta device: nothing is allocated or computed, so iresnet200 costs no more than a toy. arcface_torch's flops.py
counts with ptflops, which also adds BatchNorm, PReLU and additions (~1-3% of these networks).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.flop_counter import FlopCounterMode

from ..backbones import BACKBONES
from ..config import ModelConfig
from ..model import build_model
from . import command


@dataclass(frozen=True)
class ModelStats:
    """What one embedding network costs, for one image."""

    backbone: str
    image_size: int
    params: int
    """All parameters, trunk and head (frozen ones included)."""
    trainable: int
    """Parameters with requires_grad."""
    flops: int
    """Forward FLOPs of one image, 2 per multiply-add (FlopCounterMode: convolutions and matrix products)."""

    @property
    def gmacs(self) -> float:
        """Multiply-accumulates in billions: what the face-recognition literature calls GFLOPs."""
        return self.flops / 2e9


def model_stats(cfg: ModelConfig) -> ModelStats:
    """Count ``cfg``'s network (built without weights, on the meta device) for one image of cfg.image_size."""
    cfg = dataclasses.replace(cfg, pretrained="none")
    with torch.device("meta"):
        model = build_model(cfg).eval()
        images = torch.empty(1, 3, cfg.image_size, cfg.image_size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(images)
    return ModelStats(cfg.backbone, cfg.image_size, sum(p.numel() for p in model.parameters()),
                      sum(p.numel() for p in model.parameters() if p.requires_grad), counter.get_total_flops())


@command("model_stats")
def main(argv: Optional[list[str]] = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="model_stats", description=__doc__.splitlines()[0].split(": ", 1)[1])
    parser.add_argument("backbones", nargs="*", metavar="BACKBONE",
                        help=f"face backbones ({', '.join(BACKBONES.names())}; default: all) or timm model names")
    parser.add_argument("--image-size", type=int, default=112, help="square input size in pixels (default 112)")
    parser.add_argument("--embedding-dim", type=int, default=512, help="embedding size (default 512)")
    parser.add_argument("--head", choices=("face", "linear"), default="face", help="embedding head (default face)")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'backbone':<24} {'params (M)':>10} {'trainable (M)':>13} {'GMACs':>8} {'GFLOPs':>8}   "
          f"at {args.image_size}x{args.image_size}, {args.head} head, {args.embedding_dim}-d")
    for name in args.backbones or BACKBONES.names():
        stats = model_stats(ModelConfig(backbone=name, image_size=args.image_size, embedding_dim=args.embedding_dim,
                                        head=args.head))
        print(f"{name:<24} {stats.params / 1e6:>10.2f} {stats.trainable / 1e6:>13.2f} {stats.gmacs:>8.3f} "
              f"{stats.flops / 1e9:>8.3f}")
        rows.append({"backbone": name, "params": stats.params, "trainable": stats.trainable, "flops": stats.flops,
                     "gmacs": stats.gmacs})
    print("GMACs: multiply-accumulates (the 'GFLOPs' of arcface_torch's model zoo and the papers); GFLOPs: 2 per MAC "
          "(torch FlopCounterMode: convolutions and matrix products)")
    return rows
