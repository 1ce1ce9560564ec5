"""The replay draft: the target's recorded output, corrupted at a known rate.

Unit tests drive ReplayHandler directly (no processes). Process tests launch one target-only
coordinator and one with draft="replay:FILE" (shared per module); the script is recorded
from the target-only one, and each test rewrites it with its own corruption level (the
worker re-reads the file per request). Last, bench/gpu.py runs end to end at a tiny shape.
"""
from __future__ import annotations

import json

import pytest

from dovetail.protocol import Close, DraftRequest, OpenRequest
from dovetail.runtime.recording import record_script
from dovetail.spec.replay import expected_tau, load_script, save_script
from dovetail.workers.replay import ReplayConfig, ReplayHandler

pytestmark = pytest.mark.timeout(120)

DEPTH = 4
PROMPTS = [[7], [1, 5, 9, 13], [(7 * i + 3) % 64 for i in range(29)], [60, 2, 33, 33]]
MAX_NEW = 61  # 4 prompts x 61: 244 tokens, enough rounds to measure an acceptance rate


# ---- unit: the handler ---------------------------------------------------------------------
def make_handler(tmp_path, corrupt=0.0, seed=0, entries=None, name="script.json"):
    path = tmp_path / name
    entries = entries if entries is not None else [{"prompt": [1, 2], "continuation": [10, 11, 12, 13, 14, 15]}]
    save_script({"version": 1, "entries": entries}, path)
    cfg = ReplayConfig(bind="ipc:///unused", script=str(path), corrupt=corrupt, seed=seed, vocab_size=64,
                       tokenizer_hash="no-tokenizer:64")
    return ReplayHandler(cfg, 64, "no-tokenizer:64"), path


def ask(h, step, base_len, new, depth=DEPTH, guess_root=False, req=1):
    return h.handle(DraftRequest(req, step, base_len, new, depth, 1, 16, guess_root=guess_root))


def test_expected_tau():
    assert expected_tau(4, 0.0) == 5.0
    assert expected_tau(4, 1.0) == 1.0
    assert expected_tau(2, 0.5) == pytest.approx(1.75)


def test_replays_the_recorded_chain(tmp_path):
    h, _ = make_handler(tmp_path)
    h.handle(OpenRequest(1, [1, 2]))
    p = ask(h, 1, 2, [])
    assert p.tokens == [10, 11, 12, 13] and p.parents == [-1, 0, 1, 2] and p.root_guess == -1
    p = ask(h, 2, 2, [10, 11, 12])                  # three committed: the rest of the script
    assert p.tokens == [13, 14, 15]
    assert ask(h, 3, 5, [13, 14, 15]).tokens == []  # ran past the end
    assert ask(h, 4, 4, [99]).tokens == []          # diverged from the script
    assert ask(h, 5, 2, [10]).tokens == [11, 12, 13, 14]  # rolled back onto the script
    h.handle(Close(1))
    assert not h.states


def test_guess_root_is_the_recorded_next_token(tmp_path):
    h, _ = make_handler(tmp_path)
    h.handle(OpenRequest(1, [1, 2]))
    p = ask(h, 1, 2, [10, 11], guess_root=True)
    assert p.root_guess == 12 and p.tokens == [13, 14, 15]
    p = ask(h, 2, 2, [10, 99], guess_root=True)     # a bet off the script: nothing to propose
    assert p.root_guess == -1 and p.tokens == []


def test_corruption_is_deterministic_and_never_the_true_token(tmp_path):
    entries = [{"prompt": [1], "continuation": list(range(2, 62)) * 50}]
    h, _ = make_handler(tmp_path, corrupt=0.3, seed=5, entries=entries)
    h2, _ = make_handler(tmp_path, corrupt=0.3, seed=5, entries=entries, name="other.json")
    true = entries[0]["continuation"]
    got = [h.corrupted(0, i, t) for i, t in enumerate(true)]
    assert got == [h2.corrupted(0, i, t) for i, t in enumerate(true)]
    assert all(0 <= g < 64 for g in got)
    rate = sum(g != t for g, t in zip(got, true)) / len(true)
    assert rate == pytest.approx(0.3, abs=0.04)
    h.corrupt = 1.0
    assert all(h.corrupted(0, i, t) != t for i, t in enumerate(true[:500]))


def test_script_is_reread_when_it_changes(tmp_path):
    h, path = make_handler(tmp_path, corrupt=0.0)
    save_script({"version": 1, "corrupt": 1.0, "entries": [{"prompt": [3], "continuation": [4, 5]}]}, path)
    h.handle(OpenRequest(1, [3]))                   # a new request picks the new file up
    assert h.corrupt == 1.0
    p = ask(h, 1, 1, [])
    assert len(p.tokens) == 2 and p.tokens != [4, 5]
    path.write_text(json.dumps({"version": 2, "entries": []}))
    with pytest.raises(ValueError):
        load_script(path)


# ---- processes: through launch() -----------------------------------------------------------
@pytest.fixture(scope="module")
def coords(launch_all, close_all, tiny_target, tmp_path_factory):
    script = tmp_path_factory.mktemp("replay") / "script.json"
    save_script({"version": 1, "entries": []}, script)  # recorded below, once the target runs
    cs = launch_all({
        "base": (tiny_target, None, {}),
        "replay": (tiny_target, f"replay:{script}",
                   dict(depth=DEPTH, top_k=1, max_nodes=DEPTH, replay_corrupt=0.3, replay_seed=1)),
    })
    try:
        rec = record_script(cs["base"], PROMPTS, MAX_NEW)
        yield cs["base"], cs["replay"], script, rec
    finally:
        assert not close_all(cs.values()), "workers outlived close()"


def run_all(coord, script_path, rec, corrupt=None):
    """Generate every prompt with the script at this corruption level (None: launch's)."""
    save_script({**rec, **({} if corrupt is None else {"corrupt": corrupt})}, script_path)
    results = [coord.generate(p, max_new_tokens=MAX_NEW) for p in PROMPTS]
    for r, e in zip(results, rec["entries"]):
        assert r.token_ids == e["continuation"]      # lossless, whatever the draft says
        assert r.stats.accepted == r.stats.accepted_drafts + r.stats.rounds and not r.stats.draft_fallback
        assert r.stats.prefill_first + r.stats.accepted == MAX_NEW
    rounds = sum(r.stats.rounds for r in results)
    return results, sum(r.stats.accepted for r in results) / rounds


def test_record_script_is_target_only_output(coords):
    base, _, _, rec = coords
    assert [e["prompt"] for e in rec["entries"]] == PROMPTS
    for p, e in zip(PROMPTS, rec["entries"]):
        assert base.generate(p, max_new_tokens=MAX_NEW).token_ids == e["continuation"]


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
def test_uncorrupted_replay_is_fully_accepted(coords, overlap):
    _, replay, path, rec = coords
    replay.overlap = overlap
    try:
        results, tau = run_all(replay, path, rec, corrupt=0.0)
    finally:
        replay.overlap = False
    assert tau == pytest.approx(DEPTH + 1)         # 61 = the prefill's token + 12 rounds of 5: no trimming
    for r in results:
        assert r.stats.accepted_drafts == r.stats.drafted
        if overlap:  # the bet (whole chain accepted, root = recorded next) always wins
            assert r.stats.speculative_hits >= r.stats.rounds - 1


def test_fully_corrupted_replay_is_always_rejected(coords):
    _, replay, path, rec = coords
    results, tau = run_all(replay, path, rec, corrupt=1.0)
    assert tau == 1.0
    assert all(r.stats.drafted > 0 and r.stats.accepted_drafts == 0 for r in results)


def test_acceptance_follows_expected_tau(coords):
    _, replay, path, rec = coords
    assert replay.config.replay_corrupt == 0.3
    results, tau = run_all(replay, path, rec)       # the level launch() was given
    assert sum(r.stats.rounds for r in results) > 60
    assert 1.0 < tau < DEPTH + 1
    assert tau == pytest.approx(expected_tau(DEPTH, 0.3), abs=0.5)


# ---- the GPU benchmark, at a tiny shape on the CPU -----------------------------------------
@pytest.mark.timeout(90)
def test_gpu_bench_quick_runs_on_the_cpu(tmp_path):
    from bench import gpu
    res = gpu.main(["--quick", "--dtype", "float64", "--levels", "0.0,0.5", "--draft-device", "cpu",
                    "--out-dir", str(tmp_path)])
    saved = json.loads((tmp_path / res["path"].rsplit("/", 1)[-1]).read_text())
    (size,) = saved["sizes"]
    assert size["size"] == "tiny" and size["baseline"]["tau"] == 1.0
    for key in ("tokens_per_s", "decode_tokens_per_s", "verify_s_per_round", "bound_tokens_per_s", "efficiency"):
        assert size["baseline"][key] > 0
    levels = {row["corrupt"]: row for row in size["levels"]}
    assert set(levels) == {0.0, 0.5}
    for row in levels.values():
        assert row["lossless"]
        for key in ("speedup", "tau", "expected_tau", "efficiency", "draft_s_per_round", "bound_tokens_per_s"):
            assert row[key] > 0
    zero = levels[0.0]
    assert zero["expected_tau"] == 5.0  # --quick: depth 4
    # a few short answers (16 positions of context): each one's last round is cut by its end
    assert 1.0 < zero["tau"] and zero["tau"] == pytest.approx(zero["expected_tau"], abs=0.5)
