"""The draft worker's request handler, in-process, on a tiny float64 model.

References are computed the plain way: the whole sequence through the HF model, no
cache. A proposal may depend only on the sequence the request describes, never on what
the handler saw before, so after any rollback it must equal a fresh handler's proposal.
"""
import pytest
import torch

from dovetail.protocol import Close, Closed, DraftRequest, OpenRequest, Opened
from tests.helpers import make_tiny_model
from dovetail.spec.tree import chain_parents, check_parents, children, depths, main_path
from dovetail.workers.draft import DraftConfig, DraftHandler
from dovetail.workers.hf import CausalLM
from dovetail.workers.serve import RequestError

PROMPT = [1, 5, 9, 3, 7, 11, 2]
VOCAB = 64


def sharpened_tiny_model(path, seed):
    """A tiny random Qwen2 with sharpened attention (q and k scaled up).

    At random init attention is nearly uniform: a tiny model then acts like a bigram
    table, and a stale KV entry left by a bad rollback would change nothing. Sharper
    attention makes every prediction depend on the whole context.
    """
    return make_tiny_model(path, seed=seed, vocab_size=VOCAB, attention_gain=10.0)


@pytest.fixture(scope="session")
def model_path(tmp_path_factory):
    return sharpened_tiny_model(tmp_path_factory.mktemp("draft") / "model", seed=2)


@pytest.fixture(scope="session")
def lm(model_path):
    return CausalLM.load(str(model_path), dtype=torch.float64)


def new_handler(lm, model_path):
    return DraftHandler(lm, DraftConfig(bind="inproc://draft", model=str(model_path)), "no-tokenizer:64")


@pytest.fixture
def handler(lm, model_path):
    return new_handler(lm, model_path)


def last_logits(lm, ids):
    with torch.no_grad():
        return lm.model(torch.tensor([list(ids)])).logits[0, -1].float()  # float32, as the draft sees them


def greedy(lm, ids, n):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(last_logits(lm, ids).argmax()))
    return ids[-n:]


def fresh_proposal(lm, model_path, seq, **kw):
    """What a handler that never saw anything else proposes after ``seq``."""
    h = new_handler(lm, model_path)
    h.handle(OpenRequest(9, list(seq)))
    p = h.handle(DraftRequest(9, 1, len(seq), [], **kw))
    return p.tokens, p.parents


def test_open_and_close(handler):
    assert handler.handle(OpenRequest(1, PROMPT)) == Opened(req_id=1, cache_len=0)
    assert handler.handle(Close(1)) == Closed(req_id=1) and 1 not in handler.states


@pytest.mark.parametrize("depth", [1, 4, 7])
def test_chain_is_the_drafts_greedy_continuation(handler, lm, depth):
    handler.handle(OpenRequest(1, PROMPT))
    p = handler.handle(DraftRequest(1, 1, len(PROMPT), [], depth=depth, top_k=1, max_nodes=depth))
    assert (p.req_id, p.step, p.root_guess) == (1, 1, -1)
    assert p.tokens == greedy(lm, PROMPT, depth)
    assert p.parents == chain_parents(depth)


@pytest.mark.parametrize("depth,top_k,max_nodes", [(4, 3, 10), (5, 4, 20), (3, 2, 4), (6, 8, 60), (2, 5, 3)])
def test_tree_invariants(handler, lm, depth, top_k, max_nodes):
    handler.handle(OpenRequest(1, PROMPT))
    p = handler.handle(DraftRequest(1, 1, len(PROMPT), [], depth=depth, top_k=top_k, max_nodes=max_nodes))
    tokens, parents = p.tokens, p.parents
    check_parents(parents)  # parents before children
    assert 0 < len(tokens) == len(parents) <= max_nodes
    assert max(depths(parents)) <= depth
    paths = []  # each node's token path from the root
    for i, par in enumerate(parents):
        paths.append((paths[par] if par >= 0 else ()) + (tokens[i],))
    for node, kids in children(parents).items():
        if not kids:
            continue
        sib = [tokens[c] for c in kids]
        assert len(set(sib)) == len(sib), f"duplicate sibling tokens under node {node}"
        logits = last_logits(lm, PROMPT + list(paths[node] if node >= 0 else ()))
        # The first child is the draft's argmax there; all children are among its top_k,
        # in order of probability.
        assert sib[0] == int(logits.argmax())
        assert set(sib) <= set(logits.topk(top_k).indices.tolist())
        assert sib == sorted(sib, key=lambda t: -logits[t].item())
    # So the first-child chain is a prefix of the greedy chain. (Not always all of it:
    # the beam keeps the best nodes by path score, which may prune the greedy path.)
    chain = [tokens[i] for i in main_path(parents)]
    assert chain == greedy(lm, PROMPT, len(chain))
    # Scores are the path log-probabilities under the draft.
    assert len(p.scores) == len(tokens)
    for i, par in enumerate(parents):
        logits = last_logits(lm, PROMPT + list(paths[par] if par >= 0 else ()))
        step = float(torch.log_softmax(logits.double(), -1)[tokens[i]])
        assert p.scores[i] == pytest.approx((p.scores[par] if par >= 0 else 0.0) + step, abs=1e-4)


def test_rollback_gives_the_same_proposal_as_a_fresh_handler(handler, lm, model_path):
    kw = dict(depth=4, top_k=3, max_nodes=10)
    handler.handle(OpenRequest(1, PROMPT))
    n = len(PROMPT)
    seq = list(PROMPT)
    # Each request: (base_len, new_tokens), i.e. how much of what the draft knows is still
    # right and what came after: extend, roll back partly, roll back into the prompt, ...
    for step, (base, new) in enumerate([(n, []), (n, [4, 8, 15]), (n + 1, [16, 23]),
                                        (n + 3, [42]), (3, [60, 61]), (5, [])], start=1):
        seq = seq[:base] + new
        p = handler.handle(DraftRequest(1, step, base, new, **kw))
        assert (p.tokens, p.parents) == fresh_proposal(lm, model_path, seq, **kw), f"step {step}"


def test_guess_root_drafts_from_the_drafts_own_favourite(handler, lm, model_path):
    kw = dict(depth=3, top_k=2, max_nodes=6)
    handler.handle(OpenRequest(1, PROMPT))
    handler.handle(DraftRequest(1, 1, len(PROMPT), [], **kw))
    path = [20, 30]  # the coordinator bets these get accepted, and the next token is unknown
    p = handler.handle(DraftRequest(1, 2, len(PROMPT), path, guess_root=True, **kw))
    guess = int(last_logits(lm, PROMPT + path).argmax())
    assert p.root_guess == guess
    assert (p.tokens, p.parents) == fresh_proposal(lm, model_path, PROMPT + path + [guess], **kw)
    # The guess was wrong: roll back to the accepted path and append the real token.
    real = (guess + 1) % VOCAB
    base = len(PROMPT) + len(path)
    p = handler.handle(DraftRequest(1, 3, base, [real], **kw))
    assert p.root_guess == -1
    assert (p.tokens, p.parents) == fresh_proposal(lm, model_path, PROMPT + path + [real], **kw)
    # The guess was right: the draft already holds it, nothing new to send.
    p = handler.handle(DraftRequest(1, 4, base, [guess], **kw))
    q = handler.handle(DraftRequest(1, 5, base + 1, [], **kw))
    assert (q.tokens, q.parents) == (p.tokens, p.parents)


def _refused(handler, msg, code):
    with pytest.raises(RequestError) as e:
        handler.handle(msg)
    assert (e.value.code, e.value.req_id) == (code, msg.req_id)


def test_refused_requests_change_nothing(handler, lm, model_path):
    kw = dict(depth=3, top_k=2, max_nodes=6)
    _refused(handler, DraftRequest(5, 1, 0, [1], **kw), "unknown_request")
    handler.handle(OpenRequest(1, PROMPT))
    handler.handle(DraftRequest(1, 3, len(PROMPT), [4, 5], **kw))
    known = list(handler.states[1].known)
    _refused(handler, DraftRequest(1, 3, len(PROMPT), [6], **kw), "stale_step")  # duplicate
    _refused(handler, DraftRequest(1, 2, len(PROMPT), [6], **kw), "stale_step")  # older
    _refused(handler, DraftRequest(1, 4, len(known) + 1, [6], **kw), "bad_request")  # beyond known
    _refused(handler, DraftRequest(1, 4, 0, [], **kw), "bad_request")  # nothing to draft from
    assert handler.states[1].known == known and handler.states[1].step == 3
    p = handler.handle(DraftRequest(1, 4, len(known), [], **kw))
    assert (p.tokens, p.parents) == fresh_proposal(lm, model_path, known, **kw)


def test_top_k_zero_is_an_empty_proposal_or_a_clean_refusal(handler):
    handler.handle(OpenRequest(1, PROMPT))
    # depth=1 already answers with an empty tree; deeper trees must not crash either.
    assert handler.handle(DraftRequest(1, 1, len(PROMPT), [], depth=1, top_k=0, max_nodes=4)).tokens == []
    try:
        p = handler.handle(DraftRequest(1, 2, len(PROMPT), [], depth=3, top_k=0, max_nodes=4))
    except RequestError as e:
        assert e.code == "bad_request"
    else:
        assert (p.tokens, p.parents) == ([], [])


@pytest.mark.parametrize("min_prob", [0.05, 0.3, 0.9])
def test_a_gated_tree_is_the_open_tree_cut_at_the_gate(handler, min_prob):
    """min_prob drops every node whose path probability is below it, and nothing else."""
    import math
    handler.handle(OpenRequest(1, PROMPT))
    open_ = handler.handle(DraftRequest(1, 1, len(PROMPT), [], depth=5, top_k=3, max_nodes=12))
    gated = handler.handle(DraftRequest(1, 2, len(PROMPT), [], depth=5, top_k=3, max_nodes=12, min_prob=min_prob))
    handler.handle(Close(1))
    keep = [i for i, s in enumerate(open_.scores) if s >= math.log(min_prob)]
    assert gated.tokens == [open_.tokens[i] for i in keep]
    assert gated.scores == pytest.approx([open_.scores[i] for i in keep])
    check_parents(gated.parents)
    assert all(math.exp(s) >= min_prob for s in gated.scores)


def test_a_cached_prefix_starts_the_draft_in_step(handler, lm, model_path):
    """The draft's prefix cache: a request whose prompt extends a closed one's starts from its
    KV (only the new tail is read), and proposes exactly what a cold handler proposes."""
    handler.handle(OpenRequest(1, PROMPT, cache_scope="a"))
    handler.handle(DraftRequest(1, 1, len(PROMPT), [], depth=4, top_k=2, max_nodes=8))
    guess = handler.handle(DraftRequest(1, 2, len(PROMPT), [17, 23], depth=3, top_k=2, max_nodes=6))
    handler.handle(Close(1))
    assert [handler.prefix_cache.backend.length(e.seq) for e in handler.prefix_cache.entries] == [len(PROMPT) + 2]
    turn = PROMPT + [17, 23, 5, 8]
    handler.handle(OpenRequest(2, turn, cache_scope="a"))
    assert handler.states[2].cached == len(PROMPT) + 2  # the tree's guesses were not kept
    got = handler.handle(DraftRequest(2, 1, len(turn), [], depth=4, top_k=2, max_nodes=8))
    assert (got.tokens, got.parents) == fresh_proposal(lm, model_path, turn, depth=4, top_k=2, max_nodes=8)
    handler.handle(OpenRequest(3, turn, cache_scope="b"))  # another scope: cold
    assert handler.states[3].cached == 0
    assert guess.tokens  # the second round drafted a tree (whose rows the cache must not keep)
