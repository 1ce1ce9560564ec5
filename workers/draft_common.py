"""What every draft-side worker shares (the draft, feature-draft and replay workers): the
message handling of their requests, the growth of a draft tree by path score, and placing
the draft process on its device.

Apart from workers/draft.py so that the feature draft imports these without importing the
draft worker, which imports the feature draft's handler (an import cycle otherwise).
"""
from __future__ import annotations

import logging
import math

import torch

from dovetail.protocol import Close, Closed, DraftRequest, OpenRequest, Opened
from dovetail.system.cpus import format_cpus, pin_process, tune_gpu_worker
from dovetail.workers.serve import RequestError

log = logging.getLogger("dovetail.draft")


def gate_score(min_prob: float) -> float:
    """The lowest path log-probability a gated tree keeps."""
    return math.log(min_prob) if min_prob > 0 else -math.inf


def wire_scores(scores: list[float]) -> list[float]:
    """Path log-probabilities as the protocol takes them: finite and <= 0."""
    return [min(0.0, max(float(s), -1e4)) for s in scores]


def dispatch_draft(handler, msg, max_requests: int, new_state, release=None, retire=None):
    """The message handling every draft-side worker shares (draft, feature draft, replay):
    open a state per request (at most ``max_requests``), draft, close. On close ``retire``
    takes the whole state (the draft's prefix cache keeps it), else ``release`` its cache."""
    if isinstance(msg, OpenRequest):
        if len(handler.states) >= max_requests and msg.req_id not in handler.states:
            raise RequestError(msg.req_id, "busy", f"{len(handler.states)} requests open (max_requests)")
        handler.states[msg.req_id] = new_state(msg)
        return Opened(req_id=msg.req_id, cache_len=0)
    if isinstance(msg, DraftRequest):
        return handler.draft(msg)
    if isinstance(msg, Close):
        st = handler.states.pop(msg.req_id, None)
        if st is not None and retire is not None:
            retire(st)
        elif st is not None and release is not None:
            release(st.cache)
        return Closed(req_id=msg.req_id)
    raise RequestError(getattr(msg, "req_id", -1), "unexpected",
                       f"a draft worker does not take {type(msg).__name__}")


def apply_request(states: dict, msg: DraftRequest):
    """Check a DraftRequest against its request's state and apply base_len + new_tokens.

    Everything the draft knew past ``base_len`` is wrong now (rejected drafts, a lost
    bet), so ``cached`` is clamped there too: the caller's next forward recomputes it.
    """
    st = states.get(msg.req_id)
    if st is None:
        raise RequestError(msg.req_id, "unknown_request", f"request {msg.req_id} is not open")
    if msg.step <= st.step:
        raise RequestError(msg.req_id, "stale_step", f"draft step {msg.step} after step {st.step}")
    if msg.base_len > len(st.known):
        raise RequestError(msg.req_id, "bad_request", f"base_len {msg.base_len} > {len(st.known)} known tokens")
    if msg.base_len + len(msg.new_tokens) == 0:
        raise RequestError(msg.req_id, "bad_request", "nothing to draft from")
    st.step = msg.step
    st.known = st.known[:msg.base_len] + list(msg.new_tokens)
    st.cached = min(st.cached, msg.base_len)
    return st


def expand_level(logits: torch.Tensor, frontier: list[int], tok: list[int], par: list[int], score: list[float],
                 top_k: int, column_ids: torch.Tensor | None = None,
                 min_score: float = -math.inf) -> list[tuple[int, int]]:
    """One level of EAGLE-2 growth: of the top_k children of every frontier node, keep the
    top_k by path score (cumulative log-probability), none below ``min_score`` (the gate).
    Appends them to tok/par/score and returns (new node, frontier row) pairs.
    ``column_ids`` maps logit columns to token ids (a reduced draft vocabulary); scores are
    summed on the CPU, whatever the logits' device."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    k = min(top_k, logp.shape[-1])
    top_lp, top_cols = logp.topk(k, dim=-1)
    top_ids = top_cols if column_ids is None else column_ids[top_cols]
    parent_scores = torch.tensor([0.0 if f < 0 else score[f] for f in frontier])[:, None]
    cand = (parent_scores + top_lp.cpu()).flatten()
    out = []
    for b in cand.topk(min(top_k, cand.numel())).indices.tolist():
        if float(cand[b]) < min_score:
            break  # best first: the rest are below the gate too
        r, c = divmod(b, k)
        par.append(frontier[r])
        tok.append(int(top_ids[r, c]))
        score.append(float(cand[b]))
        out.append((len(tok) - 1, r))
    return out


def node_mask(start: int, tok, par, new) -> tuple[torch.Tensor, list[int]]:
    """Visibility [len(new), cache + new] and positions of a tree level about to be forwarded.

    Each new node sees the ``start`` committed cache entries plus its own ancestors, which
    sit in the cache in creation order; a node at depth d has position start - 1 + d.
    """
    total = start + new[-1] + 1
    allowed = torch.zeros(len(new), total, dtype=torch.bool)
    allowed[:, :start] = True
    depth = []
    for row, node in enumerate(new):
        d, a = 0, node
        while a >= 0:
            allowed[row, start + a] = True
            a, d = par[a], d + 1
        depth.append(d)
    return allowed, [start - 1 + d for d in depth]


def select_nodes(tok, par, score, max_nodes) -> tuple[list[int], list[int], list[float]]:
    """The max_nodes best nodes by path score: (tokens, parents, path scores), breadth first."""
    # Sorting by (-score, creation order) puts every parent before its children: a child's
    # path score is its parent's plus a log-probability <= 0, and it was created later.
    keep = sorted(range(len(tok)), key=lambda i: (-score[i], i))[:max_nodes]
    kept = set(keep)
    keep = [i for i in keep if par[i] < 0 or par[i] in kept]
    kids: dict[int, list[int]] = {}
    for i in keep:
        kids.setdefault(par[i], []).append(i)  # already in score order
    order: list[int] = []
    queue = list(kids.get(-1, []))
    while queue:  # breadth first: parents before children, best sibling first
        i = queue.pop(0)
        order.append(i)
        queue.extend(kids.get(i, []))
    index = {old: new for new, old in enumerate(order)}
    return [tok[i] for i in order], [-1 if par[i] < 0 else index[par[i]] for i in order], [score[i] for i in order]


def place_draft(device: str, cpus: list[int] | None, role: str = "draft") -> str:
    """Set this process up for a draft on ``device`` and return where it runs: pinned to
    ``cpus`` on the CPU (also when CUDA is missing), or tuned for a GPU."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        log.warning("no CUDA device is available: the %s runs on the CPU", role)
        device = "cpu"
    if device == "cpu":
        pinned = pin_process(cpus)
        log.info("%s on the CPU (CPUs %s, %d threads)", role, format_cpus(pinned), torch.get_num_threads())
    else:
        tune_gpu_worker()
        log.info("%s on %s (%s)", role, device, torch.cuda.get_device_name(torch.device(device)))
    return device
