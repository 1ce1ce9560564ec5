"""A Hugging Face causal LM with an explicit KV cache: tree forwards, crops and gathers.

Both workers drive their model through this: the target to verify, the draft to propose.
Rolling back is truncating cache positions; keeping an accepted tree path is gathering its
rows, because tree nodes sit in the cache in draft order, not in path order.
"""
from __future__ import annotations

import copy
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from dovetail.models.loading import load_hf_model
from dovetail.spec.tree import ancestor_mask, row_positions

log = logging.getLogger(__name__)

@dataclass
class Forward:
    logits: torch.Tensor  # [n, vocab], float32
    hidden: torch.Tensor | None  # [n, hidden]: final-norm output, the LM-head input (None: not computed)


class CausalLM:
    """The target's model (backend.py) and a draft model: it implements DraftLM (draft_lm.py)."""

    def __init__(self, model, device: str, name: str = ""):
        self.model = model.eval()
        self.device = device
        self.name = name
        self.config = model.config
        self.dtype = next(model.parameters()).dtype
        # transformers renamed past_key_values -> cache; speak whichever this version takes.
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        # Logits come from the model's own forward, which applies whatever follows its LM head
        # (Gemma-2's final soft-capping, Cohere's logit_scale, Granite's logits_scaling); the
        # final-norm hidden states are caught on their way out of the decoder.
        self._hidden: torch.Tensor | None = None
        model.model.register_forward_hook(self._keep_hidden)
        self.window = sliding_window(self.config)
        self._layer_types = sorted(set(getattr(self.config, "layer_types", None) or []))

    def _keep_hidden(self, module, args, output) -> None:
        self._hidden = output.last_hidden_state

    @classmethod
    def load(cls, path, device: str = "cpu", dtype: torch.dtype = torch.float32,
             num_layers: int | None = None) -> "CausalLM":
        model = load_hf_model(path, dtype)
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
        if self.window is None:
            return DynamicCache(config=self.config)
        # Full layers, sliding ones included: a sliding layer keeps only its last window - 1
        # positions, which rolling back by position (crop, keep_rows) cannot work with. The
        # window goes into the attention mask instead, with each cached row's position.
        cache = DynamicCache()
        cache.dovetail_positions = []
        return cache

    def forward(self, cache, tokens: list[int], row_parents: list[int] | None = None,
                logit_rows: slice | list[int] | None = None) -> Forward:
        """Run ``tokens`` after what ``cache`` holds; rows attend to the cache and their ancestors.

        ``row_parents`` None means a plain causal chain (the model's own mask, cheapest, unless
        the model has a sliding window).
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
        if self.window is not None:
            kwargs["attention_mask"] = self._window_masks(cache, positions, allowed)
        elif allowed is not None:
            kwargs["attention_mask"] = self._additive(allowed)
        ids = torch.tensor([tokens], device=self.device)
        rows = 0 if logit_rows is None else torch.tensor(  # 0: every row
            list(range(len(tokens)))[logit_rows] if isinstance(logit_rows, slice) else list(logit_rows),
            dtype=torch.long, device=self.device)
        logits = self.model(input_ids=ids, logits_to_keep=rows, **kwargs).logits[0].float()
        hidden, self._hidden = self._hidden[0], None
        return Forward(logits=logits, hidden=hidden)

    @torch.inference_mode()
    def forward_batch(self, caches: list, trees: list[tuple[list[int], list[int]]]) -> list[Forward]:
        """Several sequences' trees in ONE forward (``trees``: each one's tokens and row parents,
        rows in draft order), every row with its logits; each cache gains its own rows.

        Padded layout: the caches are copied side by side into one batch cache, each left-
        aligned and padded to the longest; each tree's rows follow at the same offset,
        padded to the biggest tree. A row sees its own cache's columns and its ancestors
        only. Keys are stored already rotated (RoPE), so where a column sits in the batch
        does not matter, only its mask. Copying the caches costs a read of every cached key
        and value per forward; on a CPU the forward itself reads every weight, far more at
        the contexts a verification has. Not for sliding-window models (their masks follow
        cached positions): the caller verifies those one by one.
        """
        from transformers import DynamicCache
        if self.window is not None:
            raise ValueError("forward_batch does not take sliding-window models")
        starts = [c.get_seq_length() for c in caches]
        width, n_rows = max(starts), max(len(t) for t, _ in trees)
        batch = len(caches)
        ids = torch.zeros(batch, n_rows, dtype=torch.long)
        positions = torch.zeros(batch, n_rows, dtype=torch.long)
        allowed = torch.zeros(batch, n_rows, width + n_rows, dtype=torch.bool)
        for b, ((tokens, parents), start) in enumerate(zip(trees, starts)):
            n = len(tokens)
            ids[b, :n] = torch.tensor(tokens)
            positions[b, :n] = torch.tensor(row_positions(parents, start))
            positions[b, n:] = start + n  # padding rows: any position, their outputs are dropped
            allowed[b, :n, :start] = True
            allowed[b, :n, width:width + n] = ancestor_mask(parents)
            allowed[b, n:, width + n:] = torch.eye(n_rows - n, dtype=torch.bool)  # a pad row sees itself
        joined = DynamicCache(config=self.config)
        for i in range(len(caches[0].layers)):
            keys = [c.layers[i].keys for c in caches]
            values = [c.layers[i].values for c in caches]
            joined.update(_pad_stack(keys, width), _pad_stack(values, width), i)
        kwargs = {self._cache_kw: joined, "use_cache": True, "position_ids": positions.to(self.device),
                  "attention_mask": self._additive(allowed)}
        logits = self.model(input_ids=ids.to(self.device), logits_to_keep=0, **kwargs).logits.float()
        hidden, self._hidden = self._hidden, None
        for b, ((tokens, _), cache) in enumerate(zip(trees, caches)):
            n = len(tokens)
            for i, layer in enumerate(cache.layers):
                done = joined.layers[i]
                layer.keys = torch.cat([layer.keys, done.keys[b:b + 1, :, width:width + n]], dim=2)
                layer.values = torch.cat([layer.values, done.values[b:b + 1, :, width:width + n]], dim=2)
        return [Forward(logits=logits[b, :len(t)], hidden=hidden[b, :len(t)]) for b, (t, _) in enumerate(trees)]

    def _additive(self, allowed: torch.Tensor) -> torch.Tensor:
        """Additive float mask [batch, 1, n, kv] from a boolean [n, kv] (batch 1) or [batch, n, kv]
        one: works for both the sdpa and eager attention kernels."""
        mask = torch.zeros(allowed.shape, dtype=self.dtype)
        mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        return mask.reshape(-1, 1, *allowed.shape[-2:]).to(self.device)

    def _window_masks(self, cache, positions: list[int], allowed: torch.Tensor | None):
        """The masks of a sliding-window model: a row at position p sees a visible column only
        if the column's position is above p - window (transformers' own rule), on the sliding
        layers; the global layers of a mixed model (Gemma-2) see all visible columns."""
        start = cache.get_seq_length()
        if allowed is None:  # a plain chain
            allowed = torch.ones(len(positions), start + len(positions), dtype=torch.bool)
            allowed[:, start:] = torch.ones(len(positions), len(positions), dtype=torch.bool).tril()
        kv = torch.tensor(cache.dovetail_positions + positions)
        windowed = allowed & (kv[None, :] > torch.tensor(positions)[:, None] - self.window)
        cache.dovetail_positions = cache.dovetail_positions + list(positions)
        if not self._layer_types:  # one kind of layer (Mistral): all sliding
            return self._additive(windowed)
        return {kind: self._additive(windowed if kind == "sliding_attention" else allowed)
                for kind in self._layer_types}

    @staticmethod
    def release(cache) -> None:
        """Nothing to free: a DynamicCache's memory goes with its last reference."""

    @staticmethod
    def fork(cache, length: int):
        """A new cache holding the first ``length`` positions of ``cache``. It shares the
        source's tensors, sliced: nothing here writes a cache tensor in place (a forward
        concatenates, keep_rows gathers, crop slices), so neither cache can change the other."""
        tensors = [t for layer in cache.layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                   if t is not None]
        twin = copy.deepcopy(cache, {id(t): t for t in tensors})
        CausalLM.crop(twin, length)
        return twin

    @staticmethod
    def crop(cache, length: int) -> None:
        """Roll back to ``length`` positions by slicing every layer's keys and values.

        Done by hand because ``DynamicCache.crop``'s argument changed meaning across
        transformers releases (absolute length before, tokens to remove after).
        """
        if cache.get_seq_length() <= length:
            return
        if hasattr(cache, "dovetail_positions"):
            cache.dovetail_positions = cache.dovetail_positions[:length]
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
        if hasattr(cache, "dovetail_positions"):
            cache.dovetail_positions = cache.dovetail_positions[:start] + [cache.dovetail_positions[start + r]
                                                                            for r in rows]
        index = torch.tensor([start + r for r in rows])
        for layer in cache.layers:
            keep = torch.cat([torch.arange(start), index]).to(layer.keys.device)
            layer.keys = layer.keys.index_select(2, keep)
            layer.values = layer.values.index_select(2, keep)


def _pad_stack(tensors: list[torch.Tensor], width: int) -> torch.Tensor:
    """[1, heads, len_i, dim] tensors stacked to [n, heads, width, dim], zero-padded on the right."""
    first = tensors[0]
    out = first.new_zeros(len(tensors), first.shape[1], width, first.shape[3])
    for b, t in enumerate(tensors):
        out[b, :, :t.shape[2]] = t[0]
    return out


def sliding_window(config) -> int | None:
    """The attention window of a model whose (some) layers use one, else None."""
    window = getattr(config, "sliding_window", None)
    types = getattr(config, "layer_types", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    if types is not None and "sliding_attention" not in types:
        return None
    return int(window)


def truncate_layers(model, num_layers: int) -> None:
    """Keep the first decoder layers only: a cheap self-draft from a bigger model."""
    layers = model.model.layers
    if not 1 <= num_layers <= len(layers):
        raise ValueError(f"num_layers must be in 1..{len(layers)}, got {num_layers}")
    model.model.layers = layers[:num_layers]
    model.config.num_hidden_layers = num_layers
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = model.config.layer_types[:num_layers]
