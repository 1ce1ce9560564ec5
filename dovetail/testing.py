"""Tiny random models for tests and examples: real architectures, a few layers, any dtype."""
from __future__ import annotations

from pathlib import Path

import torch


def make_tiny_model(path: str | Path, *, seed: int = 0, vocab_size: int = 64, hidden_size: int = 32,
                    layers: int = 2, dtype: torch.dtype = torch.float64, noise_from: str | Path | None = None,
                    noise: float = 0.0, attention_gain: float = 1.0) -> Path:
    """Save a tiny random Qwen2 model (no tokenizer) to ``path`` and return the path.

    With ``noise_from``, start from that model's weights plus Gaussian noise of scale
    ``noise``: a draft that agrees with its target often but not always.

    ``attention_gain`` scales the query and key projections. At random init attention is
    nearly uniform and greedy output soon loops on a few tokens, so a stale KV entry
    would change nothing; sharper attention makes every token depend on the context.
    """
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=False)
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
        from dovetail.tree import chain_parents
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
        return self.h.backend.length(self.h.sequences[self.req].cache)
