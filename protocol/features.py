"""Hidden-state features <-> ``Feature`` values (numpy only; torch by duck typing).

Codecs
------
``fp16``: the array as little-endian float16. Relative error <= 2**-11 per
element (fp16 rounding); finite values beyond the float16 range saturate to
+-65504 rather than becoming inf, since features only steer the draft and a
clipped outlier is better than an inf that poisons it.

``int8``: symmetric per-row quantisation over the last dimension. For each
row, ``s = max(abs(row)) / 127`` (1.0 for an all-zero row) is stored as
float16, rounded *up* so that no element needs clipping, and each element is
sent as ``q = round(x / s16)`` in [-127, 127]. Decoding gives ``q * s16``, so

    max abs error per element <= s16 / 2,  with  s16 <= s * (1 + 2**-10)

i.e. half the (fp16-rounded) scale, plus float32 arithmetic rounding (~1e-7
relative). Rows whose peak is tiny use fp16's smallest subnormal scale
(about 6e-8), which keeps the same bound. Peaks beyond 127 * 65504 saturate.
"""
from __future__ import annotations

import math

import numpy as np

from .messages import DEFAULT_FEATURE_CODEC, FEATURE_CODECS, MAX_FEATURE_DIMS, Feature
from .validation import validate_feature

__all__ = ["encode_features", "decode_features"]

_FP16_MAX = float(np.finfo(np.float16).max)


def _as_float_array(array) -> np.ndarray:
    if hasattr(array, "detach"):  # a torch.Tensor (any device/dtype), without importing torch
        array = array.detach().to("cpu").float().numpy()
    a = np.asarray(array)
    if a.dtype.kind != "f":
        raise TypeError(f"features must be a floating-point array, got dtype {a.dtype}")
    if not 1 <= a.ndim <= MAX_FEATURE_DIMS:
        raise ValueError(f"features must have 1 to {MAX_FEATURE_DIMS} dimensions, "
                         f"got shape {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("features contain NaN or infinity; refusing to send them")
    return a


def encode_features(array, codec: str = DEFAULT_FEATURE_CODEC) -> Feature:
    """Pack a float array (or torch tensor) of 1..4 dims into a Feature."""
    if codec not in FEATURE_CODECS:
        raise ValueError(f"unknown feature codec {codec!r}; expected one of {FEATURE_CODECS}")
    a = _as_float_array(array)
    shape = [int(d) for d in a.shape]
    if codec == "fp16":
        h = np.clip(a, -_FP16_MAX, _FP16_MAX).astype("<f2")
        return Feature("fp16", "float16", shape, h.tobytes())

    rows = math.prod(shape[:-1])
    x = a.astype(np.float32).reshape(rows, shape[-1])
    peak = np.abs(x).max(axis=1, initial=0.0)
    scale = np.minimum(peak / np.float32(127), np.float32(_FP16_MAX))
    s16 = scale.astype(np.float16)
    # Round the stored scale up so |x| / s16 <= 127: no clipping, error <= s16/2.
    low = s16.astype(np.float32) < scale
    s16[low] = np.nextafter(s16[low], np.float16(np.inf))
    s16[peak == 0] = 1.0
    q = np.clip(np.rint(x / s16.astype(np.float32)[:, None]), -127, 127).astype(np.int8)
    return Feature("int8", "int8", shape, q.tobytes(), s16.astype("<f2").tobytes())


def decode_features(feature: Feature) -> np.ndarray:
    """Unpack a Feature into a new float32 array of its original shape.

    Raises InvalidField (a ProtocolError) if its sizes do not add up.
    """
    validate_feature(feature)
    shape = tuple(feature.shape)
    if feature.codec == "fp16":
        return np.frombuffer(feature.data, dtype="<f2").astype(np.float32).reshape(shape)
    rows = math.prod(shape[:-1])
    q = np.frombuffer(feature.data, dtype=np.int8).astype(np.float32).reshape(rows, shape[-1])
    s = np.frombuffer(feature.scales, dtype="<f2").astype(np.float32)
    return (q * s[:, None]).reshape(shape)
