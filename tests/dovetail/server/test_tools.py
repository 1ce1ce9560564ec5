"""Tool calling's building blocks (dovetail/server/tools.py) without a server: requests into a
tools-aware chat template and back, the model's calls parsed whole and streamed in random
pieces, and the grammar that forces a call."""
from __future__ import annotations

import json
import random

import pytest
from pydantic import ValidationError

from dovetail.server.errors import APIError
from dovetail.server.tools import (HERMES, LLAMA3_JSON, MISTRAL, ChatMessage, NamedToolChoice, Tool,
                                   ToolCallParser, detect_family, forced_call_grammar, new_call_id,
                                   parses_calls, template_messages, template_supports_tools, tools_for_template)
from tests.helpers import make_tiny_tokenizer

pytestmark = pytest.mark.timeout(120)

# Qwen2.5's template, cut down: tools in a <tools> block of the system message, calls as
# <tool_call> JSON, tool answers as <tool_response> in a user turn.
QWEN_LIKE_TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\"name\": <function-name>, \"arguments\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) "
    "or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}"
    "{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}"
    "{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}"
    "{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

LLAMA_LIKE_TEMPLATE = ("{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}{%- if tools %}"
                       "{{- 'Respond in the format {\"name\": function name, \"parameters\": dictionary of "
                       "argument name and its value}.' }}{%- endif %}<|eot_id|>")
MISTRAL_LIKE_TEMPLATE = "{%- for m in messages %}{%- if m.tool_calls %}[TOOL_CALLS] {%- endif %}{%- endfor %}"

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object",
                   # Lark's comment marks and braces in a string: the %json block must still parse
                   "properties": {"city": {"type": "string", "description": "a {city} # name // \\\" }"},
                                  "days": {"type": "integer"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters


def tools(*dicts) -> list[Tool]:
    return [Tool.model_validate(d) for d in dicts]


def ids():
    """Deterministic call ids, so that two parses compare equal."""
    counter = iter(range(1 << 30))
    return lambda: f"call_{next(counter)}"


def accumulate(events: list[dict]) -> tuple[str | None, list[dict]]:
    """What an OpenAI client builds from the deltas: content appended, tool calls by index."""
    content, calls = "", {}
    for delta in events:
        assert set(delta) <= {"content", "tool_calls"}, delta
        content += delta.get("content", "")
        for piece in delta.get("tool_calls", []):
            call = calls.setdefault(piece["index"], {"id": None, "type": "function",
                                                     "function": {"name": "", "arguments": ""}})
            if "id" in piece:
                assert call["id"] is None, "a call's header came twice"
                call["id"], call["type"] = piece["id"], piece["type"]
                call["function"]["name"] = piece["function"]["name"]
            call["function"]["arguments"] += piece["function"].get("arguments", "")
    out = [calls[i] for i in sorted(calls)]
    assert sorted(calls) == list(range(len(calls)))
    return (None if out and not content.strip() else content), out


def streamed(family: str, text: str, rng: random.Random, max_piece: int = 7) -> tuple[str | None, list[dict]]:
    parser, events, i = ToolCallParser(family, new_id=ids()), [], 0
    while i < len(text):
        n = rng.randint(1, max_piece)
        events += parser.feed(text[i:i + n])
        i += n
    events += parser.finish()
    assert accumulate(events) == parser.result()
    return accumulate(events)


def parse(family: str, text: str) -> tuple[str | None, list[dict]]:
    return ToolCallParser(family, new_id=ids()).parse(text)


def call(name: str, arguments: dict, index: int = 0) -> dict:
    return {"id": f"call_{index}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


# ---- the request -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen_like_tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer
    path = make_tiny_tokenizer(tmp_path_factory.mktemp("tools-tokenizer"))
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.chat_template = QWEN_LIKE_TEMPLATE
    return tok


def test_a_tool_round_trip_goes_through_the_template_and_parses_back(qwen_like_tokenizer):
    messages = [ChatMessage.model_validate(m) for m in [
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]]
    hf_messages, hf_tools = template_messages(messages, tools(WEATHER, TIME), "auto")
    assert hf_messages[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}  # an object in HF's format
    assert hf_messages[3] == {"role": "tool", "content": '{"temp": 21}', "tool_call_id": "call_1"}
    assert "tool_calls" not in hf_messages[1]  # templates test `'tool_calls' in message`
    assert hf_tools[1]["function"]["parameters"] == {"type": "object", "properties": {}}

    text = qwen_like_tokenizer.apply_chat_template(hf_messages, tools=hf_tools, add_generation_prompt=True,
                                                   tokenize=False)
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n\n<tools>\n")
    assert json.dumps(WEATHER["function"]["parameters"]) in text
    assert '<tool_response>\n{"temp": 21}\n</tool_response>' in text
    assert text.endswith("<|im_start|>assistant\n")
    ids_ = qwen_like_tokenizer.apply_chat_template(hf_messages, tools=hf_tools, add_generation_prompt=True)
    assert len(ids_) > 0

    # The call as the template wrote it into the history is what the parser reads as that call.
    turn = text.split("<|im_start|>assistant")[1].split("<|im_end|>")[0]
    content, calls = parse(HERMES, turn)
    assert content is None
    assert calls == [call("get_weather", {"city": "Paris"})]


def test_tool_choice_none_hides_the_tools_and_a_named_choice_shows_only_its_tool(qwen_like_tokenizer):
    given = tools(WEATHER, TIME)
    assert tools_for_template(given, "none") is None and not parses_calls(given, "none")
    assert [t["function"]["name"] for t in tools_for_template(given, "auto")] == ["get_weather", "get_time"]
    named = NamedToolChoice.model_validate({"type": "function", "function": {"name": "get_time"}})
    assert [t["function"]["name"] for t in tools_for_template(given, named)] == ["get_time"]
    as_dict = {"type": "function", "function": {"name": "get_time"}}  # OpenAI's JSON, unvalidated
    assert [t["function"]["name"] for t in tools_for_template(given, as_dict)] == ["get_time"]
    assert tools_for_template(None, "auto") is None and tools_for_template([], "auto") is None

    messages = [{"role": "user", "content": "hi"}]
    _, hf_tools = template_messages(messages, given, "none")
    text = qwen_like_tokenizer.apply_chat_template(messages, tools=hf_tools, add_generation_prompt=True,
                                                   tokenize=False)
    assert "<tools>" not in text and text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_what_no_answer_could_honour_is_a_400_naming_the_field():
    given = tools(WEATHER)
    with pytest.raises(APIError) as e:
        template_messages([{"role": "user", "content": "x"}], given, {"type": "function", "function": {"name": "nope"}})
    assert e.value.status == 400 and e.value.param == "tool_choice"
    with pytest.raises(APIError) as e:
        template_messages([{"role": "user", "content": "x"}], [], "required")
    assert e.value.param == "tool_choice"
    with pytest.raises(APIError) as e:
        template_messages([{"role": "user", "content": "x"}], tools(WEATHER, WEATHER), "auto")
    assert e.value.param == "tools"
    with pytest.raises(APIError) as e:
        template_messages([{"role": "user", "content": "x"},
                           {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f",
                                                                                          "arguments": "[1]"}}]}])
    assert e.value.param == "messages.1.tool_calls.0.function.arguments"
    with pytest.raises(ValidationError):
        ChatMessage.model_validate({"role": "tool", "content": "21"})  # which call does it answer?
    with pytest.raises(ValidationError):
        ChatMessage.model_validate({"role": "user", "content": "x", "tool_calls": [
            {"id": "c", "function": {"name": "f", "arguments": "{}"}}]})
    with pytest.raises(ValidationError):
        Tool.model_validate({"type": "custom", "custom": {"name": "f"}})
    # "auto" with no tools is what clients send by default: nothing to refuse
    assert template_messages([{"role": "user", "content": "x"}], None, "auto") == (
        [{"role": "user", "content": "x"}], None)


def test_the_family_comes_from_the_template():
    assert detect_family(QWEN_LIKE_TEMPLATE) == HERMES
    assert detect_family(LLAMA_LIKE_TEMPLATE) == LLAMA3_JSON
    assert detect_family("{{ '<|python_tag|>' }}") == LLAMA3_JSON
    assert detect_family(MISTRAL_LIKE_TEMPLATE) == MISTRAL
    assert detect_family([{"name": "default", "template": "x"},
                          {"name": "tool_use", "template": QWEN_LIKE_TEMPLATE}]) == HERMES
    assert detect_family({"default": "x", "tool_use": QWEN_LIKE_TEMPLATE}) == HERMES
    assert detect_family("{% for m in messages %}{{ m.content }}{% endfor %}") is None
    assert detect_family(None) is None
    assert template_supports_tools(QWEN_LIKE_TEMPLATE) and not template_supports_tools("{{ messages }}")
    assert new_call_id().startswith("call_") and len(new_call_id(MISTRAL)) == 9  # Mistral's templates insist


# ---- the output: hermes (Qwen) -----------------------------------------------------------------
HERMES_CASES = {
    "one call": ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
                 None, [call("get_weather", {"city": "Paris"})]),
    "content before a call": ('Let me look.\n\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
                              "Let me look.", [call("get_time", {})]),
    "two calls": ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                  '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 2}}\n</tool_call>',
                  None, [call("get_weather", {"city": "Paris"}), call("get_weather", {"city": "Oslo", "days": 2}, 1)]),
    "malformed JSON is text": ('Hi <tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call> ok',
                               'Hi <tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call> ok', []),
    "no name is text": ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>', []),
    "a malformed call then a good one": (
        '<tool_call>{oops}</tool_call>\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>',
        "<tool_call>{oops}</tool_call>", [call("get_time", {})]),
    "plain text": ("The weather is <b>fine</b> today.\n", "The weather is <b>fine</b> today.\n", []),
    "a partial marker at the end": ("Wait <tool_c", "Wait <tool_c", []),
    "unclosed but complete (the model stopped)": ('<tool_call>\n{"name": "get_time", "arguments": {}}\n',
                                                  None, [call("get_time", {})]),
    "unclosed and cut short": ('Sure <tool_call>\n{"name": "get_time", "argu',
                               'Sure <tool_call>\n{"name": "get_time", "argu', []),
    "the closing marker inside the arguments": (
        '<tool_call>{"name": "echo", "arguments": {"s": "<tool_call>"}}</tool_call>',
        None, [call("echo", {"s": "<tool_call>"})]),
    "arguments as JSON text": ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>',
                               None, [call("f", {"a": 1})]),
    "text after a call": ('<tool_call>{"name": "f", "arguments": {}}</tool_call>\n\nDone.', "Done.", [call("f", {})]),
    "unicode": ('Été <tool_call>{"name": "f", "arguments": {"q": "Zürich ☀"}}</tool_call>',
                "Été", [{"id": "call_0", "type": "function",
                          "function": {"name": "f", "arguments": '{"q": "Zürich ☀"}'}}]),
}


@pytest.mark.parametrize("case", sorted(HERMES_CASES))
def test_hermes_calls_parse_the_same_whole_and_streamed_in_random_pieces(case):
    text, content, calls = HERMES_CASES[case]
    assert parse(HERMES, text) == (content, calls)
    for seed in range(40):
        assert streamed(HERMES, text, random.Random(seed), max_piece=1 + seed % 13) == (content, calls), seed


def test_a_marker_split_across_pieces_is_held_back_and_no_marker_text_leaks():
    parser = ToolCallParser(HERMES, new_id=ids())
    assert parser.feed("Let me check. <tool_c") == [{"content": "Let me check."}]  # " <tool_c" waits
    assert parser.feed("all>\n{\"name\": \"get_time\", ") == []
    assert parser.feed("\"arguments\": {}}\n</tool") == []  # a call comes out only once it is complete
    header, arguments = parser.feed("_call>")
    assert header == {"tool_calls": [{"index": 0, "id": "call_0", "type": "function",
                                      "function": {"name": "get_time", "arguments": ""}}]}
    assert arguments == {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}
    assert parser.finish() == [] and parser.finish_reason("stop") == "tool_calls"

    plain = ToolCallParser(HERMES)
    assert plain.feed("a <tool") == [{"content": "a"}]
    assert plain.feed("box>") == [{"content": " <toolbox>"}]  # not a marker after all: out as it was
    assert plain.finish() == [] and plain.finish_reason("length") == "length"


# ---- the output: Llama 3.1 and Mistral ---------------------------------------------------------
LLAMA_CASES = {
    "one call": ('{"name": "get_weather", "parameters": {"city": "Paris"}}', None,
                 [call("get_weather", {"city": "Paris"})]),
    "after the python tag": ('<|python_tag|>{"name": "get_time", "parameters": {}}', None, [call("get_time", {})]),
    "two calls joined by ;": ('{"name": "a", "parameters": {"x": "}"}}; {"name": "b", "parameters": {}}', None,
                              [call("a", {"x": "}"}), call("b", {}, 1)]),
    "a JSON answer that is no call": ('{"city": "Paris"}', '{"city": "Paris"}', []),
    "braces in plain text": ("{x} is a set", "{x} is a set", []),
    "a call after text is text": ('Sure: {"name": "a", "parameters": {}}', 'Sure: {"name": "a", "parameters": {}}', []),
    "cut short": ('{"name": "a", "parameters": {"x', '{"name": "a", "parameters": {"x', []),
    "plain text": ("  Hello there.", "  Hello there.", []),
}

MISTRAL_CASES = {
    "marked": ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
               '{"name": "get_time", "arguments": {}}]', None,
               [call("get_weather", {"city": "Paris"}), call("get_time", {}, 1)]),
    "the mark decoded away": ('[{"name": "get_time", "arguments": {}}]', None, [call("get_time", {})]),
    "a list that is no call": ("[1, 2] are numbers", "[1, 2] are numbers", []),
    "a mark after text": ('Sure.[TOOL_CALLS][{"name": "get_time", "arguments": {}}]', "Sure.", [call("get_time", {})]),
    "a bracket in text": ("[citation needed]", "[citation needed]", []),
}


@pytest.mark.parametrize("family,case", [(LLAMA3_JSON, c) for c in sorted(LLAMA_CASES)]
                         + [(MISTRAL, c) for c in sorted(MISTRAL_CASES)])
def test_llama_and_mistral_calls_parse_the_same_whole_and_streamed(family, case):
    text, content, calls = (LLAMA_CASES if family == LLAMA3_JSON else MISTRAL_CASES)[case]
    assert parse(family, text) == (content, calls)
    for seed in range(40):
        assert streamed(family, text, random.Random(seed), max_piece=1 + seed % 11) == (content, calls), seed


# Whole calls, broken ones and the fragments of both, for random answers.
MIX_PIECES = {
    HERMES: ['<tool_call>\n{"name": "f", "arguments": {"a": [1, "]"]}}\n</tool_call>', "<tool_call>{x}</tool_call>",
             "<tool", "_call>", "</tool_call>", '{"name": "g", "arguments": {}}'],
    LLAMA3_JSON: ['{"name": "f", "parameters": {"a": [1, "]"]}}', "<|python_tag|>", "<|py", "; ", "{x}"],
    MISTRAL: ['[TOOL_CALLS] [{"name": "f", "arguments": {"a": "]"}}]', '[{"name": "g", "arguments": {}}]', "[TOOL",
              "[", "]", "[1]"],
}
MIX_TEXT = ["Hi.", " ", "\n", "{", "}", '"', "\\", "x"]


@pytest.mark.parametrize("family", [HERMES, LLAMA3_JSON, MISTRAL])
def test_random_mixes_of_text_and_calls_parse_the_same_whole_and_streamed(family):
    rng = random.Random(7)
    pieces, with_calls = MIX_PIECES[family] + MIX_TEXT, 0
    for _ in range(400):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 8)))
        whole = parse(family, text)
        assert streamed(family, text, rng) == whole, text
        content, calls = whole
        with_calls += bool(calls)
        if not calls:  # nothing is lost: an answer without calls is its text, character for character
            assert content == text
    assert with_calls > 25, "the mixes hardly test calls"  # Llama calls only at the start: the fewest


# ---- forcing a call ----------------------------------------------------------------------------
def lark_json(grammar: str) -> dict:
    return json.loads(grammar.split("%json ", 1)[1])


def test_a_forced_hermes_call_is_the_markers_around_the_chosen_tools_schema():
    given = tools(WEATHER, TIME)
    assert forced_call_grammar(HERMES, given, "auto") is None and forced_call_grammar(HERMES, given, "none") is None
    kind, grammar = forced_call_grammar(HERMES, given, "required")
    assert kind == "lark"
    assert grammar.splitlines()[:2] == ['start: call ("\\n" call)*', 'call: "<tool_call>\\n" body "\\n</tool_call>"']
    schema = lark_json(grammar)
    assert [o["properties"]["name"] for o in schema["anyOf"]] == [{"const": "get_weather"}, {"const": "get_time"}]
    assert schema["anyOf"][0]["properties"]["arguments"] == WEATHER["function"]["parameters"]
    assert list(schema["anyOf"][0]["properties"]) == ["name", "arguments"]  # the name first, as Qwen writes it
    assert schema["x-guidance"]["lenient"] is True

    kind, grammar = forced_call_grammar(HERMES, given, {"type": "function", "function": {"name": "get_weather"}},
                                        parallel=False)
    assert grammar.splitlines()[0] == "start: call"
    schema = lark_json(grammar)
    assert schema["properties"]["name"] == {"const": "get_weather"} and "anyOf" not in schema
    with pytest.raises(APIError):
        forced_call_grammar(HERMES, given, {"type": "function", "function": {"name": "nope"}})


def test_forced_llama_and_mistral_calls_are_json_schemas():
    given = tools(WEATHER)
    kind, schema = forced_call_grammar(LLAMA3_JSON, given, "required")
    assert kind == "json_schema" and list(schema["properties"]) == ["name", "parameters"]
    kind, schema = forced_call_grammar(MISTRAL, given, "required", parallel=False)
    assert kind == "json_schema" and schema["type"] == "array" and schema["maxItems"] == 1
    assert schema["items"]["properties"]["name"] == {"const": "get_weather"} and "x-guidance" in schema
    kind, grammar = forced_call_grammar(MISTRAL, given, "required", mark_token_id=5)
    assert kind == "lark" and grammar.startswith('start: <[5]> " "? body\nbody: %json ')


NESTED = {"type": "function", "function": {"name": "book", "strict": True, "parameters": {
    "type": "object", "properties": {"who": {"$ref": "#/$defs/Person"}, "then": {"$ref": "#"}},
    "$defs": {"Person": {"type": "object", "properties": {"name": {"type": "string"},
                                                          "friend": {"$ref": "#/$defs/Person"}}}}}}}


def test_a_tools_own_refs_still_resolve_once_placed_in_the_call_schema():
    kind, grammar = forced_call_grammar(HERMES, tools(NESTED, WEATHER), "required")
    schema = lark_json(grammar)
    assert schema["anyOf"][0]["properties"]["arguments"] == {"$ref": "#/$defs/tool0"}
    assert schema["$defs"]["tool0"]["properties"] == {"who": {"$ref": "#/$defs/tool0.Person"},
                                                      "then": {"$ref": "#/$defs/tool0"}}
    assert schema["$defs"]["tool0.Person"]["properties"]["friend"] == {"$ref": "#/$defs/tool0.Person"}
    assert schema["anyOf"][1]["properties"]["arguments"] == WEATHER["function"]["parameters"]  # no refs: as given
    assert schema["x-guidance"]["lenient"] is True  # one tool is strict, the other not: lenient
    refs = []

    def walk(v):
        if isinstance(v, dict):
            refs.extend([v["$ref"]] if "$ref" in v else [])
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
    walk(schema)
    assert refs and all(r.split("/")[-1] in schema["$defs"] for r in refs)


def test_what_the_grammar_forces_is_what_the_parser_reads():
    """With llguidance installed: the forced grammar compiles, accepts a call written as the
    model writes it (which the parser turns into tool_calls), and refuses text and other names."""
    llguidance = pytest.importorskip("llguidance")
    tokenizer = llguidance.LLTokenizer("byte")

    def accepts(kind: str, spec, text: str) -> bool:
        grammar = llguidance.grammar_from(kind, spec if kind == "lark" else json.dumps(spec))
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=1)
        assert not matcher.is_error(), matcher.get_error()
        for t in tokenizer.tokenize_str(text):
            if not matcher.consume_token(t):
                return False
        return matcher.is_accepting()

    given = tools(WEATHER, TIME)
    call_text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>'
    second = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    required = forced_call_grammar(HERMES, given, "required")
    assert accepts(*required, call_text) and accepts(*required, call_text + "\n" + second)
    assert parse(HERMES, call_text + "\n" + second)[1] == [call("get_weather", {"city": "Paris", "days": 2}),
                                                           call("get_time", {}, 1)]
    assert not accepts(*required, "The weather is fine.")
    assert not accepts(*required, '<tool_call>\n{"name": "get_weather", "arguments": {"days": 2}}\n</tool_call>')
    named = forced_call_grammar(HERMES, given, {"type": "function", "function": {"name": "get_time"}})
    assert accepts(*named, second) and not accepts(*named, call_text)
    nested = forced_call_grammar(HERMES, tools(NESTED), "required")  # "#/$defs/..." inside Lark
    person = '{"name": "book", "arguments": {"who": {"name": "Ann", "friend": {"name": "Bo"}}}}'
    assert accepts(*nested, f"<tool_call>\n{person}\n</tool_call>")
    llama = forced_call_grammar(LLAMA3_JSON, given, "required")
    text = '{"name": "get_weather", "parameters": {"city": "Oslo"}}'
    assert accepts(*llama, text) and parse(LLAMA3_JSON, text)[1] == [call("get_weather", {"city": "Oslo"})]
