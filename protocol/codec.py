"""Encode/decode Dovetail messages to/from ZeroMQ frames.

``decode`` treats its input as hostile: it only ever raises ``ProtocolError``
subclasses, and it bounds what msgpack may allocate before unpacking.
``encode`` runs the same checks (minus the vocabulary) so a buggy sender fails
loudly at the source rather than confusing the peer.
"""
from __future__ import annotations

import msgpack

from .errors import (
    FrameTooLarge, HandshakeMismatch, InvalidField, MalformedFrame, ProtocolError, WrongVersion,
)
from .messages import (
    HEADER, MAX_FRAME_BYTES, MAX_STRING, MAX_TOKENS, MESSAGE_TYPES, PROTOCOL_TAG,
    PROTOCOL_VERSION, Feature, Handshake,
)
from .validation import _SCHEMAS, _tname, validate

__all__ = ["encode", "decode", "configure_socket", "check_compatible"]


def encode(msg) -> list[bytes]:
    """Return the two frames [header, msgpack body] for a message."""
    cls = type(msg)
    if MESSAGE_TYPES.get(getattr(cls, "TYPE", None)) is not cls:
        raise TypeError(f"cannot encode {_tname(msg)}: not a Dovetail message")
    validate(msg)
    body = {}
    for name, kind, _ in _SCHEMAS[cls]:
        v = getattr(msg, name)
        if kind == "feature" and v is not None:
            v = {n: getattr(v, n) for n, _, _ in _SCHEMAS[Feature]}
        body[name] = v
    return [HEADER.pack(PROTOCOL_TAG, PROTOCOL_VERSION, cls.TYPE),
            msgpack.packb(body, use_bin_type=True)]


def _refuse_ext(code, data):
    # Raised inside unpackb; decode wraps it into a MalformedFrame naming the message.
    raise ValueError(f"msgpack extension type {code} is not allowed")


def _from_map(cls, obj, where: str, prefix: str = ""):
    """Build a dataclass from a decoded msgpack map, checking field names."""
    if not isinstance(obj, dict):
        if prefix:
            raise InvalidField(where, prefix.rstrip("."),
                               f"must be a map or nil, got {_tname(obj)}")
        raise MalformedFrame(f"{where} body must be a msgpack map, got {_tname(obj)}")
    schema = _SCHEMAS[cls]
    names = {n for n, _, _ in schema}
    for key in obj:
        if key not in names:
            raise InvalidField(where, prefix + str(key), f"is not a field of {cls.__name__}")
    kwargs = {}
    for name, kind, required in schema:
        if name not in obj:
            if required:
                raise InvalidField(where, prefix + name, "is missing")
            continue
        v = obj[name]
        if kind == "float" and type(v) is int:
            v = float(v)
        elif kind == "floats" and isinstance(v, list):
            v = [float(x) if type(x) is int else x for x in v]
        elif kind == "feature" and v is not None:
            v = _from_map(Feature, v, where, f"{prefix}{name}.")
        kwargs[name] = v
    return cls(**kwargs)


def decode(frames, *, max_bytes: int = MAX_FRAME_BYTES, vocab_size: int | None = None):
    """Parse [header, body] frames into a message; raise ProtocolError on anything bad."""
    try:
        views = [memoryview(f) for f in frames]
    except TypeError as e:
        raise MalformedFrame(f"frames must be a list of bytes-like objects ({e})") from e
    if len(views) != 2:
        raise MalformedFrame(f"expected 2 frames (header, body), got {len(views)}")
    for label, view in zip(("header", "body"), views):
        if view.nbytes > max_bytes:  # before unpacking anything
            raise FrameTooLarge(f"{label} frame is {view.nbytes} bytes, over the limit of "
                                f"{max_bytes}")
    header, body = views
    if header.nbytes != HEADER.size:
        raise MalformedFrame(f"header frame is {header.nbytes} bytes, expected {HEADER.size}",
                             code="bad_header")
    tag, version, type_code = HEADER.unpack(header)
    if tag != PROTOCOL_TAG:
        raise MalformedFrame(f"not a Dovetail frame: tag {tag!r}, expected {PROTOCOL_TAG!r}",
                             code="bad_header")
    if version != PROTOCOL_VERSION:
        raise WrongVersion(version, PROTOCOL_VERSION)
    cls = MESSAGE_TYPES.get(type_code)
    if cls is None:
        raise MalformedFrame(f"unknown message type code {type_code}", code="unknown_type")
    name = cls.__name__
    try:
        # Limits keep a hostile body from making msgpack allocate much: arrays
        # stop just past MAX_TOKENS (so validation can name the field), strings
        # just past MAX_STRING characters of UTF-8, maps at a few dozen fields.
        obj = msgpack.unpackb(
            body, raw=False, strict_map_key=True, ext_hook=_refuse_ext, use_list=True,
            max_bin_len=max_bytes, max_str_len=min(max_bytes, 4 * MAX_STRING + 4),
            max_array_len=min(max_bytes, MAX_TOKENS + 1), max_map_len=min(max_bytes, 64),
            max_ext_len=max_bytes)
    except Exception as e:  # truncated, extra data, too deep, over a limit, bad UTF-8...
        detail = "nested too deeply" if isinstance(e, msgpack.StackError) else e
        raise MalformedFrame(f"{name} body is not valid msgpack: {type(e).__name__}: "
                             f"{detail}") from e
    try:
        msg = _from_map(cls, obj, name)
        validate(msg, vocab_size=vocab_size)
    except ProtocolError:
        raise
    except Exception as e:  # anything unforeseen is still the peer's fault, not ours
        raise MalformedFrame(f"{name} body is malformed: {type(e).__name__}: {e}") from e
    return msg


def configure_socket(sock, max_bytes: int = MAX_FRAME_BYTES) -> None:
    """Make libzmq drop any frame over ``max_bytes`` (it disconnects that peer)
    before it is buffered, and not block close() on unsent messages.

    libzmq enforces MAXMSGSIZE only in its stream decoder, i.e. on tcp:// and
    ipc:// connections; inproc:// bypasses it, which decode's own check covers.
    """
    import zmq  # lazily: the message definitions are usable without pyzmq
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    sock.setsockopt(zmq.LINGER, 0)


def _describe(role: str, hs: Handshake) -> str:
    h = hs.tokenizer_hash
    h = h[:8] + "…" if len(h) > 8 else h or "?"
    return f"{role} {hs.model or '(unnamed)'!r} has vocab {hs.vocab_size} (tokenizer {h})"


def check_compatible(target: Handshake, draft: Handshake) -> None:
    """Refuse a target/draft pair that cannot share token ids or features."""
    if target.vocab_size != draft.vocab_size or target.tokenizer_hash != draft.tokenizer_hash:
        raise HandshakeMismatch(f"{_describe('target', target)} but {_describe('draft', draft)}"
                                "; a draft must share the target's tokenizer")
    if target.feature_codec != draft.feature_codec:
        raise HandshakeMismatch(
            f"target {target.model or '(unnamed)'!r} uses feature codec "
            f"{target.feature_codec!r} but draft {draft.model or '(unnamed)'!r} uses "
            f"{draft.feature_codec!r}; both workers must use the same feature codec")
    if draft.features and draft.hidden_size != target.hidden_size:
        raise HandshakeMismatch(
            f"draft {draft.model or '(unnamed)'!r} reads hidden states of size {draft.hidden_size} but "
            f"target {target.model or '(unnamed)'!r} has hidden size {target.hidden_size}")
