"""check_compatible: a target and a draft must share tokenizer and feature codec."""
import pytest

from dovetail.protocol import Handshake, HandshakeMismatch, check_compatible


def test_check_compatible():
    target = Handshake("target", 151936, "3f2a9c7d1e", 1536, "bfloat16", "fp16", "qwen-1.5b")
    draft = Handshake("draft", 151936, "3f2a9c7d1e", 896, "float16", "fp16", "qwen-0.5b")
    check_compatible(target, draft)  # hidden sizes may differ
    other = Handshake("draft", 49152, "9bc1e2f3a4", 576, "float16", "fp16", "smollm")
    with pytest.raises(HandshakeMismatch) as info:
        check_compatible(target, other)
    text = str(info.value)
    assert "target 'qwen-1.5b' has vocab 151936 (tokenizer 3f2a9c7d…)" in text
    assert "draft 'smollm' has vocab 49152 (tokenizer 9bc1e2f3…)" in text
    assert "share the target's tokenizer" in text and info.value.code == "handshake_mismatch"
    with pytest.raises(HandshakeMismatch, match="tokenizer"):
        check_compatible(target, Handshake("draft", 151936, "other", 1, "", "fp16"))
    with pytest.raises(HandshakeMismatch, match="feature codec 'fp16'.*'int8'"):
        check_compatible(target, Handshake("draft", 151936, "3f2a9c7d1e", 1, "", "int8", "q"))


def test_a_feature_draft_must_match_the_hidden_size():
    target = Handshake("target", 151936, "3f2a9c7d1e", 896, "bfloat16", "fp16", "qwen-0.5b")
    ok = Handshake("draft", 151936, "3f2a9c7d1e", 896, "float32", "fp16", "dgf", features=True)
    check_compatible(target, ok)
    with pytest.raises(HandshakeMismatch, match="hidden states of size 1536.*hidden size 896"):
        check_compatible(target, Handshake("draft", 151936, "3f2a9c7d1e", 1536, "", "fp16", "dgf", features=True))
