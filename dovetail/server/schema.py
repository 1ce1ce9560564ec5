"""Request bodies of /v1/chat/completions and /v1/completions, checked once here.

Speculative decoding here is exact for what the target applies at every position it
verifies: temperature, top_p, a seed, the penalties and logit_bias; logprobs are the target's
own (dovetail/spec/sampling.py). What we do not compute is refused with 400 naming the
parameter, never silently dropped. Fields that change
nothing about the output (``user``, ``metadata``, ...) are accepted and ignored; any other
unknown field is refused, so that a client never believes a setting took effect.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dovetail.server.errors import APIError, bad_request, unsupported
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
    "tools": ([], "tool calling is not supported"),
    "tool_choice": ("none", "tool calling is not supported"),
    "functions": ([], "function calling is not supported"),
    "function_call": ("none", "function calling is not supported"),
    "response_format": ({"type": "text"}, "constrained output (JSON mode, schemas) is not supported"),
    "min_tokens": (0, "a minimum length masks the stop tokens, which changes the distribution"),
}
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
           "safety_identifier"}  # change nothing about the output


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # name, ...
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None

    def as_template_input(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        # Chat templates know "system"; "developer" is OpenAI's newer name for it.
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


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


class ChatRequest(_Common):
    messages: list[Message] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # the legacy API's: top k


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
    processing: dict = field(default_factory=dict)  # Coordinator.submit's keywords: penalties, bias, logprobs


def parse(model: type[_Common], body: Any) -> _Common:
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    try:
        req = model.model_validate(body)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise bad_request(f"{param}: {first['msg']}" if param else first["msg"], param) from None
    check_extras(req.model_extra or {})
    return req


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
    if isinstance(req, ChatRequest):
        prompt = [m.as_template_input() for m in req.messages]
        max_tokens = req.max_completion_tokens or req.max_tokens  # the newer name wins
    else:
        prompt = completion_prompt(req.prompt)
        max_tokens = req.max_tokens
    options = req.stream_options or StreamOptions()
    if req.stream_options is not None and not req.stream:
        raise bad_request("stream_options goes with stream: true", "stream_options")
    return Sampling(prompt, max_tokens, 1.0 if req.temperature is None else req.temperature,
                    1.0 if req.top_p is None else req.top_p, None if req.seed is None else req.seed % (1 << 63),
                    stop, req.stream, options.include_usage, processing(req))


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
    return out


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
