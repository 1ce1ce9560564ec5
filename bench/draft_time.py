"""Time one feature-draft round (catch up on the committed tokens, grow the tree) per tree shape.

    python -m bench.draft_time --device cuda:0                    # Qwen2.5-1.5B shapes
    python -m bench.draft_time --device cpu --shapes 3x2x6,6x4x16 --target-shape qwen0.5b

Random weights of the shipped drafts' real shapes (1 DGF layer, FFN 2048, the reduced head
of the shipped draft's size), built in memory: nothing is downloaded. Each timed round is a
DraftRequest through the worker's own handler, as the coordinator sends it: ``--commit``
new tokens with their target features, then a tree of DEPTHxTOP_KxNODES. This is the draft
side of the tree-size trade: the verifier's side is ``bench.verify_curve``. Random weights
make a realistic tree (dense, every level full), so the time is the one a trained draft pays.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

# name: (hidden, layers, heads, kv heads, intermediate, vocab, draft head rows) of the target.
TARGETS = {
    "qwen0.5b": (896, 24, 14, 2, 4864, 151936, 5816),
    "qwen1.5b": (1536, 28, 12, 2, 8960, 151936, 8192),
    "qwen7b": (3584, 28, 28, 4, 18944, 152064, 8192),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.draft_time", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu",
                   help="where the draft runs: 'cpu' or 'cuda:N'")
    p.add_argument("--target-shape", default="qwen1.5b", choices=sorted(TARGETS), help="the target whose shapes the draft takes")
    p.add_argument("--layers", type=int, default=1, help="draft decoder layers")
    p.add_argument("--ffn", type=int, default=2048, help="draft FFN width")
    p.add_argument("--full-head", action="store_true", help="the target's whole vocabulary as the draft's head")
    p.add_argument("--shapes", default="1x1x1,3x2x6,6x4x16,8x8x16,8x12x16,8x12x32",
                   help="tree shapes DEPTHxTOP_KxNODES, comma separated")
    p.add_argument("--dtype", default="auto", help="auto (what the draft worker picks for the device) | bfloat16 | float32")
    p.add_argument("--int8", action="store_true", help="int8 weights (the CPU's --draft-quantize int8)")
    p.add_argument("--ctx", type=int, default=256, help="committed tokens before the timed rounds")
    p.add_argument("--commit", type=int, default=3, help="tokens committed per round (accepted + the target's own)")
    p.add_argument("--rounds", type=int, default=30, help="timed rounds per shape (after 5 warm-up rounds)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: 1 on a GPU, as the draft worker; torch's on the CPU)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p


def random_pieces(name: str):
    from dovetail.draft.checkpoint import TargetPieces
    from dovetail.draft.model import TargetIdentity
    hidden, layers, heads, kv, inter, vocab, _ = TARGETS[name]
    config = {"model_type": "qwen2", "hidden_size": hidden, "num_hidden_layers": layers,
              "num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": inter,
              "vocab_size": vocab, "rms_norm_eps": 1e-6, "hidden_act": "silu", "max_position_embeddings": 32768,
              "rope_parameters": {"rope_theta": 1000000.0, "rope_type": "default"}, "initializer_range": 0.02}
    gen = torch.Generator().manual_seed(0)
    embed = torch.randn(vocab, hidden, generator=gen) * 0.02
    head = torch.randn(vocab, hidden, generator=gen) * 0.02
    ident = TargetIdentity(arch="qwen2", hidden_size=hidden, vocab_size=vocab, tokenizer_hash="random", name=name)
    return TargetPieces(identity=ident, config=config, embed=embed, head=head)


def build_handler(args):
    from dovetail.draft.checkpoint import new_feature_draft
    from dovetail.models.loading import choose_dtype
    from dovetail.workers.feature_draft import FeatureDraftHandler, quantize_feature_draft
    pieces = random_pieces(args.target_shape)
    head_rows = TARGETS[args.target_shape][-1]
    vocab = None if args.full_head else list(range(head_rows))
    model = new_feature_draft(pieces, "dgf", args.layers, intermediate_size=args.ffn, draft_vocab=vocab)
    model = model.to(args.device, choose_dtype(args.dtype, args.device)).eval()
    if args.int8:
        quantize_feature_draft(model)
    return FeatureDraftHandler(model, "random"), pieces.identity.hidden_size


def time_shape(handler, hidden: int, shape: tuple[int, int, int], args, req: int) -> list[float]:
    """Seconds per DraftRequest for one tree shape (new request id: a fresh sequence)."""
    from dovetail.protocol import DraftRequest, OpenRequest, encode_features
    depth, top_k, nodes = shape
    gen = torch.Generator().manual_seed(req)
    seq = torch.randint(0, 8000, (args.ctx,), generator=gen).tolist()
    handler.handle(OpenRequest(req, list(seq)))
    feats = lambda n: encode_features(torch.randn(n, hidden, generator=gen) * 0.5)  # noqa: E731
    handler.handle(DraftRequest(req, 1, 0, list(seq), depth, top_k, nodes, features=feats(len(seq) - 1)))
    times = []
    for step in range(2, args.rounds + 7):
        base = len(seq)
        seq += torch.randint(0, 8000, (args.commit,), generator=gen).tolist()
        t0 = time.perf_counter()
        prop = handler.handle(DraftRequest(req, step, base, seq[base:], depth, top_k, nodes,
                                           features=feats(args.commit)))
        times.append(time.perf_counter() - t0)
        assert 0 < len(prop.tokens) <= nodes, f"a tree of {len(prop.tokens)} nodes for {nodes}"
    return times[5:]


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    elif args.device.startswith("cuda"):
        from dovetail.system.cpus import tune_gpu_worker
        tune_gpu_worker()  # as the draft worker does on a GPU
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    if any(len(s) != 3 or min(s) < 1 for s in shapes):
        sys.exit(f"--shapes: DEPTHxTOP_KxNODES with positive numbers, got {args.shapes!r}")
    handler, hidden = build_handler(args)
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    print(f"draft on {args.device} ({name}), {args.target_shape} shapes, {args.layers} layer(s), FFN {args.ffn}, "
          f"{handler.handshake().dtype}, ctx {args.ctx}, {args.commit} tokens committed per round")
    print("| depth x top_k x nodes | ms per round (median) | p90 |")
    print("|---|---|---|")
    rows = []
    for i, shape in enumerate(shapes):
        t = sorted(time_shape(handler, hidden, shape, args, req=i + 1))
        med, p90 = 1000 * statistics.median(t), 1000 * t[round(0.9 * (len(t) - 1))]
        rows.append({"depth": shape[0], "top_k": shape[1], "nodes": shape[2], "ms_median": med, "ms_p90": p90})
        print(f"| {shape[0]} x {shape[1]} x {shape[2]} | {med:.2f} | {p90:.2f} |", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"device": args.device, "device_name": name, "args": vars(args),
                                              "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
