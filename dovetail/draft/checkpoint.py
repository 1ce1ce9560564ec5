"""Feature-draft checkpoints and the target pieces a draft needs (embedding, LM head, identity).

A checkpoint folder holds ``model.safetensors`` (only the trained weights, bf16) and
``config.json`` (a DraftModelConfig, target identity included). The embedding and LM head
are never stored: they are read from the target at load time, which is also where a draft
trained for another target is refused.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dovetail.draft.model import (
    DraftModelConfig, FeatureDraft, TargetIdentity, embedding_fingerprint, fingerprint_ids,
)

SHIPPED = Path(__file__).parent / "shipped"  # trained checkpoints that come with the package
DEFAULTS = "defaults.json"  # target file name -> shipped checkpoint folder used by draft="auto"
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
SAVE_DTYPE = torch.bfloat16


class TargetMismatch(ValueError):
    """A feature draft was trained for another target."""


@dataclass
class TargetPieces:
    identity: TargetIdentity
    config: dict          # the target's transformers config
    embed: torch.Tensor   # [vocab, hidden]
    head: torch.Tensor    # [vocab, hidden]


def _hf_folder(path: Path) -> Path | None:
    """A Hugging Face folder for ``path``: itself, or the de-quantized copy of a GGUF file."""
    from dovetail.models.loading import converted_dir, usable_folder
    if path.is_dir():
        return path
    for dtype in (torch.float32, torch.bfloat16):
        folder = converted_dir(path, dtype)
        if usable_folder(folder):
            return folder
    return None


def _read_tensors(folder: Path, wanted) -> dict[str, torch.Tensor]:
    """The tensors whose names ``wanted(name)`` accepts, from a (possibly sharded) safetensors
    checkpoint; only the shards that hold them are opened."""
    from safetensors import safe_open
    index = folder / "model.safetensors.index.json"
    if index.exists():
        where = json.loads(index.read_text())["weight_map"]
    else:
        with safe_open(str(folder / WEIGHTS), "pt") as f:
            where = dict.fromkeys(f.keys(), WEIGHTS)
    out = {}
    for shard in sorted({file for name, file in where.items() if wanted(name)}):
        with safe_open(str(folder / shard), "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys() if wanted(name)})
    return out


def load_target_pieces(path: str | Path) -> TargetPieces:
    """Identity, config, embedding and LM head of a target (HF folder or GGUF file).

    From a HF folder (or the cached de-quantized copy of a GGUF) only the two tensors are
    read; otherwise the whole model is loaded once (load_hf_model) and the rest dropped.
    """
    from dovetail.models.loading import load_hf_model, load_tokenizer, tokenizer_hash
    path = Path(path)
    folder = _hf_folder(path)
    tensors = {}
    if folder is not None:
        cfg = json.loads((folder / CONFIG).read_text())
        tensors = _read_tensors(folder, lambda name: name in ("model.embed_tokens.weight", "lm_head.weight"))
    if "model.embed_tokens.weight" not in tensors and "lm_head.weight" in tensors and cfg.get("tie_word_embeddings"):
        tensors["model.embed_tokens.weight"] = tensors["lm_head.weight"]  # tied: saved under one name
    if "model.embed_tokens.weight" in tensors:
        embed = tensors["model.embed_tokens.weight"]
        head = tensors.get("lm_head.weight", embed)  # tied embeddings: one tensor
    else:
        model = load_hf_model(path, torch.float32)
        cfg = model.config.to_dict()
        embed = model.get_input_embeddings().weight.detach()
        head = model.get_output_embeddings().weight.detach()
    vocab, hidden = head.shape
    ident = TargetIdentity(arch=str(cfg.get("model_type", "?")), hidden_size=int(hidden), vocab_size=int(vocab),
                           tokenizer_hash=tokenizer_hash(load_tokenizer(path), int(vocab)), name=path.name,
                           fingerprint=embedding_fingerprint(embed[fingerprint_ids(int(vocab))]))
    return TargetPieces(ident, cfg, embed, head)


def check_target(draft: TargetIdentity, target: TargetIdentity, where: str = "") -> None:
    bad = draft.mismatches(target)
    if bad:
        raise TargetMismatch(
            f"feature draft {where or ''} was trained for target {draft.name or '(unnamed)'!r} "
            f"({draft.arch}, hidden {draft.hidden_size}, vocab {draft.vocab_size}, tokenizer "
            f"{draft.tokenizer_hash}) but the target is {target.name or '(unnamed)'!r} ({target.arch}, "
            f"hidden {target.hidden_size}, vocab {target.vocab_size}, tokenizer {target.tokenizer_hash}): "
            + "; ".join(bad))


def new_feature_draft(target: TargetPieces, kind: str = "dgf", num_layers: int = 1,
                      intermediate_size: int | None = None, seed: int = 0,
                      dtype: torch.dtype = torch.float32, draft_vocab: list[int] | None = None) -> FeatureDraft:
    """A randomly initialised draft for ``target`` (the start of training)."""
    cfg = DraftModelConfig(target=target.identity, target_config=target.config, kind=kind,
                           num_layers=num_layers, intermediate_size=intermediate_size, draft_vocab=draft_vocab)
    torch.manual_seed(seed)
    model = FeatureDraft(cfg, target.embed.float(), target.head.float())
    init_weights(model, float(target.config.get("initializer_range", 0.02)))
    return model.to(dtype)


@torch.no_grad()
def init_weights(model: FeatureDraft, std: float) -> None:
    # Like transformers' init: small normal weights, zero biases, unit norms.
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.normal_(0.0, std)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)


def save_checkpoint(model: FeatureDraft, folder: str | Path) -> Path:
    """Write the trained weights (bf16) and the config; atomic per file."""
    from safetensors.torch import save_file
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", SAVE_DTYPE).contiguous() for k, v in model.state_dict().items()}
    tmp = folder / (WEIGHTS + ".tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "dovetail": "feature-draft"})
    tmp.replace(folder / WEIGHTS)
    tmp = folder / (CONFIG + ".tmp")
    tmp.write_text(json.dumps(model.config.to_dict(), indent=1))
    tmp.replace(folder / CONFIG)
    return folder


def read_config(folder: str | Path) -> DraftModelConfig:
    folder = Path(folder)
    if not (folder / CONFIG).is_file() or not (folder / WEIGHTS).is_file():
        raise FileNotFoundError(f"{folder}: a feature-draft checkpoint needs {CONFIG} and {WEIGHTS}")
    return DraftModelConfig.from_dict(json.loads((folder / CONFIG).read_text()))


def shipped_draft(target_path: str | Path, device: str = "cpu") -> Path | None:
    """The shipped checkpoint that SHIPPED/defaults.json names for this target file and draft
    device, or None. A GGUF file it does not name (another quantization of a listed model: a
    Q8_0 made by dovetail-launch quantize, a Hub download) gets the entry of the listed target
    whose identity, embedding fingerprint included, it has (gguf_identity; cheap: no
    conversion). load_feature_draft still checks the whole identity.

    An entry is a folder name (every device) or {"cpu": folder, "cuda": folder} (the devices
    listed). A target is listed for a device only while its feature draft beats the
    standalone draft model there (docs/training.md, the ablation); the other checkpoints still ship."""
    index = SHIPPED / DEFAULTS
    if not index.is_file():
        return None
    entries = json.loads(index.read_text())
    name = Path(target_path).name
    entry = entries.get(name)
    if entry is not None:
        folder = _entry_folder(index, name, entry, device)
        if folder is not None and read_config(folder).target.name != name:
            raise ValueError(f"{index} maps {name} to {folder}, which was trained for {read_config(folder).target.name}")
        return folder
    if name.endswith(".gguf") and Path(target_path).is_file():
        entry = _entry_by_identity(entries, target_path)
        return None if entry is None else _entry_folder(index, name, entry, device)
    return None


def _entry_folder(index: Path, name: str, entry, device: str) -> Path | None:
    if isinstance(entry, dict) and set(entry) - {"cpu", "cuda"}:
        raise ValueError(f"{index}: {name} lists devices {sorted(entry)}; only cpu and cuda exist")
    folder = entry.get("cuda" if device.startswith("cuda") else "cpu") if isinstance(entry, dict) else entry
    return None if folder is None else SHIPPED / folder


def _entry_by_identity(entries: dict, target_path: str | Path):
    """The defaults.json entry whose checkpoints were trained for a target with this GGUF's
    identity, or None."""
    ident = None
    for entry in entries.values():
        folders = entry.values() if isinstance(entry, dict) else [entry]
        trained_for = {read_config(SHIPPED / f).target for f in folders}
        for target in trained_for:
            ident = ident or gguf_identity(target_path)
            if not target.fingerprint or target.mismatches(ident):
                break  # a checkpoint without a fingerprint is matched by its file name only
        else:
            if trained_for:
                return entry
    return None


def gguf_identity(path: str | Path) -> TargetIdentity:
    """A GGUF target's identity read from the file itself: its metadata, tokenizer and the
    fingerprint rows of its embedding, de-quantized (no conversion to a transformers folder).
    Parsing a GGUF's metadata takes seconds (its tokenizer arrays), so each file's identity
    is cached by path, size and modification time."""
    import dataclasses
    import hashlib

    from dovetail.models.fetch import default_cache_dir
    stat = Path(path).stat()
    key = hashlib.sha256(json.dumps([str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]).encode())
    cached = default_cache_dir() / "identity" / f"{key.hexdigest()[:20]}.json"
    try:
        return TargetIdentity(**json.loads(cached.read_text()))
    except (OSError, ValueError, TypeError):
        pass
    ident = _read_gguf_identity(path)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(dataclasses.asdict(ident)))
    tmp.replace(cached)
    return ident


def _read_gguf_identity(path: str | Path) -> TargetIdentity:
    import gguf

    from dovetail.models.loading import load_tokenizer, tokenizer_hash
    reader = gguf.GGUFReader(str(path))
    arch = str(reader.get_field(gguf.Keys.General.ARCHITECTURE).contents())
    tensors = {t.name: t for t in reader.tensors}
    embed = tensors["token_embd.weight"]
    vocab = int((tensors.get("output.weight") or embed).shape[-1])
    rows = torch.from_numpy(gguf.quants.dequantize(embed.data[fingerprint_ids(vocab)], embed.tensor_type).copy())
    return TargetIdentity(arch=arch, hidden_size=int(embed.shape[0]), vocab_size=vocab,
                          tokenizer_hash=tokenizer_hash(load_tokenizer(path), vocab), name=Path(path).name,
                          fingerprint=embedding_fingerprint(rows))


def load_feature_draft(folder: str | Path, target: str | Path | TargetPieces, device: str = "cpu",
                       dtype: torch.dtype = torch.float32) -> FeatureDraft:
    """Load a checkpoint for ``target`` (a model path or loaded pieces); refuse another target."""
    from safetensors.torch import load_file
    cfg = read_config(folder)
    pieces = target if isinstance(target, TargetPieces) else load_target_pieces(target)
    check_target(cfg.target, pieces.identity, str(folder))
    model = FeatureDraft(cfg, pieces.embed.float(), pieces.head.float())
    weights = load_file(str(Path(folder) / WEIGHTS))
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)
    return model.to(device, dtype).eval()


def _target_layer_tensors(path: Path, prefixes: list[str]) -> dict[str, torch.Tensor]:
    """Every target tensor whose name starts with one of ``prefixes``."""
    folder = _hf_folder(path)
    if folder is not None:
        return _read_tensors(folder, lambda name: name.startswith(tuple(prefixes)))
    from dovetail.models.loading import load_hf_model  # a GGUF without its de-quantized copy yet: makes it
    state = load_hf_model(path, torch.float32).state_dict()
    return {k: v for k, v in state.items() if k.startswith(tuple(prefixes))}


def ffn_channels(gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` FFN channels of a gated MLP with the largest |gate_i|·|up_i|·|down_i| (row,
    row and column norms: how much channel i can move the output), in their original order."""
    score = gate.float().norm(dim=1) * up.float().norm(dim=1) * down.float().norm(dim=0)
    return score.topk(keep).indices.sort().values


@torch.no_grad()
def init_layers_from_target(model: FeatureDraft, target: str | Path) -> list[int]:
    """Start the draft's decoder layers as copies of the target's top layers (an idea from the ablation plan:
    the draft then begins from the computation that produced the features it predicts).

    Attention, biases and norms are copied as they are. A narrower draft FFN keeps the target
    channels that ``ffn_channels`` ranks highest. Returns the target layer indices used."""
    n_tgt = int(model.config.target_config["num_hidden_layers"])
    n = model.config.num_layers
    if n > n_tgt:
        raise ValueError(f"the draft has {n} layers but the target only {n_tgt}")
    ids = list(range(n_tgt - n, n_tgt))
    src = _target_layer_tensors(Path(target), [f"model.layers.{i}." for i in ids])
    state = model.state_dict()
    for j, i in enumerate(ids):
        mine = {k.removeprefix(f"layers.{j}."): v for k, v in state.items() if k.startswith(f"layers.{j}.")}
        theirs = {k.removeprefix(f"model.layers.{i}."): v for k, v in src.items() if k.startswith(f"model.layers.{i}.")}
        if set(mine) != set(theirs):
            raise ValueError(f"target layer {i} and draft layer {j} hold different tensors: "
                             f"{sorted(set(mine) ^ set(theirs))}")
        keep = None
        if mine["mlp.up_proj.weight"].shape != theirs["mlp.up_proj.weight"].shape:
            keep = ffn_channels(theirs["mlp.gate_proj.weight"], theirs["mlp.up_proj.weight"],
                                theirs["mlp.down_proj.weight"], mine["mlp.up_proj.weight"].shape[0])
        for name, dst in mine.items():
            t = theirs[name]
            if keep is not None and name in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                t = t[keep]
            elif keep is not None and name == "mlp.down_proj.weight":
                t = t[:, keep]
            if t.shape != dst.shape:
                raise ValueError(f"target layer {i} {name} is {tuple(t.shape)}, the draft's {tuple(dst.shape)}")
            dst.copy_(t.to(dst.dtype))
    return ids
