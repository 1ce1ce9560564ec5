"""Round trips and rejections for dovetail.protocol.codec."""
import math
import random

import msgpack
import numpy as np
import pytest

from dovetail.protocol import (
    HEADER, MAX_STRING, MAX_TOKENS, MAX_TREE_NODES, MESSAGE_TYPES, PROTOCOL_TAG,
    PROTOCOL_VERSION, Close, Closed, Taken, DraftProposal, DraftRequest, Error, FrameTooLarge,
    Handshake, Heartbeat, InvalidField, MalformedFrame, OpenRequest, Opened, ProtocolError,
    Shutdown, VerifyRequest, VerifyResult, WrongVersion, decode, encode, encode_features,
)

FEAT16 = encode_features(np.arange(12, dtype=np.float32).reshape(3, 4), "fp16")
FEAT8 = encode_features(np.linspace(-1, 1, 24).reshape(2, 3, 4), "int8")

SAMPLES = [
    Handshake("coordinator", 0, "", 0, "", ""),
    Handshake("target", 151936, "3f2a9c", 1536, "bfloat16", "fp16", "qwen-1.5b", "cpu", 4242),
    OpenRequest(7, [1, 2, 3]),
    OpenRequest(8, [5], temperature=0.7, top_p=0.9, seed=123),
    Opened(7, 3),
    Opened(7, 3, FEAT16, 0.25),
    DraftRequest(7, 0, 3, [4], depth=4, top_k=2, max_nodes=16),
    DraftRequest(7, 1, 4, [], 4, 2, 16, guess_root=True, features=FEAT8),
    DraftProposal(7, 0, [10, 11, 12], [-1, 0, 0], root_guess=9, seconds=0.01),
    DraftProposal(7, 0, [], []),
    VerifyRequest(7, 0, 4, [10, 11, 12, 13], [-1, 0, 1, 0]),
    VerifyResult(7, 0, [0, 1], [10, 11, 99], 6),
    VerifyResult(7, 0, [], [42], 4, FEAT8, 0.5),
    Close(7), Closed(7), Heartbeat(3, 1712345678.25),
    Error(-1, "oom", "ran out of memory"), Error(7, "bad", "ünïcödé ✓"),
    Shutdown(), Taken(7, 3),
    OpenRequest(9, [1, 2], 0.5, presence_penalty=0.5, repetition_penalty=1.1, bias_ids=[3, 4],
                bias_values=[-100.0, 2.5], logprobs=2),
    VerifyResult(7, 0, [0], [10, 11], 6, logprobs=[-0.5, -1.25], top_ids=[10, 3, 11, 4],
                 top_logprobs=[-0.5, -2.0, -1.25, -1.5]),
    DraftProposal(7, 2, [10, 11], [-1, 0], scores=[-0.25, -1.5]),
    DraftRequest(7, 3, 5, [1], 4, 2, 16, min_prob=0.55),
]


def body_of(msg):
    return msgpack.unpackb(encode(msg)[1], raw=False)


def frames(cls, body, version=PROTOCOL_VERSION):
    """Frames with a hand-made body, bypassing encode's own validation."""
    return [HEADER.pack(PROTOCOL_TAG, version, cls.TYPE), msgpack.packb(body, use_bin_type=True)]


def mutated(msg, **changes):
    body = body_of(msg)
    for key, value in changes.items():
        if value is DROP:
            body.pop(key)
        else:
            body[key] = value
    return frames(type(msg), body)


DROP = object()


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    out = encode(msg)
    assert len(out) == 2 and all(type(f) is bytes for f in out)
    assert out[0] == HEADER.pack(b"DVTL", PROTOCOL_VERSION, type(msg).TYPE)
    assert decode(out, vocab_size=151936) == msg
    assert decode([bytearray(out[0]), memoryview(out[1])]) == msg  # zmq.Frame-like buffers


def test_every_message_type_is_sampled_and_codes_unique():
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES.values())
    assert all(MESSAGE_TYPES[c].TYPE == c for c in MESSAGE_TYPES)


def test_body_is_a_plain_map_with_nested_feature():
    body = body_of(SAMPLES[5])
    assert body["features"] == {"codec": "fp16", "dtype": "float16", "shape": [3, 4],
                                "data": FEAT16.data, "scales": b""}


def test_float_fields_accept_ints_and_defaults_fill_missing_fields():
    msg = decode(frames(OpenRequest, {"req_id": 1, "prompt": [2], "top_p": 1}))
    assert msg == OpenRequest(1, [2]) and type(msg.top_p) is float


def test_encode_refuses_non_messages_and_validates():
    for thing in (FEAT16, {"req_id": 1}, None, Close):
        with pytest.raises(TypeError):
            encode(thing)
    with pytest.raises(InvalidField, match=r"OpenRequest\.prompt\[1\]"):
        encode(OpenRequest(1, [1, True]))
    with pytest.raises(InvalidField, match=r"OpenRequest\.prompt\[0\].*numpy"):
        encode(OpenRequest(1, [np.int64(3)]))


# ---------------------------------------------------------------- framing

GOOD = encode(Close(1))


@pytest.mark.parametrize("bad, exc, code, words", [
    ([GOOD[0]], MalformedFrame, "malformed", "expected 2 frames"),
    ([*GOOD, b""], MalformedFrame, "malformed", "expected 2 frames"),
    ([1, 2], MalformedFrame, "malformed", "bytes-like"),
    ([GOOD[0][:-1], GOOD[1]], MalformedFrame, "bad_header", "header frame is 6 bytes"),
    ([b"XXXX" + GOOD[0][4:], GOOD[1]], MalformedFrame, "bad_header", "not a Dovetail frame"),
    ([HEADER.pack(b"DVTL", PROTOCOL_VERSION, 0), GOOD[1]], MalformedFrame, "unknown_type", "type code 0"),
    ([HEADER.pack(b"DVTL", PROTOCOL_VERSION, 200), GOOD[1]], MalformedFrame, "unknown_type", "type code 200"),
])
def test_bad_framing(bad, exc, code, words):
    with pytest.raises(exc, match=words) as info:
        decode(bad)
    assert info.value.code == code


def test_wrong_version_message():
    with pytest.raises(WrongVersion) as info:
        decode(frames(Close, {"req_id": 1}, version=PROTOCOL_VERSION + 1))
    assert str(info.value) == (f"peer speaks Dovetail protocol version {PROTOCOL_VERSION + 1}, "
                               f"this side speaks version {PROTOCOL_VERSION}")
    assert info.value.code == "wrong_version" and info.value.peer_version == PROTOCOL_VERSION + 1


def test_oversize_checked_before_unpacking():
    garbage = b"\xc1" * 101  # not msgpack at all: only the size check can fire
    with pytest.raises(FrameTooLarge, match="body frame is 101 bytes.*limit of 100") as info:
        decode([GOOD[0], garbage], max_bytes=100)
    assert info.value.code == "oversize"
    with pytest.raises(FrameTooLarge, match="header"):
        decode([b"h" * 101, GOOD[1]], max_bytes=100)


def _deep(n):
    return b"\x91" * n + b"\xc0"  # n nested one-element arrays around nil


@pytest.mark.parametrize("body, words", [
    (GOOD[1][:-1], "not valid msgpack"),                         # truncated
    (GOOD[1] + b"\x00", "not valid msgpack"),                    # extra data
    (b"", "not valid msgpack"),
    (msgpack.packb(msgpack.ExtType(5, b"x")), "extension type 5"),
    (msgpack.packb(msgpack.Timestamp(1, 0)), "extension type -1|Close body"),
    (_deep(5000), "not valid msgpack"),
    (b"\x81\xa6req_id\xa2\xff\xfe", "not valid msgpack"),        # invalid UTF-8 string
    (msgpack.packb({1: 2}), "not valid msgpack"),                # non-str key (strict_map_key)
    (msgpack.packb([1]), "body must be a msgpack map"),
    (msgpack.packb(None), "body must be a msgpack map"),
    (msgpack.packb({"req_id": "x" * (5 * MAX_STRING)}), "not valid msgpack"),
])
def test_bad_msgpack(body, words):
    with pytest.raises(ProtocolError, match=words):
        decode([GOOD[0], body])


# ---------------------------------------------------------------- fields

OPEN, HS, DREQ = OpenRequest(1, [1, 2]), SAMPLES[1], SAMPLES[6]
PROP, VREQ, VRES, OPENED = SAMPLES[8], SAMPLES[10], SAMPLES[11], SAMPLES[5]
F = OPENED.features
FMAP = {"codec": F.codec, "dtype": F.dtype, "shape": F.shape, "data": F.data, "scales": b""}


def fmap(**changes):
    return {**FMAP, **changes}


BIG = MAX_TOKENS + 1
FIELD_CASES = [
    # types: bool is not an int, float fields take numbers, lists hold ints only
    (OPEN, dict(req_id=True), "req_id"), (OPEN, dict(req_id="1"), "req_id"),
    (OPEN, dict(req_id=1.0), "req_id"), (OPEN, dict(temperature="hot"), "temperature"),
    (OPEN, dict(temperature=True), "temperature"), (OPEN, dict(prompt="abc"), "prompt"),
    (OPEN, dict(prompt=[1, 2.0]), "prompt[1]"), (OPEN, dict(prompt=[1, False]), "prompt[1]"),
    (OPEN, dict(prompt=[1, [2]]), "prompt[1]"), (OPEN, dict(prompt={"a": 1}), "prompt"),
    (OPEN, dict(prompt=[1, 2**64 - 1]), "prompt"), (HS, dict(model=5), "model"),
    (HS, dict(model="x" * (MAX_STRING + 1)), "model"), (HS, dict(role=b"target"), "role"),
    (DREQ, dict(guess_root=1), "guess_root"), (OPENED, dict(features=[1]), "features"),
    (OPENED, dict(features=fmap(data="abc")), "features.data"),
    (OPENED, dict(features=fmap(scales=[0])), "features.scales"),
    (OPENED, dict(features=fmap(shape=[3, 4.0])), "features.shape[1]"),
    (OPENED, dict(features={k: v for k, v in FMAP.items() if k != "data"}), "features.data"),
    (OPENED, dict(features=fmap(extra=1)), "features.extra"),
    (OPEN, dict(extra=1), "extra"), (OPEN, dict(prompt=DROP), "prompt"),
    (SAMPLES[15], dict(time=math.nan), "time"), (SAMPLES[15], dict(time=math.inf), "time"),
    # ranges
    (OPEN, dict(req_id=-1), "req_id"), (SAMPLES[13], dict(req_id=-1), "req_id"),
    (SAMPLES[16], dict(req_id=-2), "req_id"), (DREQ, dict(step=-1), "step"),
    (DREQ, dict(base_len=-1), "base_len"), (DREQ, dict(depth=-1), "depth"),
    (DREQ, dict(top_k=-1), "top_k"), (DREQ, dict(max_nodes=MAX_TREE_NODES + 1), "max_nodes"),
    (OPENED, dict(cache_len=-1), "cache_len"), (OPENED, dict(seconds=-0.5), "seconds"),
    (OPEN, dict(seed=-1), "seed"), (SAMPLES[15], dict(seq=-1), "seq"),
    (HS, dict(vocab_size=-1), "vocab_size"), (HS, dict(role="boss"), "role"),
    (HS, dict(feature_codec="bf16"), "feature_codec"), (OPEN, dict(prompt=[]), "prompt"),
    (OPEN, dict(temperature=-0.1), "temperature"), (OPEN, dict(top_p=0), "top_p"),
    (OPEN, dict(top_p=1.5), "top_p"), (OPEN, dict(prompt=[3, -1]), "prompt[1]"),
    (OPEN, dict(prompt=[0] * BIG), "prompt"), (DREQ, dict(new_tokens=[0] * BIG), "new_tokens"),
    # trees
    (PROP, dict(tokens=[1] * (MAX_TREE_NODES + 1), parents=list(range(-1, MAX_TREE_NODES))),
     "tokens"),
    (PROP, dict(parents=[-1, 0]), "parents"), (PROP, dict(parents=[-1, 0, 2]), "parents[2]"),
    (PROP, dict(parents=[-2, 0, 0]), "parents[0]"), (PROP, dict(parents=[0, 0, 0]), "parents[0]"),
    (PROP, dict(root_guess=-2), "root_guess"),
    (PROP, dict(scores=[-0.5]), "scores"), (PROP, dict(scores=[-1.0, 0.5, -2.0]), "scores"),
    (PROP, dict(scores=[-1.0, "x", -2.0]), "scores[1]"), (PROP, dict(scores=[-1.0, math.nan, -2.0]), "scores[1]"),
    (PROP, dict(scores=-1.0), "scores"),
    (DREQ, dict(min_prob=1.0), "min_prob"), (DREQ, dict(min_prob=-0.1), "min_prob"), (VREQ, dict(root=-1), "root"),
    (VRES, dict(tokens=[1, 2]), "tokens"), (VRES, dict(accepted=[1, 0], tokens=[1, 2, 3]),
                                            "accepted[1]"),
    (VRES, dict(accepted=[-1]), "accepted[0]"),
    (OPEN, dict(presence_penalty=2.5), "presence_penalty"), (OPEN, dict(repetition_penalty=0), "repetition_penalty"),
    (OPEN, dict(bias_ids=[1], bias_values=[]), "bias_ids"), (OPEN, dict(bias_ids=[1, 1], bias_values=[1, 2]), "bias_ids"),
    (OPEN, dict(bias_ids=[1], bias_values=[101.0]), "bias_values"), (OPEN, dict(logprobs=21), "logprobs"),
    (VRES, dict(logprobs=[-1.0, -1.0]), "logprobs"), (VRES, dict(logprobs=[0.5]), "logprobs"),
    (VRES, dict(top_ids=[1, 2], top_logprobs=[-1.0]), "top_ids"),
    # features
    (OPENED, dict(features=fmap(codec="bf16")), "features.codec"),
    (OPENED, dict(features=fmap(dtype="int8")), "features.dtype"),
    (OPENED, dict(features=fmap(shape=[])), "features.shape"),
    (OPENED, dict(features=fmap(shape=[1, 1, 1, 3, 4])), "features.shape"),
    (OPENED, dict(features=fmap(shape=[-3, -4])), "features.shape"),
    (OPENED, dict(features=fmap(data=F.data[:-2])), "features.data"),
    (OPENED, dict(features=fmap(scales=b"\0\0")), "features.scales"),
    (VRES, dict(features={**body_of(SAMPLES[12])["features"], "scales": b"\0\0"}),
     "features.scales"),
]


@pytest.mark.parametrize("msg, changes, field", FIELD_CASES,
                         ids=[f"{type(m).__name__}-{f}" for m, _, f in FIELD_CASES])
def test_invalid_field(msg, changes, field):
    with pytest.raises(InvalidField) as info:
        decode(mutated(msg, **changes))
    name = type(msg).__name__
    assert info.value.code == "bad_field" and info.value.message_type == name
    assert f"{name}.{field}" in str(info.value)


def test_list_far_over_max_tokens_stops_inside_msgpack():
    with pytest.raises(MalformedFrame, match="not valid msgpack"):
        decode(mutated(OPEN, prompt=[0] * (MAX_TOKENS + 2)))


@pytest.mark.parametrize("msg, changes, field", [
    (OPEN, dict(prompt=[1, 100]), "prompt[1]"), (DREQ, dict(new_tokens=[100]), "new_tokens[0]"),
    (PROP, dict(tokens=[1, 2, 100]), "tokens[2]"), (PROP, dict(root_guess=100), "root_guess"),
    (VREQ, dict(root=100), "root"), (VREQ, dict(tokens=[1, 2, 3, 100]), "tokens[3]"),
    (VRES, dict(tokens=[1, 2, 100]), "tokens[2]"),
])
def test_token_ids_checked_against_vocab(msg, changes, field):
    frames_ = mutated(msg, **changes)
    assert decode(frames_) is not None  # fine when the vocabulary is unknown
    with pytest.raises(InvalidField, match=r"in \[0, 100\)") as info:
        decode(frames_, vocab_size=100)
    assert f"{type(msg).__name__}.{field}" in str(info.value)
    assert decode(mutated(PROP, root_guess=-1), vocab_size=100).root_guess == -1


def test_fuzzed_frames_only_raise_protocol_errors():
    rng = random.Random(1234)
    valid = [encode(m) for m in SAMPLES]
    junk = [None, True, -1, 2**63, 1.5, "s", b"b", [], {}, [1, "x"], {"shape": [-1]}]
    for i in range(300):
        header, body = rng.choice(valid)
        kind = i % 6
        if kind == 0:
            body = rng.randbytes(rng.randrange(0, 64))
        elif kind == 1:
            body = body[:rng.randrange(len(body))]
        elif kind == 2:
            b = bytearray(body)
            for _ in range(rng.randrange(1, 4)):
                b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
            body = bytes(b)
        elif kind == 3:
            h = bytearray(header)
            h[rng.randrange(len(h))] ^= 1 << rng.randrange(8)
            header = bytes(h)
        elif kind == 4:  # structurally valid msgpack with junk values
            d = msgpack.unpackb(body, raw=False)
            d[rng.choice([*d, "bogus"])] = rng.choice(junk)
            body = msgpack.packb(d, use_bin_type=True)
        else:
            header, body = rng.randbytes(7), rng.randbytes(rng.randrange(1, 32))
        try:
            msg = decode([header, body], vocab_size=151936)
        except ProtocolError:
            continue
        assert type(msg) in MESSAGE_TYPES.values()  # a lucky flip may still be valid


def test_batch_costs_travel_as_triples_and_bad_ones_are_refused():
    hs = Handshake("target", 100, "h", 8, "float32", "fp16", verify_us=[10, 12], batch_verify_us=[2, 1, 15, 4, 2, 30])
    assert decode(encode(hs)) == hs
    for bad in ([2, 1], [0, 1, 5], [2, 0, 5], [2, 1, -5]):  # not triples; no requests; no rows; negative time
        with pytest.raises(InvalidField, match=r"Handshake\.batch_verify_us"):
            encode(Handshake("target", 100, "h", 8, "float32", "fp16", batch_verify_us=bad))
