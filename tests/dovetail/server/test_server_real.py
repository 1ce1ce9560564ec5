"""The server on the real Qwen2.5-Coder-0.5B GGUF (llama.cpp backend), through the openai client."""
import os

import openai
import pytest

import dovetail
from dovetail.models.fetch import fetch_model

pytestmark = [pytest.mark.real_model, pytest.mark.timeout(900)]

if os.environ.get("DOVETAIL_REQUIRE_LLAMA") != "1":
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install -e '.[llama]')")

MESSAGES = [{"role": "user", "content": "Write a Python function that reverses a string."}]
N = 32


def test_chat_through_the_openai_client_is_the_library_answer(serve_factory):
    gguf = fetch_model("qwen2.5-coder-0.5b-instruct")
    with dovetail.launch(gguf, None, backend="llama.cpp") as coord:
        want = coord.generate(MESSAGES, max_new_tokens=N)
    server = serve_factory("--target", gguf, "--no-draft", "--backend", "llama.cpp", "--served-model-name", "coder")
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=300)
    got = client.chat.completions.create(model="coder", messages=MESSAGES, temperature=0, max_tokens=N)
    assert got.choices[0].message.content == want.text
    assert got.usage.completion_tokens == len(want.token_ids)
    streamed = client.chat.completions.create(model="coder", messages=MESSAGES, temperature=0, max_tokens=N,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == want.text
    print(f"\n0.5B GGUF over HTTP: {got.usage.completion_tokens} tokens, text identical to the library API's")
