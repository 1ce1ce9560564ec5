"""Training a feature draft on a tiny model: the loss goes down, and an interrupted run resumes."""
from __future__ import annotations

import argparse

import pytest
import torch

from dovetail.draft.checkpoint import load_target_pieces, new_feature_draft
from tests.helpers import make_tiny_model
from dovetail.training.train import STATE, TrainConfig, draft_loss, frequent_tokens, train, unroll_mask
from dovetail.training.cli import build_parser
from dovetail.training.data import Sequence, target_hidden
from dovetail.workers.hf import CausalLM

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("train") / "target", seed=4)
    lm = CausalLM.load(str(path), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    # Synthetic conversations: random token sequences, hidden states from the target.
    data = []
    for _ in range(16):
        toks = torch.randint(0, 64, (int(torch.randint(8, 40, (), generator=gen)),), generator=gen)
        data.append(Sequence(toks, target_hidden(lm, toks.tolist()).float()))
    return load_target_pieces(path), data, path, lm


CFG = dict(lr=3e-3, batch_size=4, seq_len=16, progress=False)


@pytest.mark.parametrize("kind,vocab,amp", [("dgf", None, False), ("eagle", None, False), ("dgf", 24, False),
                                            ("dgf", None, True)])
def test_loss_goes_down(tiny, tmp_path, kind, vocab, amp):
    pieces, data, *_ = tiny
    ids = frequent_tokens(data, vocab) if vocab else None
    model = new_feature_draft(pieces, kind, 1, draft_vocab=ids)
    losses = train(model, data, TrainConfig(steps=60, save_every=1000, amp=amp, **CFG), tmp_path)
    assert len(losses) == 60 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10]), losses
    assert (tmp_path / "model.safetensors").exists() and (tmp_path / STATE).exists()  # saved at the end


def test_loss_parts(tiny):
    pieces, data, *_ = tiny
    model = new_feature_draft(pieces)
    toks, hid = data[0].tokens[None, :9], data[0].hidden[None, :9]
    loss, parts = draft_loss(model, toks, hid)
    assert loss.item() == pytest.approx(parts["feat"] + 0.1 * parts["ce"], rel=1e-5)
    assert parts["ce"] > 0 and 0 <= parts["top1"] <= 1
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert model.head_weight.grad is None and not model.head_weight.requires_grad  # frozen


def test_unrolled_steps_are_the_workers_chain(tiny, monkeypatch):
    """Step k of the unrolled loss computes, for every chain start i at once, what the draft
    worker computes at tree level k after committing pairs 0..i (float64: exact up to
    rounding)."""
    pieces, data, *_ = tiny
    model = new_feature_draft(pieces, seed=2).double()
    toks, hid = data[0].tokens[None, :10], data[0].hidden[None, :10].double()
    n, unroll = toks.shape[1] - 1, 3
    seen = []
    forward = model.forward

    def record(*a, **kw):
        out = forward(*a, **kw)
        seen.append(out[0].detach())
        return out
    monkeypatch.setattr(model, "forward", record)
    with torch.no_grad():
        draft_loss(model, toks, hid, unroll)
    monkeypatch.undo()
    assert [t.shape[1] for t in seen] == [n, n - 1, n - 2]
    with torch.no_grad():
        for i in range(n - unroll + 1):
            cache = model.new_cache()
            h, _ = model(hid[0, :i + 1], toks[0, 1:i + 2], cache=cache)  # committed pairs 0..i
            h = h[-1:]
            for k in range(2, unroll + 1):  # a chain, as grow_feature_tree feeds it
                h, _ = model(h, toks[0, i + k:i + k + 1], torch.tensor([i + k - 1]), cache=cache)
                torch.testing.assert_close(h[0], seen[k - 1][0, i], rtol=1e-9, atol=1e-9)


def test_unroll_mask():
    m = unroll_mask(4, 3)  # 2 rows; keys: 4 pairs, 3 step-2 rows, 2 step-3 rows
    assert m.tolist() == [[1, 0, 0, 0, 1, 0, 0, 1, 0], [1, 1, 0, 0, 0, 1, 0, 0, 1]]


def test_unrolled_loss_adds_decayed_steps(tiny):
    pieces, data, *_ = tiny
    model = new_feature_draft(pieces)
    toks, hid = data[0].tokens[None, :12], data[0].hidden[None, :12]
    one, first = draft_loss(model, toks, hid)
    three, parts = draft_loss(model, toks, hid, unroll=3)
    assert set(parts) == {"feat", "ce", "top1", "top1_2", "top1_3"}
    assert parts["feat"] == pytest.approx(first["feat"]) and parts["ce"] == pytest.approx(first["ce"])
    assert three.item() > one.item() * (1 + 1e-3)  # steps 2 and 3 add positive terms
    three.backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="unroll"):
        TrainConfig(seq_len=4, unroll=4)
    short, parts = draft_loss(model, toks[:, :3], hid[:, :3], unroll=3)  # 2 pairs: steps 1 and 2 only
    assert set(parts) == {"feat", "ce", "top1", "top1_2"} and torch.isfinite(short)


def test_unrolled_training_goes_down(tiny, tmp_path):
    pieces, data, *_ = tiny
    model = new_feature_draft(pieces, seed=1)
    losses = train(model, data, TrainConfig(steps=40, save_every=1000, unroll=3, **CFG), tmp_path)
    assert sum(losses[-8:]) < 0.8 * sum(losses[:8]), losses


def test_resume_continues_from_the_saved_step(tiny, tmp_path):
    pieces, data, *_ = tiny
    straight = new_feature_draft(pieces, seed=5)
    train(straight, data, TrainConfig(steps=12, save_every=100, **CFG), tmp_path / "straight")

    # The same run, interrupted after step 8 (the last checkpoint), then resumed.
    first = new_feature_draft(pieces, seed=5)
    assert len(train(first, data, TrainConfig(steps=8, save_every=4, **CFG), tmp_path / "split")) == 8
    resumed = new_feature_draft(pieces, seed=123)  # fresh weights: the state must overwrite them
    more = train(resumed, data, TrainConfig(steps=12, save_every=4, **CFG), tmp_path / "split")
    assert len(more) == 4
    assert torch.load(tmp_path / "split" / STATE, weights_only=False)["step"] == 12
    for (name, a), b in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.allclose(a, b, atol=1e-6), name

    # Nothing left to do: a finished run runs no step.
    assert train(resumed, data, TrainConfig(steps=12, save_every=4, **CFG), tmp_path / "split") == []


def test_frequent_tokens():
    data = [Sequence(torch.tensor([5, 5, 5, 2, 2, 9]), torch.zeros(6, 4)), Sequence(torch.tensor([2, 7]), torch.zeros(2, 4))]
    assert frequent_tokens(data, 2) == [2, 5]
    assert frequent_tokens(data, 10) == [2, 5, 7, 9]  # never more than the tokens seen


def test_train_config_is_validated():
    with pytest.raises(ValueError):
        TrainConfig(steps=0)
    with pytest.raises(ValueError):
        TrainConfig(lr=0)


def test_every_cli_flag_has_help():
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, sub in subs.choices.items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.help, f"{name} {action.option_strings}"
    args = parser.parse_args(["train", "--target", "t", "--out", "o", "--kind", "eagle", "--layers", "1"])
    assert (args.kind, args.layers, args.resume) == ("eagle", 1, True)


def test_train_command_reads_the_feature_cache_and_resumes(tiny, tmp_path, capsys):
    import json
    from dovetail.training.cli import main
    from dovetail.training.data import extract_features, features_dir
    pieces, data, path, lm = tiny
    extract_features(lm, [s.tokens.tolist() for s in data], features_dir(pieces.identity, tmp_path), progress=False)
    args = ["train", "--target", str(path), "--cache-dir", str(tmp_path), "--out", str(tmp_path / "d"),
            "--seq-len", "8", "--batch-size", "2", "--lr", "1e-3", "--save-every", "2", "--layers", "2"]
    main(args + ["--steps", "4"])
    assert json.loads(capsys.readouterr().out)["steps_run"] == 4
    main(args + ["--steps", "6", "--layers", "1"])  # resumes: the saved run's shape wins
    out = json.loads(capsys.readouterr().out)
    assert out["steps_run"] == 2 and out["last_loss"] > 0
    assert json.loads((tmp_path / "d" / "config.json").read_text())["num_layers"] == 2

    # --init fine-tunes another checkpoint (its shape, its weights), here with unrolled steps.
    from safetensors.torch import load_file
    # (argparse keeps the last --out and --lr)
    main(args + ["--out", str(tmp_path / "ft"), "--init", str(tmp_path / "d"), "--unroll", "2", "--steps", "1",
                 "--lr", "1e-12"])
    assert json.loads(capsys.readouterr().out)["steps_run"] == 1
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["num_layers"] == 2
    a, b = load_file(str(tmp_path / "d" / "model.safetensors")), load_file(str(tmp_path / "ft" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # lr ~0: the same weights
    with pytest.raises(SystemExit, match="unroll"):
        main(args + ["--unroll", "8"])  # not below --seq-len 8


def test_learning_rate_schedule_warms_up_then_decays_to_a_tenth():
    cfg = TrainConfig(steps=110, lr=1e-3, warmup=10)
    lrs = [cfg.lr_at(s) for s in range(110)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # never rises after the warm-up
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)
    assert TrainConfig(steps=5, lr=2e-4).lr_at(3) == 2e-4  # no warm-up: constant
    with pytest.raises(ValueError):
        TrainConfig(steps=5, warmup=5)


def test_train_command_starts_layers_from_the_target(tiny, tmp_path, capsys):
    import json
    from safetensors.torch import load_file
    from dovetail.training.cli import main
    from dovetail.training.data import extract_features, features_dir
    pieces, data, path, lm = tiny
    extract_features(lm, [s.tokens.tolist() for s in data], features_dir(pieces.identity, tmp_path), progress=False)
    args = ["train", "--target", str(path), "--cache-dir", str(tmp_path), "--seq-len", "8", "--batch-size", "2",
            "--lr", "1e-12", "--steps", "1"]
    main(args + ["--out", str(tmp_path / "t"), "--layers-from-target"])
    assert json.loads(capsys.readouterr().out)["steps_run"] == 1
    saved = load_file(str(tmp_path / "t" / "model.safetensors"))
    top = lm.model.model.layers[-1].self_attn.q_proj.weight.detach()
    torch.testing.assert_close(saved["layers.0.self_attn.q_proj.weight"].float(), top, atol=1e-2, rtol=1e-2)  # bf16
    main(args + ["--out", str(tmp_path / "r")])
    other = load_file(str(tmp_path / "r" / "model.safetensors"))["layers.0.self_attn.q_proj.weight"].float()
    assert not torch.allclose(other, top, atol=1e-2, rtol=1e-2)  # random layers without the flag
    with pytest.raises(SystemExit, match="--init"):
        main(args + ["--out", str(tmp_path / "x"), "--layers-from-target", "--init", str(tmp_path / "t")])
