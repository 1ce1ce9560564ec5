"""GET /openapi.json, and schemathesis against the live server: whatever a client sends that
the document allows (and, in its negative mode, what it does not), the server never answers
5xx, and answers with a status, a content type and a body that the document gives.

The run is bounded: deterministic, EXAMPLES per operation, and every completion capped at
MAX_TOKENS so that the tiny model answers in a fraction of a second."""
from __future__ import annotations

import copy
import json
import math
import os
import time

import jsonschema_rs
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (content_type_conformance, response_schema_conformance,
                                               status_code_conformance)

from dovetail.server.openapi import openapi_document
from tests.dovetail.server.conftest import API_KEY

pytestmark = pytest.mark.timeout(420)

SERVED = "tiny"
MAX_TOKENS = 3
# per operation and generation mode (the GETs without parameters need one); a longer hunt:
# DOVETAIL_OPENAPI_EXAMPLES=500 pytest tests/dovetail/server/test_openapi.py
EXAMPLES = int(os.environ.get("DOVETAIL_OPENAPI_EXAMPLES", "25"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def server(serve_factory, chat_models):
    target, draft = chat_models
    return serve_factory("--target", target, "--draft", draft, "--force-draft", "--dtype", "float64",
                         "--draft-gpu", "cpu", "--depth", "3", "--top-k", "2", "--max-nodes", "6",
                         "--api-key", API_KEY, "--served-model-name", SERVED, "--request-timeout", "30")


def fetch_document(server) -> dict:
    status, headers, body = server.request("GET", "/openapi.json", key=None)  # no key needed
    assert status == 200 and headers["content-type"].startswith("application/json"), (status, body[:500])
    return json.loads(body)


def app_routes() -> set[tuple[str, str]]:
    """(method, path) of every route the app serves (HEAD aside: Starlette adds it to each GET)."""
    from dovetail.server.app import build_app
    from dovetail.server.engine import Engine
    from dovetail.server.metrics import Metrics
    app = build_app(Engine(Metrics(), 1.0, SERVED), [])
    return {(m.lower(), r.path) for r in app.routes for m in (getattr(r, "methods", None) or ()) if m != "HEAD"}


def test_the_document_is_valid_openapi_and_lists_every_route(server):
    doc = fetch_document(server)
    assert doc == openapi_document()
    assert doc["openapi"].startswith("3.1")
    schema = schemathesis.openapi.from_dict(doc)
    schema.validate()  # against the OpenAPI 3.1 meta-schema
    for name, component in doc["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(component), name  # each one a valid JSON Schema 2020-12
    documented = {(op.ok().method.lower(), op.ok().path) for op in schema.get_all_operations()}
    assert documented == app_routes()
    assert {("post", "/v1/chat/completions"), ("post", "/v1/completions"), ("get", "/v1/models"),
            ("get", "/health"), ("get", "/metrics"), ("get", "/openapi.json")} <= documented
    # the request bodies are schema.py's models: what the server validates with
    chat = doc["components"]["schemas"]["ChatRequest"]
    assert {"model", "messages"} <= set(chat["required"]) and chat["additionalProperties"] is False
    assert chat["properties"]["n"]["anyOf"][0] == {"const": 1}  # refused unless harmless
    assert "user" in chat["properties"]  # accepted and ignored
    assert set(doc["paths"]["/v1/completions"]["post"]["responses"]) == {
        "200", "400", "401", "404", "413", "415", "421", "499", "503", "504"}
    assert set(doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]) == {
        "application/json", "text/event-stream"}
    bearer = doc["components"]["securitySchemes"]["bearer"]
    assert (bearer["type"], bearer["scheme"]) == ("http", "bearer")
    assert doc["security"] == [{"bearer": []}] and doc["paths"]["/health"]["get"]["security"] == []


def test_the_document_rejects_a_wrong_response():
    """The response schemas are strict: a field the server does not send fails, a missing one too."""
    # the document's refs point at components/schemas: validate in a bundle that has them as $defs
    defs = json.loads(json.dumps(openapi_document()["components"]["schemas"]).replace(
        "#/components/schemas/", "#/$defs/"))
    ok = {"error": {"message": "m", "type": "invalid_request_error", "param": None, "code": None}}

    def valid(name: str, instance) -> bool:
        return jsonschema_rs.Draft202012Validator({"$defs": defs, "$ref": f"#/$defs/{name}"}).is_valid(instance)

    assert valid("ErrorResponse", ok)
    assert not valid("ErrorResponse", {"error": {**ok["error"], "extra": 1}})
    assert not valid("ErrorResponse", {"error": {"message": "m"}})
    chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": SERVED,
             "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                          "finish_reason": None}]}
    assert valid("ChatCompletionChunk", chunk)
    assert not valid("ChatCompletionChunk", {**chunk, "choices": [{**chunk["choices"][0], "delta": {"content": None}}]})


# ---- schemathesis against the live server ------------------------------------------------------
def narrowed(doc: dict) -> dict:
    """The document as the fuzzer should read it here: requests name the served model (any other
    is a 404 at once), and ask for at most MAX_TOKENS tokens."""
    for name in ("ChatRequest", "CompletionRequest"):
        props = doc["components"]["schemas"][name]["properties"]
        props["model"] = {**props["model"], "enum": [SERVED]}
        for field in ("max_tokens", "max_completion_tokens"):
            if field in props:
                props[field] = {"anyOf": [{"type": "integer", "minimum": 1, "maximum": MAX_TOKENS},
                                          {"type": "null"}]}
    return doc


def cap_tokens(body) -> None:
    """A negative case may drop max_tokens or send it in a form pydantic still reads as a number
    ("9999", 9999.0): cap it, or the tiny model would decode its whole 128k context."""
    if not isinstance(body, dict):
        return
    for field in ("max_tokens", "max_completion_tokens"):
        value = body.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            continue
        try:
            number = float(value)
        except (ValueError, OverflowError):
            continue
        if not math.isfinite(number) or number > MAX_TOKENS:
            body[field] = MAX_TOKENS
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
        body["max_tokens"] = MAX_TOKENS


# Built from the document the server must serve (the first test holds the two equal), not
# fetched from it: the operations are known at collection, and schemathesis' lazy
# from_fixture loader needs a pytest internal (Item._nodeid) that pytest 9 no longer has.
schema = schemathesis.openapi.from_dict(narrowed(openapi_document()))
schema.config.generation.update(max_examples=EXAMPLES, deterministic=True, database="none")


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_the_live_server_answers_as_documented(case, server):
    cap_tokens(case.body)
    t0 = time.monotonic()
    response = case.call_and_validate(base_url=server.base, headers={"Authorization": f"Bearer {API_KEY}"},
                                      checks=CHECKS, timeout=60)
    assert time.monotonic() - t0 < 30, (case.method, case.path, case.body, response.status_code)


MESSAGES = [{"role": "user", "content": "def f(x):"}]
STREAMS = [("/v1/chat/completions", {"model": SERVED, "messages": MESSAGES, "max_tokens": MAX_TOKENS,
                                     "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}),
           ("/v1/completions", {"model": SERVED, "prompt": "def f(x):", "max_tokens": MAX_TOKENS, "temperature": 0,
                                "stream": True, "stop": ["\n\n"]})]


@pytest.mark.parametrize("path,body", STREAMS, ids=["chat", "text"])
def test_streams_are_events_as_documented(server, path, body):
    """Every run, whatever the fuzzer drew: each event of a stream against the document's event
    schema ([DONE], or JSON that is a chunk or the error envelope)."""
    case = schema[path]["POST"].Case(body=copy.deepcopy(body), media_type="application/json")
    response = case.call_and_validate(base_url=server.base, headers={"Authorization": f"Bearer {API_KEY}"},
                                      checks=CHECKS, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"][0].startswith("text/event-stream")
    data = [line[6:] for line in response.content.decode().split("\n") if line.startswith("data: ")]
    assert data[-1] == "[DONE]" and len(data) >= 2  # at least the chunk with the finish_reason


def test_a_stream_off_the_document_fails_the_check(server):
    """The check has teeth: the same stream against a document whose chunk says another object."""
    doc = narrowed(openapi_document())
    doc["components"]["schemas"]["ChatCompletionChunk"]["properties"]["object"]["const"] = "chat.completion"
    wrong = schemathesis.openapi.from_dict(doc)
    path, body = STREAMS[0]
    case = wrong[path]["POST"].Case(body=copy.deepcopy(body), media_type="application/json")
    with pytest.raises(FailureGroup) as failed:
        case.call_and_validate(base_url=server.base, headers={"Authorization": f"Bearer {API_KEY}"},
                               checks=[response_schema_conformance], timeout=60)
    assert [f.title for f in failed.value.exceptions] == ["SSE event violates schema"]
