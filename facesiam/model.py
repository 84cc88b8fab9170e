"""The embedding network: a trunk (timm's, or a face backbone of facesiam/backbones) plus an embedding head,
L2-normalised; export and reload for inference.

The model knows nothing about parallelism, losses or file formats of the data: the trainer wraps it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from dataclasses import asdict, fields
from pathlib import Path
from typing import Callable, Iterator, Optional

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

from .backbones import BACKBONES, build_trunk, from_arcface
from .config import ModelConfig
from .errors import FacesiamError, InputError
from .fileio import staged_directory

log = logging.getLogger("facesiam.model")

EXPORT_FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class PretrainedWeightsError(FacesiamError, RuntimeError):
    """Pretrained weights were asked for but cannot be loaded."""


class EmbeddingModel(nn.Module):
    """trunk (timm's pooled features, or a face backbone's feature map) -> head -> L2-normalised embedding (float32)."""

    def __init__(self, trunk: nn.Module, head: nn.Module):
        super().__init__()
        self.trunk = trunk
        self.head = head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.trunk(images)
        # Normalise in fp32: under bf16 autocast the norm of a 512-d vector loses digits that cosine scores need.
        return F.normalize(self.head(features).float(), dim=-1)


def embed_with_mirror(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The LFW convention: a face's embedding is the sum of the model's embeddings of the face and of its mirror
    image (NCHW batches, flipped along the width), normalised; ``evaluate --flip`` and ``export --flip`` both.

    One pass over the batch and its mirror images together (the model is in eval mode: each image's embedding is
    its own): one larger batch runs faster than two, and an exported graph holds one copy of the network, which
    onnxruntime's optimiser and quantizer would otherwise copy for each pass."""
    emb = model(torch.cat([images, torch.flip(images, dims=[3])])).float()
    return F.normalize(emb.reshape(2, -1, emb.shape[1]).sum(dim=0), dim=1)


@contextlib.contextmanager
def batch_statistics(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode, except that BatchNorm layers normalise with each batch's own statistics, as they do in training.

    For computing the embeddings a loss sees at a training step without training: dropout is off, and the running
    statistics (and every other buffer) are restored on exit. The model's previous mode is restored too.
    """
    was_training = model.training
    saved = {name: b.clone() for name, b in model.named_buffers()}
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()
    try:
        yield model
    finally:
        model.train(was_training)
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(saved[name])


def build_head(kind: str, in_features: int | tuple[int, ...], embedding_dim: int, dropout: float = 0.0) -> nn.Module:
    """The seed's plain Linear, or the BN-Dropout-Linear-BN embedding head used by arcface_torch-style models.

    in_features: the trunk's feature size, or the (C, H, W) shape of a trunk that returns a map (facesiam/backbones'
    IResNet: 512x7x7). On a map the face head is arcface_torch's output block: BatchNorm2d over the channels, dropout,
    flatten, Linear over all C*H*W values, BatchNorm1d; the linear head flattens the map before its Linear.
    """
    shape = (in_features,) if isinstance(in_features, int) else tuple(in_features)
    flat = math.prod(shape)
    if kind == "linear":
        return nn.Linear(flat, embedding_dim) if len(shape) == 1 else nn.Sequential(nn.Flatten(1),
                                                                                      nn.Linear(flat, embedding_dim))
    if kind == "face":
        norm = nn.BatchNorm1d(shape[0]) if len(shape) == 1 else nn.BatchNorm2d(shape[0])
        flatten = [] if len(shape) == 1 else [nn.Flatten(1)]
        return nn.Sequential(
            norm,
            nn.Dropout(dropout),
            *flatten,
            nn.Linear(flat, embedding_dim, bias=False),
            nn.BatchNorm1d(embedding_dim),
        )
    raise InputError(f"unknown head {kind!r}: use 'linear' or 'face'")


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors or a torch checkpoint (loaded with weights_only: no code runs)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise PretrainedWeightsError(f"{path}: not a state dict; save it with torch.save(model.state_dict(), ...)")
    return state


def load_trunk_weights(trunk: nn.Module, path: str | Path) -> None:
    """Load a local .safetensors/.pth state dict into a timm trunk; every trunk tensor must be present."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(
            f"pretrained weights file {path} not found; pass --pretrained none, hub, or an existing .safetensors/.pth"
        )
    state = read_state_dict(path)
    # Accept exports of a whole EmbeddingModel (trunk.*) as well as plain timm state dicts.
    if any(k.startswith("trunk.") for k in state):
        state = {k[len("trunk."):]: v for k, v in state.items() if k.startswith("trunk.")}
    own = trunk.state_dict()
    usable = {k: v for k, v in state.items() if k in own}
    missing = [k for k in own if k not in usable]
    wrong = [k for k, v in usable.items() if v.shape != own[k].shape]
    if missing or wrong:
        detail = (f"{len(missing)} missing (e.g. {missing[:3]})" if missing else "") + (
            f" {len(wrong)} with other shapes (e.g. {wrong[:3]})" if wrong else "")
        raise PretrainedWeightsError(f"{path} does not fit this backbone: {detail.strip()}; "
                                     "is it for the same --backbone? (tools/convert_weights.py converts known formats)")
    trunk.load_state_dict(usable, strict=True)


def build_model(cfg: ModelConfig) -> EmbeddingModel:
    """Create the trunk (random, hub or local weights) and the head; fails early with a clear message."""
    pretrained = cfg.pretrained or "none"
    if cfg.backbone in BACKBONES:
        return _build_face_backbone_model(cfg, pretrained)
    if pretrained == "hub":
        try:
            trunk = timm.create_model(cfg.backbone, pretrained=True, num_classes=0)
        except Exception as err:  # network errors come in many types (OSError, HTTP, hub-specific)
            raise PretrainedWeightsError(
                f"could not download pretrained weights for {cfg.backbone!r} from the model hub ({type(err).__name__}: "
                f"{str(err).splitlines()[0][:200] if str(err) else ''}); use --pretrained none for random init, or "
                "--pretrained PATH for a local .safetensors/.pth file (tools/convert_weights.py makes one)"
            ) from err
    else:
        try:
            trunk = timm.create_model(cfg.backbone, pretrained=False, num_classes=0)
        except RuntimeError as err:
            raise InputError(f"unknown backbone {cfg.backbone!r}: see timm.list_models() ({err})") from None
        if pretrained != "none" and not Path(pretrained).is_dir():
            load_trunk_weights(trunk, pretrained)
    model = EmbeddingModel(trunk, build_head(cfg.head, trunk.num_features, cfg.embedding_dim, cfg.dropout))
    if pretrained not in ("none", "hub") and Path(pretrained).is_dir():
        load_checkpoint_weights(model, cfg, pretrained)
    return model


def _build_face_backbone_model(cfg: ModelConfig, pretrained: str) -> EmbeddingModel:
    """A backbone of facesiam/backbones (arcface_torch's IResNet, MobileFaceNet): its trunk and the head over its
    feature map; --pretrained FILE takes an arcface_torch backbone.pth or a facesiam state dict."""
    trunk = build_trunk(cfg)
    model = EmbeddingModel(trunk, build_head(cfg.head, trunk.feature_shape, cfg.embedding_dim, cfg.dropout))
    if cfg.head == "face" and BACKBONES.get(cfg.backbone).info["frozen_embedding_scale"]:
        model.head[-1].weight.requires_grad_(False)  # arcface_torch never trains it (IResNet's `features` BN)
    if pretrained != "none":
        if Path(pretrained).is_dir():
            load_checkpoint_weights(model, cfg, pretrained)
        else:
            load_face_backbone_weights(model, cfg, pretrained)
    return model


def load_face_backbone_weights(model: EmbeddingModel, cfg: ModelConfig, path: str | Path) -> None:
    """``--pretrained FILE`` for a face backbone: an arcface_torch ``backbone.pth`` of the same architecture, or a
    facesiam state dict (trunk.* / head.*, e.g. an export's model.safetensors). The trunk must fit tensor for tensor;
    the head loads when this run's head fits it (``face``, same embedding size), else it stays newly initialised,
    with a warning (a 512-d arcface_torch model fine-tuned into a 128-d one keeps its trunk)."""
    path = Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(f"pretrained weights file {path} not found; pass --pretrained none, an "
                                     "arcface_torch backbone.pth or a facesiam export directory")
    state = read_state_dict(path)
    if not any(k.startswith("trunk.") for k in state):
        found = from_arcface(state)
        if found is None:
            raise PretrainedWeightsError(f"{path}: neither an arcface_torch backbone state dict nor a facesiam one "
                                         f"(e.g. {list(state)[:2]}); is it for --backbone {cfg.backbone}?")
        if found[0] != cfg.backbone:
            name = found[0]
            raise PretrainedWeightsError(f"{path} is an arcface_torch {BACKBONES.get(name).info['arcface_name']} "
                                         f"({name}); this run's backbone is {cfg.backbone}: set --backbone {name}")
        state = found[1]
    trunk = {k[len("trunk."):]: v for k, v in state.items() if k.startswith("trunk.")}
    own = model.trunk.state_dict()
    if trunk.keys() != own.keys() or any(trunk[k].shape != own[k].shape for k in own):
        raise PretrainedWeightsError(f"{path} does not fit backbone {cfg.backbone}: "
                                     f"{_describe_mismatch(trunk, own)}; is it for the same --backbone?")
    model.trunk.load_state_dict(trunk, strict=True)
    head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
    own_head = model.head.state_dict()
    if head.keys() == own_head.keys() and all(head[k].shape == own_head[k].shape for k in own_head):
        model.head.load_state_dict(head, strict=True)
        log.info("started from %s: trunk and head (%d-d)", path, cfg.embedding_dim)
    else:
        log.warning("started from %s: trunk only; its head does not fit this run's (%s, %d-d), so the head is newly "
                    "initialised", path, cfg.head, cfg.embedding_dim)


def load_checkpoint_weights(model: EmbeddingModel, cfg: ModelConfig, path: str | Path) -> None:
    """``--pretrained RUN/best``: start from a facesiam export (e.g. a distilled student): its trunk always, its head
    when it has this run's head type and embedding size; otherwise the head keeps its fresh initialisation, with a
    warning (fine-tuning a 128-d distilled student into a 512-d model trains a new head on the learned trunk)."""
    export = _export_dir(path)
    source = read_exported_config(export)
    if source.backbone != cfg.backbone:
        raise PretrainedWeightsError(f"{export} is a {source.backbone} model, this run's backbone is {cfg.backbone}; "
                                     f"set --backbone {source.backbone} to start from it")
    state = _read_weights(export / WEIGHTS_FILE)
    trunk = {k[len("trunk."):]: v for k, v in state.items() if k.startswith("trunk.")}
    try:
        model.trunk.load_state_dict(trunk, strict=True)
    except RuntimeError as err:
        raise PretrainedWeightsError(f"{export / WEIGHTS_FILE}: its trunk does not fit {cfg.backbone} "
                                     f"({str(err).splitlines()[0]}); re-export the model") from None
    head = {k[len("head."):]: v for k, v in state.items() if k.startswith("head.")}
    own = model.head.state_dict()
    if head.keys() == own.keys() and all(head[k].shape == own[k].shape for k in own):
        model.head.load_state_dict(head, strict=True)
        log.info("started from %s: trunk and %s head (%d-d)", export, cfg.head, cfg.embedding_dim)
    else:
        log.warning("started from %s: trunk only; its head (%s, %d-d) does not fit this run's (%s, %d-d), so the head "
                    "is newly initialised", export, source.head, source.embedding_dim, cfg.head, cfg.embedding_dim)


def export_model(model: EmbeddingModel, cfg: ModelConfig, out_dir: str | Path, extra: dict | None = None,
                 alignment: dict | None = None) -> Path:
    """Write out_dir/model.safetensors + out_dir/config.json; a complete export replaces the old one at once.

    alignment: how the training faces were aligned (faces/aligner.alignment_info, from the shards' dataset.json);
    stored as config.json's "alignment" so that inference detects and aligns raw images the same way.
    """
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    with staged_directory(out_dir, last=CONFIG_FILE) as tmp:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS_FILE))
        os.chmod(tmp / WEIGHTS_FILE, 0o644)  # safetensors creates 0600 files; an export is meant to be shared
        meta = {"format_version": EXPORT_FORMAT_VERSION, **asdict(cfg), "pretrained": "none"}
        meta["mean"], meta["std"] = list(cfg.mean), list(cfg.std)
        if extra:
            meta["export_info"] = extra
        if alignment:
            meta["alignment"] = alignment
        (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2), encoding="utf-8")
    return out_dir


def read_exported_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of an export (path: the export dir, or a run dir holding best/)."""
    path = _export_dir(path)
    try:
        meta = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path / CONFIG_FILE}: not valid JSON ({err}); re-export the model or copy it again") from None
    known = {f.name for f in fields(ModelConfig)}
    kwargs = {k: v for k, v in meta.items() if k in known}
    for key in ("mean", "std"):
        if key in kwargs:
            kwargs[key] = tuple(kwargs[key])
    return ModelConfig(**kwargs)


def exported_alignment(path: str | Path) -> Optional[dict]:
    """How the model's training faces were aligned (config.json's "alignment"), or None: trained on unaligned images."""
    path = _export_dir(path)
    try:
        return json.loads((path / CONFIG_FILE).read_text(encoding="utf-8")).get("alignment") or None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path / CONFIG_FILE}: not valid JSON ({err}); re-export the model or copy it again") from None


def _export_dir(path: str | Path) -> Path:
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not (path / CONFIG_FILE).is_file() and (path / "best" / CONFIG_FILE).is_file():
        path = path / "best"
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        missing = [f for f in (WEIGHTS_FILE, CONFIG_FILE) if not (path / f).is_file()]
        raise FileNotFoundError(f"{path}: no exported model (missing {' and '.join(missing)}); "
                                "pass a training run's best/ or final/ directory (RUN/best)")
    return path


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or one clear error when it is truncated or not a safetensors file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise InputError(f"{path}: corrupt or truncated weights file ({err}); re-export the model "
                         "(training writes RUN/best and RUN/final) or copy the file again") from None


def _describe_mismatch(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> str:
    """What differs between the weights in a file and the network its config.json describes."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} tensor(s) of another shape (file vs config), e.g. {shapes[0]}")
    if missing:
        parts.append(f"{len(missing)} tensor(s) missing, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected, e.g. {unexpected[0]}")
    head = [v for k, v in state.items() if k.startswith("head.") and v.ndim == 2]
    if head:
        parts.append(f"the file's head outputs {head[-1].shape[0]}-d embeddings")
    return "; ".join(parts)


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> tuple[EmbeddingModel, ModelConfig]:
    """Rebuild an exported model for inference (eval mode) with its ModelConfig."""
    path = _export_dir(path)
    cfg = read_exported_config(path)
    model = build_model(ModelConfig(**{**asdict(cfg), "pretrained": "none"}))
    state = _read_weights(path / WEIGHTS_FILE)
    own = model.state_dict()
    if state.keys() != own.keys() or any(state[k].shape != own[k].shape for k in own):
        raise InputError(f"{path / CONFIG_FILE} (backbone {cfg.backbone}, head {cfg.head}, {cfg.embedding_dim}-d) does "
                         f"not match {path / WEIGHTS_FILE}: {_describe_mismatch(state, own)}; use the config.json "
                         "exported with these weights")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), cfg


def eval_transform_for(cfg: ModelConfig) -> Callable:
    """The inference preprocessing an exported model expects."""
    from .augment.transforms import build_eval_transform

    return build_eval_transform(cfg.image_size, center_crop=cfg.center_crop, mean=cfg.mean, std=cfg.std)
