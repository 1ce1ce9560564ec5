"""The suffix draft through real workers: output equals target-only, greedy and sampled.

Tiny float64 models (vocab 64, no tokenizer). A random tiny model's greedy output soon
repeats itself, and the prompts below repeat stretches of themselves, so the suffix draft
has copies to propose, some accepted and some not. ``suffix`` runs with a fixed shape (no
pricing: every node more likely accepted than not is verified) so that it always drafts;
``sized`` prices every tree on the tiny target's measured curve, as the defaults do.
"""
from __future__ import annotations

import os
import signal

import pytest
import torch

from dovetail.runtime.suffix_draft import AcceptTable

pytestmark = pytest.mark.timeout(180)

MAX_NEW = 48
LOOP = [(7 * i + 3) % 64 for i in range(20)]
PROMPTS = {
    "copy": LOOP + [5, 9] + LOOP[:6],
    "twice": [3, 1, 4, 1, 5, 9, 2, 6] * 3,
    "plain": [(11 * i + 2) % 64 for i in range(9)],
}
FIXED = dict(auto_tree=False, depth=8, top_k=2, max_nodes=12)


@pytest.fixture(scope="module")
def coords(launch_all, close_all, tiny_target, tiny_draft_near):
    coords = launch_all({
        "base": (tiny_target, None, {}),
        "suffix": (tiny_target, "suffix", FIXED),
        "sized": (tiny_target, "suffix", {}),
        "hybrid": (tiny_target, f"suffix+{tiny_draft_near}", dict(overlap=True, **FIXED)),
    })
    try:
        yield coords
    finally:
        assert not close_all(coords.values()), "workers outlived close()"


@pytest.fixture(scope="module")
def reference(coords):
    return {name: coords["base"].generate(p, max_new_tokens=MAX_NEW).token_ids for name, p in PROMPTS.items()}


@pytest.mark.parametrize("name", ["suffix", "sized", "hybrid"])
def test_greedy_equals_target_only(coords, reference, name):
    coord = coords[name]
    assert coord.suffix and (coord.draft is None) == (name != "hybrid")
    drafted = accepted = 0
    for prompt_name, prompt in PROMPTS.items():
        r = coord.generate(prompt, max_new_tokens=MAX_NEW)
        assert r.token_ids == reference[prompt_name], (name, prompt_name)
        s = r.stats
        assert s.new_tokens == MAX_NEW and s.accepted == s.accepted_drafts + s.rounds
        assert s.suffix_accepted <= s.suffix_drafted <= s.drafted
        drafted, accepted = drafted + s.suffix_drafted, accepted + s.suffix_accepted
    if name != "sized":  # the sized draft drafts only where the tiny target's curve says it pays
        assert accepted > 0 and drafted > 0, (drafted, accepted)


def test_the_cache_drafts_an_earlier_answer_in_its_scope_only(coords, reference):
    coord = coords["suffix"]
    prompt = [60, 61, 62, 63, 2]  # nothing in it repeats
    runs = []
    for scope in ("alice", "alice", "bob"):
        coord.rounds.suffix_accept = AcceptTable()  # each starts from the prior: only the cache differs
        runs.append(coord.generate(prompt, max_new_tokens=MAX_NEW, scope=scope))
    first, again, other = runs
    assert first.token_ids == again.token_ids == other.token_ids
    # Alice's second request copies her first answer; Bob's cannot see it.
    assert again.stats.suffix_accepted > first.stats.suffix_accepted
    assert again.stats.rounds < first.stats.rounds
    assert other.stats.accept_lengths == first.stats.accept_lengths


def test_sampling_follows_the_target_distribution(launch_tracked, tmp_path):
    """The first token sampled after a prompt that ends in a repeat: the suffix draft proposes
    the token that followed the first occurrence; accepted or resampled, the token must follow
    the target's distribution, not the draft's point mass."""
    from tests.helpers import make_tiny_model
    from transformers import Qwen2ForCausalLM

    path = make_tiny_model(tmp_path / "peaked", seed=3)
    model = Qwen2ForCausalLM.from_pretrained(str(path), dtype=torch.float64)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # a peaked distribution: a few tokens share the mass
    model.save_pretrained(path)
    stem = [9, 17, 33, 41, 2, 50, 12, 7]
    with torch.no_grad():
        # the proposal the target accepts most often, though far from always: both branches run
        dists = {d: torch.softmax(model(torch.tensor([stem + [d] + stem])).logits[0, -1], -1) for d in range(2, 64)}
    d = max(dists, key=lambda t: float(dists[t][t]))
    prompt, probs = stem + [d] + stem, dists[d]
    assert 0.05 < float(probs[d]) < 0.95, float(probs[d])
    coord = launch_tracked(path, "suffix", suffix_cache_tokens=0, stop_token_ids=[], **FIXED)
    try:
        firsts, drafted = [], 0
        for seed in range(300):
            coord.rounds.suffix_accept = AcceptTable()  # unlearned: every request drafts d first
            r = coord.generate(prompt, max_new_tokens=2, temperature=1.0, seed=seed)
            firsts.append(r.token_ids[0])
            drafted += r.stats.suffix_rounds > 0
    finally:
        coord.close()
    assert drafted == 300
    seen = torch.bincount(torch.tensor(firsts), minlength=64).double() / len(firsts)
    tv = lambda p, q: 0.5 * float((p - q).abs().sum())  # noqa: E731
    point_mass = torch.zeros(64, dtype=torch.float64)
    point_mass[d] = 1.0
    assert tv(seen, probs) < 0.1, (tv(seen, probs), float(probs[d]), float(seen[d]))
    assert tv(probs, point_mass) > 0.25  # a sampler that took the proposal would fail


@pytest.mark.timeout(90)
def test_hybrid_survives_its_model_draft(coords, reference, pids):
    """A dead model draft: the suffix draft goes on alone, then (turned off) the target alone."""
    coord = coords["hybrid"]
    draft = coord.worker_pids["draft"]
    os.kill(draft, signal.SIGKILL)
    assert not pids.wait_gone([draft])
    suffix_rounds = 0
    for name, prompt in PROMPTS.items():
        r = coord.generate(prompt, max_new_tokens=MAX_NEW)
        assert r.token_ids == reference[name]
        assert r.stats.draft_fallback
        suffix_rounds += r.stats.suffix_rounds
    assert suffix_rounds > 0
    coord.suffix = False
    try:
        for name, prompt in PROMPTS.items():
            r = coord.generate(prompt, max_new_tokens=MAX_NEW)
            assert r.token_ids == reference[name] and r.stats.drafted == 0
    finally:
        coord.suffix = True
