"""Tool calling (OpenAI's ``tools`` and ``tool_choice``) as pure building blocks: the request
into what the model's chat template takes, the model's tool-call text back into OpenAI's
``tool_calls`` (whole or streamed), and the grammar that forces a call.

Nothing here loads a model or talks to the coordinator.

Three output formats, told apart by the chat template (detect_family):
- "hermes" (Qwen2.5, Qwen3, Hermes 2 Pro): ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``,
  one block per call, anywhere in the text;
- "llama3_json" (Llama 3.1 to 3.3): the whole answer is ``{"name": ..., "parameters": {...}}`` (several
  joined by ``;``), possibly after ``<|python_tag|>``;
- "mistral": ``[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]``.

A call is emitted only once it is complete and parses, both whole and streamed: a streamed
delta cannot be taken back, and a call that turns out malformed (or is cut by max_tokens)
must come back as the text the model wrote, exactly as in the non-streamed answer. So a
streamed call arrives as two deltas (its id and name, then all its arguments) as soon as
its closing marker does. parse() is feed() + finish() on the whole text, which makes the
streamed and the whole answers the same by construction, whatever the chunking.
"""
from __future__ import annotations

import json
import re
import secrets
import string
from typing import Any, Callable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dovetail.server.errors import bad_request

HERMES, LLAMA3_JSON, MISTRAL = "hermes", "llama3_json", "mistral"
FAMILIES = (HERMES, LLAMA3_JSON, MISTRAL)

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"  # Llama's marker before a call; a special token, so decoding usually drops it
MISTRAL_MARK = "[TOOL_CALLS]"  # also a special token in Mistral's tokenizers

# The key a family's calls carry their arguments under, first; the others are accepted too.
ARGUMENT_KEYS = {HERMES: ("arguments", "parameters"), LLAMA3_JSON: ("parameters", "arguments"),
                 MISTRAL: ("arguments", "parameters")}

NAME_MAX = 64  # OpenAI's limit on a function name
MAX_TOOLS = 128  # OpenAI's limit on tools per request: each is printed into the prompt and the grammar
ID_ALPHABET = string.ascii_letters + string.digits
ID_CHARS = 24  # "call_" + 24 characters, as OpenAI's ids
MISTRAL_ID_CHARS = 9  # Mistral's chat templates refuse a tool-call id of any other length
NO_PARAMETERS = {"type": "object", "properties": {}}  # a function given without "parameters"

# Forced calls are written as Jinja's tojson (json.dumps) writes them, which is how the models
# saw calls in their prompts and training; flexible whitespace would let a model pad with
# newlines forever. Lenient: a keyword llguidance does not implement is ignored rather than
# refusing the request, unless a tool asks for "strict".
X_GUIDANCE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


# ---- the request -------------------------------------------------------------------------------
class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=NAME_MAX)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: the function takes no arguments
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]  # OpenAI's "custom" tools have no place in a chat template
    function: FunctionDef


class FunctionName(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: FunctionName


ToolChoice = Union[Literal["auto", "none", "required"], NamedToolChoice]


class CalledFunction(BaseModel):
    name: str
    arguments: Union[str, dict[str, Any]] = "{}"  # OpenAI sends JSON text; a few clients send the object


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str
    type: Literal["function"] = "function"
    function: CalledFunction


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """A chat message with OpenAI's tool fields: an assistant's ``tool_calls``, a tool's answer."""
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def check_tool_fields(self) -> "ChatMessage":
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self


def chosen_name(tool_choice) -> str | None:
    """The function a named tool_choice forces (a model or OpenAI's dict), else None."""
    if isinstance(tool_choice, NamedToolChoice):
        return tool_choice.function.name
    if isinstance(tool_choice, dict):
        return (tool_choice.get("function") or {}).get("name")
    return None


def check_tools(tools: list[Tool] | None, tool_choice) -> None:
    """400 for what no answer could honour: a choice that names no given tool, "required" with
    no tools, two tools of one name (a call could not say which it meant)."""
    names = [t.function.name for t in tools or []]
    seen = set()
    for name in names:
        if name in seen:
            raise bad_request(f"two tools are named '{name}'", "tools")
        seen.add(name)
    name = chosen_name(tool_choice)
    if name is not None and name not in seen:
        raise bad_request(f"tool_choice names the function '{name}', which is not in tools", "tool_choice")
    if tool_choice == "required" and not names:
        raise bad_request("tool_choice 'required' needs at least one tool", "tool_choice")


def chosen_tools(tools: list[Tool] | None, tool_choice) -> list[Tool]:
    """The tools the model may call: none under "none", only the named one under a named choice."""
    if not tools or tool_choice == "none":
        return []
    name = chosen_name(tool_choice)
    return [t for t in tools if name is None or t.function.name == name]


def parses_calls(tools: list[Tool] | None, tool_choice) -> bool:
    """Whether the answer goes through a ToolCallParser: only when the model was shown tools."""
    return bool(chosen_tools(tools, tool_choice))


def tools_for_template(tools: list[Tool] | None, tool_choice) -> list[dict] | None:
    """``tools=`` for apply_chat_template: OpenAI's dicts, which HF templates take as they are.
    None (not []) when there are none, so templates that test ``tools is not none`` add no
    tool prompt."""
    chosen = chosen_tools(tools, tool_choice)
    if not chosen:
        return None
    out = []
    for t in chosen:
        d = t.model_dump(exclude_none=True)
        # templates read .parameters.properties
        d["function"].setdefault("parameters", dict(NO_PARAMETERS, properties={}))
        out.append(d)
    return out


def template_messages(messages: list, tools: list[Tool] | None = None, tool_choice="auto"
                      ) -> tuple[list[dict], list[dict] | None]:
    """(messages, tools) for ``apply_chat_template(messages, tools=tools, add_generation_prompt=True)``.

    ``messages`` are ChatMessage (or their dicts, or any model with the same fields). HF's format
    differs from OpenAI's: a call's arguments are an object, not JSON text, and keys a template
    tests with ``in`` (tool_calls) are present only when they have a value.
    """
    check_tools(tools, tool_choice)
    out = []
    for i, m in enumerate(messages):
        m = ChatMessage.model_validate(m) if isinstance(m, dict) else m
        out.append(template_message(m, f"messages.{i}"))
    return out, tools_for_template(tools, tool_choice)


def template_message(m, param: str) -> dict:
    # Chat templates know "system"; "developer" is OpenAI's newer name for it.
    out = {"role": "system" if m.role == "developer" else m.role, "content": text_of(m.content)}
    calls = getattr(m, "tool_calls", None)
    if calls:
        out["tool_calls"] = [{"id": c.id, "type": "function",
                              "function": {"name": c.function.name,
                                           "arguments": arguments_object(c.function.arguments,
                                                                         f"{param}.tool_calls.{j}")}}
                             for j, c in enumerate(calls)]
    if m.role == "tool":
        out["tool_call_id"] = m.tool_call_id
        if getattr(m, "name", None):
            out["name"] = m.name  # some templates (Llama's ipython turn) print the function's name
    return out


def text_of(content) -> str:
    """A message's text: a string, text parts (models or dicts), or None (an assistant turn
    that only calls tools) as ""."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p["text"] if isinstance(p, dict) else p.text for p in content)


def arguments_object(arguments, param: str) -> dict:
    if isinstance(arguments, dict):
        return arguments
    if not arguments.strip():
        return {}  # some clients send "" for a call without arguments
    try:
        value = json.loads(arguments)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, dict):
        raise bad_request("a tool call's arguments must be a JSON object", f"{param}.function.arguments")
    return value


# ---- the family --------------------------------------------------------------------------------
def template_texts(chat_template) -> str:
    """All of a tokenizer's templates as one text: a string, or named ones ({name: text} or
    [{"name", "template"}], as Hermes 2 Pro ships its "tool_use" template)."""
    if not chat_template:
        return ""
    if isinstance(chat_template, str):
        return chat_template
    if isinstance(chat_template, dict):
        return "\n".join(chat_template.values())
    return "\n".join(t.get("template", "") for t in chat_template)


def template_supports_tools(chat_template) -> bool:
    """Whether the template renders ``tools`` at all; one that does not would drop them silently."""
    return "tools" in template_texts(chat_template)


def detect_family(chat_template) -> str | None:
    """The tool-call format a model writes, from its chat template's text; None if unknown."""
    text = template_texts(chat_template)
    if HERMES_OPEN in text:
        return HERMES
    if MISTRAL_MARK in text:
        return MISTRAL
    # Llama 3.1's template asks for {"name": ..., "parameters": ...}; its built-in tools use the tag.
    if PYTHON_TAG in text or ("<|start_header_id|>" in text and '"parameters"' in text):
        return LLAMA3_JSON
    return None


def new_call_id(family: str | None = None) -> str:
    if family == MISTRAL:
        return "".join(secrets.choice(ID_ALPHABET) for _ in range(MISTRAL_ID_CHARS))
    return "call_" + "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_CHARS))


# ---- the output --------------------------------------------------------------------------------
# Parser states. START: the beginning of the answer, where Llama's and Mistral's calls begin.
# TEXT: text, watching for the family's marker (none for Llama: after its start, all is text).
# CALL: inside a call, until it closes (a marker, or JSON brackets that balance).
START, TEXT, CALL = "start", "text", "call"
SPACE = re.compile(r"\s*")
SEPARATOR = re.compile(r"\s*(?:;\s*)?")


class ToolCallParser:
    """The model's output, streamed or whole, as content and OpenAI tool calls.

    ``feed(delta)`` returns OpenAI ``delta`` objects: ``{"content": text}`` outside calls, and
    per call ``{"tool_calls": [{"index", "id", "type", "function": {"name", "arguments": ""}}]}``
    then ``{"tool_calls": [{"index", "function": {"arguments": json_text}}]}``. Text that could
    begin a marker (a partial "<tool_c") and trailing whitespace wait for the next delta, so
    whitespace around calls never becomes content. ``finish()`` flushes what waits.
    """

    def __init__(self, family: str, new_id: Callable[[], str] | None = None):
        if family not in FAMILIES:
            raise ValueError(f"unknown tool-call family {family!r}: one of {FAMILIES}")
        self.family = family
        self.new_id = new_id or (lambda: new_call_id(family))
        self.marker = {HERMES: HERMES_OPEN, MISTRAL: MISTRAL_MARK, LLAMA3_JSON: None}[family]
        self.state = TEXT if family == HERMES else START
        self.buf = ""  # text not yet emitted
        self.opened = ""  # the text that opened the current call: written back if it does not parse
        self.after_call = False  # whitespace right after a call is not content
        self.scan = Balance()  # where the JSON scan of the current call stopped
        self.separated = False  # the call follows another (Llama's "{..}; {..}")
        self.searched = 0  # where the search for HERMES_CLOSE may resume
        self.content: list[str] = []
        self.calls: list[dict] = []
        self.finished = False

    # -- the API --
    def feed(self, delta: str) -> list[dict]:
        if self.finished:
            raise RuntimeError("feed() after finish()")
        self.buf += delta
        return self.run(final=False)

    def finish(self) -> list[dict]:
        if self.finished:
            return []
        out = self.run(final=True)
        self.finished = True
        return out

    def parse(self, text: str) -> tuple[str | None, list[dict]]:
        """The whole answer at once: (content, tool calls). This parser is left untouched."""
        whole = ToolCallParser(self.family, self.new_id)
        whole.feed(text)
        whole.finish()
        return whole.result()

    def result(self) -> tuple[str | None, list[dict]]:
        """What was parsed so far; content is None when the answer is only calls, as OpenAI's."""
        content = "".join(self.content)
        return (None if self.calls and not content.strip() else content), list(self.calls)

    def finish_reason(self, reason: str) -> str:
        """"tool_calls" once a call was parsed, else the engine's own reason ("stop", "length")."""
        return "tool_calls" if self.calls else reason

    # -- the states --
    def run(self, final: bool) -> list[dict]:
        out: list[dict] = []
        step = {START: self.at_start, TEXT: self.in_text, CALL: self.in_call}
        while step[self.state](out, final):
            pass
        return out

    def at_start(self, out: list, final: bool) -> bool:
        """Llama and Mistral call only at the very start (after whitespace): decide whether this
        answer is a call as soon as its first characters say so."""
        rest = self.buf.lstrip()
        lead = self.buf[:len(self.buf) - len(rest)]
        if not rest:
            if final:
                self.state = TEXT
                return True
            return False
        tag = PYTHON_TAG if self.family == LLAMA3_JSON else MISTRAL_MARK
        if rest.startswith(tag):
            return self.open_call(lead + tag, rest[len(tag):])
        if self.family == LLAMA3_JSON and rest[0] == "{":
            return self.open_call(lead, rest)
        if self.family == MISTRAL and rest[0] == "[":  # the mark was decoded away (a special token)
            after = rest[1:].lstrip()
            if after.startswith("{"):
                return self.open_call(lead, rest)
            if not after and not final:
                return False
        if tag.startswith(rest) and not final:
            return False  # perhaps the tag, written out as text
        self.state = TEXT
        return True

    def in_text(self, out: list, final: bool) -> bool:
        if self.after_call:
            self.buf = self.buf.lstrip()
            if not self.buf:
                return False
            self.after_call = False
        at = self.buf.find(self.marker) if self.marker else -1
        if at >= 0:
            before = self.buf[:at]
            kept = before.rstrip()
            self.emit_text(out, kept)
            return self.open_call(before[len(kept):] + self.marker, self.buf[at + len(self.marker):])
        held = 0 if final else held_back(self.buf, self.marker)
        self.emit_text(out, self.buf[:len(self.buf) - held])
        self.buf = self.buf[len(self.buf) - held:]
        return False

    def open_call(self, opened: str, rest: str, separated: bool = False) -> bool:
        self.opened, self.buf, self.state, self.separated = opened, rest, CALL, separated
        self.scan, self.searched = Balance(), 0
        return True

    def in_call(self, out: list, final: bool) -> bool:
        if self.family == HERMES:
            skip, (end, calls) = 0, self.hermes_call(final)
        else:
            skip, end, calls = self.json_call(final)
        if end is None:
            return False  # not closed yet
        if calls is None:  # not a call: the model's text, as it wrote it
            self.emit_text(out, self.opened + self.buf[skip:end])
            self.state, self.after_call = TEXT, False
        else:
            for name, arguments in calls:
                self.emit_call(out, name, arguments)
            self.after_call = True
            if self.family == LLAMA3_JSON:  # Llama writes several calls as {..}; {..}
                return self.open_call("", self.buf[end:], separated=True)
            self.state = TEXT
        self.buf = self.buf[end:]
        return True

    def hermes_call(self, final: bool) -> tuple[int | None, list | None]:
        """(end of the block in buf, its calls) once </tool_call> came; at the end of the answer
        an unclosed block is a call if its JSON is complete (a model may stop right after it)."""
        at = self.buf.find(HERMES_CLOSE, self.searched)
        if at < 0:
            self.searched = max(0, len(self.buf) - len(HERMES_CLOSE) + 1)
            if not final:
                return None, None
            return len(self.buf), one_call(self.buf, HERMES)
        return at + len(HERMES_CLOSE), one_call(self.buf[:at], HERMES)

    def json_call(self, final: bool) -> tuple[int, int | None, list | None]:
        """(characters dropped if it is text, end, calls) for Llama's object or Mistral's array,
        closed when its brackets balance. The gap after a Llama call (whitespace, one ";") is
        no text of its own."""
        gap = (SEPARATOR if self.separated else SPACE).match(self.buf).end()
        skip = gap if self.separated else 0
        if gap == len(self.buf):
            return skip, (len(self.buf) if final else None), None
        end = self.scan.advance(self.buf, gap)
        if end is None:
            return skip, (len(self.buf) if final else None), None  # cut short at the end: text
        body = self.buf[gap:end]
        return skip, end, one_call(body, LLAMA3_JSON) if self.family == LLAMA3_JSON else call_list(body)

    # -- the output --
    def emit_text(self, out: list, text: str) -> None:
        if text:
            self.content.append(text)
            out.append({"content": text})

    def emit_call(self, out: list, name: str, arguments: str) -> None:
        index, call_id = len(self.calls), self.new_id()
        self.calls.append({"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}})
        out.append({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                    "function": {"name": name, "arguments": ""}}]})
        out.append({"tool_calls": [{"index": index, "function": {"arguments": arguments}}]})


def held_back(text: str, marker: str | None) -> int:
    """How many characters at the end of ``text`` must wait: a proper prefix of the marker
    (it may complete in the next delta) and the whitespace before it."""
    k = 0
    if marker:
        for n in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:n]):
                k = n
                break
    j = len(text) - k
    while j > 0 and text[j - 1].isspace():
        j -= 1
    return len(text) - j


class Balance:
    """Where a JSON value that starts at ``start`` ends: brackets counted outside strings. It
    resumes where it stopped, so a call streamed in n pieces costs O(length), not O(n·length).
    Whether the brackets match and the JSON is valid is json.loads' job once it has ended."""

    def __init__(self):
        self.pos, self.depth, self.in_string, self.escaped = None, 0, False, False

    def advance(self, text: str, start: int) -> int | None:
        pos = start if self.pos is None else self.pos
        if pos >= len(text):
            return None
        depth, in_string, escaped = self.depth, self.in_string, self.escaped
        for i in range(pos, len(text)):
            c = text[i]
            if in_string:
                if escaped:
                    escaped = False
                elif c == "\\":
                    escaped = True
                elif c == '"':
                    in_string = False
            elif c == '"':
                in_string = True
            elif c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth <= 0:
                    return i + 1
            elif depth == 0:
                return i + 1  # not a bracket where the value should start: the scan ends, json.loads refuses
        self.pos, self.depth, self.in_string, self.escaped = len(text), depth, in_string, escaped
        return None


def one_call(body: str, family: str) -> list[tuple[str, str]] | None:
    """[(name, arguments JSON)] for a body holding one call object, None if it is not one."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    call = call_of(value, ARGUMENT_KEYS[family])
    return None if call is None else [call]


def call_list(body: str) -> list[tuple[str, str]] | None:
    """Mistral's array of calls; None unless every item is a call."""
    try:
        value = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(value, list) or not value:
        return None
    calls = [call_of(v, ARGUMENT_KEYS[MISTRAL]) for v in value]
    return None if any(c is None for c in calls) else calls


def call_of(value, keys: tuple[str, ...]) -> tuple[str, str] | None:
    if not isinstance(value, dict) or not isinstance(value.get("name"), str) or not value["name"]:
        return None
    arguments = next((value[k] for k in keys if k in value), {})
    if isinstance(arguments, str):  # some fine-tunes write the arguments as JSON text
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return value["name"], json.dumps(arguments, ensure_ascii=False)


# ---- forcing a call ----------------------------------------------------------------------------
def forced_call_grammar(family: str, tools: list[Tool] | None, tool_choice, *, parallel: bool = True,
                        mark_token_id: int | None = None) -> tuple[str, Any] | None:
    """What the output must follow for tool_choice "required" or a named function, so that a
    grammar engine (llguidance) makes the call parse: ("lark", grammar text) or
    ("json_schema", schema). None when nothing is forced ("auto", "none").

    - hermes: Lark, because the call sits between literal markers: ``<tool_call>\\n`` + a
      JSON object (``%json{...}``: name const, arguments the tool's parameters) +
      ``\\n</tool_call>``; with ``parallel`` (OpenAI's parallel_tool_calls) more calls may
      follow, one per line, as Qwen writes them. The markers are written as text: in Qwen's
      tokenizers <tool_call> is an added token that is not "special", so its one token spells
      the text and the model's own token is allowed.
    - llama3_json: a JSON schema: the answer is the bare call object, which the parser reads
      without <|python_tag|> (a special token decoding drops anyway). One call only.
    - mistral: the array of calls; with ``mark_token_id`` (the tokenizer's id of [TOOL_CALLS])
      Lark puts that special token first, as the model was trained, else a JSON schema for
      the array alone (the parser reads an answer that starts with "[{" as calls).
    """
    check_tools(tools, tool_choice)
    if tool_choice == "auto" or tool_choice == "none" or tool_choice is None:
        return None
    chosen = chosen_tools(tools, tool_choice)
    if family == HERMES:
        more = ' ("\\n" call)*' if parallel else ""
        return "lark", "\n".join([f"start: call{more}",
                                  'call: "<tool_call>\\n" body "\\n</tool_call>"',
                                  "body: %json " + json.dumps(call_schema(chosen, "arguments"))])
    if family == LLAMA3_JSON:
        return "json_schema", call_schema(chosen, "parameters")
    if family == MISTRAL:
        array = calls_array_schema(chosen, parallel)
        if mark_token_id is None:
            return "json_schema", array
        return "lark", f'start: <[{int(mark_token_id)}]> " "? body\nbody: %json {json.dumps(array)}'
    raise ValueError(f"unknown tool-call family {family!r}: one of {FAMILIES}")


def call_schema(tools: list[Tool], arguments_key: str) -> dict:
    """One call to one of ``tools``: {"name": its name, arguments_key: its parameters}, name first."""
    defs: dict[str, Any] = {}
    options = [{"type": "object",
                "properties": {"name": {"const": t.function.name},
                               arguments_key: hoisted(t.function.parameters or dict(NO_PARAMETERS, properties={}),
                                                      f"tool{i}", defs)},
                "required": ["name", arguments_key], "additionalProperties": False}
               for i, t in enumerate(tools)]
    schema = options[0] if len(options) == 1 else {"anyOf": options}
    if defs:
        schema["$defs"] = defs
    schema["x-guidance"] = {**X_GUIDANCE, "lenient": not all(t.function.strict for t in tools)}
    return schema


def calls_array_schema(tools: list[Tool], parallel: bool) -> dict:
    call = call_schema(tools, "arguments")
    top = {k: call.pop(k) for k in ("$defs", "x-guidance") if k in call}  # both only count at the root
    return {"type": "array", "items": call, "minItems": 1, **({} if parallel else {"maxItems": 1}), **top}


def hoisted(parameters: dict, prefix: str, defs: dict) -> dict:
    """A tool's parameters schema, placed under the call schema: its "$ref"s are relative to
    its own root ("#", "#/$defs/X"), which is no longer the root. So its definitions move to
    the root's $defs under ``prefix`` and its refs are rewritten; a schema without refs stays
    as it is."""
    if not has_refs(parameters):
        return parameters
    own = {k: v for k, v in parameters.items() if k not in ("$defs", "definitions")}
    for section in ("$defs", "definitions"):
        for name, sub in (parameters.get(section) or {}).items():
            defs[f"{prefix}.{name}"] = rewrite_refs(sub, prefix)
    defs[prefix] = rewrite_refs(own, prefix)
    return {"$ref": f"#/$defs/{prefix}"}


def has_refs(value) -> bool:
    if isinstance(value, dict):
        return "$ref" in value or "$defs" in value or "definitions" in value or any(map(has_refs, value.values()))
    if isinstance(value, list):
        return any(map(has_refs, value))
    return False


def rewrite_refs(value, prefix: str):
    if isinstance(value, list):
        return [rewrite_refs(v, prefix) for v in value]
    if not isinstance(value, dict):
        return value
    out = {k: rewrite_refs(v, prefix) for k, v in value.items()}
    ref = value.get("$ref")
    if isinstance(ref, str):
        if ref == "#":
            out["$ref"] = f"#/$defs/{prefix}"
        for section in ("#/$defs/", "#/definitions/"):
            if ref.startswith(section) and "/" not in ref[len(section):]:
                out["$ref"] = f"#/$defs/{prefix}.{ref[len(section):]}"
    return out
