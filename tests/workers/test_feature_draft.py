"""The feature-draft handler in-process, then end to end through real worker processes.

Target features are computed the plain way (the whole sequence through the target, no
cache). Feature row p is the target's hidden state after committed token p; a request
carries rows up to, not including, the last committed token (workers/feature_draft.py).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from dovetail.draft.checkpoint import load_feature_draft, load_target_pieces, new_feature_draft, save_checkpoint
from dovetail.protocol import DraftRequest, OpenRequest, decode_features, encode_features
from tests.helpers import make_tiny_model
from dovetail.training.train import TrainConfig, train
from dovetail.training.data import Sequence, target_hidden
from dovetail.spec.tree import check_parents, depths
from dovetail.workers.feature_draft import FeatureDraftHandler
from dovetail.workers.hf import CausalLM
from dovetail.workers.serve import RequestError

V = 64
PROMPT = [1, 5, 9, 3, 7, 11, 2]
E2E_PROMPTS = {"one-token": [7], "short": [1, 5, 9, 13], "long": [(7 * i + 3) % 64 for i in range(29)]}
MAX_NEW = 40


@pytest.fixture(scope="module")
def target_path(tmp_path_factory):
    # Sharpened attention: every prediction depends on the whole context (see
    # test_draft_handler.py), so features carry information tokens alone do not.
    return make_tiny_model(tmp_path_factory.mktemp("fd") / "target", seed=3, attention_gain=10.0)


@pytest.fixture(scope="module")
def lm(target_path):
    return CausalLM.load(str(target_path), dtype=torch.float64)


@pytest.fixture(scope="module")
def pieces(target_path):
    return load_target_pieces(target_path)


@pytest.fixture(scope="module")
def random_draft(pieces):
    return new_feature_draft(pieces, "dgf", 2, seed=1).double().eval()


def greedy(lm, prompt, n):
    cache, seq = lm.new_cache(), list(prompt)
    out = lm.forward(cache, seq, logit_rows=[-1])
    for _ in range(n):
        seq.append(int(out.logits[-1].argmax()))
        out = lm.forward(cache, [seq[-1]])
    return seq


def feats(lm, tokens, start, end):
    """Target feature rows for positions [start, end) of ``tokens``."""
    return encode_features(target_hidden(lm, tokens)[start:end])


def opened(handler, req=1, prompt=PROMPT):
    handler.handle(OpenRequest(req, list(prompt)))
    return handler


def ask(handler, lm, seq, base, step, depth=3, top_k=2, max_nodes=6, rows_from=None, req=1):
    """Draft for committed ``seq``; the draft held ``base`` tokens and features of positions
    before ``rows_from`` (default: base - 1)."""
    rows_from = max(0, base - 1) if rows_from is None else rows_from
    f = feats(lm, seq, rows_from, len(seq) - 1) if len(seq) - 1 > rows_from else None
    return handler.handle(DraftRequest(req, step, base, seq[base:], depth, top_k, max_nodes, features=f))


# ---- in-process ----------------------------------------------------------------------------
@pytest.mark.parametrize("depth,top_k,max_nodes", [(1, 1, 1), (4, 1, 16), (3, 3, 8), (5, 2, 7), (6, 4, 30)])
def test_tree_invariants(lm, random_draft, depth, top_k, max_nodes):
    h = opened(FeatureDraftHandler(random_draft, "x"))
    seq = greedy(lm, PROMPT, 5)
    p = ask(h, lm, seq, 0, 1, depth, top_k, max_nodes, rows_from=0)
    check_parents(p.parents)  # parents before children
    d = depths(p.parents)
    assert 1 <= len(p.tokens) <= min(max_nodes, depth * top_k) and max(d) <= depth
    assert all(sum(1 for x in d if x == level) <= top_k for level in set(d))
    assert all(0 <= t < V for t in p.tokens)
    # The first node is the draft's favourite after the whole committed sequence.
    with torch.no_grad():
        hid = target_hidden(lm, seq)
        _, logits = random_draft(hid[:-1], torch.tensor(seq[1:]))
    assert p.tokens[0] == int(logits[-1].argmax())
    assert p.scores[0] == pytest.approx(float(torch.log_softmax(logits[-1].double(), -1).max()), abs=1e-4)
    # path log-probabilities: one per node, each at most its parent's
    assert len(p.scores) == len(p.tokens) and all(s <= 0 for s in p.scores)
    assert all(p.scores[i] <= p.scores[par] + 1e-6 for i, par in enumerate(p.parents) if par >= 0)
    assert h.states[1].cache.get_seq_length() == len(seq) - 1  # tree nodes were not kept


def test_reduced_vocabulary_trees_use_target_token_ids(lm, pieces):
    ids = list(range(1, V, 3))
    draft = new_feature_draft(pieces, "dgf", 1, seed=2, draft_vocab=ids).double().eval()
    seq = greedy(lm, PROMPT, 5)
    p = ask(opened(FeatureDraftHandler(draft, "x")), lm, seq, 0, 1, 3, 3, 8, rows_from=0)
    assert p.tokens and set(p.tokens) <= set(ids)
    with torch.no_grad():
        _, logits = draft(target_hidden(lm, seq)[:-1], torch.tensor(seq[1:]))
    assert p.tokens[0] == ids[int(logits[-1].argmax())]


def test_incremental_and_rolled_back_drafts_equal_a_fresh_draft(lm, random_draft):
    seq = greedy(lm, PROMPT, 12)
    h = opened(FeatureDraftHandler(random_draft, "x"))
    ask(h, lm, seq[:8], 0, 1, rows_from=0)
    ask(h, lm, seq[:11], 8, 2)
    # A bet lost: the draft's last 3 tokens were wrong; they are replaced by others.
    other = seq[:9] + [(t + 1) % V for t in seq[9:13]]
    got = ask(h, lm, other, 9, 3)
    fresh = ask(opened(FeatureDraftHandler(random_draft, "x")), lm, other, 0, 1, rows_from=0)
    assert (got.tokens, got.parents) == (fresh.tokens, fresh.parents)
    assert h.states[1].cached == len(other) - 1


def test_feature_rows_must_line_up(lm, random_draft):
    seq = greedy(lm, PROMPT, 4)
    h = opened(FeatureDraftHandler(random_draft, "x"))
    with pytest.raises(RequestError, match="without a gap"):
        ask(h, lm, seq, 0, 1, rows_from=2)  # rows of positions 0, 1 never sent
    with pytest.raises(RequestError, match="positions 0.."):
        h.handle(DraftRequest(1, 2, 0, seq, 3, 1, 3))  # no features at all
    with pytest.raises(RequestError, match="guess_root"):
        h.handle(DraftRequest(1, 3, 0, seq, 3, 1, 3, guess_root=True, features=feats(lm, seq, 0, len(seq) - 1)))
    one = opened(FeatureDraftHandler(random_draft, "x"), prompt=[7])
    p = one.handle(DraftRequest(1, 1, 1, [], 3, 1, 3))
    assert p.tokens == [] and p.parents == []  # nothing to draft from yet


def test_handshake_says_features(random_draft, pieces):
    hs = FeatureDraftHandler(random_draft, pieces.identity.tokenizer_hash).handshake()
    assert hs.features and hs.hidden_size == 32 and hs.vocab_size == V and hs.role == "draft"


# ---- a trained draft -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory, lm, pieces):
    """A DGF draft trained 300 steps on the target's own greedy continuations."""
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, V, (64, 6), generator=gen)
    with torch.no_grad():  # one batched greedy run: per-sequence loops cost minutes on busy cores
        out = lm.model.generate(prompts, max_new_tokens=48, min_new_tokens=48, do_sample=False, pad_token_id=0)
    data = [Sequence(s, target_hidden(lm, s.tolist()).float()) for s in out]
    model = new_feature_draft(pieces, "dgf", 1, seed=0)
    out = tmp_path_factory.mktemp("fd") / "trained"
    losses = train(model, data, TrainConfig(steps=300, lr=3e-3, batch_size=8, seq_len=32, progress=False), out)
    assert sum(losses[-20:]) < 0.75 * sum(losses[:20])  # CE has the target entropy as its floor
    return out, model


def echo_draft(pieces):
    """An EAGLE-kind draft whose output is its input feature: x = f, layers add nothing.

    Its logits at pair (f_t, x_{t+1}) are the target head on f_t: the target's greedy
    choice after position t, i.e. x_{t+1} itself on a greedy sequence. So its first tree
    token echoes the last committed token exactly when feature row p is f_p.
    """
    model = new_feature_draft(pieces, "eagle", 1).double()
    with torch.no_grad():
        model.fusion.fc.weight.zero_()
        model.fusion.fc.bias.zero_()
        model.fusion.fc.weight[:, :32] = torch.eye(32)
        for layer in model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return model.eval()


def test_feature_rows_reach_the_draft_at_their_positions(lm, pieces):
    h = opened(FeatureDraftHandler(echo_draft(pieces), "x"))
    seq = greedy(lm, PROMPT, 10)
    for step, n in enumerate(range(len(PROMPT) + 1, len(seq) + 1), start=1):
        base = 0 if step == 1 else n - 1
        p = ask(h, lm, seq[:n], base, step, depth=1, top_k=1, max_nodes=1, rows_from=0 if step == 1 else None)
        assert p.tokens == [seq[n - 1]], n


# ---- end to end ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def coords(launch_all, close_all, target_path, trained, random_draft, tmp_path_factory):
    rand_dir = tmp_path_factory.mktemp("fd") / "random"
    save_checkpoint(random_draft, rand_dir)
    shape = dict(depth=4, top_k=2, max_nodes=8)
    cs = launch_all({"base": (target_path, None, {}),
                     "random": (target_path, f"feature:{rand_dir}", shape),
                     "trained": (target_path, f"feature:{trained[0]}", shape),
                     "int8": (target_path, f"feature:{trained[0]}", dict(shape, feature_codec="int8")),
                     "int8-weights": (target_path, f"feature:{trained[0]}",
                                      dict(shape, draft_quantize="int8", draft_device="cpu"))})
    try:
        yield cs
    finally:
        assert not close_all(cs.values()), "workers outlived close()"


def simulate(draft, lm, prompt, ref, shift=0) -> list[int]:
    """Accept lengths of depth-1 chain rounds, in-process: what the pipeline must reproduce.
    ``shift`` rolls the feature rows (a misalignment the comparison must notice)."""
    seq, lengths = list(prompt), []
    while len(seq) - len(prompt) < MAX_NEW:
        n, budget = len(seq), MAX_NEW - (len(seq) - len(prompt))
        guess = None
        if n >= 2 and budget > 1:
            with torch.no_grad():
                rows = torch.roll(target_hidden(lm, seq)[:n - 1], shift, 0)
                rows = torch.from_numpy(decode_features(encode_features(rows))).double()  # the wire
                guess = int(draft(rows, torch.tensor(seq[1:]))[1][-1].argmax())
        accepted = 2 if guess == ref[n] else 1  # the guess, then the target's own next token
        lengths.append(accepted)
        seq = ref[:n + accepted]
    return lengths


@pytest.mark.timeout(300)  # includes training the draft and starting 3 coordinators
def test_pipeline_feeds_the_draft_exactly_the_targets_features(coords, trained, lm, pieces):
    """Depth-1 chains: every round's acceptance must equal the in-process prediction with
    aligned features (and the same prediction with rows shifted by one must differ)."""
    draft = load_feature_draft(trained[0], pieces, dtype=torch.float64)
    coord = coords["trained"]
    saved = coord.config
    coord.config = dataclasses.replace(saved, depth=1, top_k=1, max_nodes=1)
    try:
        shifted_differs = False
        for name, prompt in E2E_PROMPTS.items():
            ref = greedy(lm, prompt, MAX_NEW)
            r = coord.generate(prompt, max_new_tokens=MAX_NEW)
            assert r.token_ids == ref[len(prompt):]
            assert r.stats.accept_lengths == simulate(draft, lm, prompt, ref), name
            shifted_differs |= r.stats.accept_lengths != simulate(draft, lm, prompt, ref, shift=1)
            # The next turn starts from the target's prefix cache, hidden states included: the
            # draft must get the same rows a cold prefill would give it.
            turn = ref + [3, 1, 4]
            ref2 = greedy(lm, turn, MAX_NEW)
            r2 = coord.generate(turn, max_new_tokens=MAX_NEW)
            assert r2.stats.cached_tokens == len(ref) - 1, name
            assert r2.token_ids == ref2[len(turn):]
            assert r2.stats.accept_lengths == simulate(draft, lm, turn, ref2), name
        assert shifted_differs
    finally:
        coord.config = saved


@pytest.mark.timeout(180)
def test_feature_drafts_are_lossless_and_a_trained_one_is_accepted(coords):
    accepted = {"random": 0, "trained": 0}
    rounds = dict(accepted)
    for name, prompt in E2E_PROMPTS.items():
        ref = coords["base"].generate(prompt, max_new_tokens=MAX_NEW).token_ids
        assert len(set(ref)) > 3, ref
        for draft in ("random", "trained"):
            r = coords[draft].generate(prompt, max_new_tokens=MAX_NEW)
            assert r.token_ids == ref, (draft, name)
            assert not r.stats.draft_fallback and r.stats.drafted > 0
            accepted[draft] += r.stats.accepted
            rounds[draft] += r.stats.rounds
    assert coords["trained"].draft_info.features and not coords["trained"].overlap
    # int8 features (about half the bytes) reach the draft too, and the output stays exact.
    for name, prompt in E2E_PROMPTS.items():
        r = coords["int8"].generate(prompt, max_new_tokens=MAX_NEW)
        assert r.token_ids == coords["base"].generate(prompt, max_new_tokens=MAX_NEW).token_ids
        assert not r.stats.draft_fallback and r.stats.mean_accepted > 1.2, (name, r.stats.accept_lengths)
    assert coords["int8"].draft_info.feature_codec == "int8"
    assert accepted["trained"] / rounds["trained"] > 1.5, (accepted, rounds)
    assert accepted["trained"] / rounds["trained"] > accepted["random"] / rounds["random"]
    # int8 draft weights: a different draft, still verified exactly; it still gets accepted.
    assert coords["int8-weights"].draft_info.dtype.endswith("+int8")
    quant_acc = quant_rounds = 0
    for name, prompt in E2E_PROMPTS.items():
        r = coords["int8-weights"].generate(prompt, max_new_tokens=MAX_NEW)
        assert r.token_ids == coords["base"].generate(prompt, max_new_tokens=MAX_NEW).token_ids, name
        quant_acc, quant_rounds = quant_acc + r.stats.accepted, quant_rounds + r.stats.rounds
    assert quant_acc / quant_rounds > 0.8 * accepted["trained"] / rounds["trained"]


def test_draft_worker_flags_for_a_feature_draft(tmp_path):
    from dovetail.workers.draft import DraftConfig
    DraftConfig(bind="inproc://d", feature_draft=str(tmp_path), target_model="t")
    with pytest.raises(ValueError, match="--target-model"):
        DraftConfig(bind="inproc://d", feature_draft=str(tmp_path))
    with pytest.raises(ValueError, match="either --model"):
        DraftConfig(bind="inproc://d", model="m", feature_draft=str(tmp_path), target_model="t")
    with pytest.raises(ValueError, match="either --model"):
        DraftConfig(bind="inproc://d")
    DraftConfig(bind="inproc://d", feature_draft=str(tmp_path), target_model="t", quantize="int8")
    with pytest.raises(ValueError, match="feature draft on the CPU"):
        DraftConfig(bind="inproc://d", feature_draft=str(tmp_path), target_model="t", quantize="int8", device="cuda:0")
    with pytest.raises(ValueError, match="feature draft on the CPU"):
        DraftConfig(bind="inproc://d", model="m", quantize="int8")
    with pytest.raises(ValueError, match="none or int8"):
        DraftConfig(bind="inproc://d", feature_draft=str(tmp_path), target_model="t", quantize="int4")


def test_launch_refuses_int8_weights_for_other_drafts(target_path):
    import dovetail
    with pytest.raises(ValueError, match="feature draft on the CPU"):
        dovetail.launch(target_path, target_path, draft_device="cpu", draft_quantize="int8")
    with pytest.raises(ValueError, match="'none' or 'int8'"):
        dovetail.launch(target_path, None, draft_quantize="int4")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_weights_keep_the_drafts_guesses(trained, pieces, dtype):
    from dovetail.workers.feature_draft import quantize_feature_draft
    from dovetail.workers.quant import Int8Linear
    ref = load_feature_draft(trained[0], pieces, dtype=dtype)
    quant = load_feature_draft(trained[0], pieces, dtype=dtype)
    # fusion w1, w2, wz; q, k, v, o; gate, up, down; the head
    assert quantize_feature_draft(quant) == 11 and isinstance(quant.head, Int8Linear)
    assert not any(type(m) is torch.nn.Linear for m in quant.modules())
    gen = torch.Generator().manual_seed(3)
    f = torch.randn(12, ref.config.target.hidden_size, generator=gen)
    ids = torch.randint(0, ref.config.target.vocab_size, (12,), generator=gen)
    with torch.no_grad():
        (h_ref, l_ref), (h_q, l_q) = ref(f, ids), quant(f, ids)
    assert torch.allclose(h_q.float(), h_ref.float(), atol=0.05 * h_ref.float().abs().max().item())
    assert (l_q.argmax(-1) == l_ref.argmax(-1)).float().mean() >= 0.9


@pytest.mark.timeout(120)
def test_sampling_with_a_feature_draft_is_deterministic_per_seed(coords):
    for prompt in E2E_PROMPTS.values():
        a = coords["trained"].generate(prompt, max_new_tokens=16, temperature=1.0, seed=11)
        b = coords["trained"].generate(prompt, max_new_tokens=16, temperature=1.0, seed=11)
        assert a.token_ids == b.token_ids and len(a.token_ids) == 16
        assert not a.stats.draft_fallback


# ---- offline replay (dovetail/training/distill.py) ---------------------------------------------------
def test_accepted_length_follows_matching_paths_only():
    from dovetail.training.distill import accepted_length
    # root children 5 and 6; 5 -> 7 -> 8; 6 -> 9
    tokens, parents = [5, 6, 7, 9, 8], [-1, -1, 0, 1, 2]
    assert accepted_length(tokens, parents, [5, 7, 8, 1]) == 3
    assert accepted_length(tokens, parents, [6, 9, 4]) == 2
    assert accepted_length(tokens, parents, [5, 9]) == 1  # 9 hangs below 6, not below 5
    assert accepted_length(tokens, parents, [4]) == 0
    assert accepted_length([], [], [4]) == 0
    assert accepted_length(tokens, parents, [5, 7]) == 2  # truth shorter than the tree


@pytest.mark.timeout(300)
def test_offline_replay_reproduces_the_pipelines_rounds(coords, trained, pieces, target_path):
    """Greedy rounds replayed from recorded answers commit exactly what the live pipeline
    (target and feature-draft processes, same tree shape) committed, round by round."""
    from dovetail.training.distill import greedy_with_hidden, offline_tau
    from dovetail.workers.backend import HFBackend
    backend = HFBackend(str(target_path), dtype=torch.float64)
    answers = [greedy_with_hidden(backend, p, MAX_NEW, stop_ids=set()) for p in E2E_PROMPTS.values()]
    live = [coords["trained"].generate(p, max_new_tokens=MAX_NEW) for p in E2E_PROMPTS.values()]
    for a, r in zip(answers, live):
        assert a.tokens.tolist()[a.prompt_len:] == r.token_ids  # the recorded answer is the target's
        assert a.hidden.shape == (len(a.tokens), pieces.identity.hidden_size)
        one_pass = target_hidden(CausalLM.load(str(target_path), dtype=torch.float64), a.tokens.tolist())
        assert torch.allclose(a.hidden.double(), one_pass, atol=1e-9)  # incremental = one pass (float64)
    handler = FeatureDraftHandler(load_feature_draft(trained[0], pieces, dtype=torch.float64), "x")
    got = offline_tau(handler, answers, depth=4, top_k=2, max_nodes=8)
    assert got["lengths"] == [r.stats.accept_lengths for r in live]
    assert got["tau"] == sum(r.stats.accepted for r in live) / sum(r.stats.rounds for r in live)
    assert got["tau"] > 1.5 and not handler.states  # every replayed request was closed


@pytest.mark.timeout(180)
def test_a_gated_draft_is_lossless_and_drafts_less(coords):
    """gate=True: the sizer prices a token from a steep verify curve (llama.cpp on two cores)
    and the draft proposes only tokens above that path probability."""
    from dovetail.runtime.autotree import TreeSizer
    class SteepCurve(TreeSizer):  # keeps the curve it was given: the tiny target's own is nearly flat
        def observe(self, *args, verify_s=None, **kwargs):
            super().observe(*args, **kwargs)

    coord = coords["trained"]
    saved_cfg, saved_sizer = coord.config, coord.sizer
    try:
        coord.config = dataclasses.replace(saved_cfg, auto_tree=True, gate=True)
        coord.sizer = SteepCurve([37000, 60000, 85000, 96000, 118000], max_depth=4, top_k=2, max_nodes=8,
                                 overlap=False)
        assert 0.5 < coord.sizer.min_prob() < 0.6  # (118 - 37) / 4 ms per row against a 37 ms step
        drafted = {"gated": 0, "open": 0}
        rounds = dict(drafted)
        for name, prompt in E2E_PROMPTS.items():
            ref = coords["base"].generate(prompt, max_new_tokens=MAX_NEW).token_ids
            r = coord.generate(prompt, max_new_tokens=MAX_NEW)
            assert r.token_ids == ref, name
            assert not r.stats.draft_fallback
            drafted["gated"] += r.stats.drafted
            rounds["gated"] += r.stats.rounds
        coord.config, coord.sizer = saved_cfg, saved_sizer
        for prompt in E2E_PROMPTS.values():
            r = coord.generate(prompt, max_new_tokens=MAX_NEW)
            drafted["open"] += r.stats.drafted
            rounds["open"] += r.stats.rounds
        assert drafted["gated"] / rounds["gated"] < drafted["open"] / rounds["open"], (drafted, rounds)
    finally:
        coord.config, coord.sizer = saved_cfg, saved_sizer


@pytest.mark.timeout(120)
def test_rounds_teach_the_sizer_what_verifying_costs(coords):
    """Each round's own verification time reaches the sizer: a curve that says 500 ms per
    forward moves toward the tiny target's few ms at the row counts the rounds used."""
    from dovetail.runtime.autotree import TreeSizer
    coord = coords["trained"]
    saved_cfg, saved_sizer = coord.config, coord.sizer
    try:
        coord.config = dataclasses.replace(saved_cfg, auto_tree=True)
        coord.sizer = TreeSizer([500_000] * 12, max_depth=4, top_k=2, max_nodes=8, overlap=False)
        r = coord.generate(E2E_PROMPTS["long"], max_new_tokens=MAX_NEW)
        assert r.token_ids == coords["base"].generate(E2E_PROMPTS["long"], max_new_tokens=MAX_NEW).token_ids
        seen = coord.sizer.verify_ms_k
        assert min(seen) < 100, seen  # rows it verified: learned
        assert max(seen) == 500, seen  # rows it never verified (10 to 12): as measured
    finally:
        coord.config, coord.sizer = saved_cfg, saved_sizer
