"""bench.batch_drift on a tiny float64 transformers target: every verify size gives row 0 the same logits."""
from __future__ import annotations

import pytest
import torch

from bench import batch_drift
from tests.helpers import make_tiny_model
from dovetail.workers.backend import HFBackend


@pytest.mark.timeout(120)
def test_float64_rows_do_not_drift_with_the_batch(tmp_path, capsys):
    path = make_tiny_model(tmp_path / "t", seed=2)
    backend = HFBackend(str(path), dtype=torch.float64)
    d = batch_drift.drift(backend, 20, [1, 2, 5, 9], backend.identity.vocab_size)
    assert set(d) == {1, 2, 5, 9} and max(d.values()) < 1e-9, d
    assert batch_drift.main(["--target", str(path), "--backend", "transformers", "--dtype", "float64",
                             "--contexts", "12", "--k", "1,3"]) == 0
    assert capsys.readouterr().out.startswith("context 12: k=1: 0.000, k=3: 0.000")
