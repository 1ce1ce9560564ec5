"""Dovetail on a GPU machine at real model shapes, with random weights and a replay draft.

    bash bench/gpu.sh                    # Llama-2 7B shapes (and 13B if time allows)
    python -m bench.gpu --quick          # tiny shapes, a CPU smoke test

Nothing is downloaded: targets are random-weight Llama models of real shapes (7B: 4096
wide, 32 layers; 13B: 5120, 40), saved as bf16 HF folders in a temp dir. The draft is
workers/replay.py: it replays the target's own recorded greedy output with a set fraction
of tokens corrupted (so the acceptance rate is known), while running a real small model
(1 layer of the target's width by default: feature-draft sized) on the GPU so the draft
time is real. Per corruption level it reports tokens/s, speedup over target-only, the
measured mean accepted length τ against expected_tau, and the pipeline efficiency:
measured decode tokens/s ÷ (τ / mean verify seconds per round, measured in the same run),
i.e. how much of the verify-bound speed survives wire, Python, draft and idle overhead.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

# name: (hidden, layers, heads, intermediate, vocab). 7b/13b are Llama-2's shapes.
SIZES = {
    "tiny": (64, 2, 4, 128, 256),
    "1b": (2048, 16, 16, 5632, 32000),
    "7b": (4096, 32, 32, 11008, 32000),
    "13b": (5120, 40, 40, 13824, 32000),
}


def n_params(name: str) -> int:
    h, layers, _, inter, vocab = SIZES[name]
    return layers * (4 * h * h + 3 * h * inter) + 2 * vocab * h


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="7b,13b", help=f"target shapes to run, in order, from {sorted(SIZES)}")
    p.add_argument("--quick", action="store_true", help="CPU smoke test: tiny shape, 2 short prompts")
    p.add_argument("--prompts", type=int, default=3, help="number of random prompts")
    p.add_argument("--ctx", type=int, default=128, help="prompt length in tokens")
    p.add_argument("--new-tokens", type=int, default=48, help="tokens generated per prompt")
    p.add_argument("--depth", type=int, default=6, help="replayed chain length per round")
    p.add_argument("--levels", default="0.0,0.2,0.5", help="corruption levels, comma separated")
    p.add_argument("--draft-layers", type=int, default=1, help="layers of the random draft model on the GPU")
    p.add_argument("--draft-device", default=None, help="'cuda:N' or 'cpu' (default: cuda:0 when there is a GPU)")
    p.add_argument("--target-cpus", default=None, help="CPUs for the target worker, e.g. '1-15' (default: all)")
    p.add_argument("--dtype", default="auto", help="auto | bfloat16 | float32 | float64, for both workers")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, prompts and corruption")
    p.add_argument("--budget-s", type=float, default=420.0, help="skip a size whose estimated run would end past this")
    p.add_argument("--out-dir", default=str(Path(__file__).parent / "results"), help="where gpu-<date>.json goes")
    p.add_argument("--workdir", default=None, help="where model folders are written (default: a temp dir)")
    return p


def build_random_model(path: Path, shape, layers: int, seed: int, dtype: str = "bfloat16") -> Path:
    """A random Llama saved as an HF folder, fast: slices of a random pool written straight to disk.

    No model is built or initialised and the big matrices are never copied: their values do
    not matter for speed. But the output must not hang on bf16 rounding (verifying k tokens
    at once must pick what one-at-a-time decoding picked, or the replay diverges), so the
    argmax gets a wide margin: embeddings have std 1, layers std 0.006 (the residual stream
    stays close to the current token's embedding) and lm_head is the embedding with its rows
    permuted, so each token strongly predicts one successor (a long cycle, not a loop).
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, _, heads, inter, vocab = shape
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
                      tie_word_embeddings=False)
    with torch.device("meta"):
        shapes = {k: list(v.shape) for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    # Odd pool length: no multiple of a row length, so no two rows of a matrix are equal.
    base = torch.randn((1 << 24) + 4099, generator=gen)
    pools = {std: (base * std).to(getattr(torch, dtype)) for std in (1.0, 0.006)}
    ones = torch.ones(max(hidden, 1), dtype=pools[1.0].dtype)
    path.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(path)
    # One safetensors file written by hand (8-byte header length, JSON header, raw data):
    # safetensors.save_file would first copy every tensor; this writes the pool's bytes.
    plan, offset = [], 0
    embed = None  # set at embed_tokens, which comes before lm_head in the state dict
    for name, shp in shapes.items():
        n = int(torch.Size(shp).numel())
        if name.endswith("norm.weight"):
            pieces = [ones[:n]]
        elif name == "lm_head.weight":
            rows = embed.view(vocab, hidden)[torch.randperm(vocab, generator=gen)]
            pieces = [(rows.float() * 0.02).to(embed.dtype)]
        else:
            pool = pools[1.0 if "embed_tokens" in name else 0.006]
            off, pieces, left = int(torch.randint(0, pool.numel(), (1,), generator=gen)), [], n
            while left:  # tile the pool from a random offset
                m = min(left, pool.numel() - off)
                pieces.append(pool[off:off + m])
                left, off = left - m, 0
            if "embed_tokens" in name:
                embed = pieces[0] if len(pieces) == 1 else torch.cat(pieces)  # lm_head derives from it
        nbytes = n * pieces[0].element_size()
        plan.append((name, shp, pieces, offset, offset + nbytes))
        offset += nbytes
    st_dtype = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}[dtype]
    header = {"__metadata__": {"format": "pt"}}
    header.update({name: {"dtype": st_dtype, "shape": shp, "data_offsets": [b, e]} for name, shp, _, b, e in plan})
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path / "model.safetensors", "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for _, _, pieces, _, _ in plan:
            for piece in pieces:
                f.write(piece.contiguous().view(torch.uint8).numpy().data)
    return path


def run_prompts(coord, prompts, new_tokens) -> tuple[dict, list[list[int]]]:
    """Generate every prompt; sum the stats (seconds per part of the pipeline)."""
    keys = ("new_tokens", "rounds", "drafted", "accepted", "accepted_drafts", "speculative_hits",
            "seconds", "prefill_s", "draft_s", "verify_s", "wire_s")
    agg = dict.fromkeys(keys, 0)
    outs = []
    for p in prompts:
        r = coord.generate(p, max_new_tokens=new_tokens)
        outs.append(r.token_ids)
        for k in keys:
            agg[k] += getattr(r.stats, k)
    decode_s = agg["seconds"] - agg["prefill_s"]
    agg.update(tokens_per_s=agg["new_tokens"] / agg["seconds"], decode_tokens_per_s=agg["new_tokens"] / decode_s,
               tau=agg["accepted"] / agg["rounds"], verify_s_per_round=agg["verify_s"] / agg["rounds"],
               draft_s_per_round=agg["draft_s"] / agg["rounds"])
    # What decoding would reach if each round cost only its verification: the pipeline's bound.
    agg["bound_tokens_per_s"] = agg["tau"] / agg["verify_s_per_round"]
    agg["efficiency"] = agg["decode_tokens_per_s"] / agg["bound_tokens_per_s"]
    return agg, outs


def run_size(name: str, args, workdir: Path, device: str) -> dict:
    import numpy as np

    import dovetail
    from dovetail.runtime.recording import record_with
    from dovetail.spec.replay import expected_tau, save_script

    shape = SIZES[name]
    t0 = time.perf_counter()
    target = build_random_model(workdir / f"{name}-target", shape, shape[1], args.seed)
    draft = build_random_model(workdir / f"{name}-draft", shape, args.draft_layers, args.seed + 1)
    build_s = time.perf_counter() - t0
    rng = np.random.default_rng(args.seed)
    prompts = [rng.integers(3, shape[4], args.ctx).tolist() for _ in range(args.prompts)]
    script_path = workdir / f"{name}-script.json"
    save_script({"version": 1, "entries": []}, script_path)  # filled in once recorded
    levels = [float(x) for x in args.levels.split(",")]
    t1 = time.perf_counter()
    with dovetail.launch(target, f"replay:{script_path}", target_cpus=args.target_cpus, draft_device=device,
                         dtype=args.dtype, depth=args.depth, top_k=1, max_nodes=args.depth,
                         replay_model=str(draft), replay_seed=args.seed, startup_timeout_s=600) as coord:
        launch_s = time.perf_counter() - t1
        record_with(coord, prompts[:1], 4)  # warm-up (first-forward kernel set-up), discarded
        # Target-only: the baseline, and the recording the replay draft proposes from.
        draft_client, coord.draft = coord.draft, None
        try:
            base, ref = run_prompts(coord, prompts, args.new_tokens)
        finally:
            coord.draft = draft_client
        script = {"version": 1, "entries": [{"prompt": p, "continuation": o} for p, o in zip(prompts, ref)]}
        rows = []
        for i, c in enumerate(levels):
            save_script({**script, "corrupt": c}, script_path)  # the worker re-reads it per request
            if i == 0:
                coord.generate(prompts[0], max_new_tokens=8)  # warm the draft's GPU kernels
            row, outs = run_prompts(coord, prompts, args.new_tokens)
            row.update(corrupt=c, expected_tau=expected_tau(args.depth, c), lossless=outs == ref,
                       speedup=row["decode_tokens_per_s"] / base["decode_tokens_per_s"],
                       speedup_total=row["tokens_per_s"] / base["tokens_per_s"])
            rows.append(row)
        target_dev = coord.target_info.device
        draft_dev = coord.draft_info.device if coord.draft_info else "-"
    shutil.rmtree(target, ignore_errors=True)
    shutil.rmtree(draft, ignore_errors=True)
    return {"size": name, "shape": dict(zip(("hidden", "layers", "heads", "intermediate", "vocab"), shape)),
            "draft_layers": args.draft_layers, "target_device": target_dev, "draft_device": draft_dev,
            "build_s": build_s, "launch_s": launch_s, "seconds": time.perf_counter() - t0,
            "baseline": base, "levels": rows}


def table(res: dict, depth: int) -> str:
    lines = [f"### {res['size']} (draft: {res['draft_layers']} layer(s) on {res['draft_device']}; chain depth {depth})",
             "", "| corrupt | tok/s | decode tok/s | speedup | τ measured | τ expected | verify ms/round "
             "| draft ms/round | bound tok/s | efficiency | lossless |", "|" + "---|" * 11]
    b = res["baseline"]
    lines.append(f"| target-only | {b['tokens_per_s']:.2f} | {b['decode_tokens_per_s']:.2f} | 1.00 | 1.00 | 1.00 "
                 f"| {1e3 * b['verify_s_per_round']:.1f} | - | {b['bound_tokens_per_s']:.2f} | {b['efficiency']:.2f} | - |")
    for r in res["levels"]:
        lines.append(f"| {r['corrupt']:.2f} | {r['tokens_per_s']:.2f} | {r['decode_tokens_per_s']:.2f} "
                     f"| {r['speedup']:.2f} | {r['tau']:.2f} | {r['expected_tau']:.2f} "
                     f"| {1e3 * r['verify_s_per_round']:.1f} | {1e3 * r['draft_s_per_round']:.1f} "
                     f"| {r['bound_tokens_per_s']:.2f} | {r['efficiency']:.2f} | {r['lossless']} |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.sizes, args.prompts, args.ctx, args.new_tokens, args.depth = "tiny", 2, 16, 40, 4
    import torch
    device = args.draft_device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    names = [s.strip() for s in args.sizes.split(",") if s.strip()]
    unknown = [s for s in names if s not in SIZES]
    if unknown:
        raise SystemExit(f"unknown sizes {unknown}; choose from {sorted(SIZES)}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / f"gpu-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    import transformers
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv[1:] if argv is None else argv,
              "args": vars(args), "platform": platform.platform(), "cpus": torch.get_num_threads(),
              "torch": torch.__version__, "transformers": transformers.__version__,
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "sizes": [], "skipped": []}
    # Model folders are written then read once: RAM-backed /dev/shm is faster than a disk
    # when it holds the biggest target with room to spare (the loaded copy needs RAM too).
    biggest = 2 * max(n_params(n) for n in names)  # bf16 bytes
    shm = Path("/dev/shm")
    tmp_root = str(shm) if shm.is_dir() and shutil.disk_usage(shm).free > 2.5 * biggest else None
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="dovetail-gpu-", dir=tmp_root))
    result["workdir"] = str(workdir)
    start, params_s = time.perf_counter(), None  # seconds per parameter of the last size run
    try:
        for name in names:
            params = n_params(name)
            elapsed = time.perf_counter() - start
            if params_s is not None and elapsed + params_s * params > args.budget_s:
                print(f"skipping {name}: ~{params_s * params:.0f} s more would pass --budget-s", flush=True)
                result["skipped"].append(name)
                continue
            print(f"running {name} ...", flush=True)
            res = run_size(name, args, workdir, device)
            params_s = res["seconds"] / params
            result["sizes"].append(res)
            print(table(res, args.depth), "\n", flush=True)
            out.write_text(json.dumps(result, indent=1))  # after every size: a timeout keeps what ran
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    result["path"] = str(out)
    return result


if __name__ == "__main__":
    main()
