"""facesiam serve: the face-verification and search service (facesiam/service) on uvicorn.

    python tools/serve.py --checkpoint RUN/best --gallery GALLERY --report REPORT [--operating-point far=1e-3]
    python tools/serve.py --onnx model.onnx --gallery GALLERY --threshold 0.42 [--host 127.0.0.1] [--port 8000]

The token comes from --token-file or $FACESIAM_TOKEN; without either, a new one is generated and printed.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..errors import InputError
from . import command
from .common import add_align_argument, add_model_choice, add_threshold_arguments, log_to_stderr

log = logging.getLogger("facesiam.serve")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="serve", description="Face verification and gallery search over HTTP, with a "
                                "web page at /. Binds to 127.0.0.1 and needs a bearer token for everything but "
                                "/healthz.")
    add_model_choice(p, required=True)
    p.add_argument("--gallery", help="gallery folder to search and enrol into (created on the first enrol; "
                   "without it the gallery lives in memory only)")
    add_threshold_arguments(p, required=True)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token-file", help="file holding the bearer token (default: $FACESIAM_TOKEN, else a new one "
                   "is generated and printed)")
    p.add_argument("--public-read", action="store_true", help="verify, search and the identity list without a "
                   "token (enrol and delete always need it)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also serve requests whose Host header is NAME (repeatable); by default only the loopback "
                        "names and --host are served, so a web page cannot reach the service by DNS rebinding")
    p.add_argument("--body-timeout", type=float, default=60.0,
                   help="seconds a request body may take in all, and a sixth of it (at most 10) to stall (408 after)")
    p.add_argument("--top-k", type=int, default=5, help="identities a search returns (default 5)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest image upload in MB (default 10)")
    p.add_argument("--max-pixels", type=float, default=40e6, help="largest image in pixels (default 40e6)")
    p.add_argument("--max-batch", type=int, default=32, help="most images in one network pass; 1 turns batching "
                   "off (default 32)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests "
                   "(default 5 ms)")
    p.add_argument("--keep-images", metavar="DIR", help="keep every uploaded image in DIR (default: none is kept)")
    p.add_argument("--device", default=None, help="cpu or cuda for --checkpoint (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads for --onnx (default: all cores)")
    p.add_argument("--access-log", action="store_true", help="log every request line (method, path, status)")
    add_align_argument(p)
    return p


def read_token(token_file: Optional[str]) -> tuple[str, str]:
    """(token, where it came from)."""
    if token_file:
        path = Path(token_file)
        if not path.is_file():
            raise FileNotFoundError(f"token file {path} not found; write a token into it, e.g. `python -c "
                                    f"\"import secrets; print(secrets.token_urlsafe(32))\" > {path}`")
        return path.read_text(encoding="utf-8").strip(), f"--token-file {path}"
    if os.environ.get("FACESIAM_TOKEN"):
        return os.environ["FACESIAM_TOKEN"].strip(), "$FACESIAM_TOKEN"
    return secrets.token_urlsafe(32), "generated for this run"


def allowed_hosts(host: str, extra: Sequence[str]) -> tuple[str, ...]:
    """Host header values served: the loopback names, the bound address (unless a wildcard) and --allow-host."""
    from ..service.hardening import LOOPBACK_HOSTS

    bound = () if host in ("0.0.0.0", "::", "") else (host,)
    return tuple(dict.fromkeys(h.lower() for h in (*LOOPBACK_HOSTS, *bound, *extra)))


def build(args: argparse.Namespace):
    """(app, settings) from parsed arguments: loads the model, the threshold and the gallery."""
    from ..eval.compare import decision_threshold
    from ..service.app import ServiceSettings, check_settings, create_app

    token, token_source = read_token(args.token_file)
    threshold, source = decision_threshold(args.threshold, args.report, args.operating_point)
    from ..eval.embed import open_embedder

    embedder = open_embedder(args.checkpoint, args.onnx, device=args.device, threads=args.threads)
    name = f"{args.onnx} (onnxruntime)" if args.onnx else f"{args.checkpoint} (torch)"
    settings = ServiceSettings(token=token, threshold=float(threshold), threshold_source=source,
                               public_read=args.public_read, max_bytes=int(args.max_upload_mb * 1024 * 1024),
                               max_pixels=int(args.max_pixels), top_k=args.top_k,
                               keep_images=Path(args.keep_images) if args.keep_images else None, align=args.align,
                               max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms, model_name=name,
                               allowed_hosts=allowed_hosts(args.host, args.allow_host),
                               body_timeout=args.body_timeout, idle_timeout=min(10.0, args.body_timeout / 6))
    check_settings(settings)
    if embedder.alignment and args.align:
        from ..faces.aligner import describe_alignment

        log.info("uploads are aligned as the model was trained: %s", describe_alignment(embedder.alignment))
    return create_app(embedder, settings, args.gallery), settings, token_source


@command("serve")
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = _parser().parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise InputError('facesiam serve needs FastAPI and uvicorn: pip install -e ".[serve]"') from None
    log_to_stderr()
    app, settings, token_source = build(args)
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        log.warning("binding to %s: other machines can reach this service; put it behind TLS (Host names served: "
                    "%s; add the ones clients use with --allow-host)", args.host, ", ".join(settings.allowed_hosts))
    if token_source == "generated for this run":
        print(f"token (generated for this run; pass --token-file or set FACESIAM_TOKEN to keep one): "
              f"{settings.token}", file=sys.stderr, flush=True)
    else:
        log.info("token from %s", token_source)
    print(f"facesiam serve: http://{args.host}:{args.port}/ (web page); POST /verify /search /enroll", file=sys.stderr,
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info", access_log=args.access_log)
