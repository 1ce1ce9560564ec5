"""The target worker's request handler, in-process, on a tiny float64 model.

The reference is the model's own greedy continuation computed the plain way (the whole
sequence through the HF model each step, no KV cache). Every verification round must
commit a prefix of that continuation, and decoding after any round (accepts, rejects,
tree gathers, refused requests) must go on reproducing it exactly: that is what proves
the KV cache was rolled back or gathered correctly.
"""
import numpy as np
import pytest
import torch

from dovetail.protocol import Close, Closed, VerifyRequest, decode_features
from tests.helpers import HandlerSession, make_tiny_model, plain_greedy
from dovetail.spec.tree import chain_parents
from dovetail.workers.backend import HFBackend
from dovetail.workers.serve import RequestError
from dovetail.workers.target import TargetConfig, TargetHandler

PROMPT = [1, 5, 9, 3, 7, 11, 2]
VOCAB = 64


def sharpened_tiny_model(path, seed):
    """A tiny random Qwen2 whose attention is sharpened (q and k scaled up).

    At random init attention is nearly uniform, so a tiny model acts like a bigram table
    and its greedy output soon loops on a few tokens; a stale or misplaced KV entry would
    then go unnoticed. Sharper attention makes every token depend on the whole context.
    """
    return make_tiny_model(path, seed=seed, vocab_size=VOCAB, attention_gain=10.0)


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    return sharpened_tiny_model(tmp_path_factory.mktemp("target") / "model", seed=2)


@pytest.fixture(scope="session")
def backend(model_path):
    return HFBackend(str(model_path), dtype=torch.float64)


def plain_ar(backend, prompt, n):
    """The target's greedy continuation: the whole sequence through the model each step."""
    return plain_greedy(backend.lm.model, prompt, n)


@pytest.fixture(scope="session")
def truth(backend):
    cont = plain_ar(backend, PROMPT, 40)
    assert len(set(cont)) > 15, "the reference continuation loops: the tests would be weak"
    return cont


@pytest.fixture
def handler(backend, model_path):
    return TargetHandler(backend, TargetConfig(bind="inproc://target", model=str(model_path)))


class Session(HandlerSession):
    """One request driven through the handler (request 1 and PROMPT unless told otherwise)."""

    def __init__(self, handler, req=1, prompt=PROMPT, **open_kw):
        super().__init__(handler, req, prompt, **open_kw)


def test_open_prefills_all_but_the_last_prompt_token(handler, backend):
    s = Session(handler)
    assert s.opened.cache_len == len(PROMPT) - 1  # the last token is the first root
    feats = decode_features(s.opened.features)
    assert feats.shape == (len(PROMPT) - 1, backend.identity.hidden_size)
    with torch.no_grad():
        ref = backend.lm.model.model(input_ids=torch.tensor([PROMPT[:-1]])).last_hidden_state[0]
    np.testing.assert_allclose(feats, ref.numpy(), rtol=2**-10, atol=1e-4)  # fp16 on the wire


def test_the_first_token_costs_no_forward_when_the_root_went_in_with_the_prompt(handler, backend, truth,
                                                                              monkeypatch):
    assert Session(handler, req=2).opened.root_ready is False  # a feature draft's request: hidden states only
    s = Session(handler, features=False)
    assert s.opened.root_ready and s.opened.cache_len == len(PROMPT) - 1
    assert handler.worth_waiting((b"", 1), VerifyRequest(1, 0, PROMPT[-1], [], [])) is False
    with monkeypatch.context() as m:
        m.setattr(backend, "verify", lambda *a, **k: pytest.fail("a forward for the first token"))
        assert s.verify([]).tokens == truth[:1]
    assert s.cache_len() == len(PROMPT)
    assert s.decode(8) == truth[:9]


def test_target_only_decoding_reproduces_plain_ar(handler, truth):
    assert Session(handler).decode(20) == truth[:20]


def test_a_one_token_prompt_has_nothing_to_prefill(handler, backend):
    s = Session(handler, prompt=[PROMPT[-1]])
    assert (s.opened.cache_len, s.opened.features) == (0, None)
    s.verify([5, 6])  # a (probably wrong) draft into an empty cache
    assert s.decode(6) == plain_ar(backend, [PROMPT[-1]], len(s.generated()))


@pytest.mark.parametrize("j", range(6))
def test_chain_rejected_at_each_position_rolls_back_exactly(handler, truth, j):
    k = 5
    draft = truth[:k]
    if j < k:
        draft[j] = (draft[j] + 1) % VOCAB  # corrupt position j; everything after is moot
    s = Session(handler)
    before = s.cache_len()
    res = s.verify(draft)
    assert res.accepted == list(range(j))
    assert res.tokens == truth[:j + 1]       # j accepted + the target's own token
    assert res.cache_len == before + j + 1 == s.cache_len()
    # The rejected rows must be gone from the cache: decoding on is still exact.
    assert s.decode(12) == truth[:j + 1 + 12]


def test_several_rounds_with_partial_accepts_stay_exact(handler, truth):
    s = Session(handler)
    for accept in (2, 0, 5, 1, 3):  # each round: `accept` right tokens, then a wrong one
        n = len(s.generated())
        draft = truth[n:n + accept] + [(truth[n + accept] + 7) % VOCAB, 0, 1]
        assert s.verify(draft).accepted == list(range(accept))
    n = len(s.generated())
    assert s.decode(10) == truth[:n + 10]


def test_tree_takes_the_second_child_and_gathers_its_kv(handler, backend, truth):
    # root ─┬─ 0:wrong ── 2:truth[1]   (right token under the wrong parent: a trap)
    #       └─ 1:truth[0] ── 3:truth[1] ─┬─ 4:wrong
    #                                    └─ 5:truth[2]
    wrong = (truth[0] + 1) % VOCAB
    tokens = [wrong, truth[0], truth[1], truth[1], (truth[2] + 1) % VOCAB, truth[2]]
    parents = [-1, -1, 0, 1, 3, 3]
    s = Session(handler)
    before = s.cache_len()
    res = s.verify(tokens, parents)
    assert res.accepted == [1, 3, 5]
    assert res.tokens == truth[:4]
    assert res.cache_len == before + 4
    # Rows 2, 4 and 6 of the forward were kept out of order: decoding must stay exact.
    assert s.decode(20) == truth[:24]

    # Features: root + accepted nodes, equal to the model's final hidden states (after the
    # final norm) at those positions, up to fp16 rounding.
    feats = decode_features(res.features)
    assert feats.shape == (len(res.accepted) + 1, backend.identity.hidden_size)
    seq = PROMPT + truth[:3]  # root (last prompt token) and the three accepted tokens
    with torch.no_grad():
        ref = backend.lm.model.model(input_ids=torch.tensor([seq])).last_hidden_state[0, -4:]
    np.testing.assert_allclose(feats, ref.numpy(), rtol=2**-10, atol=1e-4)


def test_features_of_a_chain_round(handler, backend, truth):
    s = Session(handler)
    res = s.verify(truth[:2] + [(truth[2] + 1) % VOCAB])
    feats = decode_features(res.features)
    assert feats.shape == (3, backend.identity.hidden_size)
    with torch.no_grad():
        ref = backend.lm.model.model(input_ids=torch.tensor([PROMPT + truth[:2]])).last_hidden_state[0, -3:]
    np.testing.assert_allclose(feats, ref.numpy(), rtol=2**-10, atol=1e-4)


def _refused(handler, msg, code):
    with pytest.raises(RequestError) as e:
        handler.handle(msg)
    assert e.value.code == code
    assert e.value.req_id == msg.req_id


def test_stale_and_duplicated_verify_do_not_advance(handler, truth):
    s = Session(handler)
    first = VerifyRequest(1, 0, PROMPT[-1], truth[:3], chain_parents(3))
    res = handler.handle(first)
    s.step, s.committed = 1, s.committed + res.tokens
    length, pending = s.cache_len(), handler.sequences[b"", 1].pending
    _refused(handler, first, "stale_step")  # the same message delivered twice
    _refused(handler, VerifyRequest(1, 5, pending, [], []), "stale_step")  # from the future
    assert s.cache_len() == length and handler.sequences[b"", 1].pending == pending
    assert handler.sequences[b"", 1].step == 1
    assert s.decode(8) == truth[:4 + 8]


def test_wrong_root_is_refused(handler, truth):
    s = Session(handler)
    length = s.cache_len()
    _refused(handler, VerifyRequest(1, 0, (PROMPT[-1] + 1) % VOCAB, truth[:2], [-1, 0]), "bad_root")
    assert s.cache_len() == length
    assert s.decode(5) == truth[:5]  # the refused round left no trace


def test_unknown_request_and_close(handler, truth):
    _refused(handler, VerifyRequest(42, 0, PROMPT[-1], [], []), "unknown_request")
    Session(handler, req=7)
    assert handler.handle(Close(7)) == Closed(req_id=7)
    assert (b"", 7) not in handler.sequences
    _refused(handler, VerifyRequest(7, 0, PROMPT[-1], [], []), "unknown_request")
    assert handler.handle(Close(7)) == Closed(req_id=7)  # closing twice is harmless


def test_a_verify_failing_midway_leaves_the_sequence_as_it_was(handler, truth):
    s = Session(handler)
    length = s.cache_len()
    # One token but two parents: the forward runs (and grows the cache), then the
    # acceptance walk accepts node 0 and trips over node 1, which has no token.
    with pytest.raises(IndexError):
        handler.handle(VerifyRequest(1, 0, PROMPT[-1], [truth[0]], [-1, 0]))
    assert s.cache_len() == length and handler.sequences[b"", 1].step == 0
    assert s.decode(6) == truth[:6]


def test_sampling_with_a_one_token_nucleus_is_greedy(handler, truth):
    # top_p this small keeps only the argmax: the sampled path (accept_sampled, its
    # rejections and the tree gather) must then commit exactly the greedy continuation.
    s = Session(handler, temperature=1.0, top_p=1e-9, seed=5)
    wrong = (truth[0] + 1) % VOCAB
    assert s.verify([wrong, truth[0], truth[1], truth[2]], [-1, -1, 1, 1]).accepted == [1, 2]
    assert s.verify(truth[3:5] + [(truth[5] + 1) % VOCAB]).accepted == [0, 1]
    assert s.decode(10) == truth[:6 + 10]


def test_sampling_is_deterministic_for_a_seed(handler):
    def run(req, seed):
        s = Session(handler, req=req, temperature=1.0, top_p=0.9, seed=seed)
        for draft in ([3, 7, 11], [], [5, 5], [9, 8, 7, 6]):
            s.verify(draft)
            s.verify(draft, parents=[-1] * len(draft))  # and as siblings of the root
        return s.committed

    a, b = run(1, seed=123), run(2, seed=123)
    assert a == b and len(a) >= len(PROMPT) + 8  # 8 rounds, >= 1 token each
    # Another seed samples something else (64 tokens, near-uniform: a tie is hopeless).
    assert run(3, seed=124) != a


def test_a_client_whose_session_ends_has_all_its_requests_closed_and_only_those(handler, backend, truth,
                                                                                 monkeypatch):
    from dovetail.protocol import OpenRequest
    released = []
    monkeypatch.setattr(backend, "release", lambda cache: released.append(cache))
    for peer in (b"gone", b"stays"):
        for req in (1, 2):
            handler.handle(OpenRequest(req, PROMPT), peer)
    caches = [handler.sequences[b"gone", r].cache for r in (1, 2)]
    assert handler.drop_peer(b"gone") == 2
    assert sorted(handler.sequences) == [(b"stays", 1), (b"stays", 2)]
    # each freed once (a llama.cpp sequence id goes back to the pool), or kept once by the prefix
    # cache (the two hold the same tokens: it keeps one)
    kept = [e.seq for e in handler.prefix_cache.entries]
    assert len(kept) == 1 and sorted(map(id, released + kept)) == sorted(map(id, caches))
    assert handler.drop_peer(b"gone") == 0
    res = handler.handle(VerifyRequest(1, 0, PROMPT[-1], [], []), b"stays")  # the other client goes on
    assert res.tokens == truth[:1]


def test_a_batch_of_verifications_commits_what_each_would_alone(handler, backend, model_path, truth):
    """verify_batch: requests at different steps, a chain, a tree, a wrong draft, target-only
    and sampled, plus a stale one that must get its own error and change nothing."""
    from dovetail.protocol import OpenRequest
    alone = TargetHandler(backend, TargetConfig(bind="inproc://alone", model=str(model_path)))
    wrong = (truth[0] + 1) % VOCAB
    drafts = [([truth[0], truth[1], truth[2]], None), ([wrong, truth[0]], [-1, -1]), ([], None),
              ([truth[0], wrong], None)]
    opens = [OpenRequest(1, PROMPT), OpenRequest(2, PROMPT), OpenRequest(3, PROMPT[:5]),
             OpenRequest(4, PROMPT, temperature=1.0, top_p=0.9, seed=3)]
    for h in (handler, alone):
        for m in opens:
            h.handle(m, b"c")
    items = [(b"c", VerifyRequest(m.req_id, 0, m.prompt[-1], tokens, parents or chain_parents(len(tokens))))
             for m, (tokens, parents) in zip(opens, drafts)]
    items.append((b"c", VerifyRequest(1, 5, PROMPT[-1], [], [])))  # a stale step
    got = handler.verify_batch(items)
    want = [alone.handle(m, p) for p, m in items[:-1]]
    for g, w in zip(got, want):
        assert (g.tokens, g.accepted, g.cache_len) == (w.tokens, w.accepted, w.cache_len)
    assert isinstance(got[-1], RequestError) and got[-1].code == "stale_step"
    assert got[0].tokens == truth[:4]  # the chain of three truths, all accepted, plus the next
    for key in handler.sequences:  # and every request goes on in step with its twin
        assert handler.sequences[key].step == alone.sequences[key].step == 1


def test_batch_rows_is_checked(model_path):
    with pytest.raises(ValueError, match="--batch-rows"):
        TargetConfig(bind="inproc://t", model=str(model_path), batch_rows=0)
