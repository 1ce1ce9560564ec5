"""Start the two worker processes and hand back a Coordinator wired to them."""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from dataclasses import replace
from pathlib import Path

import zmq

from dovetail.models.loading import load_tokenizer, stop_token_ids, tokenizer_hash
from dovetail.runtime.client import WorkerClient, WorkerError
from dovetail.models.options import (
    BACKENDS, DEFAULT_BATCH_ROWS, DEFAULT_LLAMA_CTX, DEFAULT_LLAMA_EXTRA_BUFFERS, LLAMA_MISSING, MAX_BATCH_ROWS, QUANTIZE_CHOICES,
    check_batch_rows,
    check_llama_ctx,
    check_llama_extra_buffers, llama_installed,
)
from dovetail.runtime.config import DEFAULT_DRAFT_LM, DEFAULT_DRAFT_LM_TOKENIZER, CoordinatorConfig
from dovetail.runtime.coordinator import Coordinator
from dovetail.system.cpus import format_cpus, parse_cpus
from dovetail.runtime.liveness import Liveness
from dovetail.protocol import Handshake, HandshakeMismatch, check_compatible
from dovetail.system.security import ClientKeys
from dovetail.models.options import DEFAULT_PREFIX_CACHE_TOKENS
from dovetail.system.worker_log import WorkerLog

log = logging.getLogger("dovetail")

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float64")


def launch(target=None, draft=None, *, target_address: str | None = None, client_keys: ClientKeys | None = None,
           target_cpus=None, draft_device=None, dtype: str = "auto", backend: str = "auto",
           draft_backend: str | None = None, target_quantize: str = "none", draft_quantize: str = "none",
           llama_extra_buffers: str = DEFAULT_LLAMA_EXTRA_BUFFERS, llama_ctx: int = DEFAULT_LLAMA_CTX,
           batch_rows: int = DEFAULT_BATCH_ROWS, prefill_chunk: int = 0,
           prefix_cache_tokens: int = DEFAULT_PREFIX_CACHE_TOKENS, prefix_cache_dir: str | None = None,
           **options) -> Coordinator:
    """Start a target worker (and a draft worker) and return a Coordinator for them.

    ``target``/``draft``: a Hugging Face model folder, a .gguf file, or a registry name
    ("qwen2.5-coder-1.5b-instruct", fetched once into the cache). ``draft=None`` decodes
    with the target alone, through the same worker: the baseline. ``draft="replay:FILE.json"``
    replays a recorded target output instead (workers/replay.py; see the replay_* options).
    ``draft="feature:CKPT_DIR"`` runs a feature draft (DGF or EAGLE, trained by dovetail-train
    for this target; refused for any other) that reads the target's hidden states.
    ``draft="suffix"``: the suffix draft alone (runtime/suffix_draft.py): trees copied from the
    prompt, the output so far and earlier outputs, at no model cost and with no draft process;
    ``draft="suffix+MODEL"`` runs it beside a model draft (any of the forms here), each round
    verifying whichever promises more. ``draft="auto"``: without a GPU for the draft, the suffix
    draft alone (on a CPU a model draft shares the target's cores and seldom pays); with one, the
    suffix draft beside "suffix+auto"'s model: the feature draft shipped for this target
    (dovetail/draft/shipped/) when there is one for the draft's device
    (dovetail/draft/shipped/defaults.json), else the standalone draft model DEFAULT_DRAFT_LM.
    ``target_cpus``: "0-31", "0,2,4" or a list of ints. ``draft_device``: "cpu", "cuda:N", an int N, or None for the
    first GPU when there is one. ``dtype`` forces "float32", "bfloat16" or "float64" on both
    workers. ``backend``: how the target runs, "transformers", "llama.cpp" (a GGUF on
    llama.cpp's own kernels; needs the ``llama`` extra) or "auto" (the default: llama.cpp
    for a GGUF target when llama-cpp-python is installed, else transformers).
    ``draft_backend``: the same for a draft model; None picks llama.cpp for a GGUF draft on
    the CPU when the target uses it (a CPU draft step must be cheap), transformers otherwise.
    ``target_quantize="int8"`` (or "int4", transformers backend only) gives the target
    weight-only quantized decoder layers (workers/quant.py): faster on the CPU, a slightly
    different model, and output stays identical to that quantized target decoding alone.
    ``draft_quantize="int8"``: int8 weights for a feature draft on the CPU (a faster draft
    step; only its guesses can change, never the output).
    ``llama_extra_buffers``: llama.cpp's extra (repacked, AMX) weight buffers for the workers
    that run on llama.cpp: "auto" (the default) keeps them unless a test decode with them,
    run once per machine in a child process and cached, crashed (workers/llama_buffers.py);
    "on" / "off" force them. Ignored by transformers workers.
    ``llama_ctx``: the llama.cpp target's context in tokens, shared by all its open requests;
    one request (prompt and output) fits in it and in the model's trained context.
    ``batch_rows``: the target verifies the requests waiting for it together, up to this many
    rows in one forward (1: one request per forward), or fewer where the cost per row it
    measured at start-up stops falling; llama.cpp runs them in one decode, transformers in
    one padded forward.
    ``prefill_chunk``: the target prefills a prompt this many tokens at a time, verifying the
    other requests in between (0: as many as take about half a second, measured as it goes).
    ``prefix_cache_tokens``: the target keeps finished requests' KV, up to this many tokens,
    and a prompt that starts the same way (a chat's next turn, a shared system prompt) is
    prefilled only past the cached prefix (0: off; workers/prefix_cache.py).
    ``prefix_cache_dir``: a llama.cpp target saves its cache's entries (KV and tokens) to this
    folder when it stops and loads them when it starts (a long system prompt stays cached
    across restarts); None: not kept.
    Other keyword options are fields of :class:`CoordinatorConfig`.

    ``target_address="tcp://HOST:PORT"``: use the target worker already serving there
    (``dovetail-launch --role target``) instead of starting one; ``client_keys`` are its
    CurveZMQ keys (required off loopback). Only the draft starts here. ``target`` is then
    optional and only read for its tokenizer (checked against the remote target's hash);
    without it the draft model's tokenizer is used (the handshake proved it the same), and
    with neither, prompts must be token ids. ``target_cpus``, ``backend``, quantization and
    the target's dtype are set where the target runs.
    """
    from dovetail.models.fetch import resolve_model

    if dtype not in DTYPE_CHOICES:
        raise ValueError(f"dtype must be one of {DTYPE_CHOICES}, got {dtype!r}")
    if target_quantize not in QUANTIZE_CHOICES:  # here, before any process starts
        raise ValueError(f"target_quantize must be one of {QUANTIZE_CHOICES}, got {target_quantize!r}")
    if draft_quantize not in ("none", "int8"):
        raise ValueError(f"draft_quantize must be 'none' or 'int8', got {draft_quantize!r}")
    check_llama_extra_buffers(llama_extra_buffers)
    check_llama_ctx(llama_ctx)
    check_batch_rows(batch_rows)
    if not 0 <= prefill_chunk <= MAX_BATCH_ROWS:
        raise ValueError(f"prefill_chunk must be in 0..{MAX_BATCH_ROWS} (0: sized by time), got {prefill_chunk}")
    if prefix_cache_tokens < 0:
        raise ValueError(f"prefix_cache_tokens must be >= 0 (0: off), got {prefix_cache_tokens}")
    if prefix_cache_dir and not prefix_cache_tokens:
        raise ValueError("prefix_cache_dir keeps the prefix cache across restarts: it needs prefix_cache_tokens > 0")
    remote = target_address is not None
    if remote and prefix_cache_dir:
        raise ValueError("prefix_cache_dir is the target's: give --prefix-cache-dir to dovetail-launch --role target")
    if remote:
        check_remote(target_address, client_keys, target_cpus)
    elif target is None:
        raise ValueError("give a target model, or the target_address of a target worker serving elsewhere")
    config = CoordinatorConfig(**options)
    cpus = parse_cpus(target_cpus)
    target_path = resolve_model(str(target)) if target is not None else None
    device = _draft_device(draft_device)
    suffix, draft = split_suffix(draft, device)
    draft = pick_draft(draft, target_path, device, target_spec=None if target is None else str(target))
    if not remote:
        backend = pick_backend(backend, target_path, target_quantize)
        check_backend(backend, target_path)
        if prefix_cache_dir and backend != "llama.cpp":
            raise ValueError("prefix_cache_dir saves llama.cpp KV state: it needs the llama.cpp backend (a GGUF target), "
                             f"not {backend}")
    # "replay:FILE.json" starts workers/replay.py: the target's recorded output, corrupted at
    # config.replay_corrupt, so that the acceptance rate is known (benchmarks, tests).
    replay = str(draft)[len("replay:"):] if str(draft).startswith("replay:") else None
    if replay is not None and not Path(replay).is_file():
        raise FileNotFoundError(f"replay script not found: {replay}")
    replay = str(Path(replay).resolve()) if replay is not None else None  # workers may chdir
    feature = str(draft)[len("feature:"):] if str(draft).startswith("feature:") else None
    if feature is not None:
        if not Path(feature).is_dir():
            raise FileNotFoundError(f"feature-draft checkpoint folder not found: {feature}")
        feature = str(Path(feature).resolve())
    draft_path = (resolve_model(str(draft)) if draft is not None and replay is None and feature is None
                  else None)
    if draft_quantize != "none" and (feature is None or device != "cpu"):
        raise ValueError("draft_quantize='int8' is for a feature draft on the CPU (draft='feature:DIR' or a shipped "
                         f"one, draft_device='cpu'); got draft {draft!r} on {device!r}")
    if draft is not None and draft_device is None and device == "cpu":
        log.warning("no GPU found: the draft runs on the CPU, sharing the target's cores")
    config = settle_sizing(config)
    draft_backend = pick_draft_backend(draft_backend, backend, draft_path, device, config)
    if draft_backend == "llama.cpp":
        check_backend(draft_backend, draft_path)
        config = replace(config, top_k=1)  # llama.cpp drafts grow chains
    config = config.with_tree_defaults(device)
    overlap = config.overlap if config.overlap is not None else device.startswith("cuda")
    overlap = overlap and feature is None  # a feature draft cannot draft ahead of the target's features

    run_dir = Path(tempfile.mkdtemp(prefix="dovetail-"))
    ctx = zmq.Context()
    clients: list[WorkerClient] = []
    liveness = Liveness(ctx, config.heartbeat_interval_s, config.heartbeat_liveness).start()
    try:
        if remote:
            tgt = WorkerClient(ctx, "target", target_address, None, keys=client_keys)
        else:
            tgt = _spawn(ctx, "target", run_dir, [
                "--model", str(target_path), "--dtype", dtype, "--feature-codec", config.feature_codec,
                "--backend", backend, "--quantize", target_quantize, "--batch-rows", str(batch_rows),
                "--prefill-chunk", str(prefill_chunk), "--prefix-cache-tokens", str(prefix_cache_tokens),
                *(["--llama-extra-buffers", llama_extra_buffers, "--ctx", str(llama_ctx)]
                  if backend == "llama.cpp" else []),
                *(["--prefix-cache-dir", str(prefix_cache_dir)] if prefix_cache_dir else []),
                *(["--cpus", format_cpus(cpus)] if cpus else [])], config)
        clients.append(tgt)
        hs_tgt, starts_draft = None, True
        if (feature is not None or draft_path is not None) and config.auto_tree and not config.force_draft:
            # Ask the target's curve first: where no draft can pay, none is started at all.
            hs_tgt = _handshake(tgt, config, remote=remote)
            liveness.watch(tgt)
            reason = _skip_draft_reason(hs_tgt, config, overlap)
            if reason is not None:
                log.warning(reason)
                starts_draft = False
        dft = None
        draft_cpus = parse_cpus(config.draft_cpus) or cpus
        cpu_flags = ["--cpus", format_cpus(draft_cpus)] if draft_cpus and device == "cpu" else []
        if starts_draft and feature is not None:
            dft = _spawn(ctx, "draft", run_dir, [
                "--feature-draft", feature, "--target-model", str(target_path), "--dtype", dtype,
                "--device", device, "--feature-codec", config.feature_codec, "--quantize", draft_quantize,
                *cpu_flags], config)
            clients.append(dft)
        elif starts_draft and draft_path is not None:
            dft = _spawn(ctx, "draft", run_dir, [
                "--model", str(draft_path), "--dtype", dtype, "--device", device, "--backend", draft_backend,
                "--prefix-cache-tokens", str(prefix_cache_tokens),
                *(["--llama-extra-buffers", llama_extra_buffers] if draft_backend == "llama.cpp" else []),
                *(["--layers", str(config.draft_layers)] if config.draft_layers else []), *cpu_flags], config)
            clients.append(dft)
        elif replay is not None and config.replay_model:  # identity from its own model
            dft = _spawn(ctx, "replay", run_dir, _replay_args(replay, config, dtype, device), config)
            clients.append(dft)
        if hs_tgt is None:
            hs_tgt = _handshake(tgt, config, remote=remote)
            liveness.watch(tgt)  # only now: a worker binds its socket after loading its model
        if replay is not None and dft is None:  # no model: it takes the target's identity
            dft = _spawn(ctx, "replay", run_dir, _replay_args(replay, config, dtype, device) + [
                "--vocab-size", str(hs_tgt.vocab_size), "--tokenizer-hash", hs_tgt.tokenizer_hash], config)
            clients.append(dft)
        hs_dft = _handshake(dft, config) if dft else None
        if dft is not None:
            liveness.watch(dft)
        if hs_dft is not None:
            check_compatible(hs_tgt, hs_dft)
        tokenizer = _tokenizer(target_path, draft_path, hs_tgt) if remote else _local_tokenizer(target_path)
    except BaseException:
        liveness.stop()
        for c in clients:
            c.close()
        ctx.term()
        shutil.rmtree(run_dir, ignore_errors=True)
        raise
    log.info("target %s on %s; draft %s on %s; overlap %s", hs_tgt.model,
             target_address or f"CPUs {format_cpus(cpus) if cpus else 'all'}",
             (hs_dft.model if hs_dft else "none") + (" and the suffix draft" if suffix else ""),
             hs_dft.device if hs_dft else "-", overlap)
    if config.stop_token_ids is None and target_path is not None:  # what the model's own files say
        config = replace(config, stop_token_ids=stop_token_ids(target_path, tokenizer))
    return Coordinator(tgt, dft, hs_tgt, hs_dft, tokenizer, config, overlap=overlap,
                       context=ctx, run_dir=run_dir, liveness=liveness, suffix=suffix)


def settle_sizing(config: CoordinatorConfig) -> CoordinatorConfig:
    """auto_tree and gate as given, or their defaults: automatic sizing unless depth or
    max_nodes fixes the shape (a shape the user fixed is kept as given), the gate with it."""
    if config.auto_tree is None:
        config = replace(config, auto_tree=config.depth is None and config.max_nodes is None)
    if config.gate is None:
        config = replace(config, gate=config.auto_tree)
    if config.gate and not config.auto_tree:
        raise ValueError("gate=True prices draft tokens with the automatic tree sizer: it needs auto_tree "
                         "(pass auto_tree=True to keep depth/max_nodes as caps)")
    return config


def _skip_draft_reason(hs_target: Handshake, config: CoordinatorConfig, overlap: bool) -> str | None:
    from dovetail.runtime.autotree import skip_draft_reason
    if not hs_target.verify_us:  # not measured: nothing to judge by
        return None
    return skip_draft_reason(hs_target.verify_us, config.depth, config.top_k, config.max_nodes, overlap)


SUFFIX = "suffix"


def split_suffix(draft, device: str) -> tuple[bool, object]:
    """(whether the suffix draft runs, the model draft) for launch()'s ``draft``."""
    if draft == "auto":
        return True, None if device == "cpu" else "auto"
    if draft == SUFFIX:
        return True, None
    if isinstance(draft, str) and draft.startswith(SUFFIX + "+"):
        model = draft[len(SUFFIX) + 1:]
        if not model or model == SUFFIX:
            raise ValueError(f"draft={draft!r}: name the model draft after 'suffix+' (e.g. 'suffix+auto')")
        return True, model
    return False, draft


def pick_draft(draft, target_path, device: str = "cpu", target_spec: str | None = None):
    """Resolve draft="auto" (see launch()) for a draft on ``device``; ``target_spec``: the
    target as the user named it (a Hub id gets the small model of its family)."""
    if draft != "auto":
        return draft
    from dovetail.draft.checkpoint import shipped_draft
    shipped = shipped_draft(target_path, device) if target_path is not None else None
    if shipped is not None:
        log.info("draft: the feature draft shipped for %s on %s (%s)", Path(target_path).name, device, shipped.name)
        return f"feature:{shipped}"
    if target_path is None:
        return DEFAULT_DRAFT_LM  # a remote target's tokenizer is checked at the handshake
    target_hash = tokenizer_hash(load_tokenizer(target_path), 0)
    why = ""
    if target_spec is not None and not Path(target_spec).expanduser().exists():
        from dovetail.models.hub import family_draft, parse_hub_id
        if parse_hub_id(target_spec) is not None:
            family, why = family_draft(target_spec, target_hash, gguf=str(target_path).endswith(".gguf"))
            if family is not None:
                log.info("draft: %s (%s)", family, why)
                return family
    if target_hash != DEFAULT_DRAFT_LM_TOKENIZER:
        log.warning("draft='auto': no feature draft ships for %s%s, and its tokenizer is not %s's, so no draft "
                    "model here can draft for it; decoding with the target alone (pass draft= a model with "
                    "the target's tokenizer)", Path(target_path).name, f" ({why})" if why else "", DEFAULT_DRAFT_LM)
        return None
    return DEFAULT_DRAFT_LM


def pick_backend(chosen: str, target_path, quantize: str = "none") -> str:
    """"auto": llama.cpp for a GGUF target when llama-cpp-python is installed, else
    transformers (also when asked to quantize: that is the transformers backend's)."""
    if chosen != "auto":
        return chosen
    fast = str(target_path).endswith(".gguf") and quantize == "none" and llama_installed()
    log.info("target backend: %s", "llama.cpp" if fast else "transformers")
    return "llama.cpp" if fast else "transformers"


def pick_draft_backend(chosen, target_backend: str, draft_path, device: str, config) -> str:
    if chosen is not None:
        return chosen
    auto = (target_backend == "llama.cpp" and device == "cpu" and draft_path is not None
            and str(draft_path).endswith(".gguf") and not config.draft_layers)
    return "llama.cpp" if auto else "transformers"


def check_backend(backend: str, target_path) -> None:
    """Refuse a backend that cannot run this target before any process starts."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "llama.cpp":
        if not llama_installed():
            raise RuntimeError(LLAMA_MISSING)
        if not str(target_path).endswith(".gguf"):
            raise ValueError(f"the llama.cpp backend runs .gguf targets, got {target_path}")


def _replay_args(script: str, config: CoordinatorConfig, dtype: str, device: str) -> list[str]:
    model = ["--model", str(config.replay_model), "--device", device] if config.replay_model else []
    return ["--script", script, "--corrupt", str(config.replay_corrupt), "--seed", str(config.replay_seed),
            "--dtype", dtype, *model]


def _draft_device(spec) -> str:
    if spec is None:
        import torch
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if isinstance(spec, int):
        return f"cuda:{spec}"
    spec = str(spec)
    if spec.isdigit():
        return f"cuda:{spec}"
    if spec == "cuda":
        return "cuda:0"
    if spec != "cpu" and not spec.startswith("cuda:"):
        raise ValueError(f"draft_device must be 'cpu', 'cuda:N' or an int, got {spec!r}")
    return spec


def _spawn(ctx, role: str, run_dir: Path, args: list[str], config: CoordinatorConfig) -> WorkerClient:
    address = f"ipc://{run_dir}/{role}.sock"
    # -X faulthandler: a crash in native code (llama.cpp, torch) prints the Python stack
    # into the worker's log instead of nothing.
    cmd = [sys.executable, "-X", "faulthandler", "-m", f"dovetail.workers.{role}", "--bind", address,
           "--parent-pid", str(os.getpid()), "--log-level", config.log_level,
           "--max-requests", str(config.worker_max_requests), *args]
    # The kernel's parent-death signal follows the spawning *thread* (workers/lifeline.py):
    # safe only from the main thread, which lives as long as this process does.
    if threading.current_thread() is threading.main_thread():
        cmd.append("--parent-death-signal")
    # torch's OpenMP threads busy-wait after each parallel region by default. Two workers
    # taking turns on the same cores (a CPU draft) then steal each other's time, which
    # makes every round many times slower; passive waiting costs a lone worker little.
    # llama.cpp is the exception: it opens one parallel region per graph and its threads
    # would fall asleep between layers' barriers (a 1.5B step: 35 ms -> 50 ms on 2 cores),
    # while OpenMP's default (spin briefly, then sleep) already frees the cores between steps.
    backend = args[args.index("--backend") + 1] if "--backend" in args else None
    llama = backend == "llama.cpp"
    env = {**({} if llama else {"OMP_WAIT_POLICY": "PASSIVE"}), **os.environ, **config.env}
    # Its stderr is shown live here and kept in run_dir/<role>.log (WorkerLog), whose last
    # lines go into the error if the worker dies: a notebook or a service may lose the live copy.
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    stderr_log = WorkerLog(proc.stderr, run_dir / f"{role}.log", role)
    log.info("started %s worker pid %d", role, proc.pid)
    return WorkerClient(ctx, role, address, proc, stderr_log=stderr_log, backend=backend)


def _handshake(client: WorkerClient, config: CoordinatorConfig, remote: bool = False) -> Handshake:
    """The first exchange with a worker. A local one may take startup_timeout_s to load its
    model; a remote one is already serving, so silence there means a wrong address, key or
    firewall, and connect_timeout_s reports that much sooner."""
    hello = Handshake(role="coordinator", vocab_size=0, tokenizer_hash="", hidden_size=0, dtype="",
                      feature_codec=config.feature_codec, pid=os.getpid())
    timeout, knob = ((config.connect_timeout_s, "connect_timeout_s") if remote
                     else (config.startup_timeout_s, "startup_timeout_s"))
    try:
        hs = client.call(hello, Handshake, timeout, knob)
    except WorkerError as e:
        raise WorkerError(client.role, e.code, _remote_failure(client, e) if remote else f"did not start: {e.detail}") from e
    client.vocab_size = hs.vocab_size
    return hs


def check_remote(address: str, keys: ClientKeys | None, target_cpus) -> None:
    """Refuse a remote target setup that could never work, before anything starts."""
    from dovetail.system.security import is_loopback
    if not address.startswith("tcp://"):
        raise ValueError(f"target_address must be tcp://HOST:PORT, got {address!r}")
    if keys is None and not is_loopback(address):
        raise ValueError(f"{address} is off loopback, where a target worker serves only with CurveZMQ: "
                         "pass client_keys=ClientKeys(SECRET_FILE, SERVER_PUBLIC_FILE) "
                         "(dovetail-launch keys writes both)")
    if target_cpus is not None:
        raise ValueError("target_cpus is set where the target runs (dovetail-launch --role target --target-cpus)")


def _remote_failure(client: WorkerClient, e: WorkerError) -> str:
    return (f"no handshake from {client.address}: {e}. Check that `dovetail-launch --role target` serves "
            "there, that the firewall lets this host reach its port, and that its --curve-allow folder "
            "holds this client's public key and client_keys the worker's public key (CurveZMQ failures "
            "are silent)")


def _local_tokenizer(target_path):
    return load_tokenizer(target_path)


def _tokenizer(target_path, draft_path, hs_target: Handshake):
    """The remote target's tokenizer from a local copy: the target's own files, else the draft's
    (its handshake hash equals the target's), else None (token ids only)."""
    if target_path is None:
        return load_tokenizer(draft_path) if draft_path is not None else None
    tok = load_tokenizer(target_path)
    if tokenizer_hash(tok, hs_target.vocab_size) != hs_target.tokenizer_hash:
        raise HandshakeMismatch(f"the tokenizer of {target_path} is not the remote target's "
                                f"({hs_target.model}, tokenizer hash {hs_target.tokenizer_hash})")
    return tok
