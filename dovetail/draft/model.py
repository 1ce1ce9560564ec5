"""The Dovetail feature draft: DGF (or EAGLE's concat + Linear) fusion, then decoder layers.

Input at draft position t is the target's last hidden state f_t (final-norm output, the
LM-head input) and the embedding e_{t+1} of the next token. The output is the draft's
guess of f_{t+1} (after its own final RMSNorm) and the logits of the frozen target LM
head on it, i.e. a guess of token t+2. Deeper tree levels feed the draft's own hidden
state back in as the feature, as EAGLE does.

Dynamic Gating Fusion (the Dovetail paper, arXiv 2412.18934), no biases:
    h1 = f W1,  h2 = SiLU(RMSNorm(e) W2),  z = sigmoid([h1; h2] Wz),  x = z*h1 + (1-z)*h2
The EAGLE baseline (ablations) is x = [f; e] W + b with one layer.

The embedding and the LM head are the target's, frozen, held as non-persistent buffers so
that ``state_dict()`` holds exactly the trained weights (what a checkpoint stores).
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

KINDS = ("dgf", "eagle")


# The embedding fingerprint: the leading dimensions of a few fixed token ids' embedding rows,
# de-quantized. Two quantizations of one model (Q4_K_M, Q8_0, BF16) stay within the tolerance
# of each other; another model with the same architecture and tokenizer (a base model and its
# code fine-tune) does not.
FINGERPRINT_IDS = (11, 101, 1009, 10007, 50021, 100003)  # those below the vocabulary size count
FINGERPRINT_DIMS = 32
FINGERPRINT_TOLERANCE = 0.25  # relative L2 distance; measured: the 0.5B's Q4_K_M re-quantized to
                              # Q8_0 0.005, to BF16 0.002; unrelated rows ~1.4


def embedding_fingerprint(rows: torch.Tensor) -> tuple[float, ...]:
    """The fingerprint of the embedding rows of FINGERPRINT_IDS below the vocabulary size."""
    return tuple(round(float(x), 5) for x in rows[:, :FINGERPRINT_DIMS].float().flatten())


def fingerprint_ids(vocab_size: int) -> list[int]:
    return [i for i in FINGERPRINT_IDS if i < vocab_size]


@dataclass(frozen=True)
class TargetIdentity:
    """What a draft must agree with to serve a target: trained features mean nothing elsewhere."""
    arch: str
    hidden_size: int
    vocab_size: int
    tokenizer_hash: str
    name: str = ""  # informative only: a renamed copy of the same model is still the same target
    fingerprint: tuple[float, ...] = ()  # embedding_fingerprint; () where unknown (not compared)

    def __post_init__(self):
        if not self.arch or self.hidden_size < 1 or self.vocab_size < 1 or not self.tokenizer_hash:
            raise ValueError(f"incomplete target identity: {self}")
        object.__setattr__(self, "fingerprint", tuple(self.fingerprint))  # a JSON list comes back a tuple

    def mismatches(self, other: "TargetIdentity") -> list[str]:
        keys = ("arch", "hidden_size", "vocab_size", "tokenizer_hash")
        bad = [f"{k} {getattr(self, k)!r} vs {getattr(other, k)!r}" for k in keys
               if getattr(self, k) != getattr(other, k)]
        if not bad and self.fingerprint and other.fingerprint:
            distance = fingerprint_distance(self.fingerprint, other.fingerprint)
            if distance > FINGERPRINT_TOLERANCE:
                bad.append(f"the embeddings differ by {distance:.2f} (relative; two quantizations of one model "
                           f"stay under {FINGERPRINT_TOLERANCE}): another model of the same architecture")
        return bad


def fingerprint_distance(a, b) -> float:
    """Relative L2 distance of two fingerprints (inf when they are of different sizes)."""
    if len(a) != len(b):
        return float("inf")
    ta, tb = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    return float((ta - tb).norm() / tb.norm().clamp_min(1e-12))


@dataclass
class DraftModelConfig:
    """Shape of a feature draft plus the identity (and layer hyper-parameters) of its target."""
    target: TargetIdentity
    # The target's transformers config (a dict): the layers reuse its architecture, heads,
    # norm epsilon and rotary settings; only depth and FFN width are the draft's own.
    target_config: dict
    kind: str = "dgf"
    num_layers: int = 1
    intermediate_size: int | None = None  # None: the target's FFN width
    # A reduced LM head: only these target token ids (the most frequent ones) get logits;
    # the head costs vocab x hidden per position, the biggest part of a small draft's step.
    draft_vocab: list[int] | None = field(default=None, repr=False)

    def __post_init__(self):
        if isinstance(self.target, dict):
            self.target = TargetIdentity(**self.target)
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.num_layers < 1:
            raise ValueError("num_layers must be at least 1")
        if self.kind == "eagle" and self.num_layers != 1:
            raise ValueError("the EAGLE baseline has exactly one decoder layer")
        if self.intermediate_size is not None and self.intermediate_size < 1:
            raise ValueError("intermediate_size must be positive")
        if self.draft_vocab is not None:
            ids = self.draft_vocab
            if not ids or len(set(ids)) != len(ids) or not all(0 <= i < self.target.vocab_size for i in ids):
                raise ValueError(f"draft_vocab must be distinct token ids in [0, {self.target.vocab_size})")
        if self.target_config.get("hidden_size") != self.target.hidden_size:
            raise ValueError("target_config and target identity disagree on hidden_size")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DraftModelConfig":
        return cls(**d)


def layer_config(cfg: DraftModelConfig):
    """The target's transformers config, cut to the draft's depth and FFN width."""
    from transformers import AutoConfig
    d = dict(cfg.target_config)
    model_type = d.pop("model_type")
    for k in ("architectures", "quantization_config", "transformers_version", "_name_or_path", "dtype"):
        d.pop(k, None)
    d["num_hidden_layers"] = cfg.num_layers
    if cfg.intermediate_size is not None:
        d["intermediate_size"] = cfg.intermediate_size
    if d.get("layer_types"):
        d["layer_types"] = ["full_attention"] * cfg.num_layers  # no sliding window in a draft
    d["use_sliding_window"] = False
    lc = AutoConfig.for_model(model_type, **d)
    lc._attn_implementation = "sdpa"  # takes our explicit boolean/additive tree masks
    return lc


def architecture_classes(model_type: str):
    """(DecoderLayer, RotaryEmbedding) classes of the target's architecture in transformers."""
    mod = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    layer = next(getattr(mod, n) for n in dir(mod) if n.endswith("DecoderLayer"))
    rotary = next(getattr(mod, n) for n in dir(mod) if n.endswith("RotaryEmbedding"))
    return layer, rotary


class DGFusion(nn.Module):
    def __init__(self, hidden: int, eps: float):
        super().__init__()
        self.w1 = nn.Linear(hidden, hidden, bias=False)
        self.w2 = nn.Linear(hidden, hidden, bias=False)
        self.wz = nn.Linear(2 * hidden, hidden, bias=False)
        self.emb_norm = nn.RMSNorm(hidden, eps=eps)

    def gate(self, f: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(z, h1, h2): exposed so tests can check the gate lies in (0, 1)."""
        h1 = self.w1(f)
        h2 = nn.functional.silu(self.w2(self.emb_norm(e)))
        return torch.sigmoid(self.wz(torch.cat([h1, h2], dim=-1))), h1, h2

    def forward(self, f, e):
        z, h1, h2 = self.gate(f, e)
        return z * h1 + (1 - z) * h2


class ConcatFusion(nn.Module):
    """EAGLE's fusion: one Linear over the concatenated feature and embedding."""

    def __init__(self, hidden: int):
        super().__init__()
        self.fc = nn.Linear(2 * hidden, hidden, bias=True)

    def forward(self, f, e):
        return self.fc(torch.cat([f, e], dim=-1))


class FeatureDraft(nn.Module):
    def __init__(self, config: DraftModelConfig, embed: torch.Tensor, head: torch.Tensor):
        super().__init__()
        ident = config.target
        if tuple(embed.shape) != (ident.vocab_size, ident.hidden_size) or head.shape != embed.shape:
            raise ValueError(f"embedding {tuple(embed.shape)} / head {tuple(head.shape)} do not fit the "
                             f"target identity (vocab {ident.vocab_size}, hidden {ident.hidden_size})")
        self.config = config
        self.lconfig = layer_config(config)
        layer_cls, rotary_cls = architecture_classes(self.lconfig.model_type)
        eps = float(getattr(self.lconfig, "rms_norm_eps", 1e-6))
        h = ident.hidden_size
        self.fusion = DGFusion(h, eps) if config.kind == "dgf" else ConcatFusion(h)
        self.layers = nn.ModuleList(layer_cls(self.lconfig, i) for i in range(config.num_layers))
        # transformers renamed the layers' past_key_values -> cache (after 5.17): an unknown
        # keyword is swallowed by **kwargs, and the layer would then silently run uncached.
        self._cache_kw = "cache" if "cache" in inspect.signature(layer_cls.forward).parameters else "past_key_values"
        self.rotary = rotary_cls(self.lconfig)
        self.norm = nn.RMSNorm(h, eps=eps)
        # Frozen and not persistent: they come from the target, never from a checkpoint.
        self.register_buffer("embed_weight", embed.detach().clone(), persistent=False)
        ids = torch.tensor(config.draft_vocab if config.draft_vocab else range(ident.vocab_size))
        # logit column i is target token vocab_ids[i] (the identity without a reduced head)
        self.register_buffer("vocab_ids", ids, persistent=False)
        self.register_buffer("head_weight", head.detach()[ids].clone(), persistent=False)
        self.head = None  # a quantized stand-in for head_weight at inference (quantize_feature_draft)

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The frozen target head (its draft_vocab rows) on draft hidden states."""
        return self.head(hidden) if self.head is not None else hidden @ self.head_weight.T

    def new_cache(self):
        from transformers import DynamicCache
        return DynamicCache(config=self.lconfig)

    def forward(self, features: torch.Tensor, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                cache=None, allowed: torch.Tensor | None = None, logits: bool = True):
        """Draft positions for rows (f_t, token_{t+1}); rows are one sequence (or [B, n] batches).

        Logit column i stands for target token ``vocab_ids[i]`` (all of them unless the
        config has a reduced ``draft_vocab``).

        ``features`` [..., n, H]; ``tokens`` [..., n] (the *next* tokens); ``positions`` [n]
        (default: after what ``cache`` holds); ``allowed`` [n, past+n] boolean visibility
        (default: causal). Returns (hidden [..., n, H], logits [..., n, V] or None).
        """
        batched = features.dim() == 3
        f = (features if batched else features[None]).to(self.device, self.dtype)
        ids = (tokens if batched else tokens[None]).to(self.device)
        n = f.shape[1]
        past = cache.get_seq_length() if cache is not None else 0
        if positions is None:
            positions = torch.arange(past, past + n)
        if allowed is None:
            allowed = torch.ones(n, past + n, dtype=torch.bool).tril(past)
        mask = torch.zeros(allowed.shape, dtype=self.dtype)
        mask.masked_fill_(~allowed.cpu(), torch.finfo(self.dtype).min)
        mask = mask[None, None].to(self.device)
        pos = positions.reshape(1, -1).to(self.device)
        x = self.fusion(f, nn.functional.embedding(ids, self.embed_weight))
        rope = self.rotary(x, pos)
        for layer in self.layers:
            x = layer(x, attention_mask=mask, position_ids=pos, use_cache=cache is not None,
                      position_embeddings=rope, **{self._cache_kw: cache})
        hidden = self.norm(x)
        out = self.logits(hidden) if logits else None
        return (hidden, out) if batched else (hidden[0], out[0] if out is not None else None)
