"""Every error leaves as OpenAI's envelope: {"error": {"message", "type", "param", "code"}}."""
from __future__ import annotations

import json


class APIError(Exception):
    """An error with its HTTP status; ``headers`` go out with it (Retry-After on 503)."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def sse(self) -> bytes:
        """The error as a server-sent event: a stream that has started cannot change its status."""
        return f"data: {json.dumps(self.body())}\n\n".encode()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


def unsupported(param: str, why: str) -> APIError:
    return APIError(400, f"'{param}' is not supported: {why}", "invalid_request_error", param, "unsupported_parameter")
