"""Settings of the coordinator: how to draft, how to wait, where the workers run."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

# Tree shape (depth, top_k, max_nodes) by where the draft runs. A CPU draft shares the
# target's cores, so each draft step costs about half a target step (0.5B vs 1.5B on the
# 2-core machine): a shallow, narrow tree won there (python -m bench.pipeline). A GPU
# draft step is ~50x cheaper than CPU verification, so the tree grows until the CPU's
# cost of verifying more tokens bites (measured on a 16-core machine: 7B verify cost is flat to k ~ 16).
# There, growing wide and deep and keeping the 16 best paths costs the draft a few ms and
# picks better nodes: with the shipped 1.5B DGF draft, depth 8 x top-12 committed 3.02
# tokens per round against 2.93 for depth 6 x top-4 (docs/training.md, ablation).
TREE_DEFAULTS = {"cpu": (3, 2, 6), "cuda": (8, 12, 16)}

# Heartbeat interval bounds: below 10 ms the pings cost more than they tell; above a minute
# a dead remote worker would hold a request for many minutes before anyone notices.
MIN_HEARTBEAT_INTERVAL_S = 0.01
MAX_HEARTBEAT_INTERVAL_S = 60.0


DEFAULT_DRAFT_LM = "qwen2.5-coder-0.5b-instruct"  # draft="auto" when no feature draft ships for the target
# Its tokenizer's identity (models/loading.py tokenizer_hash), so that draft="auto" can tell
# before fetching 491 MB whether it could draft for a target at all.
DEFAULT_DRAFT_LM_TOKENIZER = "5ad4def217b37b7d"


@dataclass
class CoordinatorConfig:
    depth: int | None = None       # draft tokens along one path (None: by draft device)
    top_k: int | None = None       # children per tree node; 1 drafts a chain
    max_nodes: int | None = None   # most tree tokens sent for one verification
    overlap: bool | None = None    # draft round n+1 while round n verifies (None: only on a GPU draft)
    auto_tree: bool | None = None  # size each draft from the verify-cost curve and acceptance
                                   # (None: on unless depth or max_nodes is given); depth caps it
    gate: bool | None = None       # with auto_tree: propose only draft tokens whose path probability
                                   # pays for their verification (autotree.TreeSizer.min_prob; None:
                                   # on with auto_tree: near 0 where rows are cheap, so it only prunes
                                   # where a row costs a real share of a step)
    force_draft: bool = False      # start the draft even where the target's curve says no draft can pay
                                   # (autotree.skip_draft_reason; only asked when auto_tree is on)
    draft_layers: int | None = None  # run only the first N layers of the draft model
    suffix_max_nodes: int = 63      # most nodes of a suffix-draft tree (and at most the measured curve's rows - 1)
    suffix_cache_tokens: int = 1 << 16  # earlier outputs the suffix draft copies from, per scope (API key),
                                    # in tokens over all scopes; 0: off (runtime/suffix_draft.py: a timing side channel)
    draft_cpus: list[int] | None = None  # CPUs for a CPU draft (default: the target's)
    feature_codec: str = "fp16"
    stop_token_ids: list[int] | None = None  # default: the tokenizer's end-of-turn/text tokens
    startup_timeout_s: float = 1800.0  # loading (and de-quantizing) a model can take minutes
    prefill_timeout_s: float = 600.0
    verify_timeout_s: float = 120.0
    draft_timeout_s: float = 30.0   # past this the draft is suspect: target-only until it answers
    draft_probe_timeout_s: float = 0.2  # how long a request waits for a suspect draft's heartbeat
    max_active: int = 4             # requests decoding at once (their rounds interleave on the workers)
    max_pending: int = 256          # requests admitted (active + queued); past it: CoordinatorBusy
    queue_timeout_s: float = 600.0  # how long an admitted request may wait for an active slot
    close_timeout_s: float = 10.0   # close(): how long cancelled requests get to finish their round
    worker_max_requests: int = 256  # requests each worker holds open at once (its --max-requests)
    connect_timeout_s: float = 120.0  # a remote target's handshake: wrong keys or address look like silence
    # Liveness (dovetail/runtime/liveness.py): a heartbeat to each worker every interval; a worker that
    # misses `heartbeat_liveness` in a row is declared dead or hung (in-flight requests end).
    heartbeat_interval_s: float = 1.0
    heartbeat_liveness: int = 3
    log_level: str = "warning"
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the workers
    # draft="replay:FILE.json" (workers/replay.py, a draft of known acceptance, for benchmarks):
    replay_corrupt: float = 0.0     # probability each replayed token is replaced (the target rejects it)
    replay_seed: int = 0            # seed of those coins
    replay_model: str | None = None  # run this model's chain forwards on draft_device for real draft time

    def __post_init__(self):
        for name in ("depth", "top_k"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        if not 1 <= self.suffix_max_nodes <= 1024:
            raise ValueError(f"suffix_max_nodes must be in 1..1024, got {self.suffix_max_nodes}")
        if self.suffix_cache_tokens < 0:
            raise ValueError(f"suffix_cache_tokens must be >= 0 (0 turns the cache off), got {self.suffix_cache_tokens}")
        if self.max_nodes is not None and not 1 <= self.max_nodes <= 1024:
            raise ValueError(f"max_nodes must be in 1..1024, got {self.max_nodes}")
        if not 1 <= self.max_active <= self.max_pending:
            raise ValueError(f"need 1 <= max_active <= max_pending, got {self.max_active}, {self.max_pending}")
        for name in ("startup_timeout_s", "prefill_timeout_s", "verify_timeout_s", "draft_timeout_s",
                     "draft_probe_timeout_s", "queue_timeout_s", "close_timeout_s", "connect_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if not MIN_HEARTBEAT_INTERVAL_S <= self.heartbeat_interval_s <= MAX_HEARTBEAT_INTERVAL_S:
            raise ValueError(f"heartbeat_interval_s must be in [{MIN_HEARTBEAT_INTERVAL_S}, "
                             f"{MAX_HEARTBEAT_INTERVAL_S}], got {self.heartbeat_interval_s}")
        if not isinstance(self.heartbeat_liveness, int) or self.heartbeat_liveness < 1:
            raise ValueError(f"heartbeat_liveness must be an int >= 1, got {self.heartbeat_liveness!r}")
        if not 0.0 <= self.replay_corrupt <= 1.0:
            raise ValueError(f"replay_corrupt must be in [0, 1], got {self.replay_corrupt}")
        if self.feature_codec not in ("fp16", "int8"):
            raise ValueError(f"feature_codec must be 'fp16' or 'int8', got {self.feature_codec!r}")

    @property
    def liveness_window_s(self) -> float:
        """How long a worker may stay silent before it is declared dead or hung."""
        return self.heartbeat_interval_s * self.heartbeat_liveness

    def with_tree_defaults(self, draft_device: str) -> "CoordinatorConfig":
        """Fill the unset tree-shape fields with the defaults for this draft device."""
        depth, top_k, max_nodes = TREE_DEFAULTS["cuda" if draft_device.startswith("cuda") else "cpu"]
        return replace(self, depth=self.depth or depth, top_k=self.top_k or top_k,
                       max_nodes=self.max_nodes or max_nodes)
