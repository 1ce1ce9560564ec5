"""Hub ids (org/repo, org/repo:QUANT, org/repo:FILE.gguf) through huggingface_hub, against a
local stand-in for the Hub (hub_server.py): nothing leaves the machine."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dovetail.models.fetch import ModelNotFound, resolve_model
from dovetail.models.hub import HubRef, parse_hub_id, pick_gguf, quant_tag
from tests.dovetail.models.hub_server import FakeHub

pytestmark = pytest.mark.timeout(120)

SPLIT_FILES = ["m-Q6_K-00002-of-00002.gguf", "m-Q6_K-00001-of-00002.gguf"]
GGUFS = ["Qwen2.5-7B-Instruct-Q4_K_M.gguf", "Qwen2.5-7B-Instruct-q8_0.gguf", "Qwen2.5-7B-Instruct-BF16.gguf"]


@pytest.mark.parametrize("spec, ref", [
    ("Qwen/Qwen2.5-Coder-7B-Instruct", HubRef("Qwen/Qwen2.5-Coder-7B-Instruct")),
    ("Qwen/Qwen2.5-Coder-7B-Instruct-GGUF:Q4_K_M", HubRef("Qwen/Qwen2.5-Coder-7B-Instruct-GGUF", "Q4_K_M")),
    ("bartowski/Llama-3.2-1B-Instruct-GGUF:Llama-3.2-1B-Instruct-Q8_0.gguf",
     HubRef("bartowski/Llama-3.2-1B-Instruct-GGUF", "Llama-3.2-1B-Instruct-Q8_0.gguf")),
    ("./models/x", None), ("/abs/x", None), ("a/b/c", None), ("name", None), ("a/../b", None), ("~/x", None),
])
def test_what_is_a_hub_id(spec, ref):
    assert parse_hub_id(spec) == ref


def test_a_gguf_is_picked_by_its_quantization_tag_as_llama_cpp_does():
    assert pick_gguf(HubRef("o/r", "q4_k_m"), GGUFS) == ["Qwen2.5-7B-Instruct-Q4_K_M.gguf"]
    assert pick_gguf(HubRef("o/r", "Q8_0"), GGUFS) == ["Qwen2.5-7B-Instruct-q8_0.gguf"]
    assert pick_gguf(HubRef("o/r"), GGUFS) == ["Qwen2.5-7B-Instruct-Q4_K_M.gguf"]  # no tag: Q4_K_M
    assert pick_gguf(HubRef("o/r", "Qwen2.5-7B-Instruct-BF16.gguf"), GGUFS) == ["Qwen2.5-7B-Instruct-BF16.gguf"]
    assert pick_gguf(HubRef("o/r", "Q6_K"), sorted(SPLIT_FILES)) == sorted(SPLIT_FILES)  # first part first
    assert [quant_tag(f) for f in GGUFS + SPLIT_FILES] == ["Q4_K_M", "Q8_0", "BF16", "Q6_K", "Q6_K"]


def test_a_missing_or_ambiguous_gguf_is_refused_with_the_choices():
    with pytest.raises(ModelNotFound, match=r"no GGUF quantization 'Q5_K_M'; it has: BF16, Q4_K_M, Q8_0"):
        pick_gguf(HubRef("o/r", "Q5_K_M"), GGUFS)
    with pytest.raises(ModelNotFound, match="several GGUF files"):
        pick_gguf(HubRef("o/r", "Q8_0"), ["a/m-Q8_0.gguf", "b/m-Q8_0.gguf"])
    with pytest.raises(ModelNotFound, match="incomplete"):
        pick_gguf(HubRef("o/r", "Q8_0"), ["m-Q8_0-00001-of-00003.gguf", "m-Q8_0-00002-of-00003.gguf"])


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The stand-in Hub as HF_ENDPOINT, and an empty Hugging Face cache, for this process."""
    from huggingface_hub import constants
    with FakeHub() as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", server.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        yield server


def test_a_gguf_repo_resolves_and_a_second_start_needs_no_network(hub, monkeypatch):
    from huggingface_hub import constants
    hub.add_repo("org/m-GGUF", {"README.md": b"hi", **{f: f.encode() * 10 for f in GGUFS + SPLIT_FILES}})
    path = resolve_model("org/m-GGUF:q8_0", progress=False)
    assert path.name == "Qwen2.5-7B-Instruct-q8_0.gguf" and path.read_bytes() == path.name.encode() * 10
    assert [d.rsplit("/", 1)[-1] for d in hub.downloads()] == ["Qwen2.5-7B-Instruct-q8_0.gguf"]  # that file only
    first = resolve_model("org/m-GGUF:Q6_K", progress=False)  # split parts: both fetched, the first returned
    assert first.name == "m-Q6_K-00001-of-00002.gguf" and (first.parent / SPLIT_FILES[0]).exists()
    hub.requests.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert resolve_model("org/m-GGUF:q8_0", progress=False) == path
    assert hub.requests == []  # from the cache alone
    with pytest.raises(ModelNotFound, match="HF_HUB_OFFLINE"):
        resolve_model("org/m-GGUF:BF16", progress=False)  # not cached, and offline


def test_bad_ids_and_missing_tags_are_clear_errors_and_a_5xx_burst_is_retried(hub):
    hub.add_repo("org/m-GGUF", {f: b"x" for f in GGUFS})
    with pytest.raises(ModelNotFound, match="'org/nope' is not a repository on http://127.0.0.1"):
        resolve_model("org/nope", progress=False)
    with pytest.raises(ModelNotFound, match="no GGUF quantization 'Q3_K_S'; it has: BF16, Q4_K_M, Q8_0"):
        resolve_model("org/m-GGUF:Q3_K_S", progress=False)
    hub.fail_next = 2  # two 503s: huggingface_hub's own backoff (1 s, 2 s) rides them out
    assert resolve_model("org/m-GGUF:BF16", progress=False).name == "Qwen2.5-7B-Instruct-BF16.gguf"
    assert sum("/tree/" in r for r in hub.requests) >= 3


@pytest.mark.parametrize("spec", ["models/x.gguf", "models/x.safetensors", "org/model.bin", "./x", "../x",
                                  "/no/such/dir", "~/no-such-dovetail-model", "a/b/c.gguf"])
def test_a_missing_path_is_no_such_file_not_a_hub_fetch(hub, tmp_path, monkeypatch, spec):
    """A mistyped relative path would otherwise be taken for the Hub id org/repo and fetched."""
    monkeypatch.chdir(tmp_path)
    hub.add_repo("models/x.gguf", {"config.json": b"{}", "model.safetensors": b"x"})  # there to be fetched
    with pytest.raises(ModelNotFound, match="no such file"):
        resolve_model(spec, progress=False)
    assert hub.requests == []


def test_a_hub_id_that_looks_like_no_path_still_goes_to_the_hub(hub, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    hub.add_repo("Qwen/Qwen2.5-0.5B-Instruct", {"config.json": b"{}", "model.safetensors": b"x"})
    hub.add_repo("org/m-GGUF", {f: b"x" for f in GGUFS})
    assert (resolve_model("Qwen/Qwen2.5-0.5B-Instruct", progress=False) / "model.safetensors").read_bytes() == b"x"
    assert resolve_model("org/m-GGUF:Qwen2.5-7B-Instruct-BF16.gguf", progress=False).name == GGUFS[2]  # :FILE.gguf


def test_a_transformers_repo_decodes_as_the_same_folder_on_disk(hub, tmp_path):
    import dovetail
    from tests.helpers import make_tiny_model, make_tiny_tokenizer
    folder = make_tiny_model(tmp_path / "tiny", seed=0)
    make_tiny_tokenizer(folder)
    hub.add_folder("org/tiny", folder)
    got = resolve_model("org/tiny", progress=False)
    assert (got / "config.json").exists() and list(got.glob("*.safetensors"))
    outputs = []
    for target in ("org/tiny", folder):
        with dovetail.launch(target, None, dtype="float64") as coord:
            outputs.append(coord.generate("hello there", max_new_tokens=12).token_ids)
    assert outputs[0] == outputs[1] and len(outputs[0]) == 12


@pytest.mark.real_model
@pytest.mark.timeout(300)
def test_a_gguf_from_the_hub_decodes_as_the_file_on_disk(tmp_path):
    """The CLI in a fresh process, pointed at the stand-in Hub by HF_ENDPOINT and HF_HOME only."""
    gguf = resolve_model("smollm2-135m-instruct")
    with FakeHub() as hub:
        hub.add_repo("org/SmolLM2-135M-Instruct-GGUF", {"SmolLM2-135M-Instruct-Q4_K_M.gguf": gguf.read_bytes()})
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
               "OMP_WAIT_POLICY": "PASSIVE"}
        texts = []
        for target in ("org/SmolLM2-135M-Instruct-GGUF", str(gguf)):
            run = subprocess.run([sys.executable, "-m", "dovetail.cli", "--target", target, "--no-draft", "--backend",
                                  "llama.cpp", "--target-cpus", "0", "--prompt", "Name a color.",
                                  "--max-new-tokens", "16"],
                                 env=env, capture_output=True, text=True, timeout=240)
            assert run.returncode == 0, run.stderr[-2000:]
            texts.append(run.stdout)
        assert texts[0] == texts[1] and texts[0].strip()
        assert any(Path(p).name == "SmolLM2-135M-Instruct-Q4_K_M.gguf" for p in (tmp_path / "hf").rglob("*.gguf"))


def test_the_fetch_command_takes_hub_ids(hub, capsys):
    from dovetail.models.fetch import main
    hub.add_repo("org/m-GGUF", {f: b"x" for f in GGUFS})
    assert main(["org/m-GGUF:Q8_0", "--quiet"]) == 0
    assert capsys.readouterr().out.strip().endswith("Qwen2.5-7B-Instruct-q8_0.gguf")
    assert main(["org/m-GGUF:Q2_K", "--quiet"]) == 1
    assert "no GGUF quantization 'Q2_K'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["not-a-model"])


def test_auto_draft_for_a_hub_target_is_the_small_model_of_its_family(hub, tmp_path):
    import dovetail
    from tests.helpers import make_tiny_model, make_tiny_tokenizer
    target = make_tiny_model(tmp_path / "t", seed=0)
    draft = make_tiny_model(tmp_path / "d", seed=1, noise_from=target, noise=0.005)
    for folder in (target, draft):
        make_tiny_tokenizer(folder)
    hub.add_folder("Qwen/Qwen2.5-Coder-7B-Instruct", target)
    hub.add_folder("Qwen/Qwen2.5-Coder-0.5B-Instruct", draft)
    outputs = []
    for name, d in (("Qwen/Qwen2.5-Coder-7B-Instruct", "auto"), (target, None)):
        # A fixed tree: on a tiny model the measured curve is timing noise, and automatic sizing
        # with its gate may then price every draft token out (drafted 0 on one CI run).
        with dovetail.launch(name, d, dtype="float64", draft_device="cpu", depth=3, top_k=1, max_nodes=3) as coord:
            r = coord.generate("hello there", max_new_tokens=16)
            outputs.append((r.token_ids, r.stats.drafted))
    assert outputs[0][0] == outputs[1][0]
    assert outputs[0][1] > 0 and outputs[1][1] == 0  # the family's draft drafted; alone, nothing


def test_a_family_draft_with_another_tokenizer_is_refused_before_its_weights(hub, tmp_path, caplog):
    from dovetail.runtime.launch import pick_draft
    from tests.helpers import make_tiny_model, make_tiny_tokenizer
    target = make_tiny_model(tmp_path / "t", seed=0)
    other = make_tiny_model(tmp_path / "o", seed=1)
    make_tiny_tokenizer(target)
    make_tiny_tokenizer(other, chars="zyxwvutsrqponmlkjihgfedcba ")
    hub.add_folder("meta-llama/Llama-3.1-8B-Instruct", target)
    hub.add_folder("unsloth/Llama-3.2-1B-Instruct", other)
    path = resolve_model("meta-llama/Llama-3.1-8B-Instruct", progress=False)
    hub.requests.clear()
    assert pick_draft("auto", path, target_spec="meta-llama/Llama-3.1-8B-Instruct") is None
    assert "unsloth/Llama-3.2-1B-Instruct's tokenizer is not meta-llama/Llama-3.1-8B-Instruct's" in caplog.text
    fetched = [d.rsplit("/", 1)[-1] for d in hub.downloads()]
    assert fetched and not any(f.endswith(".safetensors") for f in fetched)  # its tokenizer only
    hub.add_folder("org/Unknown-7B", target)
    path = resolve_model("org/Unknown-7B", progress=False)
    assert pick_draft("auto", path, target_spec="org/Unknown-7B") is None
    assert "no draft of org/Unknown-7B's family is known" in caplog.text
