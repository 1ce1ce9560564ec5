"""Where model files are kept, what a model name that is a path looks like, and the errors of
finding one.

The lowest module of dovetail.models' fetch -> hub -> loading: each of them imports what it
shares with the others from here, so none imports one above it (no import cycle).
Standard library only.
"""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "DOVETAIL_CACHE"

# Endings of model files, never of a Hugging Face Hub repository name: a name with one is a
# path. (A Hub id names a file only after a colon, org/repo:FILE.gguf.)
MODEL_FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".onnx", ".json")
PATH_PREFIXES = ("./", "../", "/", "~", ".\\", "..\\")  # relative or absolute, never an org


class FetchError(RuntimeError):
    """A download could not be completed (network, index or packaging problem)."""


class ModelNotFound(FileNotFoundError, ValueError):
    """Neither an existing file or folder nor a registry name."""


def default_cache_dir() -> Path:
    """``$DOVETAIL_CACHE`` if set, else ``~/.cache/dovetail``."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    return Path.home() / ".cache" / "dovetail"


def looks_like_path(spec: str) -> bool:
    """Whether ``spec`` can only be meant as a local path: it starts like one (./ ../ / ~),
    has more folders than org/repo, or ends in a model file's extension (models/x.gguf)
    before any ``:pick`` a Hub id may carry."""
    spec = str(spec)
    if spec.startswith(PATH_PREFIXES) or spec in (".", ".."):
        return True
    name = spec.split(":", 1)[0]
    return name.count("/") > 1 or name.lower().endswith(MODEL_FILE_SUFFIXES)


def check_missing_path(spec: str) -> None:
    """Refuse a name that is a path to nothing, before it is taken for a Hub id: a mistyped
    ``models/x.gguf`` must not become a download of the repository models/x.gguf."""
    if looks_like_path(spec):
        where = Path(spec).expanduser().absolute()
        raise ModelNotFound(f"no such file: {spec!r} ({where}) does not exist; it names a local path, so it is "
                            "not looked up on the Hugging Face Hub")
