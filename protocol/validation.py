"""Validation of Dovetail messages: field types from the dataclass annotations,
then per-message value rules (ranges, tree shape, token ids, feature sizes).

Used by the codec on both sides: ``decode`` on what a peer sent, ``encode`` on
what we are about to send, so a bug shows up where it was made.
"""
from __future__ import annotations

import math
import typing
from dataclasses import MISSING, fields

from .errors import InvalidField
from .messages import (
    FEATURE_CODECS, FEATURE_DTYPES, MAX_BATCH_SHAPES, MAX_FEATURE_DIMS, MAX_GRAMMAR_BYTES, MAX_STRING, MAX_TOKENS, MAX_TOP_LOGPROBS,
    MAX_TREE_NODES,
    MESSAGE_TYPES, ROLES, DraftProposal, DraftRequest, Error, Feature, Handshake, OpenRequest, Opened,
    VerifyRequest, VerifyResult,
)

__all__ = ["validate", "validate_feature"]


_INT64 = (-(1 << 63), 1 << 63)  # what msgpack can carry for signed fields


def _kind(hint) -> str:
    for kind, h in (("int", int), ("float", float), ("str", str), ("bool", bool),
                    ("bytes", bytes), ("ints", list[int]), ("floats", list[float]),
                    ("feature", Feature | None)):
        if hint == h:
            return kind
    raise TypeError(f"unsupported field annotation {hint!r}")


def _schema(cls) -> tuple[tuple[str, str, bool], ...]:
    """(name, kind, required) per field, derived once from the dataclass."""
    hints = typing.get_type_hints(cls)
    return tuple((f.name, _kind(hints[f.name]), f.default is MISSING and f.default_factory is MISSING)
                 for f in fields(cls))


_SCHEMAS = {cls: _schema(cls) for cls in (*MESSAGE_TYPES.values(), Feature)}


def _tname(v) -> str:
    t = type(v)
    return t.__name__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"


def _check_types(obj, where: str, prefix: str = "") -> None:
    """Type checks from the schema. bool is not an int, float fields accept ints."""
    for name, kind, _ in _SCHEMAS[type(obj)]:
        v = getattr(obj, name)
        bad = lambda problem: InvalidField(where, prefix + name, problem)  # noqa: E731
        if kind == "int":
            if type(v) is not int:
                raise bad(f"must be an int, got {_tname(v)}")
            if not _INT64[0] <= v < _INT64[1]:
                raise bad(f"= {v} does not fit in 64 bits")
        elif kind == "float":
            if type(v) not in (int, float):
                raise bad(f"must be a number, got {_tname(v)}")
            if not math.isfinite(v):
                raise bad(f"must be finite, got {v}")
        elif kind == "str":
            if type(v) is not str:
                raise bad(f"must be a str, got {_tname(v)}")
            if len(v) > MAX_STRING:
                raise bad(f"is {len(v)} characters long, more than MAX_STRING={MAX_STRING}")
        elif kind == "bool" and type(v) is not bool:
            raise bad(f"must be a bool, got {_tname(v)}")
        elif kind == "bytes" and type(v) is not bytes:
            raise bad(f"must be bytes, got {_tname(v)}")
        elif kind == "ints":
            if type(v) not in (list, tuple):
                raise bad(f"must be a list of ints, got {_tname(v)}")
            if len(v) > MAX_TOKENS:
                raise bad(f"has {len(v)} items, more than MAX_TOKENS={MAX_TOKENS}")
            if not all(type(x) is int for x in v):
                i = next(i for i, x in enumerate(v) if type(x) is not int)
                raise InvalidField(where, f"{prefix}{name}[{i}]",
                                   f"must be an int, got {_tname(v[i])}")
            if v and (min(v) < _INT64[0] or max(v) >= _INT64[1]):
                raise bad("holds a value that does not fit in 64 bits")
        elif kind == "floats":
            if type(v) not in (list, tuple):
                raise bad(f"must be a list of numbers, got {_tname(v)}")
            if len(v) > MAX_TOKENS:
                raise bad(f"has {len(v)} items, more than MAX_TOKENS={MAX_TOKENS}")
            for i, x in enumerate(v):
                if type(x) not in (int, float) or not math.isfinite(x):
                    raise InvalidField(where, f"{prefix}{name}[{i}]", f"must be a finite number, got {x!r}")
        elif kind == "feature" and v is not None:
            if type(v) is not Feature:
                raise bad(f"must be a Feature or None, got {_tname(v)}")
            validate_feature(v, where, prefix=f"{prefix}{name}.")


def _at_least(msg, where: str, low, *names: str) -> None:
    for name in names:
        v = getattr(msg, name)
        if v < low:
            raise InvalidField(where, name, f"must be >= {low}, got {v}")


def _token_ids(where: str, name: str, ids, vocab_size: int | None, scalar=False) -> None:
    """Token ids are >= 0 always, and < vocab_size when the vocabulary is known."""
    if not ids:
        return
    if min(ids) < 0 or (vocab_size is not None and max(ids) >= vocab_size):
        i, v = next((i, v) for i, v in enumerate(ids)
                    if v < 0 or (vocab_size is not None and v >= vocab_size))
        valid = f"in [0, {vocab_size})" if vocab_size is not None else ">= 0"
        raise InvalidField(where, name if scalar else f"{name}[{i}]",
                           f"= {v} is not a token id (token ids are {valid})")


def _tree(where: str, msg, vocab_size: int | None) -> None:
    tokens, parents = msg.tokens, msg.parents
    if len(tokens) > MAX_TREE_NODES:
        raise InvalidField(where, "tokens", f"has {len(tokens)} nodes, more than "
                           f"MAX_TREE_NODES={MAX_TREE_NODES}")
    if len(parents) != len(tokens):
        raise InvalidField(where, "parents", f"has {len(parents)} entries but tokens has "
                           f"{len(tokens)}; they must be parallel lists")
    for i, p in enumerate(parents):
        if not -1 <= p < i:
            raise InvalidField(where, f"parents[{i}]", f"= {p} must be in [-1, {i}) "
                               "(-1 is the root; parents come before children)")
    _token_ids(where, "tokens", tokens, vocab_size)


def validate_feature(f: Feature, where: str = "Feature", prefix: str = "") -> None:
    """Check a Feature's shape, codec and byte lengths against each other."""
    _check_types(f, where, prefix)
    bad = lambda name, problem: InvalidField(where, prefix + name, problem)  # noqa: E731
    if f.codec not in FEATURE_CODECS:
        raise bad("codec", f"must be one of {FEATURE_CODECS}, got {f.codec!r}")
    dtype, itemsize = FEATURE_DTYPES[f.codec]
    if f.dtype != dtype:
        raise bad("dtype", f"must be {dtype!r} for codec {f.codec!r}, got {f.dtype!r}")
    if not 1 <= len(f.shape) <= MAX_FEATURE_DIMS:
        raise bad("shape", f"must have 1 to {MAX_FEATURE_DIMS} dimensions, got {len(f.shape)}")
    if min(f.shape) < 0:
        raise bad("shape", f"has a negative dimension: {list(f.shape)}")
    rows = math.prod(f.shape[:-1])
    expected = rows * f.shape[-1] * itemsize
    if len(f.data) != expected:
        raise bad("data", f"has {len(f.data)} bytes, shape {list(f.shape)} of {dtype} "
                  f"needs {expected}")
    want_scales = rows * 2 if f.codec == "int8" else 0  # one float16 per row for int8
    if len(f.scales) != want_scales:
        raise bad("scales", f"has {len(f.scales)} bytes, codec {f.codec!r} with {rows} rows "
                  f"needs {want_scales}")


def validate(msg, *, vocab_size: int | None = None) -> None:
    """Raise InvalidField unless ``msg`` is a well-formed message."""
    where = type(msg).__name__
    _check_types(msg, where)
    if isinstance(msg, Handshake):
        if msg.role not in ROLES:
            raise InvalidField(where, "role", f"must be one of {ROLES}, got {msg.role!r}")
        if msg.feature_codec not in ("", *FEATURE_CODECS):
            raise InvalidField(where, "feature_codec",
                               f"must be one of {FEATURE_CODECS}, got {msg.feature_codec!r}")
        _at_least(msg, where, 0, "vocab_size", "hidden_size", "pid", "max_context", "open_requests", "kv_cells")
        if len(msg.verify_us) > MAX_TREE_NODES + 1 or any(t < 0 for t in msg.verify_us):
            raise InvalidField(where, "verify_us", f"must hold at most {MAX_TREE_NODES + 1} "
                               "non-negative microsecond figures")
        b = msg.batch_verify_us
        if len(b) % 3 or len(b) > 3 * MAX_BATCH_SHAPES or any(t < 0 for t in b) or any(
                n < 1 for n in b[0::3] + b[1::3]):
            raise InvalidField(where, "batch_verify_us", f"must be at most {MAX_BATCH_SHAPES} triples (requests >= 1, "
                               "rows per request >= 1, microseconds >= 0)")
        return
    if isinstance(msg, Error):
        _at_least(msg, where, -1, "req_id")  # -1: not about one request
        return
    _at_least(msg, where, 0, *(n for n in ("req_id", "step", "seq", "cache_len", "base_len",
                                           "depth", "top_k", "max_nodes", "seed", "seconds", "reused")
                               if hasattr(msg, n)))
    if isinstance(msg, OpenRequest):
        if not msg.prompt:
            raise InvalidField(where, "prompt", "must hold at least one token")
        _token_ids(where, "prompt", msg.prompt, vocab_size)
        if msg.temperature < 0:
            raise InvalidField(where, "temperature", f"must be >= 0, got {msg.temperature}")
        if not 0 < msg.top_p <= 1:
            raise InvalidField(where, "top_p", f"must be in (0, 1], got {msg.top_p}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(msg, name) <= 2.0:
                raise InvalidField(where, name, f"must be in [-2, 2], got {getattr(msg, name)}")
        if not 0 < msg.repetition_penalty <= 10:
            raise InvalidField(where, "repetition_penalty", f"must be in (0, 10], got {msg.repetition_penalty}")
        if len(msg.bias_ids) != len(msg.bias_values) or len(set(msg.bias_ids)) != len(msg.bias_ids):
            raise InvalidField(where, "bias_ids", "must be distinct token ids, one per bias_values entry")
        _token_ids(where, "bias_ids", msg.bias_ids, vocab_size)
        if any(not -100 <= v <= 100 for v in msg.bias_values):
            raise InvalidField(where, "bias_values", "must be in [-100, 100]")
        if not -1 <= msg.logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidField(where, "logprobs", f"must be in [-1, {MAX_TOP_LOGPROBS}], got {msg.logprobs}")
        if len(msg.grammar) > MAX_GRAMMAR_BYTES:
            raise InvalidField(where, "grammar", f"is {len(msg.grammar)} bytes, more than MAX_GRAMMAR_BYTES="
                                                 f"{MAX_GRAMMAR_BYTES}")
        _token_ids(where, "stop_ids", msg.stop_ids, vocab_size)
        if msg.grammar and not msg.stop_ids:
            raise InvalidField(where, "stop_ids", "a grammar needs at least one stop id to end the output")
    elif isinstance(msg, Opened):
        if msg.reused > msg.cache_len:
            raise InvalidField(where, "reused", f"= {msg.reused}, more than the {msg.cache_len} positions held")
    elif isinstance(msg, DraftRequest):
        if msg.max_nodes > MAX_TREE_NODES:
            raise InvalidField(where, "max_nodes", f"= {msg.max_nodes} exceeds "
                               f"MAX_TREE_NODES={MAX_TREE_NODES}")
        _token_ids(where, "new_tokens", msg.new_tokens, vocab_size)
        if not 0.0 <= msg.min_prob < 1.0:
            raise InvalidField(where, "min_prob", f"must be in [0, 1), got {msg.min_prob}")
    elif isinstance(msg, DraftProposal):
        _tree(where, msg, vocab_size)
        if msg.scores and len(msg.scores) != len(msg.tokens):
            raise InvalidField(where, "scores", f"has {len(msg.scores)} entries but tokens has "
                               f"{len(msg.tokens)}; send one per node or none")
        if any(s > 0 for s in msg.scores):
            raise InvalidField(where, "scores", "are log-probabilities: every one must be <= 0")
        if msg.root_guess != -1:
            _token_ids(where, "root_guess", [msg.root_guess], vocab_size, scalar=True)
    elif isinstance(msg, VerifyRequest):
        _token_ids(where, "root", [msg.root], vocab_size, scalar=True)
        _tree(where, msg, vocab_size)
    elif isinstance(msg, VerifyResult):
        acc = msg.accepted
        if len(acc) > MAX_TREE_NODES:
            raise InvalidField(where, "accepted", f"has {len(acc)} nodes, more than "
                               f"MAX_TREE_NODES={MAX_TREE_NODES}")
        for i, a in enumerate(acc):  # a root-to-leaf path visits increasing indices
            if not (0 <= a < MAX_TREE_NODES and (i == 0 or a > acc[i - 1])):
                raise InvalidField(where, f"accepted[{i}]", f"= {a}: accepted must be "
                                   "increasing draft-node indices in [0, MAX_TREE_NODES)")
        if len(msg.tokens) != len(acc) + 1:
            raise InvalidField(where, "tokens", f"has {len(msg.tokens)} items but accepted has "
                               f"{len(acc)}; tokens must be the accepted tokens plus one")
        _token_ids(where, "tokens", msg.tokens, vocab_size)
        n = len(msg.tokens)
        if msg.logprobs and len(msg.logprobs) != n:
            raise InvalidField(where, "logprobs", f"has {len(msg.logprobs)} items for {n} tokens")
        if len(msg.top_ids) != len(msg.top_logprobs) or len(msg.top_ids) % n or len(msg.top_ids) > n * MAX_TOP_LOGPROBS:
            raise InvalidField(where, "top_ids", f"must hold k <= {MAX_TOP_LOGPROBS} ids per token, as top_logprobs")
        _token_ids(where, "top_ids", msg.top_ids, vocab_size)
        if any(v > 0 for v in msg.logprobs) or any(v > 0 for v in msg.top_logprobs):
            raise InvalidField(where, "logprobs", "log-probabilities must be <= 0")
