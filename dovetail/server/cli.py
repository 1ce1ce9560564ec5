"""dovetail-launch serve: the workers and an OpenAI-compatible HTTP server on uvicorn.

The server listens at once and answers /health with 503 while the workers load (minutes
on a first run: the models are fetched and converted), then 200. Ctrl-C or SIGTERM stops
taking requests, lets running ones finish for GRACEFUL_S, cancels the rest and shuts the
workers down.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

GRACEFUL_S = 5  # seconds open streams get to finish on shutdown before they are cut
DEFAULT_PORT = 8000
DEFAULT_MAX_BODY_MB = 4.0  # a chat body of 4 MB is ~1M tokens of text: more than any context we serve
DEFAULT_KEEPALIVE_S = 5.0  # app.KEEPALIVE_S: well under the 60 s after which proxies cut a silent stream


def build_serve_parser() -> argparse.ArgumentParser:
    from dovetail.flags import add_drafting_flags, add_model_flags, add_role_flags
    p = argparse.ArgumentParser(prog="dovetail-launch serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    h = p.add_argument_group("HTTP")
    h.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: 127.0.0.1; off loopback it needs --api-key)")
    h.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    h.add_argument("--api-key", action="append", default=None, metavar="KEY",
                   help="accept this key as 'Authorization: Bearer KEY'; repeat for several (also --api-key-file)")
    h.add_argument("--api-key-file", default=None, metavar="FILE",
                   help="accept the keys in FILE, one per line (keeps them out of the process list)")
    h.add_argument("--allow-unauthenticated", action="store_true",
                   help="listen off loopback without an API key: anyone who reaches the port can use the model")
    h.add_argument("--cors-origin", action="append", default=None, metavar="ORIGIN",
                   help="allow browser requests from this origin (repeat; '*' for any); default: none")
    h.add_argument("--allowed-host", action="append", default=None, metavar="NAME",
                   help="also answer requests whose Host header is NAME (repeat; '*' for any); by default only "
                        "loopback names, IP addresses and --host are answered, which blocks DNS rebinding")
    h.add_argument("--served-model-name", default=None,
                   help="the model name clients use (default: --target as given; a local path by its file "
                        "name; else the remote target's name)")
    h.add_argument("--max-body-mb", type=float, default=DEFAULT_MAX_BODY_MB, metavar="MB",
                   help=f"refuse request bodies larger than MB with 413 (default: {DEFAULT_MAX_BODY_MB:g})")
    h.add_argument("--sse-keepalive", type=float, default=DEFAULT_KEEPALIVE_S, metavar="S",
                   help="send a ': keep-alive' comment every S seconds while a stream waits for its first "
                        f"token, so proxies do not cut it (default: {DEFAULT_KEEPALIVE_S:g})")
    h.add_argument("--max-active", type=int, default=4,
                   help="requests decoding at once; their rounds interleave on the workers (default: 4)")
    h.add_argument("--max-pending", type=int, default=64,
                   help="requests admitted, decoding or waiting; past it a request gets 503 with "
                        "Retry-After (default: 64)")
    h.add_argument("--request-timeout", type=float, default=600.0, metavar="S",
                   help="a request still running after S seconds is cancelled and answered 504 (default: 600)")
    add_model_flags(p)
    add_drafting_flags(p)
    add_role_flags(p)
    p.add_argument("--log-level", default="info", help="debug | info | warning (default: info)")
    return p


def read_keys(args) -> list[str]:
    keys = list(args.api_key or [])
    if args.api_key_file:
        keys += [line.strip() for line in Path(args.api_key_file).read_text().splitlines() if line.strip()]
    if any(len(k) < 8 for k in keys):
        raise ValueError("API keys must be at least 8 characters")
    return keys


def check_serve_flags(args, keys: list[str]) -> None:
    from dovetail.flags import ROLE_TARGET, check_role_flags
    from dovetail.system.security import is_loopback
    if args.role == ROLE_TARGET:
        raise ValueError("serve runs a coordinator: use --role local (default) or --role draft --connect ...")
    check_role_flags(args)
    if not 0 <= args.port < 65536:
        raise ValueError(f"--port must be in [0, 65535], got {args.port}")
    if args.request_timeout <= 0:
        raise ValueError("--request-timeout must be > 0")
    if args.max_body_mb <= 0:
        raise ValueError("--max-body-mb must be > 0")
    if args.sse_keepalive <= 0:
        raise ValueError("--sse-keepalive must be > 0")
    if not 1 <= args.max_active <= args.max_pending:
        raise ValueError(f"need 1 <= --max-active <= --max-pending, got {args.max_active}, {args.max_pending}")
    host = f"[{args.host}]" if ":" in args.host else args.host
    if not keys and not args.allow_unauthenticated and not is_loopback(f"tcp://{host}:{args.port}"):
        raise ValueError(f"--host {args.host} is reachable from other machines, and without a key anyone there "
                         "could use the model: pass --api-key KEY (or --api-key-file FILE), listen on "
                         "127.0.0.1, or say --allow-unauthenticated")


def serve_main(argv) -> int:
    args = build_serve_parser().parse_args(argv)
    try:
        keys = read_keys(args)
        check_serve_flags(args, keys)
    except (ValueError, OSError) as e:
        print(f"dovetail-launch serve: {e}", file=sys.stderr)
        return 2
    try:
        import uvicorn

        from dovetail.server.app import build_app
        from dovetail.server.engine import FAILED, Engine, public_model_name
        from dovetail.server.metrics import Metrics
    except ImportError as e:
        print(f"dovetail-launch serve: {e.name} is missing: pip install -e '.[serve]'", file=sys.stderr)
        return 1
    level = getattr(logging, args.log_level.upper(), logging.INFO)
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from dovetail.flags import start_coordinator

    from dovetail.flags import DEFAULT_TARGET, ROLE_LOCAL
    # The model as the user named it (as vLLM does), but a local path by its file name only (a
    # client has no business with this machine's paths); a remote target without --target: its own name.
    target = args.target or (DEFAULT_TARGET if args.role == ROLE_LOCAL else None)
    served = args.served_model_name or (public_model_name(target) if target else None)
    engine = Engine(Metrics(), args.request_timeout, served)
    app = build_app(engine, keys, args.cors_origin, allowed_hosts=[args.host, *(args.allowed_host or [])],
                    max_body_bytes=int(args.max_body_mb * (1 << 20)), keepalive_s=args.sse_keepalive)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level.lower(),
                                           timeout_graceful_shutdown=GRACEFUL_S, access_log=level <= logging.DEBUG))

    def stop(_reason: str) -> None:
        server.should_exit = True

    print(f"dovetail: serving on http://{args.host}:{args.port} (/health is 503 until the workers are up)",
          file=sys.stderr)
    engine.start(lambda: start_coordinator(args, max_active=args.max_active, max_pending=args.max_pending),
                 on_failure=stop)
    # uvicorn handles SIGINT/SIGTERM while it runs and raises them again once it has stopped;
    # these handlers take that second delivery, so the workers below are closed, not orphaned.
    stopped = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stopped.append(signum))
    try:
        server.run()
    finally:
        engine.close()
    if engine.state == FAILED:
        print(f"dovetail-launch serve: {engine.failure}", file=sys.stderr)
        return 1
    return 0
