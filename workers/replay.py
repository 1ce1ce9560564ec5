"""Replay draft: proposes the target's own recorded greedy continuation, a set fraction corrupted.

    python -m dovetail.workers.replay --bind ipc://... --script FILE.json --corrupt 0.2 --seed 0 \
        [--model PATH --device cuda:0 | --vocab-size N --tokenizer-hash H]

Its acceptance rate is known in advance, which real drafts never offer: every token it
proposes is what the target would say, except that each is independently replaced, with
probability ``corrupt``, by a different token, and the target rejects there. A chain of
``depth`` tokens then commits ``expected_tau(depth, corrupt)`` tokens per round on average.

The script (``{"version": 1, "entries": [{"prompt": [...], "continuation": [...]}]}``) is
re-read whenever its file changes, and an optional top-level ``"corrupt"`` in it overrides
``--corrupt``: one launched worker can serve a script recorded after it started, at several
corruption levels, without restarting the (slow to load) target.

With ``--model`` it also runs a real chain draft's forwards (catch up on the new tokens, then
one token at a time) on its own KV cache, so the draft time it reports is realistic.
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field

import numpy as np

from dovetail.models.loading import dtype_name
from dovetail.protocol import DraftProposal, DraftRequest, Handshake
from dovetail.spec.replay import load_script
from dovetail.workers.draft import apply_request, check_placement, dispatch_draft, load_draft_model
from dovetail.workers.draft_lm import DraftCache, DraftLM
from dovetail.workers.serve import WorkerConfig, parse_config, serve, setup_logging, worker_parser

log = logging.getLogger("dovetail.replay")
@dataclass
class ReplayConfig(WorkerConfig):
    script: str
    corrupt: float = 0.0
    seed: int = 0
    model: str | None = None
    device: str = "cpu"
    layers: int | None = None
    vocab_size: int | None = None
    tokenizer_hash: str | None = None

    def __post_init__(self):
        super().__post_init__()
        check_placement(self.device, self.layers)
        if not 0.0 <= self.corrupt <= 1.0:
            raise ValueError(f"--corrupt must be in [0, 1], got {self.corrupt}")
        if self.model is None and (self.vocab_size is None or self.tokenizer_hash is None):
            raise ValueError("without --model, give --vocab-size and --tokenizer-hash (the target's)")


@dataclass
class ReplayState:
    known: list[int]          # committed tokens + the root guess, as with DraftHandler
    cache: DraftCache | None = None  # the real draft model's KV cache (--model only)
    cached: int = 0
    step: int = -1
    entry: int = -1           # script entry this request last matched


@dataclass
class ReplayHandler:
    config: ReplayConfig
    vocab_size: int
    tok_hash: str
    lm: DraftLM | None = None  # the real draft model when --model is given
    role: str = "draft"
    states: dict[int, ReplayState] = field(default_factory=dict)
    entries: list[tuple[list[int], list[int]]] = field(default_factory=list)
    corrupt: float = 0.0
    _sig: tuple | None = None

    def __post_init__(self):
        self.corrupt = self.config.corrupt
        self.reload()

    def reload(self) -> None:
        """Re-read the script if its file changed since we last read it."""
        st = os.stat(self.config.script)
        sig = (st.st_ino, st.st_mtime_ns, st.st_size)
        if sig == self._sig:
            return
        script = load_script(self.config.script)
        self.entries = [(list(e["prompt"]), list(e["continuation"])) for e in script["entries"]]
        self.corrupt = float(script.get("corrupt", self.config.corrupt))
        self._sig = sig
        log.info("script %s: %d entries, corrupt %.3f", self.config.script, len(self.entries), self.corrupt)

    def handshake(self) -> Handshake:
        lm = self.lm
        return Handshake(role="draft", vocab_size=self.vocab_size, tokenizer_hash=self.tok_hash,
                         hidden_size=lm.hidden_size if lm else 0,
                         dtype=dtype_name(lm.dtype) if lm else "",
                         feature_codec="fp16", model=f"replay({lm.name if lm else 'no model'})",
                         device=lm.device if lm else "none", pid=os.getpid(), open_requests=len(self.states))

    def handle(self, msg):
        return dispatch_draft(self, msg, self.config.max_requests, self.open_state,
                              release=self.lm.release if self.lm else None)

    def open_state(self, msg) -> "ReplayState":
        self.reload()  # a new request is the moment a changed script may take effect
        return ReplayState(list(msg.prompt), self.lm.new_cache() if self.lm else None)

    def lookup(self, st: ReplayState, seq: list[int]) -> tuple[int, int]:
        """(entry, tokens of its continuation already in seq), or (-1, 0) off script."""
        order = [st.entry] if st.entry >= 0 else []
        for i in [*order, *range(len(self.entries))]:
            prompt, cont = self.entries[i]
            n = len(seq) - len(prompt)
            if 0 <= n <= len(cont) and seq[:len(prompt)] == prompt and seq[len(prompt):] == cont[:n]:
                st.entry = i
                return i, n
        return -1, 0

    def recorded(self, st: ReplayState, seq: list[int], depth: int) -> tuple[int, list[int]]:
        """The script's next ``depth`` tokens after ``seq`` (fewer near its end; none off script)."""
        entry, n = self.lookup(st, seq)
        return (entry, self.entries[entry][1][n:n + depth]) if entry >= 0 else (-1, [])

    def corrupted(self, entry: int, pos: int, token: int) -> int:
        """The token at absolute position ``pos``, replaced with probability ``corrupt``.

        The coin depends only on (seed, entry, pos): a position looks the same in every round
        and every overlapped bet that proposes it, so each position is judged once and the
        per-round acceptance follows expected_tau exactly.
        """
        rng = np.random.default_rng([self.config.seed, entry, pos])
        if rng.random() >= self.corrupt:
            return token
        return (token + int(rng.integers(1, self.vocab_size))) % self.vocab_size  # never itself

    def draft(self, msg: DraftRequest) -> DraftProposal:
        t0 = time.perf_counter()
        st = apply_request(self.states, msg)
        self._catch_up(st)
        root_guess = -1
        if msg.guess_root:
            # The coordinator bets a whole round ahead: the guess is the recorded next token
            # (never corrupted: it stands for the target's own token, not a draft token).
            _, nxt = self.recorded(st, st.known, 1)
            if nxt:
                root_guess = nxt[0]
                st.known.append(root_guess)
                self._catch_up(st)
        depth = min(msg.depth, msg.max_nodes)
        entry, chain = self.recorded(st, st.known, depth) if not msg.guess_root or root_guess >= 0 else (-1, [])
        start = len(st.known)
        tokens = [self.corrupted(entry, start + i, t) for i, t in enumerate(chain)]
        self._chain_forwards(st, tokens)
        return DraftProposal(req_id=msg.req_id, step=msg.step, tokens=tokens,
                             parents=list(range(-1, len(tokens) - 1)), root_guess=root_guess,
                             seconds=time.perf_counter() - t0)

    # ---- the real draft compute (--model only) -------------------------------------------
    def _catch_up(self, st: ReplayState) -> None:
        """Same KV bookkeeping as DraftHandler: roll back, then forward what is new."""
        if self.lm is None:
            return
        st.cached = min(st.cached, len(st.known) - 1)
        self.lm.crop(st.cache, st.cached)
        self.lm.forward(st.cache, st.known[st.cached:], logit_rows=[-1])
        st.cached = len(st.known)

    def _chain_forwards(self, st: ReplayState, tokens: list[int]) -> None:
        """A chain draft of k tokens costs k-1 more one-token forwards after the catch-up."""
        if self.lm is None:
            return
        for t in tokens[:-1]:
            self.lm.forward(st.cache, [t], logit_rows=[-1])
        self.lm.crop(st.cache, st.cached)  # proposals are guesses: never keep them
        if str(self.lm.device).startswith("cuda"):
            import torch
            torch.cuda.synchronize(self.lm.device)  # so `seconds` is the GPU's time, not launch time


def build_parser():
    p = worker_parser("replay", __doc__)
    p.add_argument("--script", required=True, help="replay script JSON: {'version': 1, 'entries': [{'prompt', 'continuation'}]}")
    p.add_argument("--corrupt", type=float, default=0.0, help="probability that each proposed token is replaced (a 'corrupt' key in the script overrides)")
    p.add_argument("--seed", type=int, default=0, help="seed of the corruption coins")
    p.add_argument("--model", default=None, help="draft model to run real chain forwards with (for realistic draft time)")
    p.add_argument("--device", default="cpu", help="'cpu' or 'cuda:N' for --model")
    p.add_argument("--layers", type=int, default=None, help="use only the first N layers of --model")
    p.add_argument("--vocab-size", type=int, default=None, help="the target's vocabulary size (taken from --model when given)")
    p.add_argument("--tokenizer-hash", default=None, help="the target's tokenizer hash (taken from --model when given)")
    return p


def main(argv=None) -> None:
    cfg = parse_config(ReplayConfig, build_parser(), argv)
    setup_logging(cfg.log_level, "replay")
    lm, vocab, tok_hash = None, cfg.vocab_size, cfg.tokenizer_hash
    if cfg.model is not None:
        from dovetail.models.loading import load_tokenizer, tokenizer_hash
        lm = load_draft_model(cfg.model, cfg.device, cfg.dtype, cfg.layers, cfg.cpus, role="replay draft")
        vocab = vocab or lm.vocab_size
        tok_hash = tok_hash or tokenizer_hash(load_tokenizer(cfg.model), lm.vocab_size)
    serve(cfg.bind, ReplayHandler(cfg, vocab, tok_hash, lm), parent_pid=cfg.parent_pid, keys=cfg.keys,
          heartbeat_timeout=cfg.heartbeat_timeout, parent_death_signal=cfg.parent_death_signal)


if __name__ == "__main__":
    main()
