"""The flags and roles that dovetail-launch and `dovetail-launch serve` share, and the
coordinator they describe.

Both command lines import them from here, so neither imports the other (dovetail.cli
imports dovetail.server.cli only to dispatch the serve subcommand).
"""
from __future__ import annotations

import argparse

from dovetail.models.options import (
    DEFAULT_BATCH_ROWS, DEFAULT_LLAMA_CTX, DEFAULT_LLAMA_EXTRA_BUFFERS, LLAMA_EXTRA_BUFFERS, MAX_BATCH_ROWS, MIN_LLAMA_CTX,
    QUANTIZE_CHOICES,
)
from dovetail.runtime.config import DEFAULT_DRAFT_LM, CoordinatorConfig
from dovetail.models.options import DEFAULT_PREFIX_CACHE_TOKENS

DEFAULT_TARGET = "qwen2.5-coder-1.5b-instruct"
DEFAULT_DRAFT = "auto"
ROLE_LOCAL, ROLE_TARGET, ROLE_DRAFT = "local", "target", "draft"
ROLES = (ROLE_LOCAL, ROLE_TARGET, ROLE_DRAFT)


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
    m.add_argument("--prefill-chunk", type=int, default=0, metavar="TOKENS",
                   help="the target prefills a prompt this many tokens at a time and verifies the other requests "
                        "in between, so a long prompt does not stall their streams (default 0: as many as take "
                        "about half a second, measured as it goes)")
    m.add_argument("--prefix-cache-tokens", type=int, default=DEFAULT_PREFIX_CACHE_TOKENS, metavar="TOKENS",
                   help="the target keeps finished requests' KV for later prompts that start the same way (a "
                        "chat's next turn, a shared system prompt), up to this many tokens, least recently used "
                        f"first out (default: {DEFAULT_PREFIX_CACHE_TOKENS}). The server keeps them per API key: "
                        "a cached prefix answers faster, a timing side channel between tenants")
    m.add_argument("--no-prefix-cache", dest="prefix_cache_tokens", action="store_const", const=0,
                   help="prefill every prompt from scratch (same as --prefix-cache-tokens 0)")
    m.add_argument("--prefix-cache-dir", default=None, metavar="DIR",
                   help="llama.cpp target: save the prefix cache's entries to DIR when it stops and load them when "
                        "it starts, so a long system prompt stays cached across restarts (default: not kept)")
    m.add_argument("--prefill-timeout", type=float, default=CoordinatorConfig.prefill_timeout_s, metavar="S",
                   help="a prompt's prefill may take this long (default: %(default)g)")
    m.add_argument("--verify-timeout", type=float, default=CoordinatorConfig.verify_timeout_s, metavar="S",
                   help="one round's verification may take this long, counted from when the target takes it up "
                        "(default: %(default)g)")
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
    if args.prefix_cache_tokens < 0:
        raise ValueError(f"--prefix-cache-tokens must be >= 0 (0: off), got {args.prefix_cache_tokens}")
    if not 0 <= args.prefill_chunk <= MAX_BATCH_ROWS:
        raise ValueError(f"--prefill-chunk must be in 0..{MAX_BATCH_ROWS} (0: sized by time), got {args.prefill_chunk}")
    for flag in ("prefill_timeout", "verify_timeout"):
        if not getattr(args, flag) > 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be > 0 seconds, got {getattr(args, flag)}")


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
                           llama_extra_buffers=args.llama_extra_buffers, llama_ctx=args.llama_ctx, batch_rows=args.batch_rows,
                           prefill_chunk=args.prefill_chunk, prefix_cache_tokens=args.prefix_cache_tokens,
                           prefix_cache_dir=args.prefix_cache_dir if args.role != ROLE_DRAFT else None,
                           prefill_timeout_s=args.prefill_timeout,
                           verify_timeout_s=args.verify_timeout, depth=args.depth, top_k=args.top_k, max_nodes=args.max_nodes,
                           auto_tree=args.auto_tree, gate=args.gate, force_draft=args.force_draft,
                           overlap=args.overlap, draft_layers=args.draft_layers, log_level=args.log_level,
                           suffix_cache_tokens=args.suffix_cache_tokens,
                           heartbeat_interval_s=args.heartbeat_interval, heartbeat_liveness=args.liveness,
                           **options)
