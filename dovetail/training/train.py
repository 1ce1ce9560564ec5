"""Train a feature draft for one target: ``dovetail-train extract | train | eval``.

Loss (as in the Dovetail paper): SmoothL1(draft hidden, target hidden of the next position)
+ 0.1 x cross-entropy of the draft's logits against the target's own token distribution
(softmax of the target LM head on its hidden state). AdamW. The draft at pair t sees
(f_t, x_{t+1}) and must produce f_{t+1}: exactly what the draft worker feeds it.

Unrolled training (``unroll`` > 1, "training-time test" as in EAGLE-3 / HASS): from tree
level 2 on, the draft worker feeds the draft its *own* previous hidden state, not the
target's. Trained only on target features, the draft never sees its own errors and the
deeper levels drift. With unroll K, each window is also drafted K-1 more steps exactly as
the worker grows a chain (same rotary positions, same visibility: the committed pairs up
to the chain's start plus the chain itself), and step k's loss (weight UNROLL_DECAY^(k-1))
is added to the first step's.

Checkpoints go to ``--out``: the draft checkpoint (model.safetensors bf16 + config.json,
what the draft worker loads) and ``train_state.pt`` (fp32 weights, optimizer, step, RNG),
from which an interrupted run resumes.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from dovetail.draft.checkpoint import save_checkpoint
from dovetail.draft.model import KINDS, FeatureDraft
from dovetail.training.data import Sequence

log = logging.getLogger("dovetail.training.train")

STATE = "train_state.pt"
CE_WEIGHT = 0.1
UNROLL_DECAY = 0.8   # weight of unrolled step k is UNROLL_DECAY ** (k - 1): the first level matters most


@dataclass
class TrainConfig:
    steps: int = 1000
    lr: float = 3e-5
    batch_size: int = 8
    seq_len: int = 256            # pairs per training window
    weight_decay: float = 0.0
    warmup: int = 0               # steps of linear warm-up, then cosine decay to lr / 10
    save_every: int = 200         # steps between checkpoints (and at the end)
    seed: int = 0
    amp: bool = False             # bf16 autocast (weights and optimizer stay fp32): for GPUs
    unroll: int = 1               # draft steps per window fed on the draft's own features (see above)
    progress: bool = True

    def __post_init__(self):
        if self.steps < 1 or self.batch_size < 1 or self.seq_len < 2 or self.save_every < 1:
            raise ValueError("steps, batch_size, save_every must be >= 1 and seq_len >= 2")
        if not 1 <= self.unroll < self.seq_len:
            raise ValueError(f"unroll must be in [1, seq_len), got {self.unroll}")
        if not self.lr > 0:
            raise ValueError("lr must be positive")
        if not 0 <= self.warmup < self.steps:
            raise ValueError("warmup must be in [0, steps)")

    def lr_at(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based): a function of the step alone,
        so a resumed run continues the same schedule."""
        if not self.warmup:
            return self.lr
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        done = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, done))))


def step_loss(model: FeatureDraft, pred: torch.Tensor, logits: torch.Tensor, goal: torch.Tensor):
    """SmoothL1 on features + CE_WEIGHT x cross-entropy against the target's distribution."""
    # With a reduced draft vocabulary head_weight has only its rows: the target's
    # distribution is then the one restricted (renormalised) to the draft's tokens.
    feat = F.smooth_l1_loss(pred.float(), goal.float())
    with torch.no_grad():
        target_p = torch.softmax((goal @ model.head_weight.T).float(), dim=-1)
    ce = -(target_p * torch.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
    with torch.no_grad():
        top1 = (logits.argmax(-1) == target_p.argmax(-1)).float().mean()
    return feat + CE_WEIGHT * ce, float(feat.detach()), float(ce.detach()), float(top1)


def unroll_mask(n: int, step: int) -> torch.Tensor:
    """Visibility of unrolled step ``step`` (>= 2): row i (the chain started at pair i) sees
    pairs 0..i of step 1 and its own rows of steps 2..step. Keys are laid out as the cache
    holds them: n pairs of step 1, then n-1 rows of step 2, n-2 of step 3, ..."""
    rows = n - step + 1
    blocks = [torch.ones(rows, n, dtype=torch.bool).tril()]
    for k in range(2, step + 1):
        blocks.append(torch.eye(rows, n - k + 1, dtype=torch.bool))
    return torch.cat(blocks, dim=1)


def draft_loss(model: FeatureDraft, tokens: torch.Tensor, hidden: torch.Tensor,
               unroll: int = 1) -> tuple[torch.Tensor, dict]:
    """Loss on windows: tokens [B, L+1], hidden [B, L+1, H] (target hidden after each token).

    Step 1 is teacher-forced: pair t = (f_t, x_{t+1}) predicts f_{t+1}. Step k >= 2 takes
    the draft's step-(k-1) output for chain i (its guess of f_{i+k-1}) with the true token
    x_{i+k}, at rotary position i+k-1, and predicts f_{i+k}: tree level k of a draft whose
    last committed pair was i.
    """
    hidden = hidden.to(model.device, model.dtype)
    n = tokens.shape[1] - 1
    cache = model.new_cache() if unroll > 1 else None
    pred, logits = model(hidden[:, :-1], tokens[:, 1:], cache=cache)
    total, feat, ce, top1 = step_loss(model, pred, logits, hidden[:, 1:])
    parts = {"feat": feat, "ce": ce, "top1": top1}
    for k in range(2, min(unroll, n) + 1):  # a short window unrolls less: chain i needs x_{i+k}
        rows = n - k + 1
        pred, logits = model(pred[:, :rows], tokens[:, k:k + rows], torch.arange(k - 1, k - 1 + rows),
                             cache=cache, allowed=unroll_mask(n, k))
        loss_k, _, _, top1_k = step_loss(model, pred, logits, hidden[:, k:k + rows])
        total = total + UNROLL_DECAY ** (k - 1) * loss_k
        parts[f"top1_{k}"] = top1_k
    return total, parts


def sample_batch(data: list[Sequence], cfg: TrainConfig, rng: random.Random):
    """Random windows of seq_len + 1 positions (shorter sequences give shorter windows, so
    every window in one batch is cut to the shortest)."""
    picks = [data[rng.randrange(len(data))] for _ in range(cfg.batch_size)]
    length = min(cfg.seq_len + 1, *(len(s.tokens) for s in picks))
    toks, hid = [], []
    for s in picks:
        a = rng.randrange(len(s.tokens) - length + 1)
        toks.append(s.tokens[a:a + length])
        hid.append(s.hidden[a:a + length])
    return torch.stack(toks), torch.stack(hid)


def save_state(model, opt, step: int, rng: random.Random, out: Path, cfg: TrainConfig) -> None:
    save_checkpoint(model, out)
    tmp = out / (STATE + ".tmp")
    torch.save({"step": step, "model": model.state_dict(), "optimizer": opt.state_dict(),
                "rng": rng.getstate(), "torch_rng": torch.get_rng_state(), "config": asdict(cfg)}, tmp)
    tmp.replace(out / STATE)


def load_state(model, opt, out: Path, rng: random.Random) -> int:
    """Resume from out/train_state.pt if there is one; return the step to continue from."""
    path = out / STATE
    if not path.exists():
        return 0
    st = torch.load(path, weights_only=True)  # tensors, numbers, tuples: no pickled objects
    model.load_state_dict(st["model"])
    opt.load_state_dict(st["optimizer"])
    rng.setstate(st["rng"])
    torch.set_rng_state(st["torch_rng"])
    log.info("resuming %s at step %d", out, st["step"])
    return int(st["step"])


def train(model: FeatureDraft, data: list[Sequence], cfg: TrainConfig, out: str | Path,
          resume: bool = True) -> list[float]:
    """Run steps until cfg.steps (continuing a saved run in ``out``); return this run's losses."""
    from tqdm import tqdm
    out = Path(out)
    data = [s for s in data if len(s.tokens) >= 3]
    if not data:
        raise ValueError("no training sequence has 3 tokens or more")
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = load_state(model, opt, out, rng) if resume else 0
    model.train()
    losses: list[float] = []
    bar = tqdm(total=cfg.steps, initial=step, desc="train draft", unit="step", disable=not cfg.progress)
    t0, tokens = time.perf_counter(), 0
    while step < cfg.steps:
        toks, hid = sample_batch(data, cfg, rng)
        with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=cfg.amp):
            loss, parts = draft_loss(model, toks, hid, cfg.unroll)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for group in opt.param_groups:
            group["lr"] = cfg.lr_at(step)
        torch.nn.utils.clip_grad_norm_(params, 1.0)  # early steps on raw features can spike
        opt.step()
        step += 1
        tokens += toks.numel()
        losses.append(float(loss.detach()))
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", top1=f"{parts['top1']:.2f}",
                        tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_state(model, opt, step, rng, out, cfg)
    bar.close()
    model.eval()
    return losses


def frequent_tokens(data: list[Sequence], n: int) -> list[int]:
    """The n most frequent token ids of the training data (a reduced draft vocabulary)."""
    counts = torch.bincount(torch.cat([s.tokens for s in data]))
    n = min(n, int((counts > 0).sum()))
    return sorted(counts.topk(n).indices.tolist())


def check_kind(kind: str, layers: int) -> None:
    if kind not in KINDS:
        raise ValueError(f"--kind must be one of {KINDS}")
    if kind == "eagle" and layers != 1:
        raise ValueError("the EAGLE baseline has one layer (--layers 1)")
