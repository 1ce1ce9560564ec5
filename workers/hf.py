"""A Hugging Face causal LM with an explicit KV cache: tree forwards, crops and gathers.

Both workers drive their model through this: the target to verify, the draft to propose.
Rolling back is truncating cache positions; keeping an accepted tree path is gathering its
rows, because tree nodes sit in the cache in draft order, not in path order.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dovetail.tree import ancestor_mask, row_positions

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def cpu_has_bf16() -> bool:
    """bf16 pays on the CPU only with native bf16 dot products (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def choose_dtype(requested: str, device: str) -> torch.dtype:
    if requested != "auto":
        if requested not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {requested!r}")
        return DTYPES[requested]
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


def converted_dir(gguf: Path, dtype: torch.dtype) -> Path | None:
    """Where a de-quantized copy of a GGUF file lives (safetensors + tokenizer), or None.

    De-quantizing a GGUF in transformers and converting its tokenizer takes tens of
    seconds per process; loading the safetensors copy takes a few.
    """
    if os.environ.get(CONVERT_CACHE_ENV, "1") == "0":
        return None
    from dovetail.fetch import default_cache_dir
    st = gguf.stat()
    name = f"{gguf.stem}-{st.st_size}-{int(st.st_mtime)}-{str(dtype).removeprefix('torch.')}"
    return default_cache_dir() / "converted" / name


def _usable(folder: Path | None) -> bool:
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
        probe = converted_dir(Path(path), torch.float32)
        prefix = probe.name.rsplit("-", 1)[0] + "-" if probe else None
        for cached in sorted(probe.parent.glob(prefix + "*")) if probe and probe.parent.exists() else []:
            if _usable(cached):
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


@dataclass
class Forward:
    logits: torch.Tensor  # [n, vocab], float32
    hidden: torch.Tensor  # [n, hidden]: final-norm output, the LM-head input


class CausalLM:
    def __init__(self, model, device: str, name: str = ""):
        self.model = model.eval()
        self.device = device
        self.name = name
        self.config = model.config
        self.dtype = next(model.parameters()).dtype
        # transformers renamed past_key_values -> cache; speak whichever this version takes.
        params = inspect.signature(model.model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    @classmethod
    def load(cls, path, device: str = "cpu", dtype: torch.dtype = torch.float32,
             num_layers: int | None = None) -> "CausalLM":
        from transformers import AutoModelForCausalLM
        folder, kw = split_model_path(path)
        cached = converted_dir(Path(path), dtype) if kw else None
        from transformers.utils import logging as hf_logging
        # A progress bar only where loading is slow: de-quantizing a GGUF file.
        slow = kw and not _usable(cached)
        (hf_logging.enable_progress_bar if slow else hf_logging.disable_progress_bar)()
        if _usable(cached):
            model = AutoModelForCausalLM.from_pretrained(str(cached), dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **kw)
            if cached is not None:
                save_converted(model, load_tokenizer(path), cached)
        if num_layers is not None:
            truncate_layers(model, num_layers)
        return cls(model.to(device), device, name=Path(path).name)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def new_cache(self):
        from transformers import DynamicCache
        return DynamicCache(config=self.config)

    def forward(self, cache, tokens: list[int], row_parents: list[int] | None = None,
                logit_rows: slice | list[int] | None = None) -> Forward:
        """Run ``tokens`` after what ``cache`` holds; rows attend to the cache and their ancestors.

        ``row_parents`` None means a plain causal chain (the model's own mask, cheapest).
        Logits are computed only for ``logit_rows`` (all rows by default): the LM head
        dominates small forwards.
        """
        start = cache.get_seq_length()
        if row_parents is None:
            return self.forward_masked(cache, tokens, list(range(start, start + len(tokens))), None, logit_rows)
        allowed = torch.ones(len(tokens), start + len(tokens), dtype=torch.bool)
        allowed[:, start:] = ancestor_mask(row_parents)
        return self.forward_masked(cache, tokens, row_positions(row_parents, start), allowed, logit_rows)

    @torch.inference_mode()
    def forward_masked(self, cache, tokens: list[int], positions: list[int], allowed: torch.Tensor | None,
                       logit_rows: slice | list[int] | None = None) -> Forward:
        """Forward with explicit position ids and a boolean [n, cache+n] visibility mask."""
        kwargs = {self._cache_kw: cache, "use_cache": True,
                  "position_ids": torch.tensor([positions], device=self.device)}
        if allowed is not None:
            # Additive float mask: works for both the sdpa and eager attention kernels.
            mask = torch.zeros(allowed.shape, dtype=self.dtype)
            mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
            kwargs["attention_mask"] = mask[None, None].to(self.device)
        ids = torch.tensor([tokens], device=self.device)
        hidden = self.model.model(input_ids=ids, **kwargs).last_hidden_state[0]
        picked = hidden if logit_rows is None else hidden[logit_rows]
        logits = self.model.get_output_embeddings()(picked).float()
        return Forward(logits=logits, hidden=hidden)

    @staticmethod
    def crop(cache, length: int) -> None:
        """Roll back to ``length`` positions by slicing every layer's keys and values.

        Done by hand because ``DynamicCache.crop``'s argument changed meaning across
        transformers releases (absolute length before, tokens to remove after).
        """
        if cache.get_seq_length() <= length:
            return
        for layer in cache.layers:
            if getattr(layer, "keys", None) is not None and layer.keys.numel():
                layer.keys = layer.keys[:, :, :length]
                layer.values = layer.values[:, :, :length]

    @staticmethod
    def keep_rows(cache, start: int, rows: list[int]) -> None:
        """Keep cache positions [0, start) plus the given rows of the last forward, in order."""
        if rows == list(range(len(rows))):
            CausalLM.crop(cache, start + len(rows))  # a prefix of the forward: plain truncation
            return
        index = torch.tensor([start + r for r in rows])
        for layer in cache.layers:
            keep = torch.cat([torch.arange(start), index]).to(layer.keys.device)
            layer.keys = layer.keys.index_select(2, keep)
            layer.values = layer.values.index_select(2, keep)


def truncate_layers(model, num_layers: int) -> None:
    """Keep the first decoder layers only: a cheap self-draft from a bigger model."""
    layers = model.model.layers
    if not 1 <= num_layers <= len(layers):
        raise ValueError(f"num_layers must be in 1..{len(layers)}, got {num_layers}")
    model.model.layers = layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]
