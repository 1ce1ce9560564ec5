"""Structured output through the coordinator and both workers, on tiny float64 models with a
character-level tokenizer: the target masks its distribution at every tree node with the
grammar state of that node's path, prunes draft nodes the grammar forbids, and advances the
state by committed tokens only. So every output follows its grammar, and with a draft the
output is exactly target-only decoding's under the same grammar (greedy, and seeded)."""
import json
import random
import re

import jsonschema_rs
import pytest
import torch

from dovetail.spec.tree import chain_parents
from dovetail.workers.backend import HFBackend
from dovetail.workers.target import TargetConfig, TargetHandler
from tests.dovetail.spec.test_grammar import random_schema
from tests.helpers import HandlerSession, make_tiny_model, make_tiny_tokenizer

pytestmark = pytest.mark.timeout(900)

SCHEMAS = 100
MAX_NEW = 400  # random schemas' languages are finite: greedy ends well before this
PROMPTS = [[5, 9, 3, 7, 11], [2, 4, 6, 8, 10, 12, 14], [40, 41, 40, 41, 40]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("grammar-models")
    target = make_tiny_model(root / "target", seed=0, attention_gain=4.0)
    draft = make_tiny_model(root / "draft", seed=1, noise_from=target, noise=0.002)
    for path in (target, draft):
        make_tiny_tokenizer(path)
    return target, draft


@pytest.fixture(scope="module")
def tokenizer(models):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast.from_pretrained(str(models[0]))


@pytest.fixture(scope="module")
def alone(launch_tracked, models):
    c = launch_tracked(models[0], None)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def drafted(launch_tracked, models):
    # a fixed tree of 2 children a node: with a random model one of them is often a token the
    # grammar forbids, so pruning runs on most rounds
    c = launch_tracked(models[0], models[1], max_active=4, worker_max_requests=8, auto_tree=False,
                       depth=4, top_k=2, max_nodes=8)
    try:
        yield c
    finally:
        c.close()


def text_and_stop(coord, result) -> tuple[str, bool]:
    ids = result.token_ids
    stopped = bool(ids) and ids[-1] in coord.stop_token_ids
    return coord.tokenizer.decode(ids[:-1] if stopped else ids), stopped


def test_random_schemas_validate_and_a_draft_changes_nothing(alone, drafted):
    rng = random.Random(29)
    drafted_tokens = 0
    for i in range(SCHEMAS):
        # compact JSON: a random model writes all the whitespace a place allows (32), which
        # would take the output past any small budget (docs/structured-output.md)
        schema = {**random_schema(rng), "x-guidance": {"whitespace_flexible": False}}
        prompt = PROMPTS[i % len(PROMPTS)]
        ref = alone.generate(prompt, max_new_tokens=MAX_NEW, temperature=0.0, grammar=("json_schema", schema))
        got = drafted.generate(prompt, max_new_tokens=MAX_NEW, temperature=0.0, grammar=("json_schema", schema))
        assert got.token_ids == ref.token_ids, (i, schema)
        text, stopped = text_and_stop(alone, ref)
        assert stopped and ref.stats.finish_reason == "stop", (i, schema, text)
        assert jsonschema_rs.validator_for(schema).is_valid(json.loads(text)), (i, schema, text)
        drafted_tokens += got.stats.drafted
    assert drafted_tokens > 0  # the draft took part


def test_seeded_sampling_under_a_grammar_is_the_same_text_with_a_draft(alone, drafted):
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 8},
                                               "b": {"type": "array", "items": {"type": "integer"}, "maxItems": 3}},
              "required": ["a", "b"], "additionalProperties": False}
    texts = set()
    for seed in range(12):
        kw = dict(max_new_tokens=MAX_NEW, temperature=0.9, seed=seed, grammar=("json_schema", schema))
        ref = alone.generate(PROMPTS[0], **kw)
        assert drafted.generate(PROMPTS[0], **kw).token_ids == ref.token_ids, seed
        text, stopped = text_and_stop(alone, ref)
        assert stopped and jsonschema_rs.validator_for(schema).is_valid(json.loads(text)), text
        texts.add(text)
    assert len(texts) > 3  # the seeds really sample


def test_regex_json_object_and_lark(alone, drafted):
    for coord in (alone, drafted):
        text, stopped = text_and_stop(coord, coord.generate(PROMPTS[1], max_new_tokens=60,
                                                            grammar=("regex", r"[a-c]{2,5}-[0-9]{3}")))
        assert stopped and re.fullmatch(r"[a-c]{2,5}-[0-9]{3}", text), text
        text, stopped = text_and_stop(coord, coord.generate(PROMPTS[2], max_new_tokens=MAX_NEW,
                                                            grammar=("json_object", None)))
        # a random model may fill any object's free strings until the budget runs out; what it
        # wrote is always an object's valid prefix, and a finished one parses
        assert text.lstrip().startswith("{")
        if stopped:
            assert isinstance(json.loads(text), dict)
        text, stopped = text_and_stop(coord, coord.generate(PROMPTS[0], max_new_tokens=40,
                                                            grammar='start: ("yes" | "no") "!"'))
        assert stopped and text in ("yes!", "no!"), text


def test_bad_grammars_are_refused_before_decoding(alone):
    with pytest.raises(ValueError, match="JSON schema"):
        alone.generate(PROMPTS[0], grammar=("json_schema", "{not json"))
    with pytest.raises(ValueError, match="unknown grammar kind"):
        alone.generate(PROMPTS[0], grammar=("yaml", "a: b"))
    with pytest.raises(TypeError, match="grammar must be"):
        alone.generate(PROMPTS[0], grammar=42)


def test_a_grammar_the_vocabulary_cannot_spell_is_a_value_error_and_the_workers_go_on(alone, drafted):
    from dovetail.runtime.rounds import GrammarError
    for coord in (alone, drafted):  # the tiny tokenizer has no capital letters
        with pytest.raises(GrammarError, match="at the start"):
            coord.generate(PROMPTS[0], grammar=("regex", "Zf"))
        with pytest.raises(GrammarError, match="after 1 tokens"):
            coord.generate(PROMPTS[0], max_new_tokens=10, grammar=("regex", "aZ"))
        assert coord.generate(PROMPTS[0], max_new_tokens=10, grammar=("regex", "ab")).token_ids[:2] == \
            coord.tokenizer.convert_tokens_to_ids(["a", "b"])


# ---- the target handler, in-process: pruning and the state after each round --------------

@pytest.fixture(scope="module")
def handler(models):
    backend = HFBackend(str(models[0]), dtype=torch.float64)
    return TargetHandler(backend, TargetConfig(bind="inproc://target", model=str(models[0])))


def test_forbidden_draft_nodes_are_pruned_before_the_forward(handler, tokenizer, monkeypatch):
    from dovetail.spec.grammar import grammar_text
    ids = {c: tokenizer.convert_tokens_to_ids(c) for c in "abxz"}
    s = HandlerSession(handler, 1, PROMPTS[0], grammar=grammar_text("regex", "ab+").encode(),
                       stop_ids=[tokenizer.eos_token_id])
    seen = []
    verify = handler.backend.verify
    monkeypatch.setattr(handler.backend, "verify",
                        lambda seq, root, tokens, parents, hidden=True: seen.append(list(tokens)) or
                        verify(seq, root, tokens, parents, hidden=hidden))
    # x (forbidden at the start), a, then b and z below a (z forbidden after "a"), b below b
    tokens = [ids["x"], ids["a"], ids["b"], ids["z"], ids["b"]]
    parents = [-1, -1, 1, 1, 2]
    res = s.verify(tokens, parents)
    assert seen == [[ids["a"], ids["b"], ids["b"]]]  # only the allowed nodes took rows
    # "a" and "b" are the only tokens the grammar allows first and second: both accepted, by
    # their indices in the draft's own tree
    assert res.accepted[:2] == [1, 2] and res.tokens[:2] == [ids["a"], ids["b"]]
    assert res.tokens[-1] in (ids["b"], tokenizer.eos_token_id)
    seq = handler.sequences[b"", 1]
    assert len(seq.grammar) == len(res.tokens)  # the state follows the committed tokens only
    assert s.cache_len() == len(PROMPTS[0]) - 1 + 1 + len(res.accepted)


def test_a_rejected_branch_leaves_nothing_in_the_grammar_state(handler, tokenizer):
    from dovetail.spec.grammar import grammar_text
    stop = tokenizer.eos_token_id
    text = grammar_text("regex", "(ab|cd)e{0,20}")
    s = HandlerSession(handler, 2, PROMPTS[1], grammar=text.encode(), stop_ids=[stop])
    ref = HandlerSession(handler, 3, PROMPTS[1], grammar=text.encode(), stop_ids=[stop])
    want = ref.decode(6)  # target-only under the grammar
    a, c = tokenizer.convert_tokens_to_ids("a"), tokenizer.convert_tokens_to_ids("c")
    first = want[0]
    wrong = c if first == a else a  # the branch the target does not take
    s.verify([wrong, tokenizer.convert_tokens_to_ids("b" if wrong == a else "d")], chain_parents(2))
    assert s.generated()[:1] == [first]
    while len(s.generated()) < 6:
        s.verify([])
    assert s.generated()[:6] == want
