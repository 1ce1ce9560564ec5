"""Settings of the coordinator: how to draft, how to wait, where the workers run."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CoordinatorConfig:
    depth: int = 4                 # draft tokens along one path (chain length when top_k = 1)
    top_k: int = 1                 # children per tree node; 1 drafts a chain
    max_nodes: int = 16            # most tree tokens sent for one verification
    overlap: bool | None = None    # draft round n+1 while round n verifies (None: only on a GPU draft)
    draft_layers: int | None = None  # run only the first N layers of the draft model
    draft_cpus: list[int] | None = None  # CPUs for a CPU draft (default: the target's)
    feature_codec: str = "fp16"
    stop_token_ids: list[int] | None = None  # default: the tokenizer's end-of-turn/text tokens
    startup_timeout_s: float = 1800.0  # loading (and de-quantizing) a model can take minutes
    prefill_timeout_s: float = 600.0
    verify_timeout_s: float = 120.0
    draft_timeout_s: float = 30.0   # past this the draft is suspect: target-only until it answers
    draft_probe_timeout_s: float = 0.2  # how long a request waits for a suspect draft's heartbeat
    log_level: str = "warning"
    env: dict[str, str] = field(default_factory=dict)  # extra environment for the workers

    def __post_init__(self):
        if self.depth < 1 or self.top_k < 1:
            raise ValueError(f"depth and top_k must be at least 1 (got depth={self.depth}, top_k={self.top_k})")
        if not 1 <= self.max_nodes <= 1024:
            raise ValueError(f"max_nodes must be in 1..1024, got {self.max_nodes}")
        for name in ("startup_timeout_s", "prefill_timeout_s", "verify_timeout_s", "draft_timeout_s",
                     "draft_probe_timeout_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive")
        if self.feature_codec not in ("fp16", "int8"):
            raise ValueError(f"feature_codec must be 'fp16' or 'int8', got {self.feature_codec!r}")
