"""launch() starts no draft where the target's measured verify cost says none can pay.

The target worker reads its verify-cost curve from the per-machine cache when one is there
(workers/calibrate.py): each test writes the curve it needs into a fresh cache, under the key
the worker computes, so the decision is the same on any CPU. The model is the SmolLM2-135M
GGUF (fetched once, 98 MB: large enough to cache a curve), on llama.cpp, target and draft.
"""
import json
import logging
import os

import pytest

import dovetail
from dovetail.runtime.autotree import skip_draft_reason

pytestmark = [pytest.mark.timeout(300), pytest.mark.real_model]

if os.environ.get("DOVETAIL_REQUIRE_LLAMA") != "1":  # CI sets it: there a missing library fails
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llama]')")

SMALL_GGUF = "smollm2-135m-instruct"
THREADS = 1
STEEP = [36000 + 24000 * k for k in range(16)]  # each row ~2/3 of a step: the 2-core EPYC's Q4_K
FLAT = [36000 + 500 * k for k in range(16)]     # rows nearly free: a many-core, memory-bound CPU


@pytest.fixture(scope="module")
def gguf():
    from dovetail.models.fetch import resolve_model
    return resolve_model(SMALL_GGUF)


@pytest.fixture
def cached_curve(gguf, tmp_path, monkeypatch):
    """Write ``curve`` where the target worker will look for this model's curve."""
    from dovetail.models.options import DEFAULT_BATCH_ROWS
    from dovetail.workers.calibrate import cache_dir, cache_key, curve_kind
    from dovetail.workers.llama import LlamaBackend
    from dovetail.workers.llama_buffers import decide
    monkeypatch.setenv("DOVETAIL_CACHE", str(tmp_path))  # inherited by the workers
    # The buffers the worker will decide on (probed once here, cached for it): they key the curve.
    backend = LlamaBackend(str(gguf), threads=THREADS, extra_buffers=decide("auto", str(gguf), THREADS).extra_buffers)
    try:
        key = cache_key(str(gguf), "llama.cpp", curve_kind(backend), THREADS, DEFAULT_BATCH_ROWS)
    finally:
        backend.close()
    assert key is not None, "the model is too small to cache a curve: the worker would measure one"

    def write(curve):
        path = cache_dir() / f"{key}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"verify_us": curve}))
    return write


def start(gguf, **options):
    return dovetail.launch(gguf, gguf, backend="llama.cpp", target_cpus=[0], draft_device="cpu",
                           dtype="float32", **options)


def test_no_draft_process_where_not_even_a_free_draft_pays(gguf, cached_curve, caplog):
    cached_curve(STEEP)
    with caplog.at_level(logging.WARNING, logger="dovetail"), start(gguf) as coord:
        assert coord.target_info.verify_us == STEEP  # the worker judged by the curve written above
        assert coord.draft is None and coord.draft_info is None
        result = coord.generate("def add(a, b):", max_new_tokens=8)
    assert result.stats.drafted == 0 and len(result.token_ids) == 8
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("no draft")]
    assert len(lines) == 1 and "--force-draft" in lines[0]


def test_a_draft_starts_where_it_may_pay_or_when_forced(gguf, cached_curve):
    cached_curve(FLAT)
    assert skip_draft_reason(FLAT, 3, 1, 3, overlap=False) is None
    with start(gguf) as coord:
        assert coord.draft is not None
    cached_curve(STEEP)
    with start(gguf, force_draft=True) as coord:
        assert coord.draft is not None
        assert coord.generate("def add(a, b):", max_new_tokens=8).stats.drafted > 0


def test_auto_draft_for_a_foreign_tokenizer_fetches_nothing_and_decodes_target_only(
        launch_tracked, tmp_path, monkeypatch, caplog):
    """draft="suffix+auto" (what "auto" means beside a GPU) for a target no shipped draft fits and
    whose tokenizer is not the default draft model's: one warning, the suffix draft alone, and
    the 491 MB draft is never fetched."""
    import logging

    import dovetail.models.fetch as fetch
    from tests.helpers import make_tiny_model, make_tiny_tokenizer

    target = make_tiny_model(tmp_path / "foreign", seed=0)
    make_tiny_tokenizer(target)
    resolve = fetch.resolve_model

    def no_draft_fetch(name, *args, **kwargs):
        assert "0.5b" not in str(name), "the default draft model was fetched"
        return resolve(name, *args, **kwargs)

    monkeypatch.setattr(fetch, "resolve_model", no_draft_fetch)
    with caplog.at_level(logging.WARNING, logger="dovetail"):
        coord = launch_tracked(target, "suffix+auto", draft_device="cpu")
    try:
        assert coord.draft is None and coord.worker_pids["draft"] is None and coord.suffix
        assert coord.generate([5, 6, 7], max_new_tokens=4).stats.new_tokens == 4
    finally:
        coord.close()
    assert sum("tokenizer is not" in r.getMessage() for r in caplog.records) == 1


def test_auto_without_a_gpu_is_the_suffix_draft_alone(launch_tracked, tiny_target, monkeypatch):
    """draft="auto" with the draft on the CPU: no draft process and nothing fetched (a model
    draft sharing the target's cores seldom pays), the suffix draft in the coordinator."""
    import dovetail.models.fetch as fetch
    from dovetail.runtime.launch import split_suffix

    assert split_suffix("auto", "cpu") == (True, None)
    assert split_suffix("auto", "cuda:0") == (True, "auto")
    assert split_suffix("suffix+x", "cpu") == (True, "x") and split_suffix("x", "cpu") == (False, "x")
    with pytest.raises(ValueError, match="suffix\\+auto"):
        split_suffix("suffix+", "cpu")
    monkeypatch.setattr(fetch, "resolve_model", lambda name, *a, **k: pytest.fail(f"fetched {name}")
                        if "0.5b" in str(name) else tiny_target)
    coord = launch_tracked(tiny_target, "auto", draft_device="cpu")
    try:
        assert coord.suffix and coord.draft is None and coord.worker_pids["draft"] is None
        prompt = [5, 6, 7, 8, 9, 10, 5, 6, 7]
        assert coord.generate(prompt, max_new_tokens=8).stats.new_tokens == 8
    finally:
        coord.close()
