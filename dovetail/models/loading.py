"""Model files: where they are, how they load, what identifies them.

A target or draft is a Hugging Face folder or a GGUF file. Loading a GGUF through
transformers de-quantizes it, which takes tens of seconds per process, so the first load
keeps a safetensors copy (converted_dir) that later loads, and load_tokenizer, read instead.
torch and transformers are imported where they are used: the coordinator loads a tokenizer
without either worker's model code.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
from pathlib import Path

from dovetail.models.store import default_cache_dir

log = logging.getLogger(__name__)

DTYPE_NAMES = ("float32", "bfloat16", "float16", "float64")


def cpu_has_bf16() -> bool:
    """bf16 pays on the CPU only with native bf16 dot products (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_dtype(requested: str, device: str):
    """The torch dtype for ``requested`` ("auto" or one of DTYPE_NAMES) on ``device``."""
    import torch
    if requested != "auto":
        if requested not in DTYPE_NAMES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPE_NAMES)}, got {requested!r}")
        return getattr(torch, requested)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else torch.float32


def split_model_path(path: str | os.PathLike) -> tuple[str, dict]:
    """A GGUF file loads as (its folder, gguf_file=name); a folder loads as is."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model not found: {p}")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ValueError(f"{p}: expected a .gguf file or a Hugging Face model folder")
        return str(p.parent), {"gguf_file": p.name}
    if not (p / "config.json").exists():
        raise ValueError(f"{p}: a Hugging Face model folder needs a config.json")
    return str(p), {}


CONVERT_CACHE_ENV = "DOVETAIL_CONVERT_CACHE"  # "0" turns the converted-GGUF cache off


def converted_dir(gguf: Path, dtype) -> Path | None:
    """Where a de-quantized copy of a GGUF file lives (safetensors + tokenizer), or None.

    De-quantizing a GGUF in transformers and converting its tokenizer takes tens of
    seconds per process; loading the safetensors copy takes a few.
    """
    if os.environ.get(CONVERT_CACHE_ENV, "1") == "0":
        return None
    st = gguf.stat()
    name = f"{gguf.stem}-{st.st_size}-{int(st.st_mtime)}-{dtype_name(dtype)}"
    return default_cache_dir() / "converted" / name


def usable_folder(folder: Path | None) -> bool:
    return folder is not None and (folder / "config.json").exists() and (folder / "tokenizer_config.json").exists()


def save_converted(model, tokenizer, folder: Path) -> None:
    """Write the de-quantized model atomically; two workers converting at once is fine."""
    import tempfile
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".", dir=folder.parent))
    try:
        # save_pretrained refuses GGUF-loaded models (they count as "quantized"), so
        # write a plain config and the de-quantized tensors ourselves.
        from safetensors.torch import save_model
        config = copy.deepcopy(model.config)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, folder)
        log.info("cached the de-quantized model in %s", folder)
    except Exception as e:  # another process won the race, the disk is full...: not fatal
        log.warning("not caching the de-quantized model (%s: %s)", type(e).__name__, e)
    finally:
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


def load_tokenizer(path: str | os.PathLike):
    """The model's tokenizer, or None for models saved without one (token ids only)."""
    from transformers import AutoTokenizer
    folder, kw = split_model_path(path)
    if kw:
        # Any dtype's converted copy carries the same tokenizer, already converted.
        probe = converted_dir(Path(path), "float32")
        prefix = probe.name.rsplit("-", 1)[0] + "-" if probe else None
        for cached in sorted(probe.parent.glob(prefix + "*")) if probe and probe.parent.exists() else []:
            if usable_folder(cached):
                return AutoTokenizer.from_pretrained(str(cached))
    if not kw and not any((Path(folder) / f).exists() for f in
                          ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
        return None
    if not kw and _saved_tokenizer_class(Path(folder)) in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        # A generic tokenizer.json: AutoTokenizer would rebuild it as the model type's own
        # class (new pre-tokenizer included); load it exactly as saved instead.
        from transformers import PreTrainedTokenizerFast
        return PreTrainedTokenizerFast.from_pretrained(folder)
    return AutoTokenizer.from_pretrained(folder, **kw)


def _saved_tokenizer_class(folder: Path) -> str | None:
    try:
        return json.loads((folder / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        return None


def tokenizer_hash(tokenizer, vocab_size: int) -> str:
    """Identity of a tokenizer: two models may share drafts only when their vocabularies agree."""
    if tokenizer is None:
        return f"no-tokenizer:{vocab_size}"
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab, ensure_ascii=False).encode()).hexdigest()[:16]


def load_hf_model(path, dtype):
    """The transformers model of a HF folder or GGUF file (a GGUF from its de-quantized copy
    once there is one; the first load makes it)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging
    folder, kw = split_model_path(path)
    cached = converted_dir(Path(path), dtype) if kw else None
    # A progress bar only where loading is slow: de-quantizing a GGUF file.
    slow = kw and not usable_folder(cached)
    (hf_logging.enable_progress_bar if slow else hf_logging.disable_progress_bar)()
    if usable_folder(cached):
        return AutoModelForCausalLM.from_pretrained(str(cached), dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw)
    if cached is not None:
        save_converted(model, load_tokenizer(path), cached)
    return model


def dtype_name(dtype) -> str:
    """"bfloat16" for torch.bfloat16 or "bfloat16" alike."""
    return str(dtype).removeprefix("torch.")


# End-of-turn tokens of the model families we run, by name, stopped on wherever a vocabulary has
# them (llama.cpp does the same): a chat model may end its turn with one its config omits.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>",
                      "<end_of_turn>", "<|end|>")
GGUF_STOP_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


def stop_token_ids(path, tokenizer) -> list[int]:
    """Where a model's generation ends: the ids its files declare (generation_config.json's
    eos_token_id, one or a list such as Llama-3's <|eot_id|> and <|eom_id|>; a GGUF's
    eos / eot / eom), the tokenizer's eos, and the end-of-turn tokens its vocabulary has."""
    return sorted(set(declared_stop_ids(path)) | set(default_stop_ids(tokenizer)))


def declared_stop_ids(path) -> list[int]:
    path = Path(path)
    if path.suffix == ".gguf":
        from gguf import GGUFReader
        fields = GGUFReader(str(path)).fields
        return [int(f.parts[f.data[0]][0]) for key in GGUF_STOP_KEYS if (f := fields.get(key)) is not None]
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        try:
            eos = json.loads((path / name).read_text()).get("eos_token_id")
        except (OSError, ValueError):
            continue
        ids += [eos] if isinstance(eos, int) else [int(i) for i in eos or []]
    return ids


def default_stop_ids(tokenizer) -> list[int]:
    """The tokenizer's eos and the end-of-turn tokens in its vocabulary."""
    if tokenizer is None:
        return []
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for tok in END_OF_TURN_TOKENS:
        if tok in vocab:
            ids.add(int(vocab[tok]))
    return sorted(ids)
