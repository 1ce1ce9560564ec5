"""CausalLM and LlamaDraftLM implement DraftLM, their caches DraftCache: checked without a
real model (LlamaDraftLM would need llama-cpp-python and a GGUF), so a renamed method or a
changed signature fails here instead of in a running draft worker.
"""
import ast
import inspect
import textwrap
from pathlib import Path

import pytest
import torch

import dovetail.workers.draft as draft_module
import dovetail.workers.replay as replay_module
from dovetail.workers.draft_lm import DraftCache, DraftLM
from dovetail.workers.hf import CausalLM
from dovetail.workers.llama import LlamaSeq
from dovetail.workers.llama_draft import LlamaDraftLM
from tests.helpers import make_tiny_model

pytestmark = pytest.mark.timeout(60)


def protocol_members(proto) -> tuple[set[str], dict]:
    """(data members, {method name: function}) that a Protocol declares."""
    own = {k: v for k, v in vars(proto).items() if not k.startswith("_")}
    data = {k for k, v in own.items() if isinstance(v, property)} | set(vars(proto).get("__annotations__", {}))
    return data, {k: v for k, v in own.items() if inspect.isfunction(v)}


def caller_params(cls, name: str) -> list[inspect.Parameter]:
    """A method's parameters as a caller passes them: without self (a staticmethod has none)."""
    raw = inspect.getattr_static(cls, name)
    if isinstance(raw, staticmethod):
        return list(inspect.signature(raw.__func__).parameters.values())
    return list(inspect.signature(raw).parameters.values())[1:]


def method_problems(cls, proto) -> list[str]:
    """How ``cls``'s methods fail ``proto``'s: missing, other names or kinds, lost defaults,
    or extra parameters a caller of the Protocol would not pass."""
    problems = []
    for name in protocol_members(proto)[1]:
        try:
            got = caller_params(cls, name)
        except (AttributeError, TypeError):
            problems.append(f"{name}: missing")
            continue
        want = caller_params(proto, name)
        head, extra = got[:len(want)], got[len(want):]
        if [(p.name, p.kind) for p in head] != [(p.name, p.kind) for p in want]:
            problems.append(f"{name}: takes {[p.name for p in got]}, not {[p.name for p in want]}")
        elif any(w.default is not w.empty and g.default is g.empty for w, g in zip(want, head)):
            problems.append(f"{name}: a parameter the Protocol makes optional is required")
        elif any(p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in extra):
            problems.append(f"{name}: extra required parameters {[p.name for p in extra]}")
    return problems


def init_attributes(cls) -> set[str]:
    """The names ``cls.__init__`` assigns on self, read from its source."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls.__init__)))
    return {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Store)
            and isinstance(n.value, ast.Name) and n.value.id == "self"}


def llama_problems(cls) -> list[str]:
    """DraftLM problems of a class that cannot be built here: its data members must be set
    in __init__ or be properties."""
    props = {k for k in dir(cls) if isinstance(inspect.getattr_static(cls, k), property)}
    missing = protocol_members(DraftLM)[0] - init_attributes(cls) - props
    return [f"{name}: never set" for name in sorted(missing)] + method_problems(cls, DraftLM)


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return CausalLM.load(str(make_tiny_model(tmp_path_factory.mktemp("draft_lm") / "m")), dtype=torch.float64)


def test_protocol_declares_what_the_draft_worker_uses():
    data, methods = protocol_members(DraftLM)
    assert data == {"name", "dtype", "device", "vocab_size", "hidden_size"}
    assert set(methods) == {"new_cache", "release", "crop", "forward", "forward_masked"}


def lm_attributes(module, *names: str) -> set[str]:
    """Attributes read on ``lm`` or ``self.lm`` inside the named classes and functions of ``module``."""
    tree = ast.parse(Path(module.__file__).read_text())
    used = set()
    for node in (n for n in tree.body if getattr(n, "name", None) in names):
        for a in ast.walk(node):
            if isinstance(a, ast.Attribute) and (ast.unparse(a.value) in ("lm", "self.lm")):
                used.add(a.attr)
    return used


def test_draft_worker_uses_only_the_protocol():
    """A new call on the draft LM must enter the Protocol (and both classes), an unused member leave it."""
    used = (lm_attributes(draft_module, "DraftHandler", "grow_tree", "forward_nodes")
            | lm_attributes(replay_module, "ReplayHandler"))
    data, methods = protocol_members(DraftLM)
    assert used == data | set(methods)


def test_causal_lm_implements_draft_lm(tiny_lm):
    assert method_problems(CausalLM, DraftLM) == []
    data, _ = protocol_members(DraftLM)
    assert {name for name in data if not hasattr(tiny_lm, name)} == set()
    assert (tiny_lm.vocab_size, tiny_lm.hidden_size, tiny_lm.dtype) == (64, 32, torch.float64)


def test_llama_draft_lm_implements_draft_lm():
    assert llama_problems(LlamaDraftLM) == []


def test_caches_implement_draft_cache(tiny_lm):
    for cache in (tiny_lm.new_cache(), LlamaSeq(seq_id=0)):
        assert method_problems(type(cache), DraftCache) == []
        assert cache.get_seq_length() == 0


class NoHiddenSize(LlamaDraftLM):
    def __init__(self):
        self.name, self.dtype, self.device, self.vocab_size = "x", "q8_0", "cpu", 64


class RenamedParameter(LlamaDraftLM):
    def crop(self, cache, n):
        pass


class RequiredExtra(LlamaDraftLM):
    def forward(self, cache, tokens, row_parents=None, logit_rows=None, *, scratch):
        pass


class DroppedDefault(LlamaDraftLM):
    def forward(self, cache, tokens, row_parents, logit_rows=None):
        pass


def without_crop():
    """LlamaDraftLM as if its crop had been renamed (a subclass would inherit it)."""
    return type("NoCrop", (), {k: v for k, v in vars(LlamaDraftLM).items()
                               if k not in ("crop", "__dict__", "__weakref__")})


@pytest.mark.parametrize("cls, problem", [
    (without_crop(), "crop: missing"),
    (NoHiddenSize, "hidden_size: never set"),
    (RenamedParameter, "crop: takes ['cache', 'n'], not ['cache', 'length']"),
    (RequiredExtra, "forward: extra required parameters ['scratch']"),
    (DroppedDefault, "forward: a parameter the Protocol makes optional is required"),
])
def test_the_check_catches_a_class_that_drifts(cls, problem):
    assert llama_problems(cls) == [problem]
