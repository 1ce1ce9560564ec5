"""Models named as the Hugging Face Hub names them, fetched through huggingface_hub.

- ``org/repo``: a transformers repository (config, tokenizer, safetensors); a repository
  of GGUF files only gets its Q4_K_M file, as llama.cpp's ``-hf org/repo`` does.
- ``org/repo:QUANT``: the GGUF of that quantization (``Q8_0``, ``q4_k_m``, ...), all parts
  of a split one (``-00001-of-00003.gguf``); the path of its first part is returned, which
  is what llama.cpp loads.
- ``org/repo:FILE.gguf``: that file.

huggingface_hub does the rest as it does for transformers and vLLM: its cache
(``~/.cache/huggingface/hub``, ``HF_HOME``, ``HF_HUB_CACHE``), ``HF_TOKEN``, ``HF_ENDPOINT``,
``HF_HUB_OFFLINE``, resumable downloads and its own progress bars. What the cache already
holds resolves with no network at all.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from dovetail.models.store import FetchError, ModelNotFound

HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?::(?P<pick>[\w.+-]+))?$")
DEFAULT_QUANT = "Q4_K_M"  # llama.cpp's -hf picks this from a GGUF repository named alone
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]  # a transformers folder
SPLIT = re.compile(r"-(\d{5})-of-(\d{5})\.gguf$", re.IGNORECASE)


@dataclass(frozen=True)
class HubRef:
    repo: str
    pick: str | None = None  # a quantization tag or a .gguf file name; None: the repository's model

    def __str__(self) -> str:
        return self.repo + (f":{self.pick}" if self.pick else "")


def parse_hub_id(spec: str) -> HubRef | None:
    """The Hub id in ``spec``, or None when it does not look like one."""
    m = HUB_ID.match(str(spec))
    if m is None or ".." in m["repo"]:
        return None
    return HubRef(m["repo"], m["pick"])


def resolve_hub(ref: HubRef, progress: bool = True) -> Path:
    """The local path of the model ``ref`` names: from the cache, else downloaded."""
    cached = _cached(ref)
    if cached is not None:
        return cached
    from huggingface_hub import constants
    if constants.HF_HUB_OFFLINE:
        raise ModelNotFound(f"{ref} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) and HF_HUB_OFFLINE "
                            "is set: download it once with the network on")
    files = _call(ref, "list its files", lambda api: api.list_repo_files(ref.repo))
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    if ref.pick is None and not ggufs:
        if "config.json" not in files:
            raise FetchError(f"{ref} has no config.json and no .gguf file: not a model dovetail can load")
        return Path(_download(ref, MODEL_FILES, progress))
    chosen = pick_gguf(ref, ggufs)
    folder = _download(ref, chosen, progress)
    return Path(folder) / chosen[0]


def pick_gguf(ref: HubRef, ggufs: list[str]) -> list[str]:
    """The file(s) of the GGUF ``ref`` picks, parts in order; refused with the choices listed."""
    pick = ref.pick or DEFAULT_QUANT
    if pick.lower().endswith(".gguf"):
        chosen = [f for f in ggufs if f == pick or f.rsplit("/", 1)[-1] == pick]
    else:
        tag = re.compile(rf"(^|[-_.]){re.escape(pick)}([-_.]|$)", re.IGNORECASE)
        chosen = [f for f in ggufs if tag.search(SPLIT.sub(".gguf", f.rsplit("/", 1)[-1])[:-len(".gguf")])]
    if not chosen:
        choices = sorted({quant_tag(f) for f in ggufs} - {""}) or ggufs
        raise ModelNotFound(f"{ref.repo} has no GGUF {'file' if pick.lower().endswith('.gguf') else 'quantization'} "
                            f"{pick!r}; it has: {', '.join(choices) or 'no .gguf files'}")
    first = SPLIT.sub("", chosen[0])
    if any(SPLIT.sub("", f) != first for f in chosen):  # two files for one tag (e.g. two folders)
        raise ModelNotFound(f"{ref} matches several GGUF files ({', '.join(chosen)}): name one as {ref.repo}:FILE.gguf")
    parts = [SPLIT.search(f) for f in chosen]
    if any(parts) and (not all(parts) or len(chosen) != int(parts[0][2])):
        raise ModelNotFound(f"{ref}: the split GGUF {first} is incomplete on the Hub ({len(chosen)} parts found)")
    return chosen


def quant_tag(filename: str) -> str:
    """Q4_K_M from 'Qwen2.5-Coder-7B-Instruct-Q4_K_M-00001-of-00002.gguf' (empty if none)."""
    stem = SPLIT.sub(".gguf", filename.rsplit("/", 1)[-1])[:-len(".gguf")]
    m = re.search(r"(?:^|[-_.])((?:I?Q\d[\w]*?)|BF16|F16|F32)$", stem, re.IGNORECASE)
    return m[1].upper() if m else ""


# ---- draft="auto" for a Hub target ---------------------------------------------------------------
# A target repository (pattern, case-insensitive) -> the small model of its family that drafts
# for it: its transformers repository (whose tokenizer is checked first) and its GGUF.
FAMILY_DRAFTS = (
    (r"qwen2\.5-coder-(?:3|7|14|32)b", "Qwen/Qwen2.5-Coder-0.5B-Instruct", "Qwen/Qwen2.5-Coder-0.5B-Instruct-GGUF:Q8_0"),
    (r"qwen2\.5-(?:3|7|14|32|72)b", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct-GGUF:Q8_0"),
    (r"llama-3(?:\.\d)?-(?:8|70)b", "unsloth/Llama-3.2-1B-Instruct", "bartowski/Llama-3.2-1B-Instruct-GGUF:Q8_0"),
)
TOKENIZER_FILES = ["tokenizer*", "*.json", "*.model", "*.tiktoken", "*.txt", "*.jinja"]  # no weights


def family_draft(target: str, target_tokenizer_hash: str, gguf: bool) -> tuple[str | None, str]:
    """(draft id, why) for a target named by a Hub id: the small model of its family when
    FAMILY_DRAFTS knows one and its tokenizer, fetched alone (a few MB) before any weights,
    hashes as the target's; (None, why not) otherwise."""
    from dovetail.models.loading import load_tokenizer, tokenizer_hash
    ref = parse_hub_id(target)
    if ref is None:
        return None, f"{target} is not a Hub id"
    entry = next((e for e in FAMILY_DRAFTS if re.search(e[0], ref.repo, re.IGNORECASE)), None)
    if entry is None:
        return None, f"no draft of {ref.repo}'s family is known"
    _, hf_repo, gguf_id = entry
    try:
        folder = _cached_files(hf_repo) or _download(HubRef(hf_repo), TOKENIZER_FILES, progress=False)
        tokenizer = load_tokenizer(folder)
    except (OSError, ValueError, RuntimeError) as e:  # FetchError, ModelNotFound, a broken tokenizer
        return None, f"the tokenizer of {hf_repo} could not be read ({e})"
    if tokenizer is None or tokenizer_hash(tokenizer, 0) != target_tokenizer_hash:
        return None, f"{hf_repo}'s tokenizer is not {ref.repo}'s"
    return (gguf_id if gguf else hf_repo), f"the {hf_repo.split('/')[-1]} of {ref.repo}'s family"


# ---- huggingface_hub ------------------------------------------------------------------------------
def _snapshot(repo: str) -> Path | None:
    """The cache's snapshot folder of ``repo`` that refs/main names, read as huggingface_hub
    lays the cache out (its own offline lookup refuses a snapshot of which only some files
    were fetched, which a GGUF repository's always is); None when there is none."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name
    folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")
    try:
        return folder / "snapshots" / (folder / "refs" / "main").read_text().strip()
    except OSError:
        return None


def _cached_files(repo: str) -> str | None:
    """The cached snapshot folder of ``repo`` when it holds a tokenizer, else None."""
    snapshot = _snapshot(repo)
    return str(snapshot) if snapshot is not None and any(snapshot.glob("tokenizer*")) else None


def _cached(ref: HubRef) -> Path | None:
    """The model from the local cache alone, if all of it is there."""
    import json
    folder = _snapshot(ref.repo)
    if folder is None:
        return None
    files = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]  # a dangling link: not fetched
    ggufs = sorted(f for f in files if f.lower().endswith(".gguf"))
    if ref.pick is None and not ggufs:
        if "config.json" not in files or not any(f.endswith(".safetensors") for f in files):
            return None
        index = folder / "model.safetensors.index.json"
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else set()
        except (OSError, ValueError, KeyError, AttributeError):
            return None
        return folder if shards <= set(files) else None
    if not ggufs:
        return None
    try:
        chosen = pick_gguf(ref, ggufs)
    except FileNotFoundError:
        return None  # not in the cache: the Hub may have it
    return folder / chosen[0]


def _download(ref: HubRef, patterns: list[str], progress: bool) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
    if not progress:
        disable_progress_bars()
    try:
        return _call(ref, "download it", lambda api: snapshot_download(ref.repo, allow_patterns=patterns))
    finally:
        if not progress:
            enable_progress_bars()


def _http():
    """The HTTP client huggingface_hub speaks (httpx2 from its 2.0, httpx before)."""
    try:
        import httpx2 as http
    except ImportError:
        import httpx as http
    return http


def _call(ref: HubRef, what: str, fn):
    """fn(HfApi()), its errors said in our words. huggingface_hub itself retries server errors
    (408, 429, 5xx) and dropped connections with exponential backoff, five times."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError
    http = _http()
    try:
        return fn(HfApi())
    except GatedRepoError as e:
        raise FetchError(f"{ref.repo} is gated on the Hub: accept its terms there and set HF_TOKEN ({e})") from e
    except RepositoryNotFoundError as e:
        raise ModelNotFound(f"{ref.repo!r} is not a repository on {constants.ENDPOINT} (or it is private: "
                            "set HF_TOKEN)") from e
    except http.ConnectError as e:
        raise FetchError(f"{ref} is not a file here, and the Hub at {constants.ENDPOINT} cannot be reached "
                         f"({e}); for a mirror set HF_ENDPOINT, for the local cache only HF_HUB_OFFLINE=1") from e
    except (HfHubHTTPError, http.TransportError) as e:
        raise FetchError(f"could not {what} from {constants.ENDPOINT} for {ref}: {e}") from e
