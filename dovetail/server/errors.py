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


def too_large(limit_bytes: int) -> APIError:
    return APIError(413, f"the request body is larger than this server's limit of {limit_bytes / (1 << 20):g} MB "
                         "(--max-body-mb)", "invalid_request_error", code="request_too_large")


def unsupported_media_type(given: str) -> APIError:
    return APIError(415, f"the body must be sent as Content-Type: application/json, got {given or 'none'!r}",
                    "invalid_request_error", code="unsupported_media_type")


def host_not_allowed(host: str) -> APIError:
    """421: a Host this server does not answer to, which is what a DNS-rebinding page sends."""
    return APIError(421, f"this server does not answer to the host {host!r}: if it is yours, start the server "
                         "with --allowed-host NAME", "invalid_request_error", code="host_not_allowed")


def client_gone() -> APIError:
    return APIError(499, "the client disconnected", "client_closed_request")
