"""Request bodies of /v1/chat/completions and /v1/completions, checked once here.

Speculative decoding here is exact for what the target applies at every position it
verifies: temperature, top_p, a seed, the penalties, logit_bias and a grammar (response_format
json_object / json_schema, the ``grammar`` and ``regex`` extensions, a forced tool call);
logprobs are the target's own (dovetail/spec/sampling.py). Tools go into the chat template
and the model's calls come back parsed (dovetail/server/tools.py). What we do not compute is
refused with 400 naming the parameter, never silently dropped. Fields that change nothing
about the output (``user``, ``metadata``, ...) are accepted and ignored; any other unknown
field is refused, so that a client never believes a setting took effect.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dovetail.server.errors import APIError, bad_request, unsupported
from dovetail.server.tools import MAX_TOOLS, ChatMessage, Tool, ToolChoice, template_messages
from dovetail.spec.sampling import MAX_TOP_LOGPROBS

MAX_STOP = 16  # stop strings per request (OpenAI allows 4; more only costs a scan per chunk)
MAX_STOP_CHARS = 256  # characters per stop string: each chunk's text is scanned for every one
MAX_MESSAGES = 1024  # messages per chat request: the template loops over them on every request

# field -> (the value that changes nothing, why any other value is refused)
REFUSED = {
    "n": (1, "one choice per request; send n requests (each with its own seed) instead"),
    "best_of": (1, "one choice per request"),
    "echo": (False, "the prompt is not echoed"),
    "suffix": ("", "insertion (suffix) is not supported"),
    "functions": ([], "the legacy function calling is not supported: send tools and tool_choice"),
    "function_call": ("none", "the legacy function calling is not supported: send tools and tool_choice"),
    "min_tokens": (0, "a minimum length masks the stop tokens, which changes the distribution"),
}
IGNORED = {"user", "metadata", "store", "service_tier", "prompt_cache_key",
           "safety_identifier"}  # change nothing about the output


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """response_format's json_schema: OpenAI's {"name", "description", "schema", "strict"}."""
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str | None = Field(default=None, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema", description="the JSON schema the output follows")
    strict: bool | None = Field(default=None, description="either way the schema is enforced; a keyword the "
                                                          "grammar engine does not implement is a 400")


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = Field(default=None, ge=1)
    stop: Union[str, list[str], None] = None
    seed: int | None = Field(default=None, ge=-(1 << 63), lt=1 << 64)  # OpenAI's int64; mapped onto ours below
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Applied by the target at every position it verifies (dovetail/spec/sampling.py): exact.
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0, le=10.0)  # vLLM's and llama.cpp's extension
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    # A grammar the target masks its distribution with at every position (dovetail/spec/grammar.py):
    # exact too. At most one of them per request.
    response_format: ResponseFormat | None = None
    grammar: str | None = Field(default=None, description="an extension: the output follows this grammar, "
                                                          "Lark (llguidance's) or llama.cpp's GBNF")
    regex: str | None = Field(default=None, description="an extension: the whole output matches this regex "
                                                        "(Rust regex syntax)")


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = Field(default=None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = Field(default=None, description='default "auto" with tools, else "none"')
    parallel_tool_calls: bool | None = Field(default=None, description="false: a forced call (tool_choice "
                                             "required or named) is exactly one call")


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # the legacy API's: top k


@dataclass
class ToolUse:
    """A chat request's tools as the engine needs them: ``template`` is what the chat template
    is given (None: no tools are shown, as under tool_choice "none"); ``family`` is the model's
    tool-call format, which the engine reads off the chat template."""
    tools: list[Tool]
    choice: Any  # "auto", "none", "required" or a NamedToolChoice
    parallel: bool
    template: list[dict] | None
    family: str | None = None

    @property
    def parses(self) -> bool:
        """Whether the output goes through a ToolCallParser: when the model was shown tools."""
        return self.template is not None

    @property
    def forced(self) -> bool:
        """tool_choice "required" or a named function: a grammar makes the output a call."""
        return self.template is not None and self.choice not in ("auto", "none")


@dataclass
class Sampling:
    """What the coordinator is asked for; ``max_tokens`` None: the rest of the context."""
    prompt: Any  # text, chat messages or token ids (Coordinator.encode_prompt)
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: list[str]
    stream: bool
    include_usage: bool
    processing: dict = field(default_factory=dict)  # Coordinator.submit's keywords: penalties, bias, logprobs, grammar
    tools: ToolUse | None = None  # chat with tools (the engine completes it: the family, a forced call's grammar)


def parse(model: type[_Common], body: Any) -> _Common:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    if model is ChatRequest:
        check_content_parts(body.get("messages"))
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise bad_request(f"{param}: {first['msg']}" if param else first["msg"], param) from None
    check_extras(req.model_extra or {})
    return req


TEXT_PART = "text"


def check_content_parts(messages) -> None:
    """Content parts other than text (image_url, input_audio, file, ...) are refused by name:
    the models served here read text only. Checked on the raw body, so that the 400 says so
    rather than that the content is not a string."""
    if not isinstance(messages, list):
        return
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            continue
        kinds = list(dict.fromkeys(p["type"] for p in content if isinstance(p, dict)
                                   and isinstance(p.get("type"), str) and p["type"] != TEXT_PART))
        if kinds:
            param = f"messages.{i}.content"
            raise APIError(400, f"{param}: {', '.join(repr(k) for k in kinds)} content parts are not supported: "
                                "the models served here read text only", param=param, code="unsupported_parameter")


def check_extras(extra: dict) -> None:
    for name, value in extra.items():
        if name in IGNORED or value is None:
            continue
        if name in REFUSED:
            harmless, why = REFUSED[name]
            if not (value == harmless or (not value and not harmless)):  # false, 0, "", [] all mean off
                raise unsupported(name, why)
            continue
        raise bad_request(f"unknown parameter '{name}'", name, "unknown_parameter")


def sampling(req: _Common) -> Sampling:
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stop) > MAX_STOP:
        raise bad_request(f"at most {MAX_STOP} stop strings, got {len(stop)}", "stop")
    if any(not s for s in stop):
        raise bad_request("stop strings must not be empty", "stop")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise bad_request(f"stop strings may have at most {MAX_STOP_CHARS} characters, got "
                          f"{max(len(s) for s in stop)}", "stop")
    tools = None
    if isinstance(req, ChatRequest):
        choice = req.tool_choice if req.tool_choice is not None else ("auto" if req.tools else "none")
        prompt, template_tools = template_messages(req.messages, req.tools, choice)  # 400s: tools.check_tools
        if req.tools:
            tools = ToolUse(list(req.tools), choice, req.parallel_tool_calls is not False, template_tools)
        max_tokens = req.max_completion_tokens or req.max_tokens  # the newer name wins
    else:
        prompt = completion_prompt(req.prompt)
        max_tokens = req.max_tokens
    options = req.stream_options or StreamOptions()
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options goes with stream: true", "stream_options")
    proc = processing(req)
    if tools is not None and tools.forced and "grammar" in proc:
        raise bad_request(f"tool_choice {describe_choice(tools.choice)} forces a tool call, which is a constraint "
                          f"of its own: it cannot go with {constraint_names(req)[0]}", "tool_choice")
    return Sampling(prompt, max_tokens, 1.0 if req.temperature is None else req.temperature,
                    1.0 if req.top_p is None else req.top_p, None if req.seed is None else req.seed % (1 << 63),
                    stop, req.stream, options.include_usage, proc, tools)


def describe_choice(choice) -> str:
    return repr(choice) if isinstance(choice, str) else f"{{'function': {{'name': {choice.function.name!r}}}}}"


def processing(req: _Common) -> dict:
    """The penalties, the bias and the logprobs asked for, as Coordinator.submit takes them."""
    out = {name: getattr(req, name) for name in ("presence_penalty", "frequency_penalty", "repetition_penalty")
           if getattr(req, name) is not None}
    if req.logit_bias:
        out["logit_bias"] = logit_bias(req.logit_bias)
    if isinstance(req, ChatRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
        if req.logprobs:
            out["logprobs"] = req.top_logprobs or 0
    elif req.logprobs is not None:
        out["logprobs"] = req.logprobs
    grammar = constraint(req)
    if grammar is not None:
        out["grammar"] = grammar
    return out


def constraints(req: _Common) -> list[tuple[str, str, Any]]:
    """(param, kind, spec) of each grammar the request asks for: response_format json_object /
    json_schema, ``grammar`` (Lark or GBNF), ``regex``."""
    out = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        out.append(("response_format", "json_object", None))
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise bad_request("response_format of type json_schema needs its json_schema: {\"name\": ..., "
                              "\"schema\": {...}}", "response_format.json_schema")
        out.append(("response_format.json_schema.schema", "json_schema", fmt.json_schema.schema_))
    if req.grammar is not None:
        out.append(("grammar", "grammar", req.grammar))
    if req.regex is not None:
        out.append(("regex", "regex", req.regex))
    return out


def constraint_names(req: _Common) -> list[str]:
    return [param.split(".")[0] + (f" {req.response_format.type}" if param.startswith("response_format") else "")
            for param, _, _ in constraints(req)]


def constraint(req: _Common) -> tuple[str, Any] | None:
    """The request's grammar as Coordinator.submit takes it, (kind, spec), checked now (no
    tokenizer needed): a bad schema, regex or grammar is a 400 naming it. At most one."""
    given = constraints(req)
    if not given:
        return None
    if len(given) > 1:
        raise bad_request(f"at most one constraint per request, got {' and '.join(constraint_names(req))}",
                          given[1][0].split(".")[0])
    param, kind, spec = given[0]
    from dovetail.spec.grammar import grammar_text  # llguidance: imported at the first request with a grammar
    try:
        grammar_text(kind, spec)
    except ValueError as e:
        raise bad_request(f"{param}: {e}", param) from None
    return kind, spec


def logit_bias(given: dict[str, float]) -> dict[int, float]:
    """OpenAI's {"token id": bias}; the ids are checked against the vocabulary by the coordinator."""
    out = {}
    for key, value in given.items():
        if not key.strip().lstrip("-").isdigit():
            raise bad_request(f"logit_bias keys are token ids, got {key!r}", "logit_bias")
        if not -100 <= value <= 100:
            raise bad_request(f"logit_bias values must be in [-100, 100], got {value}", "logit_bias")
        out[int(key)] = value
    return out


def completion_prompt(prompt) -> str | list[int]:
    """One prompt: a string or token ids; a batch of several is refused like n > 1."""
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise APIError(400, f"one prompt per request, got {len(prompt)}: send them as separate requests",
                           param="prompt", code="unsupported_parameter")
        prompt = prompt[0]
    if not prompt:
        raise bad_request("the prompt is empty", "prompt")
    return prompt
