"""The coordinator's per-request drafter: feature rows gathered between draft requests."""
import numpy as np

from dovetail.runtime.drafter import merge_features
from dovetail.protocol import decode_features, encode_features


def test_merge_features_keeps_rows_in_order():
    a, b = np.arange(6, dtype=np.float32).reshape(2, 3), -np.arange(3, dtype=np.float32).reshape(1, 3)
    assert merge_features([]) is None
    one = encode_features(a)
    assert merge_features([one]) is one  # sent as it came: no re-encoding
    for codec in ("fp16", "int8"):
        merged = merge_features([encode_features(a, codec), encode_features(b, codec)])
        assert merged.codec == codec and merged.shape == [3, 3]
        assert np.allclose(decode_features(merged), np.concatenate([a, b]), atol=0.05)
