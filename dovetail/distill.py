"""Self-distillation data and offline acceptance for feature drafts.

``generate_corpus`` lets the target answer prompts greedily and records its final-norm
hidden states for every position (prompt and answer), through the same backend that
verifies at inference (llama.cpp for a GGUF): the draft then learns the features it will
actually be fed, on text the target itself writes.

``offline_tau`` replays those greedy answers against a feature draft: at every round the
draft worker's own handler (workers/feature_draft.py) grows its tree from the recorded
features, and the round commits the longest tree path that matches the target's recorded
greedy continuation plus the target's own next token. For greedy decoding that is what
the live pipeline commits (the target's choice depends only on the prefix); the recorded
features come from one pass over the text instead of the verify passes, which differ in
rounding only. It measures trees of any shape in seconds, with no target running.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class Answered:
    tokens: torch.Tensor        # prompt + greedy answer
    hidden: torch.Tensor        # (len(tokens), hidden): the target's final-norm hidden states
    prompt_len: int


def greedy_with_hidden(backend, prompt: list[int], max_new: int, stop_ids: set[int]) -> Answered:
    """Greedy answer to ``prompt`` with the hidden state of every position."""
    seq = backend.new_sequence()
    try:
        rows = [backend.prefill(seq, prompt[:-1], hidden=True)] if len(prompt) > 1 else []
        tokens, root = list(prompt), prompt[-1]
        for _ in range(max_new):
            start = backend.length(seq)
            out = backend.verify(seq, root, [], [], hidden=True)  # a chain of the root alone
            backend.keep(seq, start, [0])
            rows.append(out.hidden[:1].float())
            root = int(out.logits[0].argmax())
            tokens.append(root)
            if root in stop_ids:
                break
        rows.append(backend.prefill(seq, [root], hidden=True).float())  # the last token's state
        return Answered(torch.tensor(tokens), torch.cat(rows), len(prompt))
    finally:
        backend.release(seq)


def write_answers(path: Path, items: list[Answered]) -> None:
    """A training shard (train_data.read_shards reads it) that also keeps the prompt lengths."""
    from dovetail.train_data import write_shard
    write_shard(path, items, {"prompt_lens": torch.tensor([a.prompt_len for a in items], dtype=torch.int64)})


def read_answers(folder: Path) -> list[Answered]:
    from dovetail.train_data import load_shards
    return [Answered(s.tokens, s.hidden, p) for t, seqs in load_shards(folder)
            for s, p in zip(seqs, t["prompt_lens"].tolist())]


def generate_corpus(backend, prompts: list[list[int]], folder: Path, max_new: int, stop_ids: set[int],
                    shard_size: int = 8, progress: bool = True) -> dict:
    """Answer ``prompts`` into shards of ``folder``; shards already there are kept (resume)."""
    from tqdm import tqdm
    from dovetail.train_data import missing_shards, shard_path
    folder.mkdir(parents=True, exist_ok=True)
    missing = missing_shards(folder, len(prompts), shard_size)
    todo = sum(len(prompts[k * shard_size:(k + 1) * shard_size]) for k in missing)
    bar = tqdm(total=todo, unit="prompt", desc="target answers", disable=not progress)
    new_tokens, t0 = 0, time.perf_counter()
    for k in missing:
        items = []
        for p in prompts[k * shard_size:(k + 1) * shard_size]:
            items.append(greedy_with_hidden(backend, p, max_new, stop_ids))
            new_tokens += len(items[-1].tokens) - items[-1].prompt_len
            bar.update(1)
        write_answers(shard_path(folder, k), items)
    bar.close()
    secs = time.perf_counter() - t0
    return {"answered": todo, "new_tokens": new_tokens, "seconds": secs,
            "tokens_per_s": new_tokens / secs if secs > 0 else 0.0}


@torch.inference_mode()
def offline_tau(handler, answers: list[Answered], depth: int, top_k: int, max_nodes: int,
                max_new: int | None = None) -> dict:
    """Mean tokens committed per round when ``handler`` (a draft worker's handler: feature
    or standalone LM draft) drafts for the recorded greedy answers; see the module docstring."""
    from dovetail.protocol import Close, DraftRequest, OpenRequest, encode_features
    features = handler.handshake().features  # False: a standalone LM draft, tokens only
    lengths: list[list[int]] = []  # tokens committed per round, per answer
    drafted, draft_s = 0, 0.0
    for req, a in enumerate(answers):
        toks = a.tokens.tolist()
        end = len(toks) if max_new is None else min(len(toks), a.prompt_len + max_new)
        handler.handle(OpenRequest(req_id=req, prompt=toks[:a.prompt_len]))
        n, sent, step = a.prompt_len, 0, 0
        base = n
        lengths.append([])
        while n < end:
            rows = a.hidden[sent:n - 1].float().numpy()  # f_sent .. f_{n-2}: what the target has computed
            msg = DraftRequest(req_id=req, step=step, base_len=base, new_tokens=toks[base:n], depth=depth,
                               top_k=top_k, max_nodes=max_nodes,
                               features=encode_features(rows, handler.feature_codec) if features and len(rows) else None)
            prop = handler.handle(msg)
            got = accepted_length(prop.tokens, prop.parents, toks[n:end])
            drafted, draft_s = drafted + len(prop.tokens), draft_s + prop.seconds
            gain = min(got + 1, end - n)  # the accepted path plus the target's own token
            lengths[-1].append(gain)
            sent, base, n, step = n - 1, n, n + gain, step + 1
        handler.handle(Close(req_id=req))
    rounds, committed = sum(map(len, lengths)), sum(map(sum, lengths))
    return {"prompts": len(answers), "rounds": rounds, "committed": committed, "drafted": drafted,
            "tau": committed / rounds if rounds else 0.0,
            "draft_ms_per_round": 1000 * draft_s / rounds if rounds else 0.0, "lengths": lengths}


def accepted_length(tokens: list[int], parents: list[int], truth: list[int]) -> int:
    """Depth of the deepest tree path (parents index earlier nodes, -1: the root) that
    spells a prefix of ``truth``."""
    depth_of: dict[int, int] = {}
    best = 0
    for i, (t, p) in enumerate(zip(tokens, parents)):
        d = 0 if p < 0 else depth_of.get(p, -1) + 1
        if (p < 0 or p in depth_of) and d < len(truth) and truth[d] == t:
            depth_of[i] = d
            best = max(best, d + 1)
    return best
