"""Feature packing: fp16 and int8 codecs, and rejection of inconsistent Features."""
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from dovetail.protocol import (
    Feature, InvalidField, VerifyResult, decode, decode_features, encode, encode_features,
)

RNG = np.random.default_rng(0)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 8), (1, 2, 3, 4)])
def test_fp16_round_trip(dtype, shape):
    x = (RNG.standard_normal(shape) * 10).astype(dtype)
    f = encode_features(x, "fp16")
    assert (f.codec, f.dtype, f.shape, f.scales) == ("fp16", "float16", list(shape), b"")
    assert f.data == x.astype("<f2").tobytes()  # little-endian float16
    y = decode_features(f)
    assert y.dtype == np.float32 and y.shape == shape
    np.testing.assert_allclose(y, x, rtol=2**-11, atol=0)


def test_fp16_saturates_instead_of_inf():
    y = decode_features(encode_features(np.array([1e6, -1e6, 1.0])))
    assert y.tolist() == [65504.0, -65504.0, 1.0]


def _int8_bound(x, f):
    """Documented bound: |error| <= s16/2 per element, s16 <= peak/127 * (1 + 2**-10)."""
    rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
    s16 = np.frombuffer(f.scales, "<f2").astype(np.float64)
    err = np.abs(decode_features(f).reshape(rows.shape) - rows)
    assert (err <= s16[:, None] / 2 * (1 + 1e-6) + 1e-12).all()
    peak = np.abs(rows).max(axis=1)
    normal = peak / 127 > 2**-14  # fp16 normal range
    assert (s16[normal] <= peak[normal] / 127 * (1 + 2**-10)).all()
    assert (s16 * 127 >= peak).all()  # rounded up: nothing clipped


@pytest.mark.parametrize("shape", [(16,), (4, 33), (2, 3, 64), (2, 2, 2, 9)])
def test_int8_round_trip_within_bound(shape):
    x = RNG.standard_normal(shape) * RNG.uniform(1e-3, 1e3, shape[:-1] + (1,))
    f = encode_features(x.astype(np.float32), "int8")
    assert (f.codec, f.dtype, f.shape) == ("int8", "int8", list(shape))
    assert len(f.data) == x.size and len(f.scales) == 2 * (x.size // shape[-1])
    _int8_bound(x.astype(np.float32), f)


def test_int8_zero_tiny_and_huge_rows():
    x = np.array([[0.0, 0.0, 0.0], [1e-9, -3e-9, 2e-9], [1.0, -127.0, 0.5], [1e5, -2e5, 3.0]],
                 dtype=np.float32)
    f = encode_features(x, "int8")
    y = decode_features(f)
    assert y[0].tolist() == [0.0, 0.0, 0.0]
    assert np.frombuffer(f.scales, "<f2")[0] == 1.0  # all-zero row gets scale 1
    assert y[2, :2].tolist() == [1.0, -127.0]  # peak 127: scale 1.0 is exact
    _int8_bound(x, f)


def test_int8_quantisation_is_as_documented():
    x = np.array([[0.3, -1.27, 0.6]], dtype=np.float32)
    f = encode_features(x, "int8")
    s16 = np.frombuffer(f.scales, "<f2")[0]
    assert s16 >= np.float32(1.27) / 127
    q = np.frombuffer(f.data, np.int8)
    assert q.tolist() == np.rint(x[0] / np.float32(s16)).astype(int).tolist()
    assert q[1] == -127


@pytest.mark.parametrize("codec", ["fp16", "int8"])
@pytest.mark.parametrize("shape", [(3, 0), (0, 5), (0,)])
def test_empty_shapes(codec, shape):
    y = decode_features(encode_features(np.zeros(shape, np.float32), codec))
    assert y.shape == shape


def test_torch_like_tensor_by_duck_typing():
    class FakeTensor:  # mimics torch.Tensor's detach/to/float/numpy chain
        def __init__(self, a):
            self.a, self.calls = a, []

        def detach(self):
            self.calls.append("detach")
            return self

        def to(self, device):
            self.calls.append(device)
            return self

        def float(self):
            self.calls.append("float")
            return self

        def numpy(self):
            return self.a.astype(np.float32)

    t = FakeTensor(np.ones((2, 3), np.float64))
    assert decode_features(encode_features(t)).tolist() == [[1.0] * 3] * 2
    assert t.calls == ["detach", "cpu", "float"]


@pytest.mark.parametrize("bad, exc", [
    (np.arange(4), TypeError), (np.array(1.0), ValueError), (np.zeros((1,) * 5), ValueError),
    (np.array([1.0, np.nan]), ValueError), (np.array([np.inf]), ValueError),
])
def test_encode_rejects(bad, exc):
    with pytest.raises(exc):
        encode_features(bad)


def test_unknown_codec():
    with pytest.raises(ValueError, match="bf16"):
        encode_features(np.zeros(3), "bf16")


@pytest.mark.parametrize("change, field", [
    (dict(data=b"\0" * 5), "data"), (dict(scales=b"\0" * 3), "scales"),
    (dict(scales=b""), "scales"), (dict(shape=[2, 4]), "data"),
    (dict(codec="fp16"), "dtype"), (dict(dtype="float16"), "dtype"), (dict(shape=[]), "shape"),
])
def test_decode_rejects_inconsistent_lengths(change, field):
    good = encode_features(np.ones((2, 3)), "int8")
    bad = Feature(**{**{k: getattr(good, k) for k in Feature.__slots__}, **change})
    with pytest.raises(InvalidField, match=rf"Feature\.{field}"):
        decode_features(bad)


def test_fp16_with_scales_rejected():
    good = encode_features(np.ones(3))
    with pytest.raises(InvalidField, match=r"Feature\.scales"):
        decode_features(Feature(good.codec, good.dtype, good.shape, good.data, b"\0\0"))


@pytest.mark.parametrize("codec", ["fp16", "int8"])
def test_feature_inside_message(codec):
    x = RNG.standard_normal((3, 16)).astype(np.float32)
    msg = VerifyResult(1, 2, [0], [5, 6], 9, encode_features(x, codec))
    out = decode(encode(msg))
    assert out == msg
    np.testing.assert_array_equal(decode_features(out.features), decode_features(msg.features))


def test_protocol_package_does_not_import_torch():
    # Loaded as a top-level package so that dovetail/__init__ (which may pull in
    # torch for other reasons) stays out of the picture.
    root = pathlib.Path(__file__).resolve().parents[2]
    code = "import sys, protocol; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True,
                         text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
