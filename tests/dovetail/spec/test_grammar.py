"""Structured output (dovetail/spec/grammar.py): masks, rollback and draft trees under a grammar.

Three tokenizer families, all built here offline: the character-level tokenizer of
tests/helpers.py, a byte-level BPE (Qwen's and Llama-3's family: ``Ġ`` for spaces, tokens
such as ``{"`` and ``":``) and a sentencepiece-style BPE with byte fallback (Llama-2's and
Gemma's family: ``▁`` for spaces, ``<0x0A>`` byte tokens), both trained on a little JSON. The
model's vocabulary is made larger than the tokenizer's, as padded embeddings are. Qwen2.5's
real tokenizer (150k ids) is marked real_model.
"""
import json
import random
import re
import time

import pytest
import torch

from dovetail.spec.grammar import (
    Grammar, PathCursor, allowed_nodes, apply_masks, grammar_text, prune, tree_masks, vocab_of,
)
from tests.helpers import make_tiny_tokenizer

jsonschema_rs = pytest.importorskip("jsonschema_rs")  # schemathesis brings it with the test extra

pytestmark = pytest.mark.timeout(120)

PADDING = 7          # model rows past the tokenizer's ids: never allowed
SCHEMAS = 20         # random schemas per tokenizer
MAX_TOKENS = 600     # every random schema's language is finite; greedy ends well before this
WORDS = ["red", "green", "blue", "cat", "dog", "yes", "no", "alpha", "beta", "x"]


# ---- tokenizers ---------------------------------------------------------------------------

def corpus(n: int = 300) -> list[str]:
    """JSON-ish text to train the small BPEs on, so they learn ``{"``, ``": `` and the like."""
    rng = random.Random(0)
    out = []
    for _ in range(n):
        obj = {rng.choice(WORDS): rng.choice([rng.randint(-99, 999), rng.choice(WORDS), True, False,
                                              [rng.randint(0, 9)] * rng.randint(0, 3)])
               for _ in range(rng.randint(1, 4))}
        out.append(json.dumps(obj, indent=rng.choice([None, 2])))
        out.append(" ".join(rng.choices(WORDS, k=6)) + ".")
    return out


def byte_level_bpe(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    fast.save_pretrained(str(path))
    return path


def sentencepiece_bpe(path):
    """Llama-2's layout: ``▁`` for spaces (normalizer), byte-fallback tokens ``<0x00>``..``<0xFF>``
    in the model's vocabulary, and a decoder that turns them back into bytes."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    spec["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
        {"type": "ByteFallback"}, {"type": "Fuse"},
        {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(str(path))
    return path


BUILDERS = {"chars": make_tiny_tokenizer, "byte_bpe": byte_level_bpe, "sentencepiece": sentencepiece_bpe}


def load(folder):
    """As dovetail.models.loading.load_tokenizer loads a generic tokenizer.json: exactly as saved."""
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


@pytest.fixture(scope="module", params=list(BUILDERS))
def tokenizer(request, tmp_path_factory):
    return load(BUILDERS[request.param](tmp_path_factory.mktemp(request.param)))


@pytest.fixture(scope="module")
def chars(tmp_path_factory):
    return load(make_tiny_tokenizer(tmp_path_factory.mktemp("chars")))


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Rows of 150k logits: torch's threads cost more than they save, as on a target worker."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def compile_for(tokenizer, kind, spec, stop_ids=None, padding=PADDING):
    return Grammar.compile(kind, spec, tokenizer, stop_ids=stop_ids, vocab_size=len(tokenizer) + padding)


# ---- decoding helpers ---------------------------------------------------------------------

def greedy(grammar: Grammar, seed: int, max_tokens: int = MAX_TOKENS) -> tuple[list[int], bool]:
    """Greedy decoding from random logits under the grammar: (tokens before the stop, stopped)."""
    gen = torch.Generator().manual_seed(seed)
    state, out = grammar.start(), []
    for _ in range(max_tokens):
        mask = state.mask()
        assert not mask[grammar.vocab.size:].any() and not mask[list(grammar.vocab.unused)].any(), "padding allowed"
        tok = int(apply_masks(torch.randn(grammar.vocab_size, generator=gen), mask).argmax())
        assert mask[tok]
        state.advance([tok])
        if tok in grammar.vocab.stop_ids:
            assert state.is_done()
            return out, True
        out.append(tok)
    return out, False


def text_of(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=False)


def path_to(parents: list[int], node: int) -> list[int]:
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """An object schema whose language is finite (bounded strings, integers, arrays; no extra
    keys), so greedy decoding from any logits ends."""
    props = {f"{rng.choice(WORDS)}{i}": random_property(rng, depth) for i in range(rng.randint(1, 4))}
    return {"type": "object", "properties": props, "additionalProperties": False,
            "required": sorted(rng.sample(sorted(props), rng.randint(0, len(props))))}


def random_property(rng: random.Random, depth: int, scalar: bool = False) -> dict:
    kinds = ["string", "integer", "boolean", "enum"] + ([] if scalar else ["array"] + (["object"] if depth < 1 else []))
    kind = rng.choice(kinds)
    if kind == "string":
        lo = rng.randint(0, 2)
        return {"type": "string", "minLength": lo, "maxLength": lo + rng.randint(0, 6)}
    if kind == "integer":
        lo = rng.randint(-50, 10)
        return {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 200)}
    if kind == "boolean":
        return {"type": "boolean"}
    if kind == "enum":
        return {"enum": rng.sample(WORDS, rng.randint(1, 3))}
    if kind == "array":
        lo = rng.randint(0, 1)
        return {"type": "array", "items": random_property(rng, depth, scalar=True), "minItems": lo,
                "maxItems": lo + rng.randint(0, 2)}
    return random_schema(rng, depth + 1)


# ---- the tests ----------------------------------------------------------------------------

def test_the_library_reads_each_familys_token_bytes(tokenizer):
    """llguidance's view of every token's bytes spells what the tokenizer decodes: spaces as
    ``Ġ`` or ``▁``, a newline and a non-ASCII character as byte tokens."""
    vocab = vocab_of(tokenizer)
    text = '{"dog": [1, true],\n "cat": "na\u00efve"}'
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert vocab.ll.decode_bytes(ids).decode().lstrip(" ") == tokenizer.decode(ids) == text or \
        tokenizer.unk_token_id in ids  # the character-level tokenizer has no "\u00ef"


def test_an_added_text_token_spells_its_text(tmp_path):
    """Qwen's <tool_call> is an added token that is not special: a grammar's literal
    "<tool_call>" is written by that one token, and it is consumed as text (llguidance reads
    every added token of a tokenizer JSON as special; the vocabulary is rebuilt then)."""
    from tokenizers import AddedToken
    tok = load(byte_level_bpe(tmp_path))
    tok.add_tokens([AddedToken("<tool_call>", special=False, normalized=False)])
    mark = tok.convert_tokens_to_ids("<tool_call>")
    assert not vocab_of(tok).ll.is_special_token(mark)
    state = compile_for(tok, "lark", 'start: "<tool_call>" "x"').start()
    assert state.mask()[mark] and state.valid_prefix([mark]) == 1
    state.advance(tok.encode("<tool_call>x", add_special_tokens=False) + [tok.eos_token_id])
    assert state.is_done()


def test_random_schemas_give_valid_json(tokenizer):
    """Greedy decoding from random logits under 20 random schemas: every output parses and
    validates, and ends on a stop token."""
    rng = random.Random(1)
    for i in range(SCHEMAS):
        schema = random_schema(rng)
        grammar = compile_for(tokenizer, "json_schema", schema)
        tokens, stopped = greedy(grammar, seed=i)
        text = text_of(tokenizer, tokens)
        assert stopped, f"no stop after {MAX_TOKENS} tokens: {text!r}"
        value = json.loads(text)
        assert jsonschema_rs.validator_for(schema).is_valid(value), (schema, text)


def test_json_object_is_any_object(tokenizer):
    grammar = compile_for(tokenizer, "json_object", None)
    for seed in range(3):
        tokens, stopped = greedy(grammar, seed=seed, max_tokens=200)
        if stopped:  # an unconstrained object may run long: a cut one proves nothing
            assert isinstance(json.loads(text_of(tokenizer, tokens)), dict)


def test_json_object_takes_any_object(chars):
    state = compile_for(chars, "json_object", None).start()
    state.advance(chars.encode('{"a": [1, true], "b": {"c": null}}', add_special_tokens=False))
    assert state.is_accepting()


def test_regex_lark_and_gbnf(chars):
    cases = [("regex", r"[a-c]{2,4}x", lambda t: re.fullmatch(r"[a-c]{2,4}x", t)),
             ("lark", 'start: "(" NUM ("," NUM)* ")"\nNUM: /[0-9]{1,3}/',
              lambda t: re.fullmatch(r"\(\d{1,3}(,\d{1,3})*\)", t)),
             ("grammar", 'root ::= "yes" | "no" | "maybe " [0-9]', lambda t: t in ("yes", "no") or
              re.fullmatch(r"maybe \d", t))]
    for kind, spec, ok in cases:
        grammar = compile_for(chars, kind, spec)
        for seed in range(5):
            tokens, stopped = greedy(grammar, seed=seed, max_tokens=100)
            assert stopped and ok(text_of(chars, tokens)), (kind, text_of(chars, tokens))


@pytest.mark.parametrize("kind, spec, words", [
    ("nonsense", "x", "unknown grammar kind"),
    ("json_schema", None, "needs its schema"),
    ("json_schema", "{not json", "not JSON"),
    ("json_schema", [1, 2], "must be an object"),
    ("json_schema", {"type": "strnig"}, "invalid grammar"),
    ("json_schema", {"type": "string", "format": "no-such-format"}, "invalid grammar"),
    ("json_schema", {"$ref": "#/$defs/missing"}, "invalid grammar"),
    ("regex", "(", "invalid grammar"),
    ("regex", 5, "is a string"),
    ("lark", "start: missing_rule", "invalid grammar"),
    ("grammar", "root ::= (", "grammar"),
])
def test_bad_specs_raise_value_error(kind, spec, words):
    with pytest.raises(ValueError, match=re.escape(words)):
        grammar_text(kind, spec)


def test_masks_have_the_model_vocab_size(chars):
    grammar = compile_for(chars, "json_object", None, padding=PADDING)
    mask = grammar.start().mask()
    assert mask.shape == (len(chars) + PADDING,) and mask.dtype == torch.bool
    assert not mask[len(chars):].any()
    assert mask.nonzero().flatten().tolist() == [chars.convert_tokens_to_ids("{")]
    state = grammar.start()
    assert not state.accepts(len(chars) + 1)           # a padding row
    with pytest.raises(ValueError):
        state.advance([len(chars) + 1])
    small = compile_for(chars, "json_object", None, padding=-10)  # a model with fewer rows than ids
    assert small.start().mask().shape == (len(chars) - 10,)


def test_complete_grammar_allows_only_stop_ids(chars):
    eos, stop2 = chars.eos_token_id, chars.convert_tokens_to_ids("#")
    grammar = compile_for(chars, "regex", "ab", stop_ids=[eos, stop2])
    state = grammar.start()
    assert not state.accepts(eos) and not state.is_accepting()
    state.advance(chars.encode("ab", add_special_tokens=False))
    assert state.is_accepting() and state.is_done()
    assert state.mask().nonzero().flatten().tolist() == sorted([eos, stop2])
    # While the output could still grow, a stop is one of the choices.
    state = compile_for(chars, "regex", "a+").start()
    state.advance(chars.encode("a", add_special_tokens=False))
    assert state.is_accepting() and not state.is_done()
    grows = state.mask()
    assert grows.nonzero().flatten().tolist() == sorted([eos, chars.convert_tokens_to_ids("a")])
    # A stop ends it (the matcher consumes it); stops after it are allowed, and all roll back.
    state.advance([eos, eos, eos])
    assert state.is_done() and state.mask().nonzero().flatten().tolist() == [eos]
    assert not state.accepts(chars.convert_tokens_to_ids("a"))
    state.rollback(3)
    assert len(state) == 1 and not state.is_done() and torch.equal(state.mask(), grows)


def test_no_stop_token_is_refused(chars):
    with pytest.raises(ValueError, match="stop token"):
        Grammar.compile("json_object", None, chars, stop_ids=[len(chars) + 3])


def test_rollback_restores_the_state(tokenizer):
    grammar = compile_for(tokenizer, "json_schema", random_schema(random.Random(5)))
    tokens, stopped = greedy(grammar, seed=3)
    assert stopped
    tokens = tokens + [grammar.vocab.stop_ids[0]]
    state, masks = grammar.start(), []
    for t in tokens:
        masks.append(state.mask())
        state.advance([t])
    assert len(state) == len(tokens) and state.is_done()
    step = 0
    while len(state):  # the stop token first, then in pieces of 1, 2, 3, ... to the start
        step += 1
        state.rollback(min(step, len(state)))
        assert torch.equal(state.mask(), masks[len(state)]), len(state)
    assert len(state) == 0 and torch.equal(state.mask(), grammar.start().mask())
    with pytest.raises(ValueError):
        state.rollback(1)
    state.advance(tokens)  # and it still goes forward
    assert state.is_done()


def test_refused_token_leaves_the_state_unchanged(chars):
    state = compile_for(chars, "regex", "abc").start()
    state.advance(chars.encode("a", add_special_tokens=False))
    before = state.mask()
    with pytest.raises(ValueError, match="does not allow"):
        state.advance(chars.encode("bx", add_special_tokens=False))
    assert len(state) == 1 and torch.equal(state.mask(), before)
    state.advance(chars.encode("bc", add_special_tokens=False))
    assert state.is_done()


def test_fork_is_independent(chars):
    state = compile_for(chars, "regex", "ab|ac").start()
    state.advance(chars.encode("a", add_special_tokens=False))
    twin = state.fork()
    twin.advance(chars.encode("b", add_special_tokens=False))
    assert len(state) == 1 and len(twin) == 2 and twin.is_done() and not state.is_done()
    assert state.accepts(chars.convert_tokens_to_ids("c"))


def random_tree(grammar: Grammar, prefix: list[int], rng: random.Random, n: int) -> tuple[list[int], list[int]]:
    """A draft tree below ``prefix`` that mostly follows the grammar (80% of its tokens are
    allowed after their parent's path), with some forbidden tokens and padding ids."""
    tokens, parents = [], []
    for i in range(n):
        p = rng.choice([-1] + list(range(i)))
        state = grammar.start()
        state.advance(prefix)
        path = [tokens[j] for j in path_to(parents, p)] if p >= 0 else []
        ok = state.valid_prefix(path) == len(path)
        if ok:
            state.advance(path)
        allowed = state.mask().nonzero().flatten().tolist() if ok else []
        if allowed and rng.random() < 0.8:
            tokens.append(rng.choice(allowed))
        else:
            tokens.append(rng.randrange(grammar.vocab_size))
        parents.append(p)
    return tokens, parents


def test_tree_masks_equal_masks_path_by_path(tokenizer):
    rng, seen = random.Random(7), []
    for i in range(6):
        grammar = compile_for(tokenizer, "json_schema", random_schema(rng))
        full, _ = greedy(grammar, seed=i)
        prefix = full[:rng.randint(0, len(full) // 2)]  # the committed text so far
        state = grammar.start()
        state.advance(prefix)
        tokens, parents = random_tree(grammar, prefix, rng, n=24)
        masks, allowed = tree_masks(state, tokens, parents)
        assert len(state) == len(prefix)  # the walk rolled everything back
        assert masks.shape == (len(tokens) + 1, grammar.vocab_size)
        assert allowed_nodes(state, tokens, parents) == allowed
        assert torch.equal(masks[0], state.mask())
        for node in range(len(tokens)):
            ref = grammar.start()
            ref.advance(prefix)
            path = [tokens[j] for j in path_to(parents, node)]
            ok = ref.valid_prefix(path) == len(path)
            assert allowed[node] == ok, (node, path)
            if ok:
                ref.advance(path)
                assert torch.equal(masks[node + 1], ref.mask()), node
            else:
                assert not masks[node + 1].any()
        seen += allowed
    assert not all(seen) and any(seen)  # the trees had both kinds of node


def test_forbidden_nodes_are_reported_and_pruned(chars):
    ids = lambda s: chars.convert_tokens_to_ids(list(s))  # noqa: E731
    grammar = compile_for(chars, "regex", "a(b|c)d")
    a, b, c, d, x = ids("abcdx")
    # root
    # ├── 0 a ── 1 b ── 3 d ── 6 eos
    # │     ├── 2 x ── 5 d        (x is forbidden, so is its child)
    # │     └── 4 c
    # └── 7 b                     (forbidden at the root)
    eos = chars.eos_token_id
    tokens = [a, b, x, d, c, d, eos, b]
    parents = [-1, 0, 0, 1, 0, 2, 3, -1]
    masks, allowed = tree_masks(grammar.start(), tokens, parents)
    assert allowed == [True, True, False, True, True, False, True, False]
    for forbidden in (2, 5, 7):
        assert not masks[forbidden + 1].any()
    assert masks[0].nonzero().flatten().tolist() == [a]
    assert sorted(masks[1].nonzero().flatten().tolist()) == sorted([b, c])
    assert masks[4].nonzero().flatten().tolist() == [eos]  # after "abd": only the stop
    kept_tokens, kept_parents, kept = prune(tokens, parents, allowed)
    assert kept == [0, 1, 3, 4, 6]
    assert kept_tokens == [a, b, d, c, eos] and kept_parents == [-1, 0, 1, 0, 2]


def test_path_cursor_gives_each_paths_mask_and_restores(tokenizer):
    rng = random.Random(11)
    grammar = compile_for(tokenizer, "json_schema", random_schema(rng))
    full, _ = greedy(grammar, seed=4)
    state = grammar.start()
    state.advance(full[:2])
    paths = [full[2:2 + k] for k in (0, 3, 1, 5, 5, 2, 0, 4)]
    with PathCursor(state) as cursor:
        for path in paths:
            ref = grammar.start()
            ref.advance(full[:2] + path)
            assert torch.equal(cursor.mask(path), ref.mask())
        with pytest.raises(ValueError):
            cursor.mask(full[2:4] + [grammar.vocab_size - 1])  # a padding id
        assert cursor.path == full[2:4]  # it stopped at the longest allowed prefix
    assert len(state) == 2


def test_apply_masks_sets_disallowed_to_minus_inf(chars):
    grammar = compile_for(chars, "regex", "ab")
    masks, _ = tree_masks(grammar.start(), chars.encode("a", add_special_tokens=False), [-1])
    logits = torch.zeros(2, grammar.vocab_size)
    apply_masks(logits, masks)
    assert torch.equal(torch.isfinite(logits), masks)


def test_forced_tokens_are_a_free_draft(tokenizer):
    """Forced tokens are always allowed, and following them (a greedy token where none is
    forced) spells the only output there is."""
    schema = {"type": "object", "properties": {"colour": {"enum": ["green"]}}, "required": ["colour"],
              "additionalProperties": False, "x-guidance": {"whitespace_flexible": False}}
    state, tokens = compile_for(tokenizer, "json_schema", schema).start(), []
    while not state.is_done():
        forced = state.forced_tokens() or [int(state.mask().nonzero()[0])]
        assert state.valid_prefix(forced) == len(forced)
        state.advance(forced)
        tokens += forced
        assert len(tokens) < 40
    assert text_of(tokenizer, tokens) == '{"colour":"green"}'


def test_the_tokenizer_side_is_built_once(chars):
    assert vocab_of(chars, [chars.eos_token_id]) is vocab_of(chars, [chars.eos_token_id])
    assert vocab_of(chars, [chars.eos_token_id]) is not vocab_of(chars, [chars.eos_token_id, 5])
    a = Grammar.compile("regex", "a", chars)
    b = Grammar.load(a.text, chars)  # off the wire: the same grammar
    assert b.vocab is a.vocab and torch.equal(a.start().mask(), b.start().mask())


@pytest.mark.real_model
@pytest.mark.timeout(600)
def test_qwen_tokenizer_masks_and_valid_json():
    """Qwen2.5's byte-level BPE from the GGUF: 151,665 real ids, then llama.cpp's 271 "[PAD<id>]"
    placeholders up to the model's 151,936 rows (never allowed). Random schemas give valid JSON;
    prints what the tokenizer side and a greedy step cost."""
    from dovetail.models.fetch import fetch_model
    from dovetail.models.loading import load_tokenizer, stop_token_ids

    path = fetch_model("qwen2.5-coder-0.5b-instruct")
    tok = load_tokenizer(path)
    stops = stop_token_ids(path, tok)
    t0 = time.perf_counter()
    vocab = vocab_of(tok, stops)
    build_s = time.perf_counter() - t0
    assert len(vocab.unused) == 271 and vocab.unused[0] == 151665
    rng, mask_s, masks = random.Random(3), 0.0, 0
    for i in range(5):
        schema = random_schema(rng)
        grammar = Grammar.compile("json_schema", schema, tok, stop_ids=stops, vocab_size=151936)
        t0 = time.perf_counter()
        tokens, stopped = greedy(grammar, seed=i)
        mask_s, masks = mask_s + time.perf_counter() - t0, masks + len(tokens) + 1
        text = tok.decode(tokens)
        assert stopped and jsonschema_rs.validator_for(schema).is_valid(json.loads(text)), text
    print(f"\nQwen2.5 tokenizer side {build_s:.2f} s; greedy step (mask + apply) {1e6 * mask_s / masks:.0f} us")
