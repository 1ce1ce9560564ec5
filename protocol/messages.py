"""Dovetail wire protocol: constants and message definitions (no I/O here).

Every message travels as two ZeroMQ frames:

1. a fixed header ``HEADER.pack(PROTOCOL_TAG, PROTOCOL_VERSION, TYPE)``;
2. a msgpack map of field name -> value (a ``Feature`` is a nested map).

The codec (``codec.py``) turns these dataclasses into frames and back, and
validates everything it receives, since a peer may be buggy or hostile.

Tree convention (DraftProposal / VerifyRequest)
-----------------------------------------------
A draft tree is sent flat as two parallel lists, ``tokens`` and ``parents``.
``parents[i]`` is the index of node i's parent among the draft nodes, with -1
meaning the root, i.e. the last committed token (``VerifyRequest.root``).
Parents always come before children (``-1 <= parents[i] < i``), so one pass
in index order visits a parent before any of its children, and a tree mask can
be built without sorting. A plain chain of k tokens is
``parents = [-1, 0, 1, ..., k-2]``. ``VerifyResult.accepted`` lists the node
indices on the accepted path from the root down, so it is strictly increasing.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import ClassVar

__all__ = [
    "PROTOCOL_TAG", "PROTOCOL_VERSION", "HEADER",
    "MAX_FRAME_BYTES", "MAX_TOKENS", "MAX_TREE_NODES", "MAX_STRING", "MAX_FEATURE_DIMS", "MAX_BATCH_SHAPES",
    "MAX_TOP_LOGPROBS", "MAX_GRAMMAR_BYTES",
    "FEATURE_CODECS", "DEFAULT_FEATURE_CODEC", "FEATURE_DTYPES", "ROLES", "HEARTBEAT_ID_PREFIX", "SESSION_ID_PREFIX",
    "Feature", "Handshake", "OpenRequest", "Opened", "DraftRequest", "DraftProposal",
    "VerifyRequest", "VerifyResult", "Close", "Closed", "Heartbeat", "Error", "Shutdown", "Taken",
    "MESSAGE_TYPES",
]

PROTOCOL_TAG = b"DVTL"
PROTOCOL_VERSION = 8  # 2: Handshake.max_context; 3: Handshake.open_requests; 4: Handshake.batch_verify_us;
                      # 5: Taken, Handshake.kv_cells, OpenRequest's penalties, bias and logprobs, VerifyResult's logprobs
                      # 6: OpenRequest.grammar and stop_ids
                      # 7: OpenRequest.cache_scope, Opened.reused (the target's prefix cache)
                      # 8: Opened.root_ready (the first token costs no forward)
# tag (4 bytes), protocol version (uint16), message type code (uint8); big-endian.
HEADER = struct.Struct(">4sHB")

# Limits. They bound what a peer can make us allocate; see codec.decode.
MAX_FRAME_BYTES = 64 * 1024 * 1024  # default cap for one frame
MAX_TOKENS = 1 << 20                # longest token-id list (prompt, new_tokens, ...)
MAX_TREE_NODES = 1024               # most draft nodes in one tree
MAX_BATCH_SHAPES = 64               # most batch shapes a target's handshake reports the cost of
MAX_STRING = 4096                   # longest str field, in characters
MAX_GRAMMAR_BYTES = 1 << 20        # longest grammar text (a JSON schema, tool definitions) in OpenRequest
MAX_TOP_LOGPROBS = 20               # most alternatives per position OpenRequest.logprobs may ask for
MAX_FEATURE_DIMS = 4                # most dimensions of a Feature's shape

# Hidden-state feature codecs: "fp16" is near-lossless, "int8" halves the bytes
# with per-row scales (see features.py for the error bound).
FEATURE_CODECS = ("fp16", "int8")
DEFAULT_FEATURE_CODEC = "fp16"
# codec -> (dtype name of Feature.data, bytes per element)
FEATURE_DTYPES = {"fp16": ("float16", 2), "int8": ("int8", 1)}

ROLES = ("coordinator", "target", "draft")
# Routing ids of the coordinator's heartbeat sockets start with this: a worker answers their
# Heartbeats on its I/O thread, never queued behind a long compute (workers/serve.py).
HEARTBEAT_ID_PREFIX = b"dvt-hb:"
# A coordinator's request socket is SESSION_ID_PREFIX + S and its heartbeat socket
# HEARTBEAT_ID_PREFIX + S, with S random per client: a worker serving many clients
# (--sessions) counts a client's heartbeats as that client's session being alive.
SESSION_ID_PREFIX = b"dvt-s:"


@dataclass(slots=True)
class Feature:
    """A tensor of hidden states; a nested value inside messages, not a message.

    ``data`` holds prod(shape) elements of ``dtype`` in little-endian order.
    For the int8 codec, ``scales`` holds one little-endian float16 scale per
    row (rows = prod(shape[:-1])); for fp16 it is empty.
    """
    codec: str
    dtype: str
    shape: list[int]
    data: bytes
    scales: bytes = b""


@dataclass(slots=True)
class Handshake:
    """First message each way. The coordinator sends role="coordinator" with
    zeros/empty strings where it does not know a value; each worker answers
    with its own identity (role "target" or "draft")."""
    TYPE: ClassVar[int] = 1
    role: str
    vocab_size: int
    tokenizer_hash: str
    hidden_size: int
    dtype: str
    feature_codec: str
    model: str = ""
    device: str = ""
    pid: int = 0
    features: bool = False  # a draft that reads the target's hidden states says so
    # Target only: measured time to verify k = 1, 2, ... tokens at once, in microseconds
    # (the curve that sizes draft trees; empty when not measured).
    verify_us: list[int] = field(default_factory=list)
    # Target only: most positions one request may hold, prompt and output together (0: unknown).
    max_context: int = 0
    # Workers: requests open on this worker now, from every client (what /metrics reports).
    open_requests: int = 0
    # Target only: measured time of one forward verifying several requests at once, as flat
    # triples (requests, rows per request, microseconds); empty when not measured.
    batch_verify_us: list[int] = field(default_factory=list)
    # Target only: KV cells all open requests share (llama.cpp's context), which the
    # coordinator reserves for each request before it starts; 0: each request has its own.
    kv_cells: int = 0


@dataclass(slots=True)
class OpenRequest:
    """Start a request: prefill ``prompt`` into a fresh KV cache."""
    TYPE: ClassVar[int] = 2
    req_id: int
    prompt: list[int]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    features: bool = True  # return hidden states (Opened, VerifyResult) for a feature draft
    # Processing of the target's logits at every position (dovetail/spec/sampling.py), as OpenAI names it;
    # logit_bias travels as two parallel lists.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    bias_ids: list[int] = field(default_factory=list)
    bias_values: list[float] = field(default_factory=list)
    logprobs: int = -1  # -1: none; 0: each committed token's; k <= MAX_TOP_LOGPROBS: and the k most likely
    # Structured output: llguidance's grammar text (dovetail/spec/grammar.py grammar_text), UTF-8, empty for
    # none; the target masks every position with it. stop_ids: the ids that end the output, allowed where
    # the grammar is complete.
    grammar: bytes = b""
    stop_ids: list[int] = field(default_factory=list)
    # The target's prefix cache: a prompt may start from the cached KV of earlier requests with the same
    # scope only (the server: one per API key; prompt-cache timing is a side channel between tenants).
    cache_scope: str = ""


@dataclass(slots=True)
class Opened:
    """Prefill done; ``features`` are hidden states when the draft wants them."""
    TYPE: ClassVar[int] = 3
    req_id: int
    cache_len: int
    features: Feature | None = None
    seconds: float = 0.0
    reused: int = 0  # prompt positions taken from the prefix cache, not prefilled
    # The prompt's last token went in with the prefill: a first VerifyRequest with no tree is
    # answered from its logits, without a forward (send the draft's tree from the next token on).
    root_ready: bool = False


@dataclass(slots=True)
class DraftRequest:
    """Ask the draft for a tree. ``new_tokens`` were committed since the draft
    last saw this request, starting at position ``base_len``. ``min_prob`` > 0
    gates the tree: a node whose path probability under the draft is below it is
    neither grown nor proposed (the tree may then be empty)."""
    TYPE: ClassVar[int] = 4
    req_id: int
    step: int
    base_len: int
    new_tokens: list[int]
    depth: int
    top_k: int
    max_nodes: int
    guess_root: bool = False
    features: Feature | None = None
    min_prob: float = 0.0


@dataclass(slots=True)
class DraftProposal:
    """A draft tree (see the tree convention above). ``root_guess`` is the
    draft's guess of the next committed token when asked, else -1. ``scores``
    (parallel to ``tokens``, or empty) are the draft's path log-probabilities:
    the sum of its log-probabilities from the root down to each node, <= 0."""
    TYPE: ClassVar[int] = 5
    req_id: int
    step: int
    tokens: list[int]
    parents: list[int]
    root_guess: int = -1
    seconds: float = 0.0
    scores: list[float] = field(default_factory=list)


@dataclass(slots=True)
class VerifyRequest:
    """Ask the target to verify a tree hanging off ``root`` (last committed token)."""
    TYPE: ClassVar[int] = 6
    req_id: int
    step: int
    root: int
    tokens: list[int]
    parents: list[int]


@dataclass(slots=True)
class VerifyResult:
    """``accepted``: draft-node indices on the accepted path; ``tokens``: the
    accepted draft tokens followed by the target's own next token, so
    ``len(tokens) == len(accepted) + 1``."""
    TYPE: ClassVar[int] = 7
    req_id: int
    step: int
    accepted: list[int]
    tokens: list[int]
    cache_len: int
    features: Feature | None = None
    seconds: float = 0.0
    # When the request asked (OpenRequest.logprobs >= 0): the raw model's log-probability of each
    # of ``tokens``, and the k most likely at each position, flat (k per token, most likely first).
    logprobs: list[float] = field(default_factory=list)
    top_ids: list[int] = field(default_factory=list)
    top_logprobs: list[float] = field(default_factory=list)


@dataclass(slots=True)
class Close:
    TYPE: ClassVar[int] = 8
    req_id: int


@dataclass(slots=True)
class Closed:
    TYPE: ClassVar[int] = 9
    req_id: int


@dataclass(slots=True)
class Heartbeat:
    TYPE: ClassVar[int] = 10
    seq: int
    time: float


@dataclass(slots=True)
class Error:
    """A failure report; ``req_id`` is -1 when it is not about one request."""
    TYPE: ClassVar[int] = 11
    req_id: int
    code: str
    message: str


@dataclass(slots=True)
class Shutdown:
    TYPE: ClassVar[int] = 12


@dataclass(slots=True)
class Taken:
    """The target took up verification ``step`` of ``req_id`` only now, long after it arrived
    (other requests' prefill chunks and verifications ran first): the coordinator's
    verify_timeout_s counts from here. A verification taken up at once gets none."""
    TYPE: ClassVar[int] = 13
    req_id: int
    step: int


MESSAGE_TYPES: dict[int, type] = {
    cls.TYPE: cls
    for cls in (Handshake, OpenRequest, Opened, DraftRequest, DraftProposal, VerifyRequest,
                VerifyResult, Close, Closed, Heartbeat, Error, Shutdown, Taken)
}
assert len(MESSAGE_TYPES) == 13, "message type codes must be unique"
