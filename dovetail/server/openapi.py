"""GET /openapi.json: the server's OpenAPI 3.1 document, built from the pydantic models.

The request bodies are schema.py's own models (what the server validates with), so the
document cannot drift from them. The responses are described by the models below, which
mirror the dicts app.py builds; tests/dovetail/server/test_openapi.py runs schemathesis
against a live server to hold the two together (no 500s, every response as documented).

OpenAPI 3.1 schemas are JSON Schema 2020-12, which is what pydantic writes: its ``$defs``
move to ``components/schemas`` and every ``$ref`` points there (``REF``).

A streamed response (``"stream": true``) is ``text/event-stream``. Its schema describes one
event, as OpenAPI 3.1 tools read it (and 3.2's ``itemSchema`` makes explicit): ``data`` is
either ``[DONE]`` (the last event) or a JSON chunk, or the error envelope when a stream that
has already started fails (its status line has gone out).
"""
from __future__ import annotations

import copy
import functools
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from dovetail.server.schema import IGNORED, MAX_STOP, REFUSED, ChatRequest, CompletionRequest

REF = "#/components/schemas/{model}"
FinishReason = Literal["stop", "length", "tool_calls"]  # tool_calls: chat, once the model called a tool
TextFinishReason = Literal["stop", "length"]


def _absent_not_null(schema: dict) -> None:
    """For a field that is left out, never sent as null: no ``default: null`` in its schema."""
    schema.pop("default", None)


class _Strict(BaseModel):
    """Responses: every field the server sends is documented, so no other may appear."""
    model_config = ConfigDict(extra="forbid")


# ---- errors ------------------------------------------------------------------------------------
class ErrorDetail(_Strict):
    message: str
    type: str = Field(description="invalid_request_error, authentication_error, service_unavailable, "
                                  "server_busy, timeout, client_closed_request, ...")
    param: Optional[str] = Field(description="the request field at fault, when one is")
    code: Optional[str] = Field(description="a stable code: unsupported_parameter, unknown_parameter, "
                                            "model_not_found, context_length_exceeded, invalid_api_key, "
                                            "queue_full, not_ready, request_timeout, ...")


class ErrorResponse(_Strict):
    """OpenAI's error envelope: every refusal and failure, whatever its status."""
    error: ErrorDetail


# ---- completions -------------------------------------------------------------------------------
class PromptTokensDetails(_Strict):
    cached_tokens: int = Field(ge=0, description="prompt tokens taken from the target's prefix cache, not prefilled")


class Usage(_Strict):
    prompt_tokens: int = Field(ge=0)
    completion_tokens: int = Field(ge=0)
    total_tokens: int = Field(ge=0)
    prompt_tokens_details: PromptTokensDetails


class DovetailStats(_Strict):
    """How speculation went for this request (not an OpenAI field)."""
    rounds: int = Field(ge=0, description="verifications by the target")
    drafted: int = Field(ge=0, description="draft tokens sent for verification")
    accepted: int = Field(ge=0, description="draft tokens the target accepted")
    mean_accepted_length: float = Field(ge=0, description="tokens committed per verification round "
                                                          "(the prefill's first token is not one)")
    draft_seconds: float = Field(ge=0)
    verify_seconds: float = Field(ge=0)
    wire_seconds: float = Field(ge=0)
    draft_fallback: bool = Field(description="the draft failed and the request ran target-only")
    cached_tokens: int = Field(ge=0, description="prompt tokens taken from the target's prefix cache (per API key)")
    prefill_seconds: float = Field(ge=0, description="seconds the target prefilled the prompt (past a cached prefix)")


class TopLogprob(_Strict):
    token: str
    logprob: float = Field(le=0)
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(max_length=20, description="most likely first")


class ChatLogprobs(_Strict):
    """The target's own log-probabilities (the raw model's, before penalties, temperature and top_p)."""
    content: list[TokenLogprob]
    refusal: None


class TextLogprobs(_Strict):
    """The legacy completions' shape: parallel lists, one entry per token."""
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class ResponseFunction(_Strict):
    name: str
    arguments: str = Field(description="the arguments as JSON text (an object)")


class MessageToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: ResponseFunction


class AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: Optional[str] = Field(description="null when the answer is only tool calls")
    tool_calls: list[MessageToolCall] = Field(None, min_length=1, json_schema_extra=_absent_not_null,
                                              description="the calls the model made, when it was given tools")


class ChatChoice(_Strict):
    index: int = Field(ge=0)
    message: AssistantMessage
    logprobs: Optional[ChatLogprobs]
    finish_reason: FinishReason


class ChatCompletion(_Strict):
    id: str = Field(pattern="^chatcmpl-")
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice] = Field(min_length=1, max_length=1)
    usage: Usage
    dovetail: DovetailStats


class TextChoice(_Strict):
    index: int = Field(ge=0)
    text: str
    logprobs: Optional[TextLogprobs]
    finish_reason: TextFinishReason


class TextCompletion(_Strict):
    id: str = Field(pattern="^cmpl-")
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChoice] = Field(min_length=1, max_length=1)
    usage: Usage
    dovetail: DovetailStats


class FunctionDelta(_Strict):
    name: str = Field(None, json_schema_extra=_absent_not_null)  # in a call's first delta
    arguments: str = Field(None, json_schema_extra=_absent_not_null)


class ToolCallDelta(_Strict):
    """A streamed call: its first delta has the id, type and name (arguments ""), the next one
    all its arguments; a call is streamed once it is complete."""
    index: int = Field(ge=0)
    id: str = Field(None, json_schema_extra=_absent_not_null)
    type: Literal["function"] = Field(None, json_schema_extra=_absent_not_null)
    function: FunctionDelta


class ChatDelta(_Strict):
    role: Literal["assistant"] = Field(None, json_schema_extra=_absent_not_null)  # the first chunk only
    content: str = Field(None, json_schema_extra=_absent_not_null)
    tool_calls: list[ToolCallDelta] = Field(None, min_length=1, max_length=1, json_schema_extra=_absent_not_null)


class ChatChunkChoice(_Strict):
    index: int = Field(ge=0)
    delta: ChatDelta
    logprobs: Optional[ChatLogprobs]
    finish_reason: Optional[FinishReason]


class ChatCompletionChunk(_Strict):
    """One event of a streamed chat completion. Exactly one chunk has a finish_reason, and it
    carries ``dovetail``; with stream_options.include_usage a last chunk has no choices and the usage."""
    id: str = Field(pattern="^chatcmpl-")
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice] = Field(max_length=1)
    usage: Usage = Field(None, json_schema_extra=_absent_not_null)
    dovetail: DovetailStats = Field(None, json_schema_extra=_absent_not_null)


class TextChunkChoice(_Strict):
    index: int = Field(ge=0)
    text: str
    logprobs: Optional[TextLogprobs]
    finish_reason: Optional[TextFinishReason]


class TextCompletionChunk(_Strict):
    """One event of a streamed text completion (OpenAI names it ``text_completion`` too)."""
    id: str = Field(pattern="^cmpl-")
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[TextChunkChoice] = Field(max_length=1)
    usage: Usage = Field(None, json_schema_extra=_absent_not_null)
    dovetail: DovetailStats = Field(None, json_schema_extra=_absent_not_null)


# ---- models and health -------------------------------------------------------------------------
class WorkerMeta(_Strict):
    model: str
    dtype: str
    device: str


class ModelMeta(_Strict):
    target: WorkerMeta
    draft: Optional[WorkerMeta] = Field(description="null when the server runs target-only")


class ModelCard(_Strict):
    id: str = Field(description="the name to send as `model`")
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: Optional[int] = Field(description="prompt and completion together, in tokens; null: unknown")
    meta: ModelMeta


class ModelList(_Strict):
    object: Literal["list"]
    data: list[ModelCard] = Field(min_length=1, max_length=1)


class Health(BaseModel):
    """200 when requests can be served (a dead draft only degrades: target-only, still lossless),
    503 while loading, after a failed start or with the target worker down. The status alone,
    unless ``detail`` asks for more (with the key)."""
    status: str = Field(description="ok, degraded, loading, failed, ...")


RESPONSE_MODELS = (ErrorResponse, ChatCompletion, TextCompletion, ChatCompletionChunk, TextCompletionChunk,
                   ModelList, Health)


# ---- the request bodies: schema.py's models, plus what they accept beyond their fields ---------
def _refused_schema(harmless: Any, why: str) -> dict:
    """A field the server refuses unless it is null or has the value that changes nothing; a
    harmless value that is empty stands for every empty one (false, 0, "", [], {})."""
    if harmless:
        accepted = [{"const": harmless}]
    else:
        accepted = [{"const": False}, {"const": 0}, {"const": ""}, {"type": "array", "maxItems": 0},
                    {"type": "object", "maxProperties": 0}]
    return {"anyOf": [*accepted, {"type": "null"}], "description": f"accepted only as {harmless!r}: {why}"}


def _request_schema(model: type[BaseModel], defs: dict) -> dict:
    schema = model.model_json_schema(ref_template=REF)
    _merge_defs(defs, schema.pop("$defs", {}))
    props = schema["properties"]
    if "model" in props:
        props["model"]["description"] = "the served model's id (GET /v1/models); any other gets 404"
    # schema.py refuses every field it does not know (check_extras): document the exceptions,
    # and none other.
    for name in sorted(IGNORED):
        props.setdefault(name, {"description": "accepted and ignored: it changes nothing about the output"})
    for name, (harmless, why) in REFUSED.items():
        props.setdefault(name, _refused_schema(harmless, why))
    schema["additionalProperties"] = False
    _checked_after_parsing(props)
    return schema


def _branches(prop: dict) -> list[dict]:
    return prop.get("anyOf", [prop])


def _nonempty(schema: dict) -> None:
    if schema.get("type") == "string":
        schema["minLength"] = 1
    elif schema.get("type") == "array":
        schema["minItems"] = 1
        if isinstance(schema.get("items"), dict):
            _nonempty(schema["items"])


def _checked_after_parsing(props: dict) -> None:
    """What schema.py refuses beyond its field types (sampling(), completion_prompt()), so that
    a client reading the document, or a fuzzer, knows it before a 400 says it."""
    for branch in _branches(props.get("stop", {})):
        if branch.get("type") == "array":  # [] is no stop string
            branch["maxItems"] = MAX_STOP
            branch = branch.get("items", {})
        if branch.get("type") == "string":
            branch["minLength"] = 1  # an empty stop string would stop everywhere
    for branch in _branches(props.get("prompt", {})):
        _nonempty(branch)
        items = branch.get("items") if branch.get("type") == "array" else None
        if isinstance(items, dict) and items.get("type") in ("string", "array"):
            branch["maxItems"] = 1  # one prompt per request: a batch is refused like n > 1
        for ids in (items, items.get("items") if isinstance(items, dict) else None):
            if isinstance(ids, dict) and ids.get("type") == "integer":
                ids["minimum"] = 0  # token ids; past the vocabulary is refused too
    if "stream_options" in props:
        props["stream_options"]["description"] = "only with \"stream\": true"
    for name, text in CONSTRAINED.items():
        if name in props:
            props[name]["description"] = text


ONE_CONSTRAINT = ("at most one of response_format (json), grammar, regex and a forced tool call; a bad schema, "
                  "grammar or regex is a 400 naming it")
CONSTRAINED = {
    "response_format": "json_object or json_schema: the target masks its distribution with the grammar at every "
                       "position (exact, with or without the draft); " + ONE_CONSTRAINT,
    "grammar": "an extension: the output follows this grammar, Lark (llguidance's) or llama.cpp's GBNF; "
               + ONE_CONSTRAINT,
    "regex": "an extension: the whole output matches this regex (Rust syntax); " + ONE_CONSTRAINT,
    "tools": "functions the model may call, shown to it through its chat template (a template that renders no "
             "tools, or writes calls in a format not parsed here, is a 400); its calls come back as "
             "message.tool_calls with finish_reason tool_calls",
    "tool_choice": "auto (default with tools): the model decides, its calls are parsed; none: the tools are not "
                   "shown; required or a named function: a grammar forces the call",
}


def _merge_defs(into: dict, defs: dict) -> None:
    for name, schema in defs.items():
        if name in into and into[name] != schema:
            raise ValueError(f"two different schemas are both named {name!r}")
        into[name] = schema


# ---- the document ------------------------------------------------------------------------------
def _ref(name: str) -> dict:
    return {"$ref": REF.format(model=name)}


ERROR_CODES = {
    400: "The request is invalid (the message and `param` say why), or it does "
         "not fit the model's context (`context_length_exceeded`).",
    401: "A valid API key is required: `Authorization: Bearer KEY` (when the server has keys).",
    404: "The model is not the one this server serves (`model_not_found`).",
    413: "The request body is larger than the server's limit.",
    415: "The body is not sent as `Content-Type: application/json`.",
    421: "The request's Host is not one this server answers to.",
    499: "The client disconnected before the response (logged; the client never sees it).",
    503: "The server is loading, or at capacity: retry after `Retry-After` seconds.",
    504: "The request ran past --request-timeout.",
}


def _error(status: int, description: str | None = None) -> dict:
    out = {"description": description or ERROR_CODES[status],
           "content": {"application/json": {"schema": _ref("ErrorResponse")}}}
    if status == 503:
        out["headers"] = {"Retry-After": {"description": "seconds to wait before retrying",
                                          "schema": {"type": "integer", "minimum": 0}}}
    return out


def _event_stream(chunk: str) -> dict:
    """One server-sent event of a stream: a JSON ``chunk`` (or the error envelope), or [DONE]."""
    return {"schema": {
        "type": "object",
        "required": ["data"],
        "properties": {"event": {"const": "message"}, "data": {"type": "string"}},
        "if": {"properties": {"data": {"const": "[DONE]"}}},
        "else": {"properties": {"data": {
            "contentMediaType": "application/json",
            "contentSchema": {"anyOf": [_ref(chunk), _ref("ErrorResponse")]}}}},
    }}


def _completion(summary: str, op_id: str, request: str, response: str, chunk: str) -> dict:
    return {
        "operationId": op_id,
        "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(request)}}},
        "responses": {
            "200": {"description": "The completion: one JSON object, or with `\"stream\": true` server-sent "
                                   "events (`data: {chunk}` ... `data: [DONE]`; `: keep-alive` comments while "
                                   "the request waits). A stream that fails after it started ends with an "
                                   "error event, then `data: [DONE]`.",
                    "content": {"application/json": {"schema": _ref(response)},
                                "text/event-stream": _event_stream(chunk)}},
            **{str(s): _error(s) for s in (400, 401, 404, 413, 415, 421, 499, 503, 504)},
        },
    }


def _get(summary: str, op_id: str, ok: dict, errors: tuple[int, ...], public: bool = False,
         error_text: dict | None = None) -> dict:
    op = {"operationId": op_id, "summary": summary,
          "responses": {"200": ok, **{str(s): _error(s, (error_text or {}).get(s)) for s in errors}}}
    if public:
        op["security"] = []  # no key needed
    return op


def _json(description: str, schema: dict) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


@functools.lru_cache(maxsize=1)
def _document() -> dict:
    defs: dict = {}
    components = {
        "ChatRequest": _request_schema(ChatRequest, defs),
        "CompletionRequest": _request_schema(CompletionRequest, defs),
    }
    for model in RESPONSE_MODELS:
        schema = model.model_json_schema(ref_template=REF)
        _merge_defs(defs, schema.pop("$defs", {}))
        components[model.__name__] = schema
    _merge_defs(components, defs)
    from dovetail import __version__
    health = _json("The server can take requests.", _ref("Health"))
    return {
        "openapi": "3.1.0",
        "info": {"title": "Dovetail", "version": __version__,
                 "description": "OpenAI-compatible completions and chat completions, decoded with lossless "
                                "speculative decoding (dovetail-launch serve)."},
        "paths": {
            "/v1/chat/completions": {"post": _completion(
                "A chat completion", "createChatCompletion", "ChatRequest", "ChatCompletion", "ChatCompletionChunk")},
            "/v1/completions": {"post": _completion(
                "A text completion", "createCompletion", "CompletionRequest", "TextCompletion",
                "TextCompletionChunk")},
            "/v1/models": {"get": _get("The served model", "listModels", _json("The one model served.",
                                                                            _ref("ModelList")),
                                       (400, 401, 421, 503), error_text={503: "The server is still loading."})},
            "/health": {"get": {
                "operationId": "health", "summary": "Liveness and readiness", "security": [],
                "parameters": [{"name": "detail", "in": "query", "required": False, "schema": {"type": "boolean"},
                                "description": "Add the details (the draft's state, a failure, a dead worker's "
                                               "last log lines): this needs the key."}],
                "responses": {"200": health,
                              "503": _json("Loading, failed to start, or the target worker is down.",
                                           _ref("Health")),
                              "401": _error(401, "`detail` without a valid key."),
                              **{str(s): _error(s) for s in (400, 421)}}}},
            "/metrics": {"get": _get("Prometheus metrics", "metrics", {
                "description": "The Prometheus text exposition format.",
                "content": {"text/plain": {"schema": {"type": "string"}}}}, (400, 401, 421))},
            "/openapi.json": {"get": _get("This document", "openapi", _json("The OpenAPI document.",
                                                                           {"type": "object"}),
                                          (400, 421), public=True)},
        },
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "One of the server's --api-key values; with none "
                                                          "configured, no key is needed."}},
        },
        "security": [{"bearer": []}],
    }


def openapi_document() -> dict:
    """The OpenAPI document (a fresh copy: callers may change it)."""
    return copy.deepcopy(_document())


async def openapi_route(request: Request) -> Response:
    return JSONResponse(_document())
