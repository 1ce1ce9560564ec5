"""Penalties, logit_bias, logprobs and seeds through the coordinator and both workers, on tiny
float64 models: with a draft the output is exactly target-only decoding's under the same
processing, and a seed means the same text with or without a draft, under load."""
import threading

import pytest
import torch

from tests.dovetail.spec.test_sampling import reference_processed
from dovetail.spec.sampling import Processing

pytestmark = pytest.mark.timeout(600)

PROMPTS = [[5, 9, 3, 7, 11], [2, 4, 6, 8, 10, 12, 14], [40, 41, 40, 41, 40]]
TEMP = 0.4  # peaked enough that sampled drafts are often accepted, far enough from greedy to vary by seed
PENALTIES = dict(presence_penalty=0.6, frequency_penalty=0.4, repetition_penalty=1.3, logit_bias={7: -100.0, 12: 3.0})


@pytest.fixture(scope="module")
def alone(launch_tracked, tiny_target):
    c = launch_tracked(tiny_target, None)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def drafted(launch_tracked, tiny_target, tiny_draft_near):
    # a fixed tree: the tiny target's measured verify curve could make the sizer draft nothing
    c = launch_tracked(tiny_target, tiny_draft_near, max_active=4, worker_max_requests=8, auto_tree=False,
                       depth=3, top_k=2, max_nodes=6)
    try:
        yield c
    finally:
        c.close()


def reference_greedy(model, prompt: list[int], n: int, proc: Processing) -> list[int]:
    """The processing applied the plain way: the whole sequence through the model each step."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            tok = int(reference_processed(logits, proc, prompt, out).argmax())
            ids.append(tok)
            out.append(tok)
    return out


def test_penalties_and_bias_greedy_equal_the_plain_reference_with_and_without_a_draft(alone, drafted, tiny_target):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_target, torch_dtype=torch.float64).eval()
    proc = Processing(0.0, 1.0, 0.6, 0.4, 1.3, {7: -100.0, 12: 3.0})
    for prompt in PROMPTS:
        want = reference_greedy(model, prompt, 24, proc)
        assert 7 not in want
        plain = alone.generate(prompt, max_new_tokens=24, temperature=0.0)
        assert plain.token_ids != want  # the processing changes the text: the test has teeth
        for coord in (alone, drafted):
            assert coord.generate(prompt, max_new_tokens=24, temperature=0.0, **PENALTIES).token_ids == want
    # rounds that rejected drafted branches came and went: nothing of them stayed in the counts
    assert drafted.generate(PROMPTS[0], max_new_tokens=24, **PENALTIES).stats.drafted > 0


def test_logprobs_with_a_draft_equal_target_only_streamed_and_not(alone, drafted):
    for prompt in PROMPTS:
        ref = alone.generate(prompt, max_new_tokens=20, logprobs=5)
        got = drafted.generate(prompt, max_new_tokens=20, logprobs=5)
        assert got.token_ids == ref.token_ids and len(got.logprobs) == len(got.token_ids)
        for a, b, tok in zip(got.logprobs, ref.logprobs, got.token_ids):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-9)
            assert [t for t, _ in a.top] == [t for t, _ in b.top]
            assert all(x[1] >= y[1] for x, y in zip(a.top, a.top[1:]))  # most likely first
            assert a.logprob <= 0 and any(t == tok for t, _ in a.top)  # greedy: the chosen is the top one
        streamed = [e for c in drafted.stream(prompt, max_new_tokens=20, logprobs=5) for e in c.logprobs or []]
        assert [e.logprob for e in streamed] == pytest.approx([e.logprob for e in ref.logprobs], abs=1e-9)
    assert alone.generate(PROMPTS[0], max_new_tokens=4).logprobs is None
    assert all(not e.top for e in alone.generate(PROMPTS[0], max_new_tokens=4, logprobs=0).logprobs)


def test_a_seed_gives_the_target_only_text_with_a_draft_under_load(alone, drafted):
    """20 seeds x 3 prompts, sampled at temperature 0.4 (with and without penalties), 4 requests
    at once through the drafted coordinator: its trees accept and reject in every way."""
    cases = [(seed, i, pen) for seed in range(20) for i in range(len(PROMPTS)) for pen in (False, True)]
    want = {(seed, i, pen): alone.generate(PROMPTS[i], max_new_tokens=16, temperature=TEMP, seed=seed,
                                           **(PENALTIES if pen else {})).token_ids
            for seed, i, pen in cases}
    assert len({tuple(v) for v in want.values()}) > len(cases) // 2  # seeds give different texts
    got, accepted, lock = {}, [], threading.Lock()

    def run(chunk):
        for seed, i, pen in chunk:
            r = drafted.generate(PROMPTS[i], max_new_tokens=16, temperature=TEMP, seed=seed,
                                 **(PENALTIES if pen else {}))
            with lock:
                got[(seed, i, pen)] = r.token_ids
                accepted.append(r.stats.accepted_drafts)

    threads = [threading.Thread(target=run, args=(cases[k::4],)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert got == want
    assert sum(accepted) > len(cases) // 2  # drafts were accepted (and rejected): the trees varied


def test_bad_processing_is_refused_before_any_work(alone):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        alone.generate(PROMPTS[0], max_new_tokens=2, logit_bias={10 ** 6: 1.0})
    with pytest.raises(ValueError, match="presence_penalty"):
        alone.generate(PROMPTS[0], max_new_tokens=2, presence_penalty=5.0)
    with pytest.raises(TypeError, match="unknown keyword"):
        alone.generate(PROMPTS[0], max_new_tokens=2, min_p=0.1)
