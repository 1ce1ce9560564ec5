"""Acceptance rules (dovetail.spec.verify): greedy on hand-made logits, and losslessness of the
sampled rules checked statistically.

Losslessness, concretely: the tokens a round commits must be distributed exactly as if the
target had sampled them itself. The statistical tests use a *Markov* target over a vocab of
10: the distribution of the first token is P0 and, after token x, the next token follows
B[x]. So the draft tree's probability rows are simply ``probs[0] = P0`` and
``probs[i + 1] = B[tokens[i]]``, and the first two committed tokens must have the joint law
``P0[x] * B[x, y]``. When a round commits only one token (nothing accepted), the second
token is what the next round would do with no draft: a plain draw from B[first].
"""
import math

import numpy as np
import pytest
import torch

from dovetail.spec.tree import chain_parents, children, main_path
from dovetail.spec.verify import accept_greedy, accept_sampled, accept_stochastic_chain, target_probs

V = 10
TRIALS = 20000


def _dist(seed: int, rows: int | None = None, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    shape = (V,) if rows is None else (rows, V)
    return torch.softmax(scale * torch.randn(shape, generator=g, dtype=torch.float64), dim=-1)


P0 = _dist(1)             # target: first token
B = _dist(2, rows=V)      # target: next token after x is B[x]
JOINT = P0[:, None] * B   # law of the first two committed tokens


# ---- greedy ---------------------------------------------------------------------------

def _logits(best: list[int]) -> torch.Tensor:
    """Rows whose argmax is ``best[r]``, with non-trivial runners-up so argmax must be taken."""
    out = torch.linspace(0.0, 1.0, 8, dtype=torch.float64).repeat(len(best), 1)
    for r, b in enumerate(best):
        out[r, b] = 3.0
    return out


def test_greedy_chain_full_accept_then_the_bonus_token():
    # The target wants 3, 5, 1 after the root and then 6: the draft guessed all three.
    path, nxt = accept_greedy(_logits([3, 5, 1, 6]), [3, 5, 1], chain_parents(3))
    assert (path, nxt) == ([0, 1, 2], 6)


@pytest.mark.parametrize("j", [0, 1, 2])
def test_greedy_chain_rejects_at_each_position(j):
    best = [3, 5, 1, 6]
    tokens = [3, 5, 1]
    tokens[j] = 7  # wrong from position j on; the target's own token replaces it
    path, nxt = accept_greedy(_logits(best), tokens, chain_parents(3))
    assert (path, nxt) == (list(range(j)), best[j])


def test_greedy_empty_draft_is_plain_argmax():
    assert accept_greedy(_logits([4]), [], []) == ([], 4)


def test_greedy_tree_takes_a_later_sibling():
    # root ─┬─ 0:2 ── 2:5
    #       └─ 1:3 ─┬─ 3:4
    #               └─ 4:5 ── 5:0
    tokens, parents = [2, 3, 5, 4, 5, 0], [-1, -1, 0, 1, 1, 4]
    # Row r+1 is the target after node r; the rows off the accepted path say 7, so a
    # verifier that read the wrong row would commit a 7.
    best = [3, 7, 5, 7, 7, 0, 6]
    assert accept_greedy(_logits(best), tokens, parents) == ([1, 4, 5], 6)
    # Same tree, the target stops agreeing below node 4: next token from node 4's row.
    best[5] = 2
    assert accept_greedy(_logits(best), tokens, parents) == ([1, 4], 2)
    # The target wants none of the root's children.
    best[0] = 1
    assert accept_greedy(_logits(best), tokens, parents) == ([], 1)


# ---- target_probs ---------------------------------------------------------------------

def test_target_probs_temperature():
    logits = torch.tensor([[1.0, 2.0, 0.5, -1.0], [0.0, 0.0, 3.0, 1.0]], dtype=torch.float64)
    for t in (0.5, 1.0, 2.0):
        probs = target_probs(logits, t)
        assert probs.dtype == torch.float64
        torch.testing.assert_close(probs, torch.softmax(logits / t, dim=-1), rtol=0, atol=1e-15)
    # Lower temperature sharpens: more mass on the argmax.
    assert target_probs(logits, 0.5)[0, 1] > target_probs(logits, 1.0)[0, 1] > target_probs(logits, 2.0)[0, 1]


def test_target_probs_top_p_keeps_the_smallest_set_reaching_it():
    p = torch.tensor([0.10, 0.50, 0.05, 0.25, 0.10], dtype=torch.float64)
    logits = p.log()
    # 0.5 alone is short of 0.7; adding 0.25 crosses it, and that crossing token stays.
    torch.testing.assert_close(target_probs(logits, 1.0, top_p=0.7),
                               torch.tensor([0, 0.5, 0, 0.25, 0], dtype=torch.float64) / 0.75)
    # 0.5 + 0.25 = 0.75 is short of 0.8; one of the 0.10s crosses it (ties: either one).
    out = target_probs(logits, 1.0, top_p=0.8)
    assert (out > 0).sum() == 3 and out[1] > 0 and out[3] > 0 and out[2] == 0
    torch.testing.assert_close(out.sum(), torch.tensor(1.0, dtype=torch.float64))
    # A tiny top_p keeps the argmax only; top_p = 1 keeps everything.
    assert target_probs(logits, 1.0, top_p=0.01).tolist() == [0, 1, 0, 0, 0]
    torch.testing.assert_close(target_probs(logits, 1.0, top_p=1.0), p)


def test_target_probs_top_p_applies_per_row_after_temperature():
    logits = torch.stack([P0.log(), B[3].log()])
    out = target_probs(logits, 0.7, top_p=0.6)
    for row, lg in zip(out, logits):
        q = torch.softmax(lg / 0.7, dim=-1)
        order = q.argsort(descending=True)
        before = q[order].cumsum(0) - q[order]
        keep = order[before < 0.6]
        expect = torch.zeros_like(q)
        expect[keep] = q[keep] / q[keep].sum()
        torch.testing.assert_close(row, expect)


# ---- statistics helpers ---------------------------------------------------------------

def _chi2_ok(counts: np.ndarray, probs: np.ndarray) -> bool:
    """Pearson chi-square goodness of fit at a ~3e-5 false-alarm level.

    Cells expected fewer than 5 times are pooled into one bin (the usual rule), and the
    critical value is Wilson-Hilferty's approximation of the chi-square quantile at z = 4.
    """
    obs, exp = counts.ravel(), probs.ravel() * counts.sum()
    small = exp < 5
    obs = np.append(obs[~small], obs[small].sum())
    exp = np.append(exp[~small], exp[small].sum())
    obs, exp = obs[exp > 0], exp[exp > 0]
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(exp) - 1
    crit = df * (1 - 2 / (9 * df) + 4 * math.sqrt(2 / (9 * df))) ** 3
    return stat < crit


def _lossless(counts: np.ndarray) -> bool:
    """The check every sampled rule must pass: first token ~ P0 (TV < 0.02 and chi-square),
    first two tokens ~ P0[x] B[x, y] (chi-square; 100 cells are too many for a tight TV)."""
    first = counts.sum(axis=1)
    tv = 0.5 * np.abs(first / first.sum() - P0.numpy()).sum()
    return tv < 0.02 and _chi2_ok(first, P0.numpy()) and _chi2_ok(counts, JOINT.numpy())


def _first_two(rounds, gen: torch.Generator) -> np.ndarray:
    """Counts of (first, second) committed tokens over rounds of (committed tokens)."""
    counts = np.zeros((V, V))
    for seq in rounds:
        if len(seq) == 1:  # nothing accepted: the next round, with no draft, samples B[first]
            seq = seq + [int(torch.multinomial(B[seq[0]], 1, generator=gen))]
        counts[seq[0], seq[1]] += 1
    return counts


# ---- accept_sampled: deterministic draft trees ----------------------------------------

# Tokens ranked by the target's preference, to build likely and unlikely drafts.
R0 = P0.argsort(descending=True).tolist()
A = R0[0]
RA = B[A].argsort(descending=True).tolist()
TREES = {
    "empty": ([], []),
    "chain-likely": ([A, RA[0], B[RA[0]].argmax().item()], chain_parents(3)),
    "chain-unlikely": ([R0[-1], 0, 1], chain_parents(3)),
    # 3 children at the root (likely, unlikely, middling); 2 under the first (2nd best, worst).
    "tree": ([A, R0[-1], R0[4], RA[1], RA[-1]], [-1, -1, -1, 0, 0]),
    # Duplicate siblings: the second copy must never be accepted twice over.
    "duplicates": ([R0[1], R0[1], A], [-1, -1, -1]),
}


def _run_tree(sampler, name: str, seed: int = 0) -> np.ndarray:
    tokens, parents = TREES[name]
    probs = torch.stack([P0] + [B[t] for t in tokens])
    gen = torch.Generator().manual_seed(seed)
    rounds = []
    for _ in range(TRIALS):
        path, nxt = sampler(probs, tokens, parents, gen)
        rounds.append([tokens[i] for i in path] + [nxt])
    return _first_two(rounds, gen)


@pytest.mark.parametrize("name", list(TREES))
def test_accept_sampled_is_lossless(name):
    assert _lossless(_run_tree(accept_sampled, name))


def _always_first_child(probs, tokens, parents, gen):
    path = main_path(parents)
    row = probs[path[-1] + 1] if path else probs[0]
    return path, int(torch.multinomial(row, 1, generator=gen))


def _fallback_from_full_p(probs, tokens, parents, gen):
    """accept_sampled with a classic bug: after rejecting every child, sample from p
    instead of p with the rejected children removed."""
    kids, path, node = children(parents), [], -1
    while True:
        p = probs[node + 1].clone()
        accepted = None
        for c in kids[node]:
            if torch.rand((), generator=gen, dtype=torch.float64) * p.sum() < p[tokens[c]]:
                accepted = c
                break
            p[tokens[c]] = 0.0
        if accepted is None:
            return path, int(torch.multinomial(probs[node + 1], 1, generator=gen))
        path.append(accepted)
        node = accepted


@pytest.mark.parametrize("wrong", [_always_first_child, _fallback_from_full_p])
def test_the_losslessness_check_catches_wrong_samplers(wrong):
    # Control: the same check on the same tree must fail for a sampler known to be biased.
    assert not _lossless(_run_tree(wrong, "tree"))


# ---- accept_stochastic_chain: drafts sampled from q -----------------------------------

Q0, Q = {}, {}
Q0["near"], Q["near"] = (0.8 * P0 + 0.2 / V), (0.8 * B + 0.2 / V)  # a good draft
Q0["far"], Q["far"] = _dist(3, scale=2.0), _dist(4, rows=V, scale=2.0)  # an unrelated one


def _run_chain(name: str, residual_bug: bool = False, k: int = 3, seed: int = 0) -> np.ndarray:
    gen = torch.Generator().manual_seed(seed)
    q0, q = Q0[name], Q[name]
    # Draw every trial's chain from the draft up front (vectorised): token i+1 ~ q[token i].
    drafts = [torch.multinomial(q0, TRIALS, replacement=True, generator=gen)]
    for _ in range(k - 1):
        drafts.append(torch.multinomial(q[drafts[-1]], 1, generator=gen)[:, 0])
    drafts = torch.stack(drafts, dim=1).tolist()
    rounds = []
    for tokens in drafts:
        probs = torch.stack([P0] + [B[t] for t in tokens])
        qrows = torch.stack([q0] + [q[t] for t in tokens[:-1]])
        if residual_bug:  # control: resampling from p instead of norm(max(p - q, 0)) is biased
            path, _ = accept_stochastic_chain(probs, qrows, tokens, gen)
            nxt = int(torch.multinomial(probs[len(path)], 1, generator=gen))
        else:
            path, nxt = accept_stochastic_chain(probs, qrows, tokens, gen)
        rounds.append([tokens[i] for i in path] + [nxt])
    return _first_two(rounds, gen)


@pytest.mark.parametrize("name", ["near", "far"])
def test_accept_stochastic_chain_is_lossless(name):
    assert _lossless(_run_chain(name))


def test_the_chain_check_catches_a_wrong_residual():
    assert not _lossless(_run_chain("far", residual_bug=True))


# ---- nucleus sampling never commits a token outside the nucleus -----------------------

def test_committed_tokens_stay_in_the_nucleus():
    p0n = target_probs(P0.log(), 1.0, top_p=0.5)
    bn = target_probs(B.log(), 1.0, top_p=0.5)
    assert 0 < (p0n > 0).sum() < V and ((bn > 0).sum(dim=1) < V).all()

    def check(first_row, seq):
        row = first_row
        for t in seq:
            assert row[t] > 0, f"token {t} is outside the nucleus"
            row = bn[t]

    gen = torch.Generator().manual_seed(0)
    # Draft trees made of tokens outside the nucleus (they must all be rejected) and inside.
    outside = int(p0n.argmin())
    tokens = [outside, int(p0n.argmax()), int(bn[outside].argmin()), outside]
    parents = [-1, -1, 0, 1]
    probs = torch.stack([p0n] + [bn[t] for t in tokens])
    for _ in range(2000):
        path, nxt = accept_sampled(probs, tokens, parents, gen)
        check(p0n, [tokens[i] for i in path] + [nxt])
    # A uniform draft proposes tokens outside the nucleus most of the time.
    uniform = torch.full((3, V), 1.0 / V, dtype=torch.float64)
    for _ in range(2000):
        chain = torch.randint(V, (3,), generator=gen).tolist()
        probs = torch.stack([p0n] + [bn[t] for t in chain])
        path, nxt = accept_stochastic_chain(probs, uniform, chain, gen)
        check(p0n, [chain[i] for i in path] + [nxt])


def test_draw_follows_the_weights_and_never_picks_a_zero():
    from dovetail.spec.verify import draw
    g = torch.Generator().manual_seed(5)
    w = torch.tensor([0.0, 0.2, 0.0, 0.5, 0.3, 0.0], dtype=torch.float64) * 7.0  # unnormalised
    counts = torch.zeros(6)
    n = 40_000
    for _ in range(n):
        counts[draw(w, g)] += 1
    assert counts[0] == counts[2] == counts[5] == 0
    assert torch.allclose(counts / n, (w / w.sum()).float(), atol=0.01)
