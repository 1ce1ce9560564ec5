"""HFBackend.verify_many: several requests' trees in one padded forward (CausalLM.forward_batch).

Float64 tiny models: every row's logits and hidden state equal what the request's own
verify gives (up to float64 rounding of a different reduction order), and every cache goes
on exactly as if it had verified alone.
"""
from __future__ import annotations

import pytest
import torch

from dovetail.workers.backend import HFBackend
from tests.helpers import make_tiny_model

pytestmark = pytest.mark.timeout(120)

EXACT = 1e-9  # float64: a different reduction order moves the last bits only


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("hf_batch") / "t", seed=3, attention_gain=4.0, layers=3)
    return HFBackend(str(path), dtype=torch.float64)


def opened(backend, prompt):
    seq = backend.new_sequence()
    backend.prefill(seq, prompt[:-1], hidden=False)
    return seq


PROMPTS = [[3, 9, 4, 22, 17, 5, 30, 2], [7, 7, 12], list(range(2, 40)), [50, 4]]
TREES = [([11, 12, 13], [-1, 0, 0]),     # a tree: two children of the first node
         ([20, 21], [-1, 0]),            # a chain
         ([], []),                       # target-only
         ([5, 6, 7, 8, 9], [-1, 0, 1, -1, 3])]  # two branches from the root


def test_one_forward_gives_each_request_its_own_verify(backend):
    alone = []
    for p, (tokens, parents) in zip(PROMPTS, TREES):
        seq = opened(backend, p)
        alone.append((backend.verify(seq, p[-1], tokens, parents), seq))
    seqs = [opened(backend, p) for p in PROMPTS]
    starts = [backend.length(s) for s in seqs]
    outs = backend.verify_many(seqs, [p[-1] for p in PROMPTS], TREES, [True] * len(seqs))
    for out, (ref, ref_seq), seq, start, (tokens, _) in zip(outs, alone, seqs, starts, TREES):
        assert out.logits.shape == ref.logits.shape == (len(tokens) + 1, backend.lm.vocab_size)
        assert (out.logits - ref.logits).abs().max() < EXACT
        assert (out.hidden - ref.hidden).abs().max() < EXACT
        # Each cache gained exactly its own rows, equal to its twin's.
        assert backend.length(seq) == backend.length(ref_seq) == start + len(tokens) + 1
        for layer, twin in zip(seq.layers, ref_seq.layers):
            assert (layer.keys - twin.keys).abs().max() < EXACT
            assert (layer.values - twin.values).abs().max() < EXACT


def test_keep_and_the_next_step_go_on_per_request(backend):
    """Keep a different path in each request, then verify again, batched and alone: same."""
    keeps = [[0, 1, 3], [0, 1, 2], [0], [0, 4, 5]]  # tree rows (0: the root) in path order
    states = {}
    for mode in ("alone", "batched"):
        seqs = [opened(backend, p) for p in PROMPTS]
        starts = [backend.length(s) for s in seqs]
        roots = [p[-1] for p in PROMPTS]
        if mode == "alone":
            [backend.verify(s, r, t, q) for s, r, (t, q) in zip(seqs, roots, TREES)]
        else:
            backend.verify_many(seqs, roots, TREES, [False] * len(seqs))
        for s, start, rows in zip(seqs, starts, keeps):
            backend.keep(s, start, rows)
        nxt = [([40 + i, 41 + i], [-1, 0]) for i in range(len(seqs))]
        outs = ([backend.verify(s, 1, t, q) for s, (t, q) in zip(seqs, nxt)] if mode == "alone"
                else backend.verify_many(seqs, [1] * len(seqs), nxt, [False] * len(seqs)))
        states[mode] = ([o.logits for o in outs], [backend.length(s) for s in seqs])
    (la, na), (lb, nb) = states["alone"], states["batched"]
    assert na == nb
    assert max((a - b).abs().max() for a, b in zip(la, lb)) < EXACT


def test_a_failed_forward_leaves_every_cache_as_it_was(backend, monkeypatch):
    seqs = [opened(backend, p) for p in PROMPTS[:2]]
    lengths = [backend.length(s) for s in seqs]

    def boom(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(backend.lm.model, "forward", boom)
    with pytest.raises(RuntimeError, match="out of memory"):
        backend.verify_many(seqs, [1, 2], TREES[:2], [False, False])
    assert [backend.length(s) for s in seqs] == lengths
