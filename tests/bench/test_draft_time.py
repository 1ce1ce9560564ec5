"""bench.draft_time on the CPU: one round per tree shape at real (0.5B) shapes, random weights."""
from __future__ import annotations

import json

import pytest

from bench import draft_time


@pytest.mark.timeout(120)
def test_times_each_tree_shape(tmp_path, capsys):
    out = tmp_path / "t.json"
    assert draft_time.main(["--device", "cpu", "--target-shape", "qwen0.5b", "--shapes", "1x1x1,3x2x5",
                            "--rounds", "2", "--ctx", "16", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["depth"], r["top_k"], r["nodes"]) for r in rows] == [(1, 1, 1), (3, 2, 5)]
    assert all(0 < r["ms_median"] <= r["ms_p90"] for r in rows)
    assert "| 3 x 2 x 5 |" in capsys.readouterr().out


def test_refuses_bad_shapes():
    with pytest.raises(SystemExit, match="DEPTHxTOP_KxNODES"):
        draft_time.main(["--device", "cpu", "--shapes", "3x2"])
