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
        assert s.new_tokens == MAX_NEW and s.accepted == s.accepted_drafts + s.rounds and s.prefill_first == 1
        assert s.suffix_accepted <= s.suffix_drafted <= s.drafted
        drafted, accepted = drafted + s.suffix_drafted, accepted + s.suffix_accepted
    if name != "sized":  # the sized draft drafts only where the tiny target's curve says it pays
        assert accepted > 0 and drafted > 0, (drafted, accepted)


@pytest.mark.parametrize("name", ["suffix", "hybrid"])
def test_the_first_token_comes_without_a_tree(coords, reference, name):
    """The prompt's last token went in with the prefill: the first round asks for the target's
    token alone (no forward, nothing to draft yet), the trees start from it."""
    r = coords[name].generate(PROMPTS["copy"], max_new_tokens=2)
    assert r.token_ids == reference["copy"][:2]
    # The second token is the only round's, with one token to go (depth 0): no tree anywhere.
    assert (r.stats.prefill_first, r.stats.rounds, r.stats.drafted, r.stats.accept_lengths) == (1, 1, 0, [1])


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


def pick_prompt(model) -> tuple[list[int], int, int, torch.Tensor]:
    """(prompt, a, b, q): a prompt stem + [a, b] + stem after which the target most likely says
    a (p > 0.6), and after a, says b with probability q[b] in (0.1, 0.9): the suffix draft then
    proposes b (what followed "stem a" before), which the target takes often, far from always."""
    g = torch.Generator().manual_seed(0)
    rows = torch.arange(62)
    with torch.no_grad():
        for _ in range(100):
            stem = torch.randint(2, 64, (8,), generator=g).tolist()
            p = torch.softmax(model(torch.tensor([stem + [a, 5] + stem for a in range(2, 64)])).logits[:, -1], -1)
            a = int(p[rows, rows + 2].argmax()) + 2  # the most self-consistent first token
            prompts = torch.tensor([stem + [a, b] + stem for b in range(2, 64)])
            p_a = torch.softmax(model(prompts).logits[:, -1], -1)[:, a]
            q = torch.softmax(model(torch.cat([prompts, torch.full((62, 1), a)], 1)).logits[:, -1], -1)
            for b in sorted(range(2, 64), key=lambda b: -float(p_a[b - 2])):
                if p_a[b - 2] > 0.6 and 0.1 < q[b - 2, b] < 0.9:
                    return stem + [a, b] + stem, a, b, q[b - 2]
    raise AssertionError("no prompt of the kind wanted for this tiny model")


def test_sampling_follows_the_target_distribution(launch_tracked, tmp_path):
    """A token the suffix draft proposes as a point mass, accepted or resampled, must follow
    the target's distribution, not the draft's. The first token is the target's own (nothing
    is drafted before the first token), mostly a; the second is drafted: b (pick_prompt)."""
    from tests.helpers import make_tiny_model
    from transformers import Qwen2ForCausalLM

    path = make_tiny_model(tmp_path / "peaked", seed=3)
    model = Qwen2ForCausalLM.from_pretrained(str(path), dtype=torch.float64)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # a peaked distribution: a few tokens share the mass
    model.save_pretrained(path)
    prompt, a, b, probs = pick_prompt(model)
    coord = launch_tracked(path, "suffix", suffix_cache_tokens=0, stop_token_ids=[], **FIXED)
    try:
        seconds = []
        for seed in range(400):
            coord.rounds.suffix_accept = AcceptTable()  # unlearned: every request drafts b after a
            r = coord.generate(prompt, max_new_tokens=3, temperature=1.0, seed=seed)
            if r.token_ids[0] == a:
                assert r.stats.suffix_drafted >= 1, r.stats  # b (and what followed it), in the second round
                seconds.append(r.token_ids[1])
    finally:
        coord.close()
    assert len(seconds) > 200, len(seconds)
    seen = torch.bincount(torch.tensor(seconds), minlength=64).double() / len(seconds)
    tv = lambda p, q: 0.5 * float((p - q).abs().sum())  # noqa: E731
    point_mass = torch.zeros(64, dtype=torch.float64)
    point_mass[b] = 1.0
    assert tv(seen, probs) < 0.1, (tv(seen, probs), float(probs[b]), float(seen[b]))
    assert tv(probs, point_mass) > 0.1  # a sampler that took the proposal would fail


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
