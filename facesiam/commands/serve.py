"""facesiam serve: the face-verification and search service (facesiam/service) on uvicorn.

    python tools/serve.py --checkpoint RUN/best --gallery GALLERY --report REPORT [--operating-point far=1e-3]
    python tools/serve.py --onnx model.onnx --db postgresql://user@host/faces --threshold 0.42 [--port 8000]

The gallery lives in GALLERY/gallery.sqlite, or in PostgreSQL with --db (several serve processes share it).
Tokens come from --token-file (one per line with scopes; re-read on SIGHUP) or $FACESIAM_TOKEN; without either, a
new one is generated and printed. SIGTERM or SIGINT drains: requests in flight finish (new ones get 503), the
database is closed, exit status 0; requests still running after --grace seconds are cut, exit status 1
(service/lifecycle.py).
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..errors import InputError
from . import command
from .common import add_align_argument, add_model_choice, add_threshold_arguments, log_to_stderr

log = logging.getLogger("facesiam.serve")


def _parser() -> argparse.ArgumentParser:
    from ..service.live_index import INDEX_KINDS

    p = argparse.ArgumentParser(prog="serve", description="Face verification and gallery search over HTTP, with a "
                                "web page at /. Binds to 127.0.0.1 and needs a bearer token for everything but "
                                "/healthz.")
    add_model_choice(p, required=True)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--gallery", help="gallery folder: its database is GALLERY/gallery.sqlite (created 0600 in a "
                       "0700 folder); a folder of the earlier format is migrated on first start. Without --gallery "
                       "or --db the gallery lives in memory only")
    where.add_argument("--db", metavar="URL", help="the gallery in PostgreSQL (postgresql://user@host/db; pip install "
                       "-e '.[postgres]'): several serve processes share it and follow each other's changes")
    p.add_argument("--index", choices=INDEX_KINDS, default="flat", help="the search index in memory: flat (exact, "
                   "default), ivf or hnsw (approximate; tuned to recall@1 0.99 at start)")
    add_threshold_arguments(p, required=True)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--token-file", help="file of bearer tokens, one per line with optional scopes (read, write, "
                   "admin; see facesiam/service/tokens.py), re-read on SIGHUP (default: $FACESIAM_TOKEN, else a new "
                   "one is generated and printed)")
    p.add_argument("--public-read", action="store_true", help="the read scope (verify, search, recognize, detect, "
                   "lists) without a token, rate-limited per client (enrol and delete always need a token)")
    p.add_argument("--public-rate", type=float, default=5.0, help="requests/s one client may make without a token "
                   "(default 5; bursts of --public-burst)")
    p.add_argument("--public-burst", type=float, default=20.0, help="requests one client may make at once without a "
                   "token (default 20)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also serve requests whose Host header is NAME (repeatable); by default only the loopback "
                        "names and --host are served, so a web page cannot reach the service by DNS rebinding")
    p.add_argument("--body-timeout", type=float, default=60.0,
                   help="seconds a request body may take in all, and a sixth of it (at most 10) to stall (408 after)")
    p.add_argument("--header-timeout", type=float, default=10.0, help="seconds a connection may take to send a "
                   "request's line and headers, from opening or from its last answer (closed after; default 10)")
    p.add_argument("--limit-concurrency", type=int, default=256, help="most connections and requests at once; "
                   "503 above (default 256)")
    p.add_argument("--forwarded-allow-ips", metavar="IPS", help="comma-separated addresses of the reverse proxies "
                   "whose X-Forwarded-For / X-Forwarded-Proto are trusted (default: none; the rate limit then counts "
                   "the connecting address)")
    p.add_argument("--max-faces", type=int, default=20, help="most faces /recognize and /detect handle in one photo "
                   "(413 above, before embedding; default 20)")
    p.add_argument("--public-cost-rate", type=float, default=20.0, help="work one client may ask for without a "
                   "token, in megapixels x faces a second, bursts of ten seconds' worth (default 20)")
    p.add_argument("--top-k", type=int, default=5, help="identities a search returns (default 5)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="largest image upload in MB (default 10)")
    p.add_argument("--max-pixels", type=float, default=40e6, help="largest image in pixels (default 40e6)")
    p.add_argument("--max-side", type=int, default=2048, help="photos longer than this are shrunk before detection "
                   "(default 2048 px: bounds the detector's time and memory)")
    p.add_argument("--max-batch", type=int, default=32, help="most images in one network pass; 1 turns batching "
                   "off (default 32)")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits for more requests "
                   "(default 5 ms)")
    p.add_argument("--keep-images", metavar="DIR", help="keep every uploaded image in DIR (default: none is kept)")
    p.add_argument("--device", default=None, help="cpu or cuda for --checkpoint (default: cuda when available)")
    p.add_argument("--threads", type=int, default=None, help="onnxruntime threads for --onnx (default: all cores)")
    p.add_argument("--access-log", action="store_true", help="log every request line (method, path, status)")
    p.add_argument("--log-format", choices=("text", "json"), default="text", help="json: every log line a JSON "
                   "object, and one access line per request (request id, method, route template, status, ms; never "
                   "a token or the query string) whether or not --access-log is given (default: text)")
    p.add_argument("--log-identities", action="store_true", help="name the identity in JSON access lines of the "
                   "/identities/{name} routes (default: the route template only)")
    p.add_argument("--grace", type=float, default=20.0, metavar="SECONDS", help="after SIGTERM or SIGINT: seconds "
                   "the requests in flight may take to finish while new ones get 503 and /readyz 503; then the "
                   "database is closed and serve exits 0, or 1 when requests still running had to be cut (a second "
                   "signal cuts at once; default 20)")
    p.add_argument("--drain-delay", type=float, default=0.0, metavar="SECONDS", help="after SIGTERM or SIGINT: "
                   "seconds during which /readyz answers 503 while requests are still served, before the drain "
                   "above begins (time for a load balancer's health checks to take this instance out; a preStop "
                   "sleep built in; default 0)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT", help="also serve /metrics (Prometheus "
                   "text format) without a token on 127.0.0.1:PORT; GET /metrics on --port always needs an admin "
                   "token")
    add_align_argument(p)
    return p


def read_tokens(token_file: Optional[str]):
    """The tokens the service accepts: --token-file, else $FACESIAM_TOKEN, else one generated for this run."""
    from ..service.tokens import TokenSet

    if token_file:
        return TokenSet.from_file(token_file)
    if os.environ.get("FACESIAM_TOKEN"):
        return TokenSet.single(os.environ["FACESIAM_TOKEN"].strip(), "$FACESIAM_TOKEN")
    return TokenSet.generated()


def allowed_hosts(host: str, extra: Sequence[str]) -> tuple[str, ...]:
    """Host header values served: the loopback names, the bound address (unless a wildcard) and --allow-host."""
    from ..service.hardening import LOOPBACK_HOSTS

    bound = () if host in ("0.0.0.0", "::", "") else (host,)
    return tuple(dict.fromkeys(h.lower() for h in (*LOOPBACK_HOSTS, *bound, *extra)))


def build(args: argparse.Namespace):
    """(app, settings) from parsed arguments: loads the model, the threshold and the gallery."""
    from ..eval.compare import decision_threshold
    from ..service.app import ServiceSettings, check_settings, create_app
    from ..service.store import open_store

    tokens = read_tokens(args.token_file)
    threshold, source = decision_threshold(args.threshold, args.report, args.operating_point)
    from ..eval.embed import open_embedder

    embedder = open_embedder(args.checkpoint, args.onnx, device=args.device, threads=args.threads)
    name = embedder.describe(parity=False) if args.onnx else f"{args.checkpoint} (torch)"  # each face's record
    settings = ServiceSettings(tokens=tokens, threshold=float(threshold), threshold_source=source,
                               public_read=args.public_read, public_rate=args.public_rate,
                               public_burst=args.public_burst, max_bytes=int(args.max_upload_mb * 1024 * 1024),
                               max_pixels=int(args.max_pixels), max_side=args.max_side, top_k=args.top_k,
                               keep_images=Path(args.keep_images) if args.keep_images else None, align=args.align,
                               max_batch=args.max_batch, batch_wait_ms=args.batch_wait_ms,
                               model_name=embedder.describe() if args.onnx else name,  # int8: + its parity
                               allowed_hosts=allowed_hosts(args.host, args.allow_host),
                               body_timeout=args.body_timeout, idle_timeout=min(10.0, args.body_timeout / 6),
                               max_faces=args.max_faces, public_cost_rate=args.public_cost_rate,
                               metrics_port=args.metrics_port, json_access_log=args.log_format == "json",
                               log_identities=args.log_identities, grace=args.grace,
                               drain_delay=args.drain_delay)
    check_settings(settings)
    if embedder.alignment and args.align:
        from ..faces.aligner import describe_alignment

        log.info("uploads are aligned as the model was trained: %s", describe_alignment(embedder.alignment))
    store = open_store(args.gallery, args.db, embedder.embedding_dim, model=name, index=args.index)
    return create_app(embedder, settings, store), settings


def uvicorn_options(args: argparse.Namespace) -> dict:
    """uvicorn's settings: proxy headers trusted only from --forwarded-allow-ips (uvicorn trusts 127.0.0.1 by
    default, which let any local client pick its rate-limit address), and deadlines for slow clients: the request
    head (--header-timeout), idle keep-alive connections, the head's size, connections at once."""
    from ..service.hardening import KEEP_ALIVE, MAX_HEAD_BYTES, header_timeout_protocol

    if args.header_timeout <= 0 or args.limit_concurrency < 1:
        raise InputError("--header-timeout must be > 0 and --limit-concurrency >= 1")
    if not (args.grace >= 0 and args.drain_delay >= 0):
        raise InputError(f"--grace and --drain-delay must be numbers of seconds >= 0, got {args.grace} and "
                         f"{args.drain_delay}")
    if args.metrics_port is not None and not (0 < args.metrics_port < 65536 and args.metrics_port != args.port):
        raise InputError(f"--metrics-port must be a free port other than --port {args.port}, got {args.metrics_port}")
    json_log = args.log_format == "json"
    # one access log at a time: uvicorn's text lines (hardening.AccessLogWithoutQuery drops their query string), or
    # with --log-format json service/metrics.py's RequestRecorder, and uvicorn's own loggers reach the JSON handler
    return {"host": args.host, "port": args.port, "log_level": "info", "access_log": args.access_log and not json_log,
            **({"log_config": None} if json_log else {}),
            "proxy_headers": bool(args.forwarded_allow_ips), "forwarded_allow_ips": args.forwarded_allow_ips or None,
            "timeout_keep_alive": KEEP_ALIVE, "h11_max_incomplete_event_size": MAX_HEAD_BYTES,
            "http": header_timeout_protocol(args.header_timeout), "limit_concurrency": args.limit_concurrency,
            "timeout_graceful_shutdown": args.grace}


@command("serve")
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = _parser().parse_args(argv)
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise InputError('facesiam serve needs FastAPI and uvicorn: pip install -e ".[serve]"') from None
    from ..service.hardening import AccessLogWithoutQuery

    log_to_stderr()
    if args.log_format == "json":
        from ..service.metrics import JsonFormatter

        for handler in logging.getLogger().handlers:
            handler.setFormatter(JsonFormatter())
    options = uvicorn_options(args)
    app, settings = build(args)
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"
    if not loopback:
        log.warning("binding to %s: other machines can reach this service; put it behind TLS (Host names served: "
                    "%s; add the ones clients use with --allow-host)", args.host, ", ".join(settings.allowed_hosts))
    tokens = settings.tokens
    if tokens.source == "generated for this run":
        print(f"token (generated for this run; pass --token-file or set FACESIAM_TOKEN to keep one): "
              f"{tokens.tokens[0].secret}", file=sys.stderr, flush=True)
    else:
        log.info("%d token(s) from %s%s", len(tokens.tokens), tokens.source,
                 " (re-read on SIGHUP)" if tokens.path else "")
    # logged, not printed: with --log-format json it is a JSON line like the rest (text: the same line as before)
    log.info("facesiam serve: http://%s:%d/ (web page); POST /verify /search /recognize /detect /enroll (pid %d)",
             args.host, args.port, os.getpid())
    logging.getLogger("uvicorn.access").addFilter(AccessLogWithoutQuery())
    serve(app, options)


def serve(app, options: dict) -> None:
    """uvicorn.run's one-process path, with the server of service/lifecycle.py: SIGTERM drains, then exit status 0,
    or CUT_EXIT_STATUS when the grace period cut requests still running."""
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    from ..service.lifecycle import CUT_EXIT_STATUS, graceful_server

    service = app.state.service
    server = graceful_server(uvicorn.Config(app, **options), service.drain, service.batcher.hurry)
    server.run()
    if not server.started:
        raise SystemExit(STARTUP_FAILURE)  # as uvicorn.run: the port taken, or the app's startup failed
    if service.drain.cut:
        log.error("shut down: the grace period of %g s was over with %d request(s) still running; they were cut",
                  service.drain.grace, service.drain.cut)
        raise SystemExit(CUT_EXIT_STATUS)
    log.info("shut down cleanly%s", f" after {service.drain.why}" if service.drain.draining else "")
    # the work is done (requests answered, database closed): the interpreter's last garbage collection over torch's
    # and the app's objects took 2-3 CPU seconds (10 s and more on a busy machine) between this line and the exit,
    # which an orchestrator counts against its kill deadline; frozen objects are left out of it
    gc.freeze()
