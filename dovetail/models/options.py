"""How a model may run: the choices the CLI, launch() and the workers all accept.

Defined here, apart from the code that acts on them (workers/), so that dovetail-launch and
launch() can list and check them before any worker starts, without importing torch or
llama_cpp.
"""
from __future__ import annotations

# Target backends (workers/target.py): transformers on any device, llama.cpp for .gguf files.
BACKENDS = ("transformers", "llama.cpp")
LLAMA_MISSING = ("the llama.cpp backend needs llama-cpp-python: pip install -e \".[llama]\" "
                 "(it compiles llama.cpp, a few minutes), or use the transformers backend")

# Weight-only quantizations of the CPU target's decoder layers (workers/quant.py).
QUANTIZE_CHOICES = ("none", "int8", "int4")

# llama.cpp's extra (repacked / AMX) weight buffers: auto tests them once per machine and model
# in a child process and keeps them where that decode survives (workers/llama_buffers.py).
LLAMA_EXTRA_BUFFERS = ("auto", "on", "off")
DEFAULT_LLAMA_EXTRA_BUFFERS = "auto"


def check_llama_extra_buffers(value, name: str = "llama_extra_buffers") -> str:
    if value not in LLAMA_EXTRA_BUFFERS:
        raise ValueError(f"{name} must be one of {', '.join(LLAMA_EXTRA_BUFFERS)}, got {value!r}")
    return value


# The llama.cpp target's context: KV cells shared by all its open requests.
DEFAULT_LLAMA_CTX = 8192
# A context smaller than one decode batch (workers/llama.py MAX_BATCH) aborts in llama.cpp's
# context set-up (GGML_ASSERT in output_reserve, measured with llama-cpp-python 0.3.36).
MIN_LLAMA_CTX = 512


def check_llama_ctx(value, name: str = "llama_ctx") -> int:
    if not isinstance(value, int) or value < MIN_LLAMA_CTX:
        raise ValueError(f"{name} must be an int >= {MIN_LLAMA_CTX}, got {value!r}")
    return value


def import_llama():
    """llama_cpp, or a RuntimeError that says how to install it."""
    try:
        import llama_cpp
    except ImportError as e:
        raise RuntimeError(LLAMA_MISSING) from e
    return llama_cpp


def llama_installed() -> bool:
    import importlib.util
    return importlib.util.find_spec("llama_cpp") is not None

DEFAULT_BATCH_ROWS = 64  # rows of several requests' verifications the target runs in one forward
MAX_BATCH_ROWS = 512     # rows per llama_decode call: the llama.cpp backend's n_batch (workers/llama.py)


def check_batch_rows(value, name: str = "batch_rows") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_BATCH_ROWS:
        raise ValueError(f"{name} must be an int in [1, {MAX_BATCH_ROWS}], got {value!r}")
    return value


# Tokens the prefix cache (workers/prefix_cache.py) keeps by default. On llama.cpp every
# decode attends over the cells in use up to the highest one, live or cached (its unified KV cache masks, it does not skip), so
# cached cells that no live request shares make every decode slower: beside a 100-token
# request, 1024 / 2048 / 4096 cached cells cost 0.99x / 1.02x / 1.22x a token (1.5B Q4_K_M,
# 2 EPYC cores). A bound of a couple of conversations, then, not the whole context. On
# transformers a cached token costs ~60 KB of memory at 1.5B in float32.
DEFAULT_PREFIX_CACHE_TOKENS = 2048
