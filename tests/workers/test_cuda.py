"""The draft side on a CUDA GPU: skipped without one (CI has none); run on a GPU machine with
``python -m pytest -m gpu``. The same code must run there unchanged: drafting on cuda:N gives
the trees it gives on the CPU, training runs there, and the pipeline stays lossless.
"""
from __future__ import annotations

import pytest
import torch

from dovetail.draft.checkpoint import load_feature_draft, load_target_pieces, new_feature_draft
from dovetail.protocol import DraftRequest, OpenRequest, encode_features
from tests.helpers import make_tiny_model, plain_greedy
from dovetail.training.train import TrainConfig, train
from dovetail.training.data import Sequence, target_hidden
from dovetail.workers.feature_draft import FeatureDraftHandler
from dovetail.workers.hf import CausalLM

pytestmark = [pytest.mark.gpu, pytest.mark.timeout(300),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
CUDA = "cuda:0"
PROMPTS = [[7], [1, 5, 9, 13], [(7 * i + 3) % 64 for i in range(29)]]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("cuda") / "target", seed=3, attention_gain=10.0)
    return path, CausalLM.load(str(path), dtype=torch.float64), load_target_pieces(path)


def greedy(lm, prompt, n):
    return list(prompt) + plain_greedy(lm.model, prompt, n)


@pytest.fixture(scope="module")
def cuda_trained(target, tmp_path_factory):
    """A DGF draft trained on the GPU (bf16 autocast, unrolled steps) on the target's own text."""
    path, lm, pieces = target
    gen = torch.Generator().manual_seed(0)
    data = []
    for _ in range(24):
        seq = greedy(lm, torch.randint(0, 64, (6,), generator=gen).tolist(), 40)
        data.append(Sequence(torch.tensor(seq), target_hidden(lm, seq).float()))
    model = new_feature_draft(pieces, "dgf", 1).to(CUDA)
    out = tmp_path_factory.mktemp("cuda") / "trained"
    cfg = TrainConfig(steps=200, lr=3e-3, batch_size=8, seq_len=24, unroll=2, amp=True, save_every=1000,
                      progress=False)
    losses = train(model, data, cfg, out)
    return model, out, losses


def test_training_runs_on_the_gpu(cuda_trained, target):
    model, out, losses = cuda_trained
    assert model.device.type == "cuda" and len(losses) == 200
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-20:]) < 0.7 * sum(losses[:20]), losses
    # The checkpoint written from the GPU loads on the CPU with the same weights (bf16 on disk).
    back = load_feature_draft(out, target[2], dtype=torch.float32)
    for (name, p), q in zip(model.state_dict().items(), back.state_dict().values()):
        assert torch.equal(p.detach().cpu().to(torch.bfloat16).float(), q), name


def test_trees_on_cuda_equal_trees_on_the_cpu(target):
    """Float64 on both: the same proposals, request by request, rollback included."""
    _, lm, pieces = target
    handlers = {dev: FeatureDraftHandler(new_feature_draft(pieces, "dgf", 2, seed=1).double().to(dev).eval(), "x")
                for dev in ("cpu", CUDA)}
    assert handlers[CUDA].model.device.type == "cuda"
    assert handlers[CUDA].handshake().device.startswith("cuda")
    seq = greedy(lm, PROMPTS[2][:9], 30)
    feats = target_hidden(lm, seq)
    # (committed length, base the draft holds): forward steps, then a rollback to 15.
    plan = [(9, 0), (11, 9), (14, 11), (20, 14), (15, 13), (25, 15)]
    for h in handlers.values():
        h.handle(OpenRequest(1, seq[:9]))
    for step, (n, base) in enumerate(plan, start=1):
        rows_from = 0 if step == 1 else max(0, base - 1)
        f = encode_features(feats[rows_from:n - 1])
        props = {dev: h.handle(DraftRequest(1, step, base, seq[base:n], 5, 3, 12, features=f))
                 for dev, h in handlers.items()}
        assert props["cpu"].tokens == props[CUDA].tokens and props["cpu"].parents == props[CUDA].parents, step
        assert len(props["cpu"].tokens) == 12


@pytest.fixture(scope="module")
def coords(launch_all, close_all, target, cuda_trained, tmp_path_factory):
    path = target[0]
    lm_draft = make_tiny_model(tmp_path_factory.mktemp("cuda") / "lm-draft", noise_from=path, noise=0.005)
    shape = dict(depth=4, top_k=2, max_nodes=8)
    cs = launch_all({"base": (path, None, {}),
                     "feature": (path, f"feature:{cuda_trained[1]}", dict(shape, draft_device=CUDA)),
                     "lm": (path, str(lm_draft), dict(shape, draft_device=CUDA))})
    try:
        yield cs
    finally:
        assert not close_all(cs.values()), "workers outlived close()"


def test_pipeline_with_the_draft_on_cuda_is_lossless(coords):
    for name in ("feature", "lm"):
        assert coords[name].draft_info.device.startswith("cuda"), coords[name].draft_info
        accepted = rounds = 0
        for prompt in PROMPTS:
            ref = coords["base"].generate(prompt, max_new_tokens=40).token_ids
            r = coords[name].generate(prompt, max_new_tokens=40)
            assert r.token_ids == ref, (name, prompt)
            assert not r.stats.draft_fallback and r.stats.drafted > 0
            accepted, rounds = accepted + r.stats.accepted, rounds + r.stats.rounds
        # Both drafts know the target's text (one trained on it, one a noisy copy of it).
        assert accepted / rounds > 1.5, (name, accepted, rounds)
