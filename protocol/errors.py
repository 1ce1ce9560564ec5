"""Exceptions raised by the Dovetail wire protocol.

All of them derive from ``ProtocolError`` (itself a ``ValueError``), so a
receive loop can catch one class, log ``str(exc)`` for humans and switch on
``exc.code`` (a short, stable machine string) to decide what to do.
"""
from __future__ import annotations

__all__ = [
    "ProtocolError", "WrongVersion", "FrameTooLarge", "MalformedFrame",
    "InvalidField", "HandshakeMismatch",
]


class ProtocolError(ValueError):
    """A frame or message that breaks the protocol.

    ``code`` is one of: "bad_header", "wrong_version", "oversize", "malformed",
    "bad_field", "unknown_type", "handshake_mismatch".
    """
    code: str = "protocol"

    def __init__(self, message: str, *, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class WrongVersion(ProtocolError):
    code = "wrong_version"

    def __init__(self, peer_version: int, version: int):
        super().__init__(f"peer speaks Dovetail protocol version {peer_version}, "
                         f"this side speaks version {version}")
        self.peer_version = peer_version
        self.version = version


class FrameTooLarge(ProtocolError):
    code = "oversize"


class MalformedFrame(ProtocolError):
    """Bad framing, header or msgpack body; ``code`` may be "bad_header",
    "unknown_type" or "malformed"."""
    code = "malformed"


class InvalidField(ProtocolError):
    """A well-formed message whose field has the wrong type or value."""
    code = "bad_field"

    def __init__(self, message_type: str, field: str, problem: str):
        super().__init__(f"{message_type}.{field} {problem}")
        self.message_type = message_type
        self.field = field


class HandshakeMismatch(ProtocolError):
    code = "handshake_mismatch"
