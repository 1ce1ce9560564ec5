"""dovetail-launch: run speculative decoding from the command line.

    dovetail-launch --target-cpus 0-31 --draft-gpu 0 --prompt "Write a quicksort in Python"

With no model arguments it uses Qwen2.5-Coder-1.5B-Instruct drafted by
Qwen2.5-Coder-0.5B-Instruct, fetched once into the cache. With no --prompt it is
interactive: one prompt per line, Ctrl-D to quit.

    dovetail-launch keys --out DIR [--name NAME ...]

writes CurveZMQ key pairs for workers served over tcp:// (see `dovetail-launch keys --help`).

    dovetail-launch serve --host 127.0.0.1 --port 8000 [--api-key KEY] [model and drafting flags]

serves OpenAI's /v1/chat/completions and /v1/completions over HTTP (see `dovetail-launch serve --help`).

Two machines (docs/deployment.md):

    dovetail-launch --role target --listen tcp://ADDR:PORT --target-cpus 0-31 \
        --curve-secret keys/worker/server.key_secret --curve-allow keys/worker/allow
    dovetail-launch --role draft --connect tcp://ADDR:PORT --draft-gpu 0 \
        --curve-client-secret keys/coordinator/coordinator.key_secret \
        --curve-server-public keys/coordinator/server.key --prompt "..."
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

# The flags and roles dovetail-launch shares with `dovetail-launch serve` live in dovetail.flags,
# which both import (neither imports the other but here, for the serve subcommand); re-exported
# here for the callers that have imported them from dovetail.cli.
from dovetail.flags import (  # noqa: F401
    DEFAULT_DRAFT, DEFAULT_TARGET, ROLE_DRAFT, ROLE_LOCAL, ROLE_TARGET, ROLES, add_drafting_flags, add_model_flags,
    add_role_flags, check_role_flags, start_coordinator,
)

KEYS_SUBCOMMAND = "keys"
SERVE_SUBCOMMAND = "serve"
QUANTIZE_SUBCOMMAND = "quantize"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dovetail-launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    add_drafting_flags(p)
    add_generation_flags(p)
    add_role_flags(p)
    p.add_argument("--log-level", default="warning", help="debug | info | warning (default: warning)")
    return p


def add_generation_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("generation")
    g.add_argument("--prompt", default=None, help="prompt text (default: read prompts from stdin)")
    g.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat template")
    g.add_argument("--max-new-tokens", type=int, default=256, help="most tokens to generate (default: 256)")
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: 0)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default: 1.0)")
    g.add_argument("--seed", type=int, default=None, help="sampling seed (default: random)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end the output before this text (repeat for several; \\n and \\t are read as newline and tab)")
    g.add_argument("--presence-penalty", type=float, default=None, help="OpenAI's presence penalty, in [-2, 2]")
    g.add_argument("--frequency-penalty", type=float, default=None, help="OpenAI's frequency penalty, in [-2, 2]")
    g.add_argument("--repetition-penalty", type=float, default=None,
                   help="divide the logits of tokens already in the prompt or output by this (> 1 discourages)")
    c = g.add_mutually_exclusive_group()
    c.add_argument("--json", action="store_true", help="the output is one JSON object")
    c.add_argument("--json-schema", metavar="FILE|JSON", default=None,
                   help="the output is JSON valid against this schema (a file, or the schema's JSON text)")
    c.add_argument("--regex", default=None, help="the whole output matches this regular expression (Rust syntax)")
    c.add_argument("--grammar", metavar="FILE", default=None,
                   help="the output follows this grammar file (Lark, or llama.cpp's GBNF)")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    # A first word, not an argparse subparser: the decoding flags stay where they were.
    if argv[:1] == [KEYS_SUBCOMMAND]:
        return keys_main(argv[1:])
    if argv[:1] == [SERVE_SUBCOMMAND]:
        from dovetail.server.cli import serve_main
        return serve_main(argv[1:])
    if argv[:1] == [QUANTIZE_SUBCOMMAND]:
        from dovetail.models.requantize import main as quantize_main
        return quantize_main(argv[1:], default_target=DEFAULT_TARGET)
    args = build_parser().parse_args(argv)
    try:
        check_role_flags(args)
    except ValueError as e:
        print(f"dovetail-launch: {e}", file=sys.stderr)
        return 2
    if args.role == ROLE_TARGET:
        return serve_target(args)  # before basicConfig: the worker sets up its own log format
    logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.WARNING),
                        format="%(asctime)s coordinator %(levelname)s %(message)s", datefmt="%H:%M:%S")
    from dovetail.runtime.client import WorkerError
    from dovetail.models.fetch import FetchError

    try:  # a bad schema, regex or grammar file says so before the models load
        processing = processing_args(args)
        from dovetail.runtime.coordinator import make_processing
        make_processing(args.temperature, args.top_p, processing, vocab_size=1 << 62)
    except (ValueError, TypeError, OSError) as e:
        print(f"dovetail-launch: {e}", file=sys.stderr)
        return 2
    print("dovetail: starting workers (the first run fetches and converts the models)...", file=sys.stderr)
    try:
        coord = start_coordinator(args)
    except (FetchError, RuntimeError, ValueError, FileNotFoundError) as e:
        print(f"dovetail-launch: {e}", file=sys.stderr)
        return 1
    with coord:
        print(f"dovetail: target {coord.target_info.model} ({coord.target_info.dtype}, {coord.target_info.device}); "
              f"draft {draft_label(coord)}; overlap {coord.overlap}",
              file=sys.stderr)
        prompts = [args.prompt] if args.prompt is not None else _read_prompts()
        for text in prompts:
            prompt = text if args.raw or coord.tokenizer is None or not coord.tokenizer.chat_template \
                else [{"role": "user", "content": text}]
            try:
                stats = _run(coord, prompt, args, processing)
            except WorkerError as e:
                print(f"\ndovetail-launch: {e}", file=sys.stderr)
                return 1
            print(f"\n[{stats.summary()}]", file=sys.stderr)
    return 0


def draft_label(coord) -> str:
    """What drafts: the draft worker's model, the suffix draft, both, or none."""
    info = coord.draft_info
    parts = [f"{info.model} ({info.dtype}, {info.device})"] if info else []
    return " + ".join(parts + (["suffix"] if coord.suffix else [])) or "none"


def serve_target(args) -> int:
    """--role target: the target worker in the foreground, serving coordinators until SIGTERM or Ctrl-C."""
    from dovetail.runtime.config import CoordinatorConfig
    from dovetail.models.fetch import FetchError, resolve_model
    from dovetail.system.security import check_bind, server_keys

    try:
        # the same knobs as the coordinator's, so both hosts agree on the window
        window = CoordinatorConfig(heartbeat_interval_s=args.heartbeat_interval,
                                   heartbeat_liveness=args.liveness).liveness_window_s
        check_bind(args.listen, server_keys(args.curve_secret, args.curve_allow))
        model = resolve_model(args.target or DEFAULT_TARGET)
        from dovetail.runtime.launch import check_backend, pick_backend
        backend = pick_backend(args.backend, model, args.target_quantize)
        check_backend(backend, model)
    except (FetchError, ValueError, RuntimeError) as e:
        print(f"dovetail-launch: {e}", file=sys.stderr)
        return 1
    from dovetail.workers import target as target_worker
    argv = ["--bind", args.listen, "--model", str(model), "--dtype", args.dtype, "--backend", backend,
            "--quantize", args.target_quantize, "--batch-rows", str(args.batch_rows),
            "--prefill-chunk", str(args.prefill_chunk), "--prefix-cache-tokens", str(args.prefix_cache_tokens),
            *(["--llama-extra-buffers", args.llama_extra_buffers, "--ctx", str(args.llama_ctx)]
              if backend == "llama.cpp" else []),
            *(["--prefix-cache-dir", args.prefix_cache_dir] if args.prefix_cache_dir else []),
            "--sessions", "--heartbeat-timeout", str(window), "--log-level", "info" if args.log_level == "warning" else args.log_level,
            *(["--cpus", args.target_cpus] if args.target_cpus else []),
            *(["--curve-secret", args.curve_secret, "--curve-allow", args.curve_allow] if args.curve_secret else [])]
    print(f"dovetail: target worker loading {model}, then serving coordinators on {args.listen} until "
          f"SIGTERM or Ctrl-C; a coordinator silent for {window:g} s has its requests closed", file=sys.stderr)
    try:
        target_worker.main(argv)
    except KeyboardInterrupt:
        return 130
    return 0


def build_keys_parser() -> argparse.ArgumentParser:
    from dovetail.system.security import DEFAULT_CLIENT
    p = argparse.ArgumentParser(
        prog=f"dovetail-launch {KEYS_SUBCOMMAND}",
        description="Create CurveZMQ key pairs for a worker served over tcp:// and for the clients it lets in. "
                    "Existing keys are never overwritten.")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="folder to write into: DIR/worker/ goes to the worker host, DIR/NAME/ to each client host")
    p.add_argument("--name", action="append", default=None, metavar="NAME",
                   help=f"a client key pair to create and allow; repeat for several (default: {DEFAULT_CLIENT})")
    return p


def keys_main(argv) -> int:
    from dovetail.system.security import DEFAULT_CLIENT, write_keys
    args = build_keys_parser().parse_args(argv)
    try:
        paths = write_keys(args.out, args.name or [DEFAULT_CLIENT])
    except (ValueError, OSError, RuntimeError) as e:
        print(f"dovetail-launch {KEYS_SUBCOMMAND}: {e}", file=sys.stderr)
        return 1
    worker = paths.pop("worker")
    print(f"On the worker host (keep {worker['secret'].parent} private):\n"
          f"  --curve-secret {worker['secret']}\n  --curve-allow {worker['allow']}")
    for name, p in paths.items():
        print(f"On the host of client {name!r} (keep {p['secret'].parent} private):\n"
              f"  client secret key: {p['secret']}\n  worker public key: {p['server_public']}")
    return 0


def _run(coord, prompt, args, processing: dict):
    from dovetail.runtime.results import Stats
    stats = Stats()
    stop = [s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop] if args.stop else None
    for chunk in coord.stream(prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed, stop,
                              stats=stats, **processing):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    return stats


def processing_args(args) -> dict:
    """The penalties and the output constraint of the generation flags, as Coordinator.stream takes them."""
    out = {name: getattr(args, name) for name in ("presence_penalty", "frequency_penalty", "repetition_penalty")
           if getattr(args, name) is not None}
    if args.json:
        out["grammar"] = ("json_object", None)
    elif args.json_schema is not None:
        text = args.json_schema
        if not text.lstrip().startswith("{"):
            text = Path(text).read_text()  # FileNotFoundError names the file
        out["grammar"] = ("json_schema", text)
    elif args.regex is not None:
        out["grammar"] = ("regex", args.regex)
    elif args.grammar is not None:
        out["grammar"] = ("grammar", Path(args.grammar).read_text())
    return out


def _read_prompts():
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("\n>>> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line:
            return
        if line.strip():
            yield line.rstrip("\n")


if __name__ == "__main__":
    sys.exit(main())
