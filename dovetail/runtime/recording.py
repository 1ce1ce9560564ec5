"""Record a replay script: the target's own greedy output, decoded target-only.

The replay draft (workers/replay.py, launch(replay_script=...)) proposes it back with a set
fraction of tokens corrupted, which gives a pipeline of known acceptance for benchmarks.
"""
from __future__ import annotations

from dovetail.runtime.coordinator import Coordinator
from dovetail.spec.replay import SCRIPT_VERSION


def record_script(coord_or_target, prompts: list[list[int]], max_new_tokens: int, **launch_kwargs) -> dict:
    """The target's greedy continuation of each prompt, target-only, as a replay script.

    ``coord_or_target``: a running Coordinator (its draft is not used) or a target model
    path, launched here with ``launch_kwargs`` and closed again.
    """
    from dovetail.runtime.launch import launch
    if isinstance(coord_or_target, Coordinator):
        return record_with(coord_or_target, prompts, max_new_tokens)
    with launch(coord_or_target, None, **launch_kwargs) as coord:
        return record_with(coord, prompts, max_new_tokens)


def record_with(coord, prompts, max_new_tokens) -> dict:
    draft, coord.draft = coord.draft, None  # no draft: a plain target-only decode
    try:
        outs = [coord.generate(list(p), max_new_tokens=max_new_tokens).token_ids for p in prompts]
    finally:
        coord.draft = draft
    return {"version": SCRIPT_VERSION, "entries": [{"prompt": list(p), "continuation": o}
                                                   for p, o in zip(prompts, outs)]}
