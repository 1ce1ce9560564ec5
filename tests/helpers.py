"""Tiny random models for tests and examples: real architectures, a few layers, any dtype."""
from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_model(path: str | Path, *, seed: int = 0, vocab_size: int = 64, hidden_size: int = 32,
                    layers: int = 2, dtype: torch.dtype = torch.float64, noise_from: str | Path | None = None,
                    noise: float = 0.0, attention_gain: float = 1.0, max_positions: int = 1 << 17) -> Path:
    """Save a tiny random Qwen2 model (no tokenizer) to ``path`` and return the path.

    With ``noise_from``, start from that model's weights plus Gaussian noise of scale
    ``noise``: a draft that agrees with its target often but not always.

    ``attention_gain`` scales the query and key projections. At random init attention is
    nearly uniform and greedy output soon loops on a few tokens, so a stale KV entry
    would change nothing; sharper attention makes every token depend on the context.

    ``max_positions`` (max_position_embeddings) is the context the target worker enforces.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=max_positions, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).to(dtype)
    if noise_from is not None:
        base = Qwen2ForCausalLM.from_pretrained(str(noise_from), dtype=dtype)
        with torch.no_grad():
            for p, q in zip(model.parameters(), base.parameters()):
                p.copy_(q + noise * torch.randn_like(q))
    if attention_gain != 1.0:
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                    proj.weight.mul_(attention_gain)
                    proj.bias.mul_(attention_gain)
    path = Path(path)
    model.save_pretrained(path)
    return path


TINY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789 .,:;()=+-*/\n_'\"[]{}<>!?#"


def make_tiny_tokenizer(path: str | Path, vocab_size: int = 64, chars: str = TINY_CHARS) -> Path:
    """Save a character-level fast tokenizer of exactly ``vocab_size`` ids next to a tiny model.

    Ids 0 and 1 are <unk> and <eos>; then one id per character. Different ``chars`` give a
    tokenizer with the same vocabulary size but a different identity (hash).
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = ["<unk>", "<eos>", *dict.fromkeys(chars)][:vocab_size]
    symbols += [f"<extra{i}>" for i in range(vocab_size - len(symbols))]
    tok = Tokenizer(models.WordLevel(vocab={s: i for i, s in enumerate(symbols)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per char
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")
    fast.save_pretrained(str(path))
    return Path(path)


def plain_greedy(model, prompt: list[int], n: int) -> list[int]:
    """A HF model's greedy continuation computed the plain way: the whole sequence each step.

    No KV cache, no speculation: the reference that decoding through the workers must
    reproduce exactly. The argmax is of float32 logits, as the target handler sees them.
    """
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].float().argmax()))
    return ids[len(prompt):]


class HandlerSession:
    """One request driven through a target handler in-process, tracking what the coordinator would."""

    def __init__(self, handler, req: int, prompt: list[int], **open_kw):
        from dovetail.protocol import OpenRequest
        self.h, self.req, self.step = handler, req, 0
        self.opened = handler.handle(OpenRequest(req, list(prompt), **open_kw))
        self.committed = list(prompt)
        self.prompt_len = len(prompt)

    def verify(self, tokens: list[int], parents: list[int] | None = None):
        """One verification of a draft (a chain unless ``parents`` is given); commits its tokens."""
        from dovetail.protocol import VerifyRequest
        from dovetail.spec.tree import chain_parents
        parents = chain_parents(len(tokens)) if parents is None else parents
        res = self.h.handle(VerifyRequest(self.req, self.step, self.committed[-1], tokens, parents))
        assert res.step == self.step and len(res.tokens) == len(res.accepted) + 1
        self.step += 1
        self.committed += res.tokens
        return res

    def decode(self, n: int) -> list[int]:
        """n target-only rounds (empty drafts): one token each."""
        for _ in range(n):
            self.verify([])
        return self.generated()

    def generated(self) -> list[int]:
        return self.committed[self.prompt_len:]

    def cache_len(self) -> int:
        return self.h.backend.length(self.h.sequences[b"", self.req].cache)


# ---- greedy output through llama.cpp: equal up to a near tie --------------------------------
# llama.cpp's CPU kernels give a row different logits depending on how many rows share its
# decode call (batched and single-row matmuls take other code paths and sum in other orders),
# and the KV entries a k-row verify writes differ the same way from those of 1-row decodes.
# bench.batch_drift measures it (max |logit(row 0 of a k-row verify) - logit(1-row decode)|
# over the vocabulary): up to 0.36 on the 1.5B GGUF, 0.25 on the 0.5B (k <= 16, 100-600
# tokens of context; AMD EPYC, AVX-512, 2 threads); 0.55 on the 0.5B along HumanEval answers
# (positions 80-150) and 0.6 between a tree's rows and single chains (test_llama_backend).
# Mostly the logits move together: the gap between the top two moved by at most 0.32 there.
# Target-only decoding takes one row per step, decoding through a draft k rows per verify,
# so the two pick different tokens only where the top two are closer than their gap moved.
# The check below reads the gap from a third forward (the common prefix, last token alone),
# which moved it too: it can read up to twice the gap drift. Bounds, with ~1.5x margin for
# other CPUs' kernels (AMX, AVX2) and thread counts:
LLAMA_DRIFT_LOGITS = 1.0      # any one logit, 1-row against k-row decodes (0.6 seen)
LLAMA_GAP_DRIFT_LOGITS = 0.5  # the gap between two logits (0.32 seen)
NEAR_TIE_LOGITS = 2 * LLAMA_GAP_DRIFT_LOGITS  # a gap greedy decoding may legitimately flip, as read


def near_tie(logits: torch.Tensor, a: int, b: int, bound: float = NEAR_TIE_LOGITS) -> float:
    """Assert that tokens ``a`` and ``b`` are the top two of ``logits`` (one row), less than
    ``bound`` apart; return their gap."""
    values, indices = logits.double().topk(2)
    top2 = sorted(int(i) for i in indices)
    gap = float(values[0] - values[1])
    assert top2 == sorted({a, b}) and gap < bound, (
        f"tokens {a} and {b} are no near tie: the top two are {top2}, {gap:.3f} logits apart "
        f"(logits of {a}, {b}: {float(logits[a]):.3f}, {float(logits[b]):.3f}; bound {bound})")
    return gap


def same_argmax_or_near_tie(logits: torch.Tensor, token: int, bound: float = NEAR_TIE_LOGITS) -> bool:
    """True when ``token`` is the argmax of ``logits`` (one row); otherwise assert that it is
    the runner-up, less than ``bound`` behind (``near_tie``), and return False."""
    top = int(logits.argmax())
    if top == token:
        return True
    near_tie(logits, top, token, bound)
    return False


class NextLogits:
    """The target's next-token logits after a token sequence, computed apart from any worker:
    all but the last token prefilled, then the last one decoded alone (as target-only decoding
    takes its steps). ``backend``: "llama.cpp" (a GGUF) or "transformers" (float32)."""

    def __init__(self, model, backend: str = "llama.cpp", threads: int = 2):
        if backend == "llama.cpp":
            from dovetail.workers.llama import LlamaBackend
            self.backend = LlamaBackend(str(model), threads=threads, n_ctx=4096, n_seqs=1)
        else:
            from dovetail.workers.backend import HFBackend
            self.backend = HFBackend(str(model), dtype=torch.float32)

    def __call__(self, ids: list[int]) -> torch.Tensor:
        seq = self.backend.new_sequence()
        try:
            if len(ids) > 1:
                self.backend.prefill(seq, list(ids[:-1]), hidden=False)
            return self.backend.verify(seq, ids[-1], [], [], hidden=False).logits[0].float()
        finally:
            self.backend.release(seq)

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> "NextLogits":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def greedy_divergence(next_logits, prompt: list[int], reference: list[int], other: list[int],
                      bound: float = NEAR_TIE_LOGITS) -> tuple[int, float] | None:
    """Compare two greedy continuations of ``prompt`` by the same target: None when they are
    equal; otherwise, where they first differ, assert that the two tokens are the target's top
    two after the common prefix and less than ``bound`` apart (``next_logits(ids)``: e.g.
    NextLogits), and return (that position, the gap)."""
    i = next((j for j, (x, y) in enumerate(zip(reference, other)) if x != y), None)
    if i is None:
        assert len(reference) == len(other), (len(reference), len(other))  # same budget, same stops
        return None
    gap = near_tie(next_logits(list(prompt) + list(reference[:i])), reference[i], other[i], bound)
    return i, gap


def divergence_summary(label: str, divergences: list) -> str:
    """'label: 3 of 4 identical; 1 diverged at near ties (token 17, gap 0.12)' for a test's output."""
    diverged = [d for d in divergences if d is not None]
    out = f"{label}: {len(divergences) - len(diverged)} of {len(divergences)} identical"
    if diverged:
        out += f"; {len(diverged)} diverged at near ties (" + ", ".join(
            f"token {i}, gap {gap:.3f}" for i, gap in diverged) + ")"
    return out
