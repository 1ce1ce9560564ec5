"""The replay draft's script: a recorded target output, and the acceptance it yields.

A script is ``{"version": 1, "entries": [{"prompt": [...], "continuation": [...]}]}``: the
target's greedy continuation of each prompt (dovetail/runtime/recording.py records one). The
replay draft (workers/replay.py) proposes it back with a set fraction of tokens corrupted, so
the acceptance rate is known in advance.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

SCRIPT_VERSION = 1


def expected_tau(depth: int, corrupt: float) -> float:
    """Tokens committed per round for a chain of ``depth``: token i survives with (1-c)^i."""
    return 1.0 + sum((1.0 - corrupt) ** i for i in range(1, depth + 1))


def load_script(path: str | Path) -> dict:
    script = json.loads(Path(path).read_text())
    if script.get("version") != SCRIPT_VERSION or not isinstance(script.get("entries"), list):
        raise ValueError(f"{path}: expected a replay script {{'version': {SCRIPT_VERSION}, 'entries': [...]}}")
    for e in script["entries"]:
        if not e.get("prompt") or not isinstance(e.get("continuation"), list):
            raise ValueError(f"{path}: every entry needs a non-empty 'prompt' and a 'continuation'")
    return script


def save_script(script: dict, path: str | Path) -> None:
    """Write atomically: a worker re-reading the file never sees half of it."""
    path = Path(path)
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(script))
    os.replace(tmp, path)
