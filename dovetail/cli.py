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

from dovetail.models.options import (
    DEFAULT_BATCH_ROWS, DEFAULT_LLAMA_CTX, DEFAULT_LLAMA_EXTRA_BUFFERS, LLAMA_EXTRA_BUFFERS, QUANTIZE_CHOICES, MIN_LLAMA_CTX,
)
from dovetail.runtime.config import DEFAULT_DRAFT_LM

DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFT = "auto"
KEYS_SUBCOMMAND = "keys"
SERVE_SUBCOMMAND = "serve"
QUANTIZE_SUBCOMMAND = "quantize"
ROLE_LOCAL, ROLE_TARGET, ROLE_DRAFT = "local", "target", "draft"
ROLES = (ROLE_LOCAL, ROLE_TARGET, ROLE_DRAFT)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dovetail-launch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_flags(p)
    add_drafting_flags(p)
    add_generation_flags(p)
    add_role_flags(p)
    p.add_argument("--log-level", default="warning", help="debug | info | warning (default: warning)")
    return p


def add_model_flags(p: argparse.ArgumentParser) -> None:
    m = p.add_argument_group("models and devices")
    m.add_argument("--target", default=None,
                   help=f"target model: HF folder, .gguf file or registry name (default: {DEFAULT_TARGET}); "
                        "with --role draft only read for its tokenizer (default there: the draft's)")
    m.add_argument("--draft", default=DEFAULT_DRAFT,
                   help="draft: a model with the target's tokenizer, feature:CKPT_DIR (a trained feature draft), "
                        "suffix (trees copied from the prompt, the output and earlier outputs: no model, no "
                        "draft process), suffix+MODEL (both; each round verifies the one that promises more), "
                        "or auto (default): suffix without a GPU; with one, suffix beside the feature draft "
                        "shipped for the target and the draft's device when there is one "
                        f"(dovetail/draft/shipped/defaults.json), else {DEFAULT_DRAFT_LM}")
    m.add_argument("--no-draft", action="store_true", help="decode with the target alone (the baseline)")
    m.add_argument("--force-draft", action="store_true",
                   help="start the draft even where the target's measured verify cost says no draft can pay "
                        "(by default the draft is then skipped, with a line that says why)")
    m.add_argument("--suffix-cache-tokens", type=int, default=1 << 16,
                   help="earlier outputs the suffix draft may copy from, in tokens (default: 65536; 0: off). "
                        "The server keeps them per API key: a request that repeats another's output decodes "
                        "faster, a timing side channel between tenants")
    m.add_argument("--target-cpus", default=None, help="CPUs for the target, e.g. '0-31' or '0,2,4' (default: all)")
    m.add_argument("--draft-gpu", default=None,
                   help="GPU index for the draft, or 'cpu' (default: GPU 0 when there is one, else the CPU)")
    m.add_argument("--backend", default="auto", choices=("auto", "transformers", "llama.cpp"),
                   help="target backend: llama.cpp runs a GGUF on its native kernels (pip install -e "
                        "\".[llama]\"); transformers runs a HF folder or a de-quantized GGUF; auto "
                        "(default): llama.cpp for a GGUF when it is installed")
    m.add_argument("--draft-backend", default=None, choices=("transformers", "llama.cpp"),
                   help="draft backend (default: llama.cpp for a GGUF draft on the CPU when the target "
                        "uses it, else transformers); llama.cpp drafts chains")
    m.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float64"),
                   help="force one dtype on both workers (auto: bf16 where the CPU has it)")
    m.add_argument("--target-quantize", default="none", choices=QUANTIZE_CHOICES,
                   help="int8 / int4: weight-only int8 or 4-bit target decoder layers, faster on the CPU; "
                        "the output is that quantized target's own, not the float target's (default: none)")
    m.add_argument("--draft-quantize", default="none", choices=("none", "int8"),
                   help="int8: int8 weights for a feature draft on the CPU, a faster draft step; only its "
                        "guesses can change, never the output (default: none)")
    m.add_argument("--draft-layers", type=int, default=None, help="use only the first N layers of the draft model")
    m.add_argument("--llama-extra-buffers", default=DEFAULT_LLAMA_EXTRA_BUFFERS, choices=LLAMA_EXTRA_BUFFERS,
                   help="llama.cpp's extra (repacked / AMX) weight buffers for the workers on llama.cpp: auto "
                        "(default) keeps them unless a test decode with them, run once per machine in a child "
                        "process and cached, crashed (as AMX buffers do on some Intel Xeons); on / off force them")
    m.add_argument("--batch-rows", type=int, default=DEFAULT_BATCH_ROWS, metavar="ROWS",
                   help="the target verifies the requests waiting for it in one forward, up to this many rows "
                        "in all, or fewer where its measured cost per row stops falling; 1 verifies them one by "
                        f"one (default: {DEFAULT_BATCH_ROWS})")
    m.add_argument("--llama-ctx", type=int, default=DEFAULT_LLAMA_CTX, metavar="TOKENS",
                   help="context of a llama.cpp target, shared by all its open requests; one request's prompt "
                        f"and output must fit (default: {DEFAULT_LLAMA_CTX}, at least {MIN_LLAMA_CTX})")


def add_drafting_flags(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("drafting")
    d.add_argument("--depth", type=int, default=None, help="draft tokens along a path; fixes the tree shape (default: sized automatically, at most 3 on a CPU draft, 8 on a GPU)")
    d.add_argument("--top-k", type=int, default=None, help="children per tree node; 1 drafts a chain (default: 2 CPU, 12 GPU)")
    d.add_argument("--max-nodes", type=int, default=None, help="most tree tokens per verification; fixes the tree shape (default: at most 6 CPU, 16 GPU)")
    d.add_argument("--auto-tree", action=argparse.BooleanOptionalAction, default=None,
                   help="size each draft from the verify-cost curve and the acceptance (default: on unless "
                        "--depth or --max-nodes is given; with --auto-tree they cap it)")
    d.add_argument("--gate", action=argparse.BooleanOptionalAction, default=None,
                   help="propose only draft tokens whose probability under the draft pays for verifying them "
                        "(needs automatic sizing; default: on with it; it prunes only where a verified row "
                        "costs a real share of a step)")
    d.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=None,
                   help="draft the next round while the target verifies (default: on for a GPU draft)")


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


def add_role_flags(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group("two machines (default: everything on this host over ipc://)")
    r.add_argument("--role", default=ROLE_LOCAL, choices=ROLES,
                   help="local: both workers and the coordinator here (default); target: serve the target "
                        "worker on --listen in the foreground; draft: the draft worker and the coordinator "
                        "here, the target at --connect")
    r.add_argument("--listen", default=None, metavar="tcp://ADDR:PORT",
                   help="--role target: address to serve on (off loopback it needs --curve-secret/--curve-allow)")
    r.add_argument("--connect", default=None, metavar="tcp://ADDR:PORT",
                   help="--role draft: address of the target worker (started with --role target)")
    r.add_argument("--curve-secret", default=None, metavar="FILE",
                   help="--role target: the worker's CurveZMQ secret key (DIR/worker/server.key_secret "
                        "from `dovetail-launch keys`)")
    r.add_argument("--curve-allow", default=None, metavar="DIR",
                   help="--role target: folder of allowed client public keys (DIR/worker/allow)")
    r.add_argument("--curve-client-secret", default=None, metavar="FILE",
                   help="--role draft: this client's CurveZMQ secret key (DIR/NAME/NAME.key_secret)")
    r.add_argument("--curve-server-public", default=None, metavar="FILE",
                   help="--role draft: the target worker's public key (DIR/NAME/server.key)")
    r.add_argument("--heartbeat-interval", type=float, default=1.0, metavar="S",
                   help="seconds between the coordinator's heartbeats to each worker (default: 1.0)")
    r.add_argument("--liveness", type=int, default=3, metavar="N",
                   help="heartbeats a worker may miss in a row before it counts as dead or hung (default: 3); "
                        "--role target closes a client's session after --heartbeat-interval x --liveness s "
                        "without hearing from it")


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
                stats = _run(coord, prompt, args)
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


def check_role_flags(args) -> None:
    """Each role's own flags, and only those: a flag for the other host is a mistake."""
    if (args.role == ROLE_TARGET) != (args.listen is not None):
        raise ValueError("--listen goes with --role target (and --role target needs it)")
    if (args.role == ROLE_DRAFT) != (args.connect is not None):
        raise ValueError("--connect goes with --role draft (and --role draft needs it)")
    if args.role != ROLE_TARGET and (args.curve_secret or args.curve_allow):
        raise ValueError("--curve-secret/--curve-allow are the target worker's: use them with --role target")
    if args.role != ROLE_DRAFT and (args.curve_client_secret or args.curve_server_public):
        raise ValueError("--curve-client-secret/--curve-server-public go with --role draft")
    if bool(args.curve_client_secret) != bool(args.curve_server_public):
        raise ValueError("--curve-client-secret and --curve-server-public go together")
    if args.role == ROLE_DRAFT and args.target_cpus is not None:
        raise ValueError("--target-cpus is set on the target's host (--role target)")


def start_coordinator(args, **options):
    """--role local: both workers here; --role draft: the draft here, the target at --connect.
    ``options``: more CoordinatorConfig fields (dovetail-launch serve's admission limits)."""
    import dovetail
    from dovetail.system.security import ClientKeys

    draft_device = None if args.draft_gpu is None else ("cpu" if args.draft_gpu == "cpu" else f"cuda:{args.draft_gpu}")
    remote = {}
    target = args.target or DEFAULT_TARGET
    if args.role == ROLE_DRAFT:
        keys = ClientKeys(args.curve_client_secret, args.curve_server_public) if args.curve_client_secret else None
        remote = {"target_address": args.connect, "client_keys": keys}
        target = args.target  # only for its tokenizer; the draft's serves otherwise
    return dovetail.launch(target, None if args.no_draft else args.draft, **remote,
                           target_cpus=args.target_cpus, draft_device=draft_device, dtype=args.dtype,
                           backend=args.backend, draft_backend=args.draft_backend,
                           target_quantize=args.target_quantize, draft_quantize=args.draft_quantize,
                           llama_extra_buffers=args.llama_extra_buffers, llama_ctx=args.llama_ctx, batch_rows=args.batch_rows, depth=args.depth, top_k=args.top_k, max_nodes=args.max_nodes,
                           auto_tree=args.auto_tree, gate=args.gate, force_draft=args.force_draft,
                           overlap=args.overlap, draft_layers=args.draft_layers, log_level=args.log_level,
                           suffix_cache_tokens=args.suffix_cache_tokens,
                           heartbeat_interval_s=args.heartbeat_interval, heartbeat_liveness=args.liveness,
                           **options)


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
            *(["--llama-extra-buffers", args.llama_extra_buffers, "--ctx", str(args.llama_ctx)]
              if backend == "llama.cpp" else []),
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


def _run(coord, prompt, args):
    from dovetail.runtime.results import Stats
    stats = Stats()
    stop = [s.replace("\\n", "\n").replace("\\t", "\t") for s in args.stop] if args.stop else None
    for chunk in coord.stream(prompt, args.max_new_tokens, args.temperature, args.top_p, args.seed, stop,
                              stats=stats):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    return stats


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
