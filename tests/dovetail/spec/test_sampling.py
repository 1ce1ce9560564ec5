"""The target's own token at each position (dovetail.spec.sampling, dovetail.spec.picker) and the walk that accepts
the draft child carrying it (accept_path): exact sampling, one text per seed whatever the tree,
and penalties that see each node's own path.

The losslessness check is test_verify's: a Markov target over 10 tokens, 20,000 rounds.
"""
import itertools
from collections import Counter

import numpy as np
import pytest
import torch

from dovetail.spec.picker import Picker, processed, token_logprobs
from dovetail.spec.sampling import History, Processing, uniform_at
from dovetail.spec.tree import chain_parents
from dovetail.spec.verify import accept_path, target_probs
from tests.dovetail.spec.test_verify import B, P0, TREES, TRIALS, V, _first_two, _lossless

pytestmark = pytest.mark.timeout(120)


def test_uniform_at_depends_on_seed_and_position_only_and_is_uniform():
    assert uniform_at(7, 100) == uniform_at(7, 100)
    us = np.array([uniform_at(s, p) for s in range(50) for p in range(200)])
    assert 0 <= us.min() and us.max() < 1
    hist, _ = np.histogram(us, bins=10, range=(0, 1))
    assert (abs(hist - len(us) / 10) < 5 * np.sqrt(len(us) / 10)).all()
    # neighbours are not correlated (a counter, not a walk)
    a = np.array([uniform_at(3, p) for p in range(5000)])
    assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 0.05


def _coupled(seed_base: int):
    """accept_path with the (seed, position) draw, on test_verify's probability rows."""
    trial = itertools.count()

    def sampler(probs, tokens, parents, gen):
        seed = seed_base * 1_000_003 + next(trial)
        logits = probs.log()  # temperature 1 on log-probabilities gives the rows back
        picker = Picker(logits, Processing(temperature=1.0), History([]), seed, root_position=0)
        return accept_path(tokens, parents, picker.pick)
    return sampler


@pytest.mark.parametrize("name", list(TREES))
def test_the_seeded_walk_is_lossless(name):
    tokens, parents = TREES[name]
    probs = torch.stack([P0] + [B[t] for t in tokens])
    gen = torch.Generator().manual_seed(0)
    sampler = _coupled(1)
    rounds = []
    for _ in range(TRIALS):
        path, nxt = sampler(probs, tokens, parents, gen)
        rounds.append([tokens[i] for i in path] + [nxt])
    assert _lossless(_first_two(rounds, gen))


def _walk_text(seed: int, tree: tuple[list[int], list[int]], n: int = 6) -> list[int]:
    """n tokens of the Markov target under one seed, each round with ``tree`` grafted on the
    committed text's last token (the tree's tokens shifted so it is a real guess sometimes)."""
    out, pos = [], 0
    while len(out) < n:
        last = out[-1] if out else None
        shift = 0 if last is None else last
        tokens = [(t + shift) % V for t in tree[0]]
        rows = [P0 if last is None else B[last]] + [B[t] for t in tokens]
        picker = Picker(torch.stack(rows).log(), Processing(temperature=1.0), History([]), seed, root_position=pos)
        path, nxt = accept_path(tokens, tree[1], picker.pick)
        new = [tokens[i] for i in path] + [nxt]
        out += new
        pos += len(new)
    return out[:n]


def test_a_seed_gives_the_same_text_whatever_the_trees():
    trees = [([], []), ([1, 2, 3], chain_parents(3)), ([0, 5, 9, 1, 2], [-1, -1, 0, 0, 2])]
    for seed in range(200):
        texts = {tuple(_walk_text(seed, t)) for t in trees}
        assert len(texts) == 1, (seed, texts)
    assert len({tuple(_walk_text(s, trees[0])) for s in range(50)}) > 40  # and seeds differ


def reference_processed(logits, proc: Processing, prompt: list[int], output: list[int]) -> torch.Tensor:
    """The processing written the plain way, token by token."""
    x = logits.double().clone()
    for t, b in proc.logit_bias.items():
        x[t] += b
    for t in set(prompt) | set(output):
        x[t] = x[t] / proc.repetition_penalty if x[t] > 0 else x[t] * proc.repetition_penalty
    for t, n in Counter(output).items():
        x[t] -= proc.frequency_penalty * n + proc.presence_penalty
    return x


def test_processing_matches_the_plain_reference_with_a_path_counted_as_output():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, generator=g, dtype=torch.float64)
    proc = Processing(0.7, 1.0, presence_penalty=0.4, frequency_penalty=0.3, repetition_penalty=1.3,
                      logit_bias={3: -100.0, 7: 2.5})
    prompt, committed, path = [1, 2, 3, 3], [4, 4, 5], [5, 9]
    history = History(prompt)
    history.commit(committed)
    got = processed(logits, proc, history, path)
    assert torch.allclose(got, reference_processed(logits, proc, prompt, committed + path), atol=1e-12)
    # the path is not kept: the history is what was committed
    assert history.counts == Counter(committed)


def test_without_processing_the_logits_are_untouched():
    logits = torch.randn(20, dtype=torch.float64)
    assert torch.equal(processed(logits, Processing(1.0), History([1, 2]), [3]), logits)


def test_logprobs_are_the_raw_models_and_top_ones_are_sorted_with_the_chosen_one_given():
    logits = torch.tensor([2.0, 0.5, 3.0, -1.0, float("-inf")], dtype=torch.float64)
    lp = token_logprobs(logits, 1, top=3)
    ref = torch.log_softmax(logits, dim=-1)
    assert lp.logprob == pytest.approx(float(ref[1]), abs=1e-12)
    assert [i for i, _ in lp.top] == [2, 0, 1]
    assert all(a[1] >= b[1] for a, b in zip(lp.top, lp.top[1:]))
    assert token_logprobs(logits, 4, top=0).logprob == -9999.0  # finite, for JSON


@pytest.mark.parametrize("bad", [dict(presence_penalty=3), dict(repetition_penalty=0), dict(logprobs=21),
                                 dict(logit_bias={1: 200}), dict(top_p=0)])
def test_bad_processing_is_refused(bad):
    with pytest.raises(ValueError):
        Processing(**{"temperature": 1.0, **bad})


def test_one_rows_nucleus_keeps_the_smallest_set_reaching_top_p():
    p = target_probs(torch.tensor([0.0, 1.0, 2.0, 3.0]).log(), 1.0, 0.8)
    assert torch.allclose(p, torch.tensor([0, 0, 0.4, 0.6], dtype=torch.float64))
