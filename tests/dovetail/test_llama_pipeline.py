"""Dovetail end to end through the llama.cpp target backend, on real Qwen2.5-Coder-0.5B weights.

Target-only decoding through our worker must give llama.cpp's own greedy tokens, and adding
a draft must not change them, up to a near tie: llama.cpp's logits for a row depend on how
many rows share its decode call (bench.batch_drift), so where the target's top two tokens are
closer than that drift, the draft's k-row verifies may pick the other one
(greedy_divergence in tests/helpers.py checks that this is all that happened). The draft here is
the same model cut to 20 of its 24 layers (transformers, float32, CPU): it agrees with the
target often, not always, so rounds both accept and reject.
"""
import os

import pytest
import torch

import dovetail
from dovetail.models.fetch import fetch_model
from dovetail.models.prompts import load_humaneval
from tests.helpers import NextLogits, divergence_summary, greedy_divergence, make_tiny_model, make_tiny_tokenizer

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(1200)]

if os.environ.get("DOVETAIL_REQUIRE_LLAMA") != "1":
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llama]')")

MODEL = "qwen2.5-coder-0.5b-instruct"
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def gguf():
    return fetch_model(MODEL)


@pytest.fixture(scope="module")
def prompts():
    return [p["prompt"] for p in load_humaneval(limit=2)]


def llama_cpp_greedy(gguf, prompt_ids: list[int], n: int) -> list[int]:
    import llama_cpp
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=1024, n_threads=2, verbose=False)
    out = []
    for tok in llm.generate(prompt_ids, temp=0.0, top_k=1, repeat_penalty=1.0):
        out.append(int(tok))
        if len(out) == n:
            break
    llm.close()
    return out


def test_greedy_identical_to_llama_cpp_and_with_a_draft(gguf, prompts):
    with dovetail.launch(gguf, None, backend="llama.cpp") as base:
        assert "llama.cpp" in base.target_info.device and base.target_info.dtype.startswith("gguf:")
        reference = [base.generate(p, max_new_tokens=NEW_TOKENS) for p in prompts]
        prompt_ids = [base.encode_prompt(p) for p in prompts]
    with dovetail.launch(gguf, gguf, backend="llama.cpp", dtype="float32", draft_device="cpu",
                         draft_layers=20, depth=4, top_k=2, max_nodes=6) as coord:
        results = [coord.generate(p, max_new_tokens=NEW_TOKENS) for p in prompts]
    # llama-cpp-python decodes the prompt's last token inside the prompt's batch, our worker
    # alone; with a draft, tokens are verified k at a time. Equal up to a near tie each.
    plain = [llama_cpp_greedy(gguf, ids, NEW_TOKENS) for ids in prompt_ids]
    with NextLogits(gguf) as next_logits:
        vs_llama_cpp = [greedy_divergence(next_logits, ids, lc, ref.token_ids)
                        for ids, lc, ref in zip(prompt_ids, plain, reference)]
        vs_draft = [greedy_divergence(next_logits, ids, ref.token_ids, res.token_ids)
                    for ids, ref, res in zip(prompt_ids, reference, results)]
    print("\n" + divergence_summary("target-only vs llama-cpp-python's own greedy", vs_llama_cpp))
    print(divergence_summary("with the draft vs target-only", vs_draft))
    committed = sum(r.stats.accepted for r in results)
    rounds = sum(r.stats.rounds for r in results)
    assert committed / rounds > 1.2, f"mean accepted length {committed / rounds:.2f}"  # drafts were used


def test_refuses_a_draft_for_another_target(gguf, tmp_path):
    draft = make_tiny_model(tmp_path / "tiny", vocab_size=64, dtype=torch.float32)
    make_tiny_tokenizer(draft)
    with pytest.raises(Exception, match="tokenizer"):
        # forced: where the target's curve says no draft can pay, none would start to be refused
        dovetail.launch(gguf, draft, backend="llama.cpp", draft_device="cpu", force_draft=True)


def test_backend_errors_are_clear(tmp_path):
    from dovetail.runtime.launch import check_backend
    with pytest.raises(ValueError, match="backend must be one of"):
        check_backend("onnx", "x.gguf")
    with pytest.raises(ValueError, match=".gguf"):
        check_backend("llama.cpp", tmp_path)


def test_auto_backend_picks_llama_cpp_for_a_gguf_only_when_installed(tmp_path, monkeypatch):
    import importlib.util

    from dovetail.runtime.launch import pick_backend
    assert pick_backend("transformers", "m.gguf") == "transformers"
    assert pick_backend("auto", tmp_path) == "transformers"  # a HF folder
    assert pick_backend("auto", "m.gguf") == "llama.cpp"
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert pick_backend("auto", "m.gguf") == "transformers"


def test_llama_ctx_bounds_a_request_and_the_error_names_it(gguf):
    with dovetail.launch(gguf, None, backend="llama.cpp", llama_ctx=512) as coord:
        assert coord.target_info.max_context == 512  # the model was trained for more
        with pytest.raises(ValueError, match=r"needs 513 positions, more than the target's 512 \(llama.cpp's "
                                             r"context: raise llama_ctx / --llama-ctx"):
            coord.generate([5, 6, 7, 8, 9], max_new_tokens=508)
        assert coord.generate([5, 6, 7, 8, 9], max_new_tokens=8).stats.new_tokens > 0
    with pytest.raises(ValueError, match="llama_ctx must be an int >= 512"):
        dovetail.launch(gguf, None, backend="llama.cpp", llama_ctx=64)


def test_a_request_that_fills_the_context_keeps_drafting_wide_trees_to_its_end(gguf, prompts):
    """llama.cpp's cells hold the tree's rows too: at length L a tree of n nodes needs L + n of
    them. A request admitted at exactly the context (prompt + max_new_tokens = llama_ctx) must
    not run out of cells in its last rounds."""
    with dovetail.launch(gguf, gguf, backend="llama.cpp", llama_ctx=512, dtype="float32", draft_device="cpu",
                         draft_layers=20, depth=4, top_k=4, max_nodes=24, auto_tree=False,
                         force_draft=True) as coord:
        text = coord.encode_prompt("".join(prompts))
        prompt = (text * (480 // len(text) + 1))[:480]
        res = coord.generate(prompt, max_new_tokens=32)
    assert res.stats.new_tokens == 32 and not res.stats.draft_fallback
    assert res.stats.drafted > 3 * res.stats.rounds  # wide trees, not chains


def test_requests_that_overfill_the_shared_cells_queue_instead_of_failing(gguf):
    """Three requests whose prompts and outputs together need more than llama.cpp's cells: each
    alone fits. Admission reserves each one's share, so the third waits for room instead of
    failing halfway with context_full (runtime/kvpool.py)."""
    text = "def add(a, b):\n    return a + b\n" * 12
    with dovetail.launch(gguf, None, backend="llama.cpp", llama_ctx=512, max_active=3) as coord:
        ids = coord.encode_prompt(text)
        assert 120 < len(ids) < 250 and 3 * (len(ids) + 60) > 512 >= len(ids) + 60
        handles = [coord.submit(ids, max_new_tokens=60, stop=None) for _ in range(3)]
        results = [h.result(timeout=600) for h in handles]
        assert all(r.stats.new_tokens > 0 for r in results)
        assert len({tuple(r.token_ids) for r in results}) == 1  # greedy: the same text each time
        with pytest.raises(ValueError, match="positions|KV cells"):
            coord.submit(ids, max_new_tokens=512 - len(ids) + 1)
