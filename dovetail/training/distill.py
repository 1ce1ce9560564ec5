"""Self-distillation data and offline acceptance for feature drafts.

``generate_corpus`` lets the target answer prompts greedily and records its final-norm
hidden states for every position (prompt and answer), through the same backend that
verifies at inference (llama.cpp for a GGUF): the draft then learns the features it will
actually be fed, on text the target itself writes. ``answer_many`` decodes many answers
side by side (one llama.cpp call advances each by a token), and ``code_prompts`` cuts
code-completion prompts from ShareGPT's Python blocks, for more such text.

``offline_tau`` replays those greedy answers against a feature draft: at every round the
draft worker's own handler (workers/feature_draft.py) grows its tree from the recorded
features, and the round commits the longest tree path that matches the target's recorded
greedy continuation plus the target's own next token. For greedy decoding that is what
the live pipeline commits (the target's choice depends only on the prefix); the recorded
features come from one pass over the text instead of the verify passes, which differ in
rounding only. It measures trees of any shape in seconds, with no target running.
"""
from __future__ import annotations

import re
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


CODE_BLOCK = re.compile(r"```(\w*)\n(.*?)```", re.S)
CODE_PROMPT_TOKENS = 96   # a code prompt's length cap: prompt tokens cost a prefill, answers the steps


def code_prompts(tokenizer, records: list[dict], limit: int, max_tokens: int = CODE_PROMPT_TOKENS,
                 min_lines: int = 6) -> list[list[int]]:
    """Code-completion prompts for self-distillation: from each conversation, the first third
    (at least two lines) of its first Python code block of at least ``min_lines`` lines, as
    raw text like a HumanEval prompt; the target writes the rest."""
    out = []
    for r in records:
        blocks = (m.group(2).rstrip("\n").split("\n") for t in r.get("conversations", []) if t.get("from") == "gpt"
                  for m in CODE_BLOCK.finditer(str(t.get("value", ""))) if m.group(1).lower() in ("python", "py"))
        lines = next((b for b in blocks if len(b) >= min_lines), None)
        if lines is None:
            continue
        prefix = "\n".join(lines[:max(2, len(lines) // 3)]) + "\n"
        out.append(tokenizer.encode(prefix, add_special_tokens=False)[:max_tokens])
        if len(out) >= limit:
            break
    return out


@dataclass
class _Open:
    index: int
    seq: object
    tokens: list[int]
    rows: list[torch.Tensor]
    prompt_len: int
    done: bool = False          # answered: the next step only reads its last token's state


def answer_many(backend, prompts: dict[int, list[int]], max_new: int, stop_ids: set[int], width: int,
                on_answer) -> None:
    """``greedy_with_hidden`` for many prompts at once: up to ``width`` sequences advance by one
    token per ``backend.step_many`` call, and a finished one makes room for the next prompt
    (continuous batching). ``on_answer(index, Answered)`` is called as each one completes."""
    queue, open_ = list(prompts.items()), []
    try:
        while queue or open_:
            while queue and len(open_) < width:
                i, prompt = queue.pop(0)
                seq = backend.new_sequence()
                open_.append(_Open(i, seq, list(prompt), [], len(prompt)))
                if len(prompt) > 1:
                    open_[-1].rows.append(backend.prefill(seq, prompt[:-1], hidden=True).float())
            out = backend.step_many([o.seq for o in open_], [o.tokens[-1] for o in open_], hidden=True)
            still = []
            for o, logits, h in zip(open_, out.logits, out.hidden):
                o.rows.append(h[None].float())
                if o.done:
                    backend.release(o.seq)
                    on_answer(o.index, Answered(torch.tensor(o.tokens), torch.cat(o.rows), o.prompt_len))
                    continue
                nxt = int(logits.argmax())
                o.tokens.append(nxt)
                o.done = nxt in stop_ids or len(o.tokens) - o.prompt_len >= max_new
                still.append(o)
            open_ = still
    finally:
        for o in open_:
            backend.release(o.seq)


def write_answers(path: Path, items: list[Answered]) -> None:
    """A training shard (dovetail.training.data.read_shards reads it) that also keeps the prompt lengths."""
    from dovetail.training.data import write_shard
    write_shard(path, items, {"prompt_lens": torch.tensor([a.prompt_len for a in items], dtype=torch.int64)})


def read_answers(folder: Path) -> list[Answered]:
    from dovetail.training.data import load_shards
    return [Answered(s.tokens, s.hidden, p) for t, seqs in load_shards(folder)
            for s, p in zip(seqs, t["prompt_lens"].tolist())]


def generate_corpus(backend, prompts: list[list[int]], folder: Path, max_new: int, stop_ids: set[int],
                    shard_size: int = 8, width: int = 1, progress: bool = True) -> dict:
    """Answer ``prompts`` into shards of ``folder``; shards already there are kept (resume).
    ``width`` > 1 answers that many side by side (a backend with ``step_many``)."""
    from tqdm import tqdm
    from dovetail.training.data import missing_shards, shard_path
    folder.mkdir(parents=True, exist_ok=True)
    def members(k: int) -> range:
        return range(k * shard_size, min((k + 1) * shard_size, len(prompts)))

    todo = {i: prompts[i] for k in missing_shards(folder, len(prompts), shard_size) for i in members(k)}
    bar = tqdm(total=len(todo), unit="prompt", desc="target answers", disable=not progress)
    done: dict[int, Answered] = {}
    new_tokens, t0 = 0, time.perf_counter()

    def record(i: int, a: Answered) -> None:
        nonlocal new_tokens
        done[i] = a
        new_tokens += len(a.tokens) - a.prompt_len
        bar.update(1)
        k = i // shard_size
        if all(j in done for j in members(k)):  # a shard is written once all of its answers are in
            write_answers(shard_path(folder, k), [done.pop(j) for j in members(k)])

    if width > 1:
        answer_many(backend, todo, max_new, stop_ids, width, record)
    else:
        for i, p in todo.items():
            record(i, greedy_with_hidden(backend, p, max_new, stop_ids))
    bar.close()
    secs = time.perf_counter() - t0
    return {"answered": len(todo), "new_tokens": new_tokens, "seconds": secs,
            "tokens_per_s": new_tokens / secs if secs > 0 else 0.0}


@torch.inference_mode()
def replay_rounds(handler, answers: list[Answered], depth: int, top_k: int, max_nodes: int,
                  max_new: int | None, commit) -> list[list[int]]:
    """Drive ``handler`` (a draft worker's handler: feature or standalone LM draft) through the
    recorded greedy answers, round by round, as the pipeline would. ``commit(proposal, truth)``
    gets each round's DraftProposal and the target's recorded continuation and returns how many
    tokens the round commits (>= 1); the next round starts there. Returns those counts per answer."""
    from dovetail.protocol import Close, DraftRequest, OpenRequest, encode_features
    features = handler.handshake().features  # False: a standalone LM draft, tokens only
    lengths: list[list[int]] = []
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
            gain = commit(handler.handle(msg), toks[n:end])
            lengths[-1].append(gain)
            sent, base, n, step = n - 1, n, n + gain, step + 1
        handler.handle(Close(req_id=req))
    return lengths


def offline_tau(handler, answers: list[Answered], depth: int, top_k: int, max_nodes: int,
                max_new: int | None = None) -> dict:
    """Mean tokens committed per round when ``handler`` drafts for the recorded greedy answers;
    see the module docstring."""
    drafted, draft_s = 0, 0.0

    def commit(prop, truth: list[int]) -> int:
        nonlocal drafted, draft_s
        drafted, draft_s = drafted + len(prop.tokens), draft_s + prop.seconds
        # the accepted path plus the target's own token
        return min(accepted_length(prop.tokens, prop.parents, truth) + 1, len(truth))

    lengths = replay_rounds(handler, answers, depth, top_k, max_nodes, max_new, commit)
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
