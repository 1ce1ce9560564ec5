"""Weight-only int8 and int4 for the target's decoder layers on the CPU.

Small-k verification on the CPU is bound by reading the weights: a 1.5B model in bf16
streams ~3 GB per forward, in int8 half of that, in int4 a quarter. Every nn.Linear inside
the decoder layers (attention q/k/v/o, MLP gate/up/down) becomes an :class:`Int8Linear`
(int8 weights, one symmetric scale per output channel, ``_weight_int8pack_mm``) or an
:class:`Int4Linear` (4-bit weights, a scale and an offset per group of INT4_GROUP inputs,
``_weight_int4pack_mm_for_cpu``). Activations stay in the model's dtype; the kernels
dequantize on the fly.

Embeddings and the LM head stay as they are: the LM head's logits decide which draft
tokens are accepted, so it keeps the model's precision; and in Qwen2.5 it is tied to the
embedding matrix, a lookup table that reads one row per token (nothing to gain there).

Pair them with bf16: on the 2-core EPYC the int8 kernel with float32 activations made the
1.5B target's k = 1 forward slower than plain float32 (3.1 s against 0.9-1.6 s, loaded).

A quantized target is a different model from the float one. Speculative decoding stays
lossless relative to the quantized target itself: the draft is verified by the same
quantized forward that decodes alone.
"""
from __future__ import annotations

import functools
import logging

import torch
from torch import nn
from torch.nn import functional as F

from dovetail.models.options import QUANTIZE_CHOICES

log = logging.getLogger(__name__)

INT8_MAX = 127  # symmetric: -127..127, so that negating a weight never overflows
# Inputs sharing one int4 scale and offset. 32, 64 and 128 ran within 10% of each other on
# the 2-core EPYC (one 1.5B decoder layer, k = 1..16): the smallest group rounds least.
INT4_GROUP = 32
INT4_N_MULTIPLE = 16  # the CPU int4 packing takes output sizes in multiples of 16


def check_quantize(mode: str) -> str:
    """``mode`` if it is a known quantization, else a ValueError that lists the known ones."""
    if mode not in QUANTIZE_CHOICES:
        raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {mode!r}")
    return mode


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight [out, in], float32 scales [out]): per-output-channel, symmetric.

    Rounding to nearest keeps every weight within half a step (scale / 2) of its value.
    """
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    # An all-zero row would divide by zero; any scale represents it exactly.
    scales = torch.where(amax > 0, amax / INT8_MAX, torch.ones_like(amax))
    q = torch.round(w / scales[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scales


def quantize_int4(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """(int32 weight [out, in] in 0..15, float32 scales_and_zeros [in/group, out, 2]).

    Asymmetric per group, in the layout of torch's int4 kernels: w ≈ (q - 8) · scale + zero,
    so q = 0 is the group's minimum and q = 15 its maximum; every weight is within scale / 2.
    """
    out_f, in_f = weight.shape
    w = weight.detach().float().reshape(out_f, in_f // group, group)
    lo, hi = w.amin(-1), w.amax(-1)
    scales = torch.where(hi > lo, (hi - lo) / 15, torch.ones_like(lo))  # a constant group: any scale
    q = torch.round((w - lo[..., None]) / scales[..., None]).clamp_(0, 15).to(torch.int32)
    zeros = lo + 8 * scales
    return q.reshape(out_f, in_f), torch.stack([scales, zeros], -1).transpose(0, 1).contiguous()


def int4_fits(linear: nn.Linear, group: int = INT4_GROUP) -> bool:
    return linear.in_features % group == 0 and linear.out_features % INT4_N_MULTIPLE == 0


@functools.cache
def int4pack_works(dtype: torch.dtype) -> bool:
    """Like :func:`int8pack_works`, for ``_weight_int4pack_mm_for_cpu``."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 2 * INT4_GROUP, generator=gen)
    q, sz = quantize_int4(torch.randn(INT4_N_MULTIPLE, 2 * INT4_GROUP, generator=gen))
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(dtype), packed, INT4_GROUP, sz.to(dtype)).float()
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    ref = x.to(dtype).float() @ dequantize_int4(q, sz).T
    tol = 1e-2 if torch.finfo(dtype).bits <= 16 else 1e-5
    return bool(torch.allclose(out, ref, rtol=tol, atol=tol * ref.abs().max().item()))


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor, group: int = INT4_GROUP) -> torch.Tensor:
    out_f, in_f = q.shape
    scales, zeros = scales_and_zeros.float().transpose(0, 1).unbind(-1)  # [out, in/group] each
    w = (q.reshape(out_f, in_f // group, group).float() - 8) * scales[..., None] + zeros[..., None]
    return w.reshape(out_f, in_f)


@functools.cache
def int8pack_works(dtype: torch.dtype) -> bool:
    """Whether ``_weight_int8pack_mm`` runs, and computes the right thing, for activations of ``dtype``.

    It exists for 16- and 32-bit floats on CPUs that torch builds it for; a tiny probe at
    quantize time is cheaper than finding out in the middle of a request.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=gen)
    q, scales = quantize_int8(torch.randn(16, 64, generator=gen))
    try:
        out = torch.ops.aten._weight_int8pack_mm(x.to(dtype), q, scales.to(dtype)).float()
    except (RuntimeError, NotImplementedError, AttributeError):
        return False
    ref = x.to(dtype).float() @ (q.float() * scales[:, None]).T
    tol = 1e-2 if torch.finfo(dtype).bits <= 16 else 1e-5  # bf16/fp16 outputs round at ~2^-8
    return bool(torch.allclose(out, ref, rtol=tol, atol=tol * ref.abs().max().item()))


class Int8Linear(nn.Module):
    """y = x · (int8 weight × scale)ᵀ + bias, with the weight stored as int8."""

    def __init__(self, weight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, fast: bool):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight)
        self.register_buffer("scales", scales)  # in the activation dtype: the kernel wants them alike
        self.register_buffer("bias", bias)
        self.fast = fast

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        dtype = linear.weight.dtype
        q, scales = quantize_int8(linear.weight)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q, scales.to(dtype), bias, fast=int8pack_works(dtype))

    def dequantized(self) -> torch.Tensor:
        return self.weight.to(self.scales.dtype) * self.scales[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fast:
            return F.linear(x, self.dequantized(), self.bias)
        # The kernel takes a contiguous 2-D [rows, in] matrix and scales of x's dtype.
        rows = x.reshape(-1, self.in_features).contiguous()
        out = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scales.to(x.dtype))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kernel = "_weight_int8pack_mm" if self.fast else "dequantize+matmul"
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}, {kernel}"


class Int4Linear(nn.Module):
    """y = x · dequantized(int4 weight)ᵀ + bias, with the weight packed for the CPU kernel."""

    def __init__(self, linear: nn.Linear, group: int = INT4_GROUP):
        super().__init__()
        dtype = linear.weight.dtype
        self.in_features, self.out_features, self.group = linear.in_features, linear.out_features, group
        self.fast = int4pack_works(dtype)
        q, sz = quantize_int4(linear.weight, group)
        # Where the kernel is missing, keep the unpacked codes (one byte each) to dequantize.
        weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1) if self.fast else q.to(torch.uint8)
        self.register_buffer("weight", weight)
        self.register_buffer("scales_and_zeros", sz.to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def dequantized(self) -> torch.Tensor:
        """The weight [out, in] the layer multiplies by, in float32."""
        if not self.fast:
            return dequantize_int4(self.weight.to(torch.int32), self.scales_and_zeros, self.group)
        eye = torch.eye(self.in_features, dtype=torch.float32)  # the kernel itself, on the identity
        return torch.ops.aten._weight_int4pack_mm_for_cpu(
            eye, self.weight, self.group, self.scales_and_zeros.float()).T.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fast:
            return F.linear(x, self.dequantized().to(x.dtype), self.bias)
        rows = x.reshape(-1, self.in_features).contiguous()
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.weight, self.group,
                                                         self.scales_and_zeros.to(x.dtype))
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kernel = "_weight_int4pack_mm_for_cpu" if self.fast else "dequantize+matmul"
        return f"in_features={self.in_features}, out_features={self.out_features}, group={self.group}, " \
               f"bias={self.bias is not None}, {kernel}"


def quantized_linear(linear: nn.Linear, mode: str) -> nn.Module:
    """The int8 or int4 replacement of ``linear``; int8 where int4's kernel cannot take its shape."""
    if mode == "int4" and int4_fits(linear):
        return Int4Linear(linear)
    if mode == "int4":
        log.warning("%d x %d linear: int4 needs in %% %d == 0 and out %% %d == 0; int8 instead",
                    linear.out_features, linear.in_features, INT4_GROUP, INT4_N_MULTIPLE)
    return Int8Linear.from_linear(linear)


def decoder_linears(model) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every nn.Linear inside the decoder layers."""
    return linears_in(model.model.layers)


def linears_in(*modules: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    """(parent, attribute, linear) for every nn.Linear inside ``modules``."""
    found = []
    for module in modules:
        for parent in module.modules():
            for name, child in parent.named_children():
                if type(child) is nn.Linear:
                    found.append((parent, name, child))
    return found


def quantize_model(model, mode: str) -> int:
    """Quantize ``model``'s decoder linears in place to ``mode``; return how many were replaced."""
    if check_quantize(mode) == "none":
        return 0
    linears = decoder_linears(model)
    dtype = linears[0][2].weight.dtype if linears else None
    works, kernel = (int4pack_works, "_weight_int4pack_mm_for_cpu") if mode == "int4" else \
        (int8pack_works, "_weight_int8pack_mm")
    if linears and not works(dtype):
        log.warning("torch.ops.aten.%s does not work for %s activations here: %s weights are "
                    "dequantized before every matmul (saves memory, not time)", kernel, dtype, mode)
    for parent, name, linear in linears:
        setattr(parent, name, quantized_linear(linear, mode))
    return len(linears)
