"""Training data for feature drafts: tokenized conversations (dovetail/models/sharegpt.py)
and the target's cached hidden states.

Hidden states are computed once per target on the CPU and cached in shards under
``~/.cache/dovetail/features/<target-id>/``: ``shard-NNNNN.safetensors`` holds the tokens
of each sequence concatenated, their offsets, and the final-norm hidden states (bf16).
Shards are written atomically, so an interrupted extraction resumes at the next shard.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("dovetail.training.train")

def tokenize(tokenizer, messages: list[dict], max_len: int) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return list(ids)[:max_len]


@dataclass
class Sequence:
    tokens: torch.Tensor  # [T] int64
    hidden: torch.Tensor  # [T, H]: the target's final-norm hidden state after each token


def target_id(identity) -> str:
    return f"{identity.name or identity.arch}-{identity.hidden_size}-{identity.tokenizer_hash}"


def features_dir(identity, cache_dir=None) -> Path:
    from dovetail.models.fetch import default_cache_dir
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    return root / "features" / target_id(identity)


@torch.no_grad()  # not inference_mode: the result may feed autograd as a training target
def target_hidden(lm, tokens: list[int]) -> torch.Tensor:
    """Final-norm hidden states of one sequence (no KV cache kept)."""
    ids = torch.tensor([tokens], device=lm.device)
    return lm.model.model(input_ids=ids).last_hidden_state[0]


def shard_path(folder: Path, k: int) -> Path:
    return folder / f"shard-{k:05d}.safetensors"


def missing_shards(folder: Path, n_items: int, shard_size: int) -> list[int]:
    """Indices of the shards of ``n_items`` items (``shard_size`` each) not written yet."""
    n_shards = (n_items + shard_size - 1) // shard_size
    return [k for k in range(n_shards) if not shard_path(folder, k).exists()]


def write_shard(path: Path, seqs: list, extra: dict[str, torch.Tensor] | None = None) -> None:
    """``seqs``: anything with .tokens and .hidden; ``extra`` tensors are stored beside them."""
    from safetensors.torch import save_file
    lengths = torch.tensor([len(s.tokens) for s in seqs])
    tensors = {"tokens": torch.cat([s.tokens for s in seqs]).to(torch.int32),
               "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
               "hidden": torch.cat([s.hidden for s in seqs]).to(torch.bfloat16).contiguous(), **(extra or {})}
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp))
    tmp.replace(path)


def load_shards(folder: Path):
    """(tensors of the shard, its Sequences) for every shard in ``folder``, in order."""
    from safetensors.torch import load_file
    for shard in sorted(Path(folder).glob("shard-*.safetensors")):
        t = load_file(str(shard))
        off = t["offsets"].tolist()
        yield t, [Sequence(t["tokens"][a:b].long(), t["hidden"][a:b]) for a, b in zip(off, off[1:])]


def read_shards(folder: Path) -> list[Sequence]:
    return [s for _, seqs in load_shards(folder) for s in seqs]


def extract_features(lm, token_lists: list[list[int]], folder: Path, shard_size: int = 64,
                     progress: bool = True) -> dict:
    """Compute and cache hidden states for ``token_lists`` in shards; only missing shards are (re)computed.

    Returns {"tokens": processed tokens, "seconds": ..., "tokens_per_s": ...} for this run.
    """
    from tqdm import tqdm
    folder.mkdir(parents=True, exist_ok=True)
    missing = missing_shards(folder, len(token_lists), shard_size)
    total, t0 = 0, time.perf_counter()
    todo = sum(len(t) for k in missing for t in token_lists[k * shard_size:(k + 1) * shard_size])
    bar = tqdm(total=todo, unit="tok", desc="target hidden states", disable=not progress)
    for k in missing:
        seqs = []
        for toks in token_lists[k * shard_size:(k + 1) * shard_size]:
            seqs.append(Sequence(torch.tensor(toks), target_hidden(lm, toks).float().cpu()))
            total += len(toks)
            bar.update(len(toks))
        write_shard(shard_path(folder, k), seqs)
    bar.close()
    secs = time.perf_counter() - t0
    return {"tokens": total, "seconds": secs, "tokens_per_s": total / secs if secs > 0 else 0.0}
