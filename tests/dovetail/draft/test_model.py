"""The feature draft model (DGF / EAGLE baseline), its target identity and its checkpoints."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from dovetail.draft.checkpoint import (
    CONFIG, WEIGHTS, TargetMismatch, load_feature_draft, load_target_pieces, new_feature_draft, save_checkpoint,
)
from dovetail.draft.model import DraftModelConfig, TargetIdentity
from tests.helpers import make_tiny_model, make_tiny_tokenizer

H, V = 32, 64


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("feature-draft-models")
    target = make_tiny_model(root / "target", seed=0)
    make_tiny_tokenizer(target)
    # Same weights, another tokenizer (same vocabulary size): a different identity.
    other_tok = make_tiny_model(root / "other-tokenizer", seed=0)
    make_tiny_tokenizer(other_tok, chars="zyxwvutsrqponmlkjihgfedcba0123456789")
    vocab80 = make_tiny_model(root / "vocab80", seed=0, vocab_size=80)
    make_tiny_tokenizer(vocab80, vocab_size=80)
    hidden48 = make_tiny_model(root / "hidden48", seed=0, hidden_size=48)
    make_tiny_tokenizer(hidden48)
    # Same architecture, sizes and tokenizer, other weights: another model.
    weights = make_tiny_model(root / "other-weights", seed=5)
    make_tiny_tokenizer(weights)
    # The target's weights, each moved a little (as another quantization moves them): the same model.
    requantized = make_tiny_model(root / "requantized", seed=0, noise_from=target, noise=0.002)
    make_tiny_tokenizer(requantized)
    return {"target": target, "tokenizer": other_tok, "vocab": vocab80, "hidden": hidden48, "weights": weights,
            "requantized": requantized}


@pytest.fixture(scope="module")
def pieces(models):
    return load_target_pieces(models["target"])


def test_target_pieces_are_the_targets_embedding_and_head(models, pieces):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(str(models["target"]), dtype=torch.float64)
    assert torch.equal(pieces.embed, hf.model.embed_tokens.weight.detach())
    assert torch.equal(pieces.head, hf.lm_head.weight.detach())
    assert pieces.identity.arch == "qwen2" and (pieces.identity.vocab_size, pieces.identity.hidden_size) == (V, H)


@pytest.mark.parametrize("layers", [1, 3])
def test_dgf_shapes_and_gate_range(pieces, layers):
    model = new_feature_draft(pieces, "dgf", layers, intermediate_size=40)
    assert len(model.layers) == layers and model.layers[0].mlp.up_proj.out_features == 40
    f, tok = 3 * torch.randn(9, H), torch.randint(0, V, (9,))
    hidden, logits = model(f, tok)
    assert hidden.shape == (9, H) and logits.shape == (9, V)
    # The design-note formula, computed by hand from the weights (no biases anywhere).
    fus = model.fusion
    assert all(m.bias is None for m in (fus.w1, fus.w2, fus.wz))
    e = pieces.embed.float()[tok]
    h1 = f @ fus.w1.weight.T
    h2 = torch.nn.functional.silu(fus.emb_norm(e) @ fus.w2.weight.T)
    z = torch.sigmoid(torch.cat([h1, h2], -1) @ fus.wz.weight.T)
    z_model, _, _ = fus.gate(f, e)
    assert torch.allclose(z, z_model, atol=1e-6)
    assert torch.allclose(fus(f, e), z * h1 + (1 - z) * h2, atol=1e-6)
    assert ((z > 0) & (z < 1)).all() and z.std() > 0
    # Logits are the frozen target head on the draft's hidden state.
    assert torch.allclose(logits, hidden @ pieces.head.float().T, atol=1e-5)
    assert not any(p.requires_grad is False for p in model.parameters())
    assert "embed_weight" not in dict(model.named_parameters())


def test_eagle_baseline_shapes(pieces):
    model = new_feature_draft(pieces, "eagle", 1)
    assert model.fusion.fc.in_features == 2 * H and model.fusion.fc.out_features == H
    hidden, logits = model(torch.randn(5, H), torch.randint(0, V, (5,)))
    assert hidden.shape == (5, H) and logits.shape == (5, V)
    with pytest.raises(ValueError, match="one decoder layer"):
        new_feature_draft(pieces, "eagle", 2)


def test_config_validation(pieces):
    base = dict(target=pieces.identity, target_config=pieces.config)
    with pytest.raises(ValueError, match="kind"):
        DraftModelConfig(**base, kind="medusa")
    with pytest.raises(ValueError, match="num_layers"):
        DraftModelConfig(**base, num_layers=0)
    with pytest.raises(ValueError, match="hidden_size"):
        DraftModelConfig(target=TargetIdentity("qwen2", 16, V, "h"), target_config=pieces.config)
    with pytest.raises(ValueError, match="incomplete"):
        TargetIdentity("qwen2", H, V, "")


def test_cache_makes_drafting_incremental(pieces):
    model = new_feature_draft(pieces, "dgf", 2).double()
    f, tok = torch.randn(12, H, dtype=torch.float64), torch.randint(0, V, (12,))
    full_h, full_l = model(f, tok)
    cache = model.new_cache()
    parts = [model(f[a:b], tok[a:b], cache=cache) for a, b in ((0, 5), (5, 6), (6, 12))]
    assert torch.allclose(torch.cat([h for h, _ in parts]), full_h, atol=1e-12)
    assert torch.allclose(torch.cat([lg for _, lg in parts]), full_l, atol=1e-12)
    assert cache.get_seq_length() == 12


@pytest.mark.parametrize("kind", ["dgf", "eagle"])
def test_checkpoint_round_trip(pieces, models, tmp_path, kind):
    model = new_feature_draft(pieces, kind, 2 if kind == "dgf" else 1)
    save_checkpoint(model, tmp_path)
    trained = dict(model.named_parameters())
    with safe_open(str(tmp_path / WEIGHTS), "pt") as f:
        keys = set(f.keys())
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in keys)
    assert keys == set(trained)  # only the trained weights: no embedding, head or rotary buffers
    n_bytes = 2 * sum(p.numel() for p in trained.values())
    assert n_bytes <= (tmp_path / WEIGHTS).stat().st_size <= n_bytes + 16384
    assert json.loads((tmp_path / CONFIG).read_text())["target"]["tokenizer_hash"] == pieces.identity.tokenizer_hash

    loaded = load_feature_draft(tmp_path, models["target"])
    assert loaded.config == model.config
    for name, p in loaded.named_parameters():
        assert torch.equal(p, trained[name].detach().to(torch.bfloat16).float()), name
    assert torch.equal(loaded.head_weight, pieces.head.float())
    f, tok = torch.randn(4, H), torch.randint(0, V, (4,))
    assert torch.allclose(loaded(f, tok)[0], model(f, tok)[0], atol=0.05)


@pytest.mark.parametrize("other,why", [("tokenizer", "tokenizer_hash"), ("vocab", "vocab_size"),
                                       ("hidden", "hidden_size"), ("weights", "another model of the same architecture")])
def test_draft_refuses_a_mismatched_target(pieces, models, tmp_path, other, why):
    save_checkpoint(new_feature_draft(pieces), tmp_path)
    with pytest.raises(TargetMismatch, match=why) as err:
        load_feature_draft(tmp_path, models[other])
    assert f"'{models['target'].name}'" in str(err.value) and f"'{models[other].name}'" in str(err.value)


def test_another_quantization_of_the_target_is_the_same_target(pieces, models, tmp_path):
    save_checkpoint(new_feature_draft(pieces), tmp_path)
    assert load_feature_draft(tmp_path, models["requantized"]) is not None
    fp = load_target_pieces(models["requantized"]).identity.fingerprint
    assert len(fp) == len(pieces.identity.fingerprint) > 0 and fp != pieces.identity.fingerprint
    # A checkpoint saved before fingerprints existed is matched on the rest of the identity.
    old = TargetIdentity(**{**json.loads((tmp_path / CONFIG).read_text())["target"], "fingerprint": []})
    assert old.mismatches(load_target_pieces(models["weights"]).identity) == []


def test_missing_checkpoint_is_a_clear_error(tmp_path, models):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_feature_draft(tmp_path, models["target"])


def test_reduced_draft_vocabulary(pieces, models, tmp_path):
    ids = [0, 1, 2, 5, 8, 13, 21, 34, 55, 63]
    model = new_feature_draft(pieces, draft_vocab=ids)
    hidden, logits = model(torch.randn(6, H), torch.randint(0, V, (6,)))
    assert logits.shape == (6, len(ids))
    assert torch.allclose(logits, hidden @ pieces.head.float()[ids].T, atol=1e-5)
    assert model.vocab_ids.tolist() == ids
    save_checkpoint(model, tmp_path)
    loaded = load_feature_draft(tmp_path, models["target"])
    assert loaded.config.draft_vocab == ids and loaded.vocab_ids.tolist() == ids
    for bad in ([], [1, 1], [3, V]):
        with pytest.raises(ValueError, match="draft_vocab"):
            new_feature_draft(pieces, draft_vocab=bad)


def test_auto_draft_is_the_checkpoint_shipped_for_the_target(pieces, models, tmp_path, monkeypatch):
    import dovetail.draft.checkpoint as draft_io
    import dovetail.runtime.launch as launch_mod
    from dovetail.models.loading import load_tokenizer, tokenizer_hash
    from dovetail.runtime.config import DEFAULT_DRAFT_LM
    from dovetail.runtime.launch import pick_draft
    monkeypatch.setattr(draft_io, "SHIPPED", tmp_path)
    # As if the default draft model had the tiny target's tokenizer: it may draft for it.
    monkeypatch.setattr(launch_mod, "DEFAULT_DRAFT_LM_TOKENIZER", tokenizer_hash(load_tokenizer(models["target"]), V))
    assert pick_draft("auto", models["target"]) == DEFAULT_DRAFT_LM  # nothing shipped
    save_checkpoint(new_feature_draft(pieces, "dgf", 1), tmp_path / "for-target")
    assert pick_draft("auto", models["target"]) == DEFAULT_DRAFT_LM  # shipped, but not the default
    (tmp_path / "defaults.json").write_text(json.dumps({models["target"].name: "for-target"}))
    assert pick_draft("auto", models["target"]) == f"feature:{tmp_path / 'for-target'}"
    assert pick_draft("auto", models["tokenizer"]) is None  # another tokenizer: no draft at all
    assert pick_draft("auto", None) == DEFAULT_DRAFT_LM  # a remote target: the handshake checks
    assert pick_draft("my-draft", models["target"]) == "my-draft"
    assert pick_draft(None, models["target"]) is None
    (tmp_path / "defaults.json").write_text(json.dumps({"another.gguf": "for-target"}))
    with pytest.raises(ValueError, match="trained for"):
        pick_draft("auto", tmp_path / "another.gguf")
    # a draft for one device only: the other gets the standalone draft model
    (tmp_path / "defaults.json").write_text(json.dumps({models["target"].name: {"cpu": "for-target"}}))
    assert pick_draft("auto", models["target"], "cpu") == f"feature:{tmp_path / 'for-target'}"
    assert pick_draft("auto", models["target"], "cuda:0") == DEFAULT_DRAFT_LM


def test_shipped_checkpoints_fit_the_size_budget():
    """Each shipped checkpoint at most 64 MB, all of them at most 200 MB, every default real."""
    from dovetail.draft.checkpoint import CONFIG, DEFAULTS, SHIPPED, WEIGHTS, read_config
    folders = [c.parent for c in SHIPPED.glob(f"*/{CONFIG}")]
    sizes = {f.name: sum(p.stat().st_size for p in f.iterdir()) for f in folders}
    assert all(size <= 64e6 for size in sizes.values()), sizes
    assert sum(sizes.values()) <= 200e6, sizes
    for f in folders:
        assert (f / WEIGHTS).is_file() and read_config(f).target.name
    index = SHIPPED / DEFAULTS
    if index.is_file():
        for target, entry in json.loads(index.read_text()).items():
            for folder in entry.values() if isinstance(entry, dict) else [entry]:
                assert read_config(SHIPPED / folder).target.name == target


def test_shipped_defaults_per_device():
    """The shipped index: the 0.5B target's draft everywhere, the 1.5B's on the CPU only
    (on a GPU the standalone 0.5B draft model commits far more per round)."""
    from pathlib import Path

    from dovetail.draft.checkpoint import shipped_draft
    big, small = Path("m/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"), Path("m/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
    assert shipped_draft(big, "cpu").name == "qwen2.5-coder-1.5b-dgf1"
    assert shipped_draft(big, "cuda:0") is None
    assert shipped_draft(small, "cpu").name == shipped_draft(small, "cuda:1").name == "qwen2.5-coder-0.5b-dgf1"


def test_layers_from_target_copy_its_top_layers(pieces, models):
    from transformers import AutoModelForCausalLM
    from dovetail.draft.checkpoint import init_layers_from_target
    hf = AutoModelForCausalLM.from_pretrained(str(models["target"]), dtype=torch.float64)  # 2 layers
    for n in (1, 2):
        model = new_feature_draft(pieces, "dgf", n)  # the target's FFN width
        assert init_layers_from_target(model, models["target"]) == list(range(2 - n, 2))
        for j, i in enumerate(range(2 - n, 2)):
            mine, theirs = model.layers[j].state_dict(), hf.model.layers[i].state_dict()
            assert mine.keys() == theirs.keys()
            assert all(torch.equal(mine[k], theirs[k].float()) for k in mine)
        # so the draft layer computes what the target's layer computes
        x = torch.randn(1, 5, H)
        pos = torch.arange(5)[None]
        rope = model.rotary(x, pos)
        mask = torch.zeros(5, 5).masked_fill_(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))[None, None]
        ref = hf.model.layers[1].float()(x, attention_mask=mask, position_ids=pos, position_embeddings=rope)
        got = model.layers[-1](x, attention_mask=mask, position_ids=pos, position_embeddings=rope)
        ref, got = (t[0] if isinstance(t, tuple) else t for t in (ref, got))
        torch.testing.assert_close(got, ref)
        hf.double()
    with pytest.raises(ValueError, match="only 2"):
        init_layers_from_target(new_feature_draft(pieces, "dgf", 3), models["target"])


def test_layers_from_target_keep_the_strongest_ffn_channels(pieces, models):
    from transformers import AutoModelForCausalLM
    from dovetail.draft.checkpoint import ffn_channels, init_layers_from_target
    top = AutoModelForCausalLM.from_pretrained(str(models["target"]), dtype=torch.float32).model.layers[-1].mlp
    g, u, d = top.gate_proj.weight.detach(), top.up_proj.weight.detach(), top.down_proj.weight.detach()
    model = new_feature_draft(pieces, "eagle", 1, intermediate_size=24)  # the target's is 64
    init_layers_from_target(model, models["target"])
    keep = ffn_channels(g, u, d, 24)
    score = g.norm(dim=1) * u.norm(dim=1) * d.norm(dim=0)
    dropped = torch.ones(64, dtype=torch.bool)
    dropped[keep] = False
    assert len(keep) == 24 and keep.tolist() == sorted(keep.tolist())
    assert score[keep].min() >= score[dropped].max()
    mlp = model.layers[0].mlp
    assert torch.equal(mlp.gate_proj.weight, g[keep]) and torch.equal(mlp.up_proj.weight, u[keep])
    assert torch.equal(mlp.down_proj.weight, d[:, keep])
