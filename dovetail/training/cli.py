"""``dovetail-train``: extract target features, train a feature draft, evaluate it.

    dovetail-train extract --target MODEL --conversations 2000            # ShareGPT as written
    dovetail-train extract --target MODEL --source humaneval --problems 40:164   # self-distillation
    dovetail-train extract --target MODEL --source humaneval --problems 0:40     # for eval --offline
    dovetail-train extract --target MODEL --source sharegpt-code --code-prompts 800  # more self-distillation
    dovetail-train train   --target MODEL --out DRAFT_DIR --data sharegpt,humaneval:40:164,sharegpt-code:800
    dovetail-train eval    --target MODEL --draft DRAFT_DIR [--offline]

``extract`` caches the target's hidden states: of ShareGPT training conversations (never
the held-out ones), or of the target's own greedy answers (through the llama.cpp backend
that verifies at inference) to HumanEval problems or to code prompts cut from ShareGPT's
Python blocks. ``train`` reads those caches and
resumes from DRAFT_DIR when it holds a run. ``eval`` runs held-out prompts (HumanEval
problems 0..39 by default) through the real pipeline (target worker + feature-draft worker)
and reports the mean tokens committed per round; ``--offline`` replays the recorded greedy
answers through the draft worker's handler instead (dovetail/training/distill.py).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

log = logging.getLogger("dovetail.training.train")


def add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", required=True, help="the target model: HF folder, .gguf file or registry name")
    p.add_argument("--cache-dir", default=None, help="cache root (default ~/.cache/dovetail)")
    p.add_argument("--max-len", type=int, default=1024, help="tokens kept per conversation (chat template applied)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dovetail-train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    ex = sub.add_parser("extract", help="compute and cache the target's hidden states of ShareGPT conversations")
    add_common(ex)
    ex.add_argument("--conversations", type=int, default=1000, help="training conversations to extract")
    ex.add_argument("--shard-size", type=int, default=64, help="conversations per cache shard (resume granularity)")
    ex.add_argument("--dtype", default="auto", help="target dtype on the CPU: auto (bf16 where native), float32, ...")
    ex.add_argument("--source", default="sharegpt", choices=("sharegpt", "humaneval", "sharegpt-code"),
                    help="sharegpt: its conversations as written; humaneval: the target's own greedy answers "
                         "(self-distillation) to the HumanEval problems in --problems; sharegpt-code: its greedy "
                         "completions of --code-prompts Python prefixes from ShareGPT's training conversations")
    ex.add_argument("--code-prompts", type=int, default=800,
                    help="code prompts answered with --source sharegpt-code (the first third of a conversation's "
                         "first Python block, at most 96 tokens)")
    ex.add_argument("--width", type=int, default=16,
                    help="answers decoded side by side in one llama.cpp call (1: one after another)")
    ex.add_argument("--problems", default="40:164", metavar="A:B",
                    help="HumanEval problems answered with --source humaneval (evaluation uses 0:40)")
    ex.add_argument("--max-new-tokens", type=int, default=192, help="answer length (--source humaneval, sharegpt-code)")
    ex.add_argument("--threads", type=int, default=None, help="llama.cpp threads (default: all CPUs)")
    tr = sub.add_parser("train", help="train (or resume training) a feature draft on the cached features")
    add_common(tr)
    tr.add_argument("--out", required=True, help="draft checkpoint folder (also holds the resumable train state)")
    tr.add_argument("--kind", default="dgf", choices=("dgf", "eagle"), help="fusion: DGF, or EAGLE concat+Linear baseline")
    tr.add_argument("--layers", type=int, default=1, help="decoder layers of the draft")
    tr.add_argument("--intermediate-size", type=int, default=None, help="FFN width of the draft layers (default: the target's)")
    tr.add_argument("--steps", type=int, default=1000, help="total optimizer steps (a resumed run continues up to this)")
    tr.add_argument("--lr", type=float, default=3e-5, help="AdamW learning rate")
    tr.add_argument("--warmup", type=int, default=0,
                    help="linear warm-up steps, then cosine decay to lr/10 (default 0: constant lr)")
    tr.add_argument("--batch-size", type=int, default=8, help="windows per step")
    tr.add_argument("--seq-len", type=int, default=256, help="positions per window")
    tr.add_argument("--save-every", type=int, default=200, help="steps between checkpoints")
    tr.add_argument("--draft-vocab", type=int, default=None, metavar="N",
                    help="reduced LM head: only the N most frequent tokens of the training data (default: all)")
    tr.add_argument("--data", default="sharegpt", metavar="SOURCES",
                    help="comma-separated training sets from `extract`: sharegpt, humaneval:A:B for the "
                         "target's answers to HumanEval problems A..B-1, sharegpt-code:N for its completions of "
                         "N ShareGPT code prompts (e.g. sharegpt,humaneval:40:164,sharegpt-code:800)")
    tr.add_argument("--answer-len", type=int, default=192, help="--max-new-tokens the answers were extracted with")
    tr.add_argument("--device", default="cpu", help="'cpu' or 'cuda:N'")
    tr.add_argument("--seed", type=int, default=0, help="initialisation and batch-sampling seed")
    tr.add_argument("--amp", action="store_true", help="bf16 autocast for the forward/backward (GPU training)")
    tr.add_argument("--unroll", type=int, default=1, metavar="K",
                    help="also train K-1 draft steps fed on the draft's own features, as tree levels 2..K "
                         "are (training-time test); each step costs about one more forward")
    tr.add_argument("--init", default=None, metavar="DIR",
                    help="start from this draft checkpoint's weights (its shape; --kind/--layers/... are "
                         "ignored), e.g. to fine-tune a shipped draft; a run already saved in --out wins")
    tr.add_argument("--layers-from-target", action="store_true",
                    help="start the draft's decoder layers as copies of the target's top layers (a narrower "
                         "--intermediate-size keeps the FFN channels with the largest weight norms) instead of "
                         "random weights; the fusion stays random")
    tr.add_argument("--no-resume", dest="resume", action="store_false", help="start over even if --out holds a run")
    ev = sub.add_parser("eval", help="mean accepted length on held-out ShareGPT prompts, through the real pipeline")
    add_common(ev)
    ev.add_argument("--draft", required=True, help="feature-draft checkpoint folder")
    ev.add_argument("--prompt-set", default="humaneval", choices=("humaneval", "sharegpt"),
                    help="humaneval: the problems in --problems (default 0:40, never trained on); "
                         "sharegpt: the first --prompts held-out conversations' first user turns")
    ev.add_argument("--prompts", type=int, default=20, help="held-out ShareGPT prompts to run (--prompt-set sharegpt)")
    ev.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default), else sampled")
    ev.add_argument("--max-new-tokens", type=int, default=128, help="tokens generated per prompt")
    ev.add_argument("--draft-device", default=None, help="'cpu' or 'cuda:N' (default: the first GPU, else the CPU)")
    ev.add_argument("--depth", type=int, default=None, help="tree depth (default: automatic sizing)")
    ev.add_argument("--top-k", type=int, default=None, help="children per tree node")
    ev.add_argument("--max-nodes", type=int, default=None, help="tree tokens per round")
    ev.add_argument("--offline", action="store_true",
                    help="replay recorded greedy target answers (extract --source humaneval --problems 0:40) "
                         "instead of running the target: exact acceptance for greedy, trees of any size in seconds")
    ev.add_argument("--eval-answer-len", type=int, default=192,
                    help="--max-new-tokens the recorded answers were extracted with")
    ev.add_argument("--problems", default="0:40", metavar="A:B", help="HumanEval problems evaluated")
    return p


def training_records(target_path, max_len: int, limit: int | None, held: bool = False):
    """Tokenized ShareGPT conversations: the training split, or the held-out one."""
    from dovetail.models.sharegpt import read_sharegpt, sharegpt_path, split_records, to_messages
    from dovetail.training.data import tokenize
    from dovetail.models.loading import load_tokenizer
    tok = load_tokenizer(target_path)
    train, heldout = split_records(read_sharegpt(sharegpt_path()))
    records = (heldout if held else train)[:limit]
    return tok, [(r, tokenize(tok, to_messages(r), max_len)) for r in records]


def problem_range(spec: str) -> tuple[int, int]:
    try:
        a, b = (int(x) for x in spec.split(":"))
    except ValueError:
        raise SystemExit(f"--problems takes A:B (e.g. 40:164), got {spec!r}") from None
    if not 0 <= a < b <= 164:
        raise SystemExit(f"--problems {spec}: HumanEval has problems 0..163")
    return a, b


def answers_dir(ident, cache_dir, a: int, b: int, max_new: int) -> Path:
    from dovetail.training.data import features_dir
    return features_dir(ident, cache_dir) / f"humaneval-{a}-{b}-greedy{max_new}"


def code_answers_dir(ident, cache_dir, n: int, max_new: int) -> Path:
    from dovetail.training.data import features_dir
    return features_dir(ident, cache_dir) / f"sharegpt-code-{n}-greedy{max_new}"


def run_extract_answers(args, target, ident) -> dict:
    """Self-distillation: the target's greedy answers to HumanEval problems or code prompts."""
    import os
    from dovetail.models.loading import default_stop_ids
    from dovetail.training.distill import code_prompts, generate_corpus
    from dovetail.models.loading import load_tokenizer
    from dovetail.workers.llama import LlamaBackend
    if not str(target).endswith(".gguf"):
        raise SystemExit(f"--source {args.source} answers through the llama.cpp backend: give a GGUF target")
    if args.width < 1:
        raise SystemExit("--width must be at least 1")
    tok = load_tokenizer(target)
    if args.source == "humaneval":
        from dovetail.models.prompts import load_humaneval
        a, b = problem_range(args.problems)
        prompts = [tok.encode(p["prompt"], add_special_tokens=False) for p in load_humaneval(progress=True)[a:b]]
        folder, what = answers_dir(ident, args.cache_dir, a, b, args.max_new_tokens), {"problems": f"{a}:{b}"}
    else:
        from dovetail.models.sharegpt import read_sharegpt, sharegpt_path, split_records
        train, _ = split_records(read_sharegpt(sharegpt_path()))  # never the held-out conversations
        prompts = code_prompts(tok, train, args.code_prompts)
        if len(prompts) < args.code_prompts:
            raise SystemExit(f"--code-prompts {args.code_prompts}: ShareGPT's training split has {len(prompts)}")
        folder = code_answers_dir(ident, args.cache_dir, args.code_prompts, args.max_new_tokens)
        what = {"code_prompts": len(prompts)}
    threads = args.threads or len(os.sched_getaffinity(0))
    longest = max(map(len, prompts)) + args.max_new_tokens + 1
    backend = LlamaBackend(str(target), threads=threads, n_ctx=max(4096, args.width * longest),
                           n_seqs=max(2, args.width), device_label="cpu")
    try:
        stats = generate_corpus(backend, prompts, folder, args.max_new_tokens, set(default_stop_ids(tok)),
                                width=args.width)
    finally:
        backend.close()
    return {"folder": str(folder), **what, "width": args.width, **stats}


def run_extract(args) -> dict:
    from dovetail.draft.checkpoint import load_target_pieces
    from dovetail.models.fetch import resolve_model
    from dovetail.training.data import extract_features, features_dir
    from dovetail.models.loading import choose_dtype
    from dovetail.workers.hf import CausalLM
    target = resolve_model(args.target)
    ident = load_target_pieces(target).identity
    if args.source != "sharegpt":
        return run_extract_answers(args, target, ident)
    folder = features_dir(ident, args.cache_dir)
    meta = {"target": ident.__dict__, "max_len": args.max_len, "shard_size": args.shard_size}
    meta_path = folder / "meta.json"
    if meta_path.exists() and {k: v for k, v in json.loads(meta_path.read_text()).items() if k != "conversations"} != meta:
        raise SystemExit(f"{folder} was extracted with other settings ({meta_path}); remove it or match them")
    _, data = training_records(target, args.max_len, args.conversations)
    folder.mkdir(parents=True, exist_ok=True)
    meta_path.write_text(json.dumps({**meta, "conversations": len(data)}, indent=1))
    lm = CausalLM.load(target, dtype=choose_dtype(args.dtype, "cpu"))
    stats = extract_features(lm, [toks for _, toks in data], folder, args.shard_size)
    return {"folder": str(folder), "conversations": len(data), "dtype": str(lm.dtype), **stats}


def training_data(sources: str, ident, cache_dir, answer_len: int) -> list:
    """The cached sequences of every source named in ``sources`` (see train --data)."""
    from dovetail.training.data import features_dir, read_shards
    data = []
    for src in filter(None, (x.strip() for x in sources.split(","))):
        if src == "sharegpt":
            folder, how = features_dir(ident, cache_dir), "dovetail-train extract"
        elif src.startswith("humaneval:"):
            a, b = problem_range(src.removeprefix("humaneval:"))
            if a < 40:
                raise SystemExit("HumanEval problems 0..39 are the evaluation set: train on 40:164")
            folder = answers_dir(ident, cache_dir, a, b, answer_len)
            how = f"dovetail-train extract --source humaneval --problems {a}:{b} --max-new-tokens {answer_len}"
        elif src.startswith("sharegpt-code:"):
            count = src.removeprefix("sharegpt-code:")
            n = int(count) if count.isdigit() else 0
            if n < 1:
                raise SystemExit(f"--data {src}: give the number of code prompts, e.g. sharegpt-code:800")
            folder = code_answers_dir(ident, cache_dir, n, answer_len)
            how = f"dovetail-train extract --source sharegpt-code --code-prompts {n} --max-new-tokens {answer_len}"
        else:
            raise SystemExit(f"--data: unknown source {src!r} (sharegpt, humaneval:A:B, sharegpt-code:N)")
        got = read_shards(folder)
        if not got:
            raise SystemExit(f"no cached features for {src} in {folder}: run `{how}` first")
        log.info("%s: %d sequences, %d tokens", src, len(got), sum(len(s.tokens) for s in got))
        data += got
    if not data:
        raise SystemExit("--data names no training set")
    return data


def run_train(args) -> dict:
    from dovetail.draft.checkpoint import (
        CONFIG, init_layers_from_target, load_feature_draft, load_target_pieces, new_feature_draft,
    )
    from dovetail.models.fetch import resolve_model
    from dovetail.training.train import TrainConfig, check_kind, frequent_tokens, train
    check_kind(args.kind, args.layers)
    try:
        cfg = TrainConfig(steps=args.steps, lr=args.lr, warmup=args.warmup, batch_size=args.batch_size,
                          seq_len=args.seq_len, save_every=args.save_every, seed=args.seed, amp=args.amp,
                          unroll=args.unroll)
    except ValueError as e:
        raise SystemExit(f"dovetail-train train: {e}") from None
    if args.layers_from_target and args.init:
        raise SystemExit("dovetail-train train: --layers-from-target starts new layers; --init starts from a checkpoint")
    target = resolve_model(args.target)
    pieces = load_target_pieces(target)
    data = training_data(args.data, pieces.identity, args.cache_dir, args.answer_len)
    out = Path(args.out)
    if args.resume and (out / CONFIG).exists():  # the saved run decides the shape
        model = load_feature_draft(out, pieces, device=args.device)
    elif args.init:
        model = load_feature_draft(args.init, pieces, device=args.device)
        log.info("starting from %s (%s, %d layers)", args.init, model.config.kind, model.config.num_layers)
    else:
        vocab = frequent_tokens(data, args.draft_vocab) if args.draft_vocab else None
        model = new_feature_draft(pieces, args.kind, args.layers, args.intermediate_size, args.seed,
                                  draft_vocab=vocab)
        if args.layers_from_target:
            used = init_layers_from_target(model, target)
            log.info("draft layers start from target layers %s", used)
        model = model.to(args.device)
    t0 = time.perf_counter()
    losses = train(model, data, cfg, out, resume=args.resume)
    secs = time.perf_counter() - t0
    return {"out": str(out), "steps_run": len(losses), "seconds": secs,
            "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
            "tokens_per_s": len(losses) * cfg.batch_size * cfg.seq_len / secs if secs else 0.0}


def run_eval_offline(args) -> dict:
    from dovetail.training.distill import offline_tau, read_answers
    from dovetail.draft.checkpoint import load_feature_draft, load_target_pieces
    from dovetail.models.fetch import resolve_model
    from dovetail.workers.feature_draft import FeatureDraftHandler
    target = resolve_model(args.target)
    pieces = load_target_pieces(target)
    a, b = problem_range(args.problems)
    folder = answers_dir(pieces.identity, args.cache_dir, a, b, args.eval_answer_len)
    answers = read_answers(folder)
    if not answers:
        raise SystemExit(f"no recorded answers in {folder}: run `dovetail-train extract --source humaneval "
                         f"--problems {a}:{b} --max-new-tokens {args.eval_answer_len}` first")
    model = load_feature_draft(args.draft, pieces, device=args.draft_device or "cpu")
    handler = FeatureDraftHandler(model, pieces.identity.tokenizer_hash)
    return offline_tau(handler, answers, args.depth or 4, args.top_k or 4, args.max_nodes or 16,
                       max_new=args.max_new_tokens)


def run_eval(args) -> dict:
    if args.offline:
        return run_eval_offline(args)
    import dovetail
    from dovetail.models.fetch import resolve_model
    from dovetail.models.sharegpt import to_messages
    target = resolve_model(args.target)
    if args.prompt_set == "humaneval":
        from dovetail.models.prompts import load_humaneval
        a, b = problem_range(args.problems)
        prompts = [p["prompt"] for p in load_humaneval(progress=True)[a:b]]
    else:
        _, held = training_records(target, args.max_len, args.prompts, held=True)
        prompts = [[next(m for m in to_messages(r) if m["role"] == "user")] for r, _ in held]
    shape = {k: v for k, v in (("depth", args.depth), ("top_k", args.top_k), ("max_nodes", args.max_nodes))
             if v is not None}
    rounds = accepted = drafted = fallbacks = 0
    draft_s = seconds = 0.0
    with dovetail.launch(target, f"feature:{args.draft}", draft_device=args.draft_device, **shape) as coord:
        for prompt in prompts:
            r = coord.generate(prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
            rounds += r.stats.rounds
            accepted += r.stats.accepted
            drafted += r.stats.drafted
            fallbacks += r.stats.draft_fallback  # a failing draft would make the mean meaningless
            draft_s += r.stats.draft_s
            seconds += r.stats.seconds
    return {"prompts": len(prompts), "rounds": rounds, "drafted": drafted, "draft_fallbacks": fallbacks,
            "mean_accepted": accepted / rounds if rounds else 0.0,
            "draft_ms_per_round": 1000 * draft_s / rounds if rounds else 0.0,
            "tokens_per_s": accepted / seconds if seconds else 0.0}


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    torch.set_grad_enabled(True)
    run = {"extract": run_extract, "train": run_train, "eval": run_eval}[args.command]
    print(json.dumps(run(args), indent=1))


if __name__ == "__main__":
    main()
