"""Face recognition backbones written here (arcface_torch's IResNet and MobileFaceNet), chosen by name beside timm's.

``model.backbone: iresnet50`` picks an entry of ``BACKBONES`` (facesiam/registry.py); any other name is a timm model.
An entry builds the trunk: the convolutional body, whose output (``trunk.feature_shape``) feeds the ``face`` head
(model.build_head), which is the rest of arcface_torch's network (BN, dropout, flatten, FC, BN1d). So an arcface_torch
``backbone.pth`` of the same architecture loads with ``--pretrained backbone.pth`` (model.load_face_backbone_weights):
``from_arcface`` recognises the architecture and renames its tensors, and every one of them must fit.

These networks are built for 112x112 aligned faces: their output block reads a 7x7 map (``input_size``).
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from ..errors import InputError
from ..registry import Registry
from . import iresnet, mobilefacenet

if TYPE_CHECKING:
    from ..config import ModelConfig

BACKBONES = Registry("backbone")
"""name -> build() -> trunk module with ``feature_shape``. Info: ``input_size`` (pixels the architecture needs),
``arcface_name`` (arcface_torch's get_model name), ``from_arcface`` (its state dict -> facesiam EmbeddingModel keys),
``frozen_embedding_scale`` (arcface_torch keeps the last BatchNorm's scale at 1: the face head's is not trained)."""

for _name, _layers in iresnet.IRESNET_LAYERS.items():
    BACKBONES.register(_name, functools.partial(iresnet.IResNetTrunk, _layers),
                       doc=f"arcface_torch's r{_name[7:]} (IResNet, {sum(_layers)} blocks; 112 px)",
                       input_size=iresnet.INPUT_SIZE, arcface_name=f"r{_name[7:]}", from_arcface=iresnet.from_arcface,
                       identify_arcface=iresnet.identify_arcface, frozen_embedding_scale=True)

BACKBONES.register("mobilefacenet", mobilefacenet.MobileFaceNetTrunk,
                   doc="arcface_torch's mbf (MobileFaceNet, ~0.45 GFLOPs; 112 px)", input_size=mobilefacenet.INPUT_SIZE,
                   arcface_name="mbf", from_arcface=mobilefacenet.from_arcface,
                   identify_arcface=mobilefacenet.identify_arcface, frozen_embedding_scale=False)


def build_trunk(cfg: ModelConfig) -> nn.Module:
    """The trunk of a registered face backbone; a clear error when the config cannot use it."""
    entry = BACKBONES.get(cfg.backbone)
    if cfg.image_size != entry.info["input_size"]:
        raise InputError(f"backbone {cfg.backbone} needs model.image_size {entry.info['input_size']} (its head reads a "
                         f"7x7 map), not {cfg.image_size}: set --image-size {entry.info['input_size']}")
    if cfg.pretrained == "hub":
        raise InputError(f"backbone {cfg.backbone} has no model-hub weights: use --pretrained none, an arcface_torch "
                         f"backbone.pth ({entry.info['arcface_name']}) or a facesiam export")
    return entry.build()


def identify_arcface(state: dict[str, torch.Tensor]) -> str | None:
    """Which registered backbone an arcface_torch state dict is for, or None."""
    for entry in BACKBONES:
        name = entry.info["identify_arcface"](state)
        if name is not None:
            return name
    return None


def from_arcface(state: dict[str, torch.Tensor]) -> tuple[str, dict[str, torch.Tensor]] | None:
    """(backbone name, facesiam EmbeddingModel state dict: trunk.* and the face head's head.*) of an arcface_torch
    backbone state dict (``module.`` prefixes of a DDP-wrapped save removed), or None when it is not one."""
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    name = identify_arcface(state)
    return None if name is None else (name, BACKBONES.get(name).info["from_arcface"](state))
