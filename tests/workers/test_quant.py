"""Weight-only int8 and int4 for the target (workers/quant.py): accuracy, losslessness, wiring.

Tiny float32 models: torch's int8 and int4 CPU kernels take 16- and 32-bit float
activations only (float64 goes through the dequantize fallback, tested on its own below).
"""
from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

import dovetail
from dovetail import cli
from tests.helpers import HandlerSession, make_tiny_model, plain_greedy
from dovetail.workers import target as target_worker
from dovetail.workers.backend import HFBackend
from dovetail.workers.quant import (
    INT4_GROUP, Int4Linear, Int8Linear, check_quantize, int4pack_works, int8pack_works, quantize_int4,
    quantize_int8, quantize_model,
)
from dovetail.workers.serve import parse_config
from dovetail.workers.target import TargetConfig, TargetHandler

PROMPT = [1, 5, 9, 3, 7, 11, 2]
VOCAB = 64


def float_linear(dtype=torch.float32, seed=0, fan_in=96, fan_out=80) -> nn.Linear:
    """Gaussian rows whose sizes span 16x, as LLM output channels do: one scale per
    tensor instead of per channel would then round the small rows far too coarsely."""
    torch.manual_seed(seed)
    lin = nn.Linear(fan_in, fan_out)
    with torch.no_grad():
        lin.weight.copy_(0.1 * torch.randn(fan_out, fan_in) * 2.0 ** -(torch.arange(fan_out) % 5)[:, None])
        lin.bias.copy_(torch.randn(fan_out))  # big enough that a dropped bias would show
    return lin.to(dtype)


# ---- the int8 linear -----------------------------------------------------------------------
def test_the_kernels_work_here_for_bf16_and_fp32():
    # The speed-up rests on them: the fallback dequantizes every call and saves no time.
    for works in (int8pack_works, int4pack_works):
        assert works(torch.float32) and works(torch.bfloat16)
        assert not works(torch.float64)


def test_int8_linear_is_close_to_the_float_linear():
    lin = float_linear()
    q = Int8Linear.from_linear(lin)
    assert q.fast and q.weight.dtype == torch.int8 and q.weight.shape == lin.weight.shape
    x = torch.randn(16, 4, 96)
    with torch.no_grad():
        want, got = lin(x), q(x)
    assert got.shape == want.shape == (16, 4, 80)
    # Round-to-nearest keeps each weight within step/2 of its value, step_j = max_i |w_ji| / 127,
    # so each output is within sum_i |x_i| * step_j / 2 of the float one (+ float32 rounding).
    step = lin.weight.detach().abs().amax(dim=1) / 127
    assert ((q.dequantized() - lin.weight.detach()).abs() <= step[:, None] * (0.5 + 1e-5)).all()
    assert ((got - want).abs() <= x.abs().sum(-1, keepdim=True) * step / 2 + 1e-4).all()
    # That worst case is loose: rounding errors are uniform in ±step/2 (rms step/√12) and add
    # up like noise, so each channel's relative error is ~ step/√12 / rms(w_j) ≈ 0.7% for a
    # Gaussian row of 96 (max ≈ 2.9 rms). 2% per channel leaves room for unlucky rows; one
    # scale per tensor would put the smallest rows (16x smaller) near 10%.
    err = (got - want).reshape(-1, 80)
    ref = (want - lin.bias.detach()).reshape(-1, 80)
    rel = err.norm(dim=0) / ref.norm(dim=0)
    assert rel.max() < 0.02 and rel.min() > 1e-4, rel  # and not zero: the weights really were rounded
    # The kernel computes exactly what the stored weights say (the dequantized matmul).
    ref = x @ q.dequantized().T + lin.bias
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_int8_linear_in_bf16_stays_within_bf16_rounding_of_float():
    lin = float_linear()
    q = Int8Linear.from_linear(float_linear(torch.bfloat16))
    assert q.fast and q.scales.dtype == torch.bfloat16
    x = torch.randn(7, 96)
    with torch.no_grad():
        want, got = lin(x), q(x.bfloat16()).float()
    # bf16 alone (weights, inputs, outputs: 8-bit mantissas, ~0.4% each) plus int8's ~0.6%.
    rel = ((got - want).norm() / want.norm()).item()
    assert rel < 0.03, rel


def test_int4_linear_is_close_to_the_float_linear():
    lin = float_linear()
    q = Int4Linear(lin)
    assert q.fast and q.weight.dtype == torch.uint8 and q.weight.numel() == 80 * 96 // 2  # two codes a byte
    x = torch.randn(16, 4, 96)
    with torch.no_grad():
        want, got = lin(x), q(x)
    # Each group of 32 inputs spans [lo, hi] in 15 steps of (hi - lo) / 15; rounding to the
    # nearest keeps every weight within half a step.
    w = lin.weight.detach().reshape(80, 96 // INT4_GROUP, INT4_GROUP)
    step = ((w.amax(-1) - w.amin(-1)) / 15).repeat_interleave(INT4_GROUP, dim=1)
    assert ((q.dequantized() - lin.weight.detach()).abs() <= step * (0.5 + 1e-5)).all()
    # Per channel: rounding noise of rms step/√12 against rms(w); a Gaussian group of 32
    # spans ~4.1 rms, so the expected relative error is 4.1/15/√12 ≈ 8%; 12% leaves room,
    # and 8-bit-sized errors (< 1%) would mean these were not really 4-bit weights.
    err = (got - want).reshape(-1, 80)
    rel = err.norm(dim=0) / (want - lin.bias.detach()).reshape(-1, 80).norm(dim=0)
    assert rel.max() < 0.12 and rel.min() > 0.03, rel
    torch.testing.assert_close(got, x @ q.dequantized().T + lin.bias, rtol=1e-4, atol=1e-4)


def test_int4_codes_span_each_group_and_constant_groups_come_back_exactly():
    w = torch.tensor([[-1.0, 0.0, 0.4, 2.0] * 8, [3.0] * 32]).repeat(8, 1)  # 16 rows of 32: one group each
    q, sz = quantize_int4(w)
    assert q.min() >= 0 and q.max() <= 15 and sz.shape == (1, 16, 2)
    assert q[0, :4].tolist() == [0, 5, 7, 15]  # lo -> 0, hi -> 15, in steps of 3/15 = 0.2
    lin = nn.Linear(32, 16, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    back = Int4Linear(lin).dequantized()  # through the packed kernel
    torch.testing.assert_close(back, w, atol=0.1 + 1e-6, rtol=0)
    assert torch.equal(back[1], w[1])


def test_rows_of_zeros_and_extremes_quantize_exactly():
    w = torch.tensor([[0.0, 0.0, 0.0], [1.0, -2.0, 0.5], [-3.0, 3.0, 1.5]])
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert q[0].tolist() == [0, 0, 0] and torch.isfinite(scales).all()
    assert q[1, 1] == -127 and q[2].tolist() == [-127, 127, 64]  # amax maps to ±127
    torch.testing.assert_close(q.float() * scales[:, None], w, atol=(scales / 2).max().item(), rtol=0)


def test_float64_falls_back_to_dequantize_then_matmul(caplog, tmp_path):
    lin = float_linear(torch.float64)
    q = Int8Linear.from_linear(lin)
    assert not q.fast and q.scales.dtype == torch.float64
    x = torch.randn(4, 96, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(q(x), x @ q.dequantized().T + lin.bias)
    model = HFBackend(str(make_tiny_model(tmp_path / "m64")), dtype=torch.float64).lm.model
    with caplog.at_level(logging.WARNING, logger="dovetail.workers.quant"):
        quantize_model(model, "int8")
    assert "dequantized before every matmul" in caplog.text


@pytest.mark.parametrize("mode, cls", [("int8", Int8Linear), ("int4", Int4Linear)])
def test_only_the_decoder_linears_are_quantized(tmp_path, mode, cls):
    model = HFBackend(str(make_tiny_model(tmp_path / "m", dtype=torch.float32, layers=3)),
                      dtype=torch.float32).lm.model
    assert quantize_model(model, "none") == 0 and not any(isinstance(m, cls) for m in model.modules())
    assert quantize_model(model, mode) == 3 * 7  # q, k, v, o, gate, up, down per layer
    for layer in model.model.layers:
        assert not any(type(m) is nn.Linear for m in layer.modules())
        assert sum(type(m) is cls for m in layer.modules()) == 7
    # Kept as they were: the LM head decides acceptance (and is the tied embedding in Qwen2.5).
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32


# ---- refusals and flags ----------------------------------------------------------------------
def test_int4_falls_back_to_int8_where_the_kernel_cannot_take_the_shape(caplog):
    with caplog.at_level(logging.WARNING, logger="dovetail.workers.quant"):
        from dovetail.workers.quant import quantized_linear
        assert isinstance(quantized_linear(nn.Linear(32, 24), "int4"), Int8Linear)  # 24 % 16 != 0
        assert isinstance(quantized_linear(nn.Linear(48, 32), "int4"), Int8Linear)  # 48 % 32 != 0
    assert caplog.text.count("int8 instead") == 2


def test_unknown_quantize_values_are_refused_clearly(tmp_path):
    for bad in ("int2", "INT8", ""):
        with pytest.raises(ValueError, match=r"quantize must be one of \('none', 'int8', 'int4'\), got"):
            check_quantize(bad)
    with pytest.raises(ValueError, match="quantize must be one of"):
        TargetConfig(bind="inproc://t", model="m", quantize="fp8")
    with pytest.raises(ValueError, match="target_quantize must be one of"):
        dovetail.launch(tmp_path, None, target_quantize="fp8")  # before any process starts
    with pytest.raises(ValueError, match="for a target on the CPU"):
        HFBackend(str(tmp_path), dtype=torch.float32, device="cuda:0", quantize="int8")


def test_target_worker_flag_reaches_the_config():
    argv = ["--bind", "ipc:///tmp/x.sock", "--model", "m"]
    parser = target_worker.build_parser()
    assert parse_config(TargetConfig, parser, argv).quantize == "none"
    assert parse_config(TargetConfig, parser, argv + ["--quantize", "int8"]).quantize == "int8"
    with pytest.raises(SystemExit):
        parser.parse_args(argv + ["--quantize", "fp8"])


def test_cli_flag_reaches_launch(monkeypatch, capsys):
    assert cli.build_parser().parse_args([]).target_quantize == "none"
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--target-quantize", "fp8"])
    seen = {}

    def fake_launch(target, draft, **kw):
        seen.update(kw)
        raise ValueError("stop here")
    monkeypatch.setattr(dovetail, "launch", fake_launch)
    assert cli.main(["--target-quantize", "int8", "--no-draft", "--prompt", "x"]) == 1
    assert seen["target_quantize"] == "int8" and "stop here" in capsys.readouterr().err


# ---- lossless relative to the quantized target -------------------------------------------------
@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    # Sharpened attention (as in test_target_handler): every token depends on the context,
    # so a wrong KV row after a rejection or a tree gather changes the output.
    return make_tiny_model(tmp_path_factory.mktemp("quant") / "model", seed=2, vocab_size=VOCAB,
                           dtype=torch.float32, attention_gain=10.0)


@pytest.fixture(scope="module", params=["int8", "int4"])
def backend(model_path, request):
    return HFBackend(str(model_path), dtype=torch.float32, quantize=request.param)


@pytest.fixture(scope="module")
def truth(backend):
    cont = plain_greedy(backend.lm.model, PROMPT, 40)
    assert len(set(cont)) > 12, "the reference continuation loops: the tests would be weak"
    return cont


@pytest.fixture
def handler(backend, model_path):
    return TargetHandler(backend, TargetConfig(bind="inproc://target", model=str(model_path),
                                               quantize=backend.quantize))


def test_the_quantized_target_is_really_quantized(backend, model_path):
    assert backend.identity.dtype == f"float32+{backend.quantize}"
    plain = HFBackend(str(model_path), dtype=torch.float32)
    assert plain.identity.dtype == "float32"
    with torch.no_grad():
        a = backend.lm.model(torch.tensor([PROMPT])).logits
        b = plain.lm.model(torch.tensor([PROMPT])).logits
    assert not torch.equal(a, b)  # a different model...
    rel = ((a - b).norm() / b.norm()).item()
    assert rel < (0.05 if backend.quantize == "int8" else 0.25), rel  # ...close to the float one


def test_quantized_greedy_is_the_same_with_and_without_drafts(handler, truth):
    assert HandlerSession(handler, 1, PROMPT).decode(24) == truth[:24]
    s = HandlerSession(handler, 2, PROMPT)
    for accept in (3, 0, 5, 1):  # each round: `accept` right tokens, then a wrong one
        n = len(s.generated())
        draft = truth[n:n + accept] + [(truth[n + accept] + 7) % VOCAB, 0, 1]
        assert s.verify(draft).accepted == list(range(accept))
    # A tree whose right path is the second child: its KV rows are gathered out of order.
    n = len(s.generated())
    wrong = (truth[n] + 1) % VOCAB
    res = s.verify([wrong, truth[n], truth[n + 1], truth[n + 2]], [-1, -1, 1, 2])
    assert res.accepted == [1, 2, 3]
    n = len(s.generated())
    assert s.decode(10) == truth[:n + 10]


@pytest.mark.timeout(120)
def test_launch_with_a_float_draft_matches_the_quantized_target_alone(model_path):
    # The float model drafts for its own int8 version: close, so most tokens are accepted
    # and some rejected; the output must be the int8 target's own either way.
    with dovetail.launch(model_path, None, dtype="float32", target_quantize="int8",
                         env={"OMP_WAIT_POLICY": "PASSIVE"}) as alone:
        assert alone.target_info.dtype == "float32+int8"
        want = alone.generate(PROMPT, max_new_tokens=30).token_ids
    with dovetail.launch(model_path, model_path, dtype="float32", draft_device="cpu", target_quantize="int8",
                         depth=4, top_k=2, max_nodes=8, env={"OMP_WAIT_POLICY": "PASSIVE"}) as drafted:
        assert drafted.draft_info.dtype == "float32"  # the draft is never quantized
        r = drafted.generate(PROMPT, max_new_tokens=30)
    assert r.token_ids == want
    assert r.stats.accepted_drafts > 0 and r.stats.rounds < 30
