"""flux.run.protocol: round trips, the validating decoder (targeted + fuzzed), drop counting, real sockets."""
import logging

import msgspec
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flux.integrations.remote import messages as M
from flux.run import protocol as P
from flux.run.protocol import ProtocolError, decode, encode


def group(gid: int = 7, lens=(2, 3), version: int = 4) -> P.TrajectoryGroup:
    total = sum(lens)
    return P.TrajectoryGroup(
        group_id=gid, prompt_index=gid * 10, generator="gen-0", sample_count=len(lens),
        prompt_ids=np.array([5, 6, 7], dtype=np.int64), response_ids=np.arange(total) + 10,
        response_lens=np.array(lens), logprobs=-np.linspace(0.1, 1.0, total),
        versions=np.full(total, version), rewards=np.arange(len(lens), dtype=np.float64),
        finish=np.array([True] + [False] * (len(lens) - 1)), gen_seconds=1.5, meta={"temp": 1.0})


HANDLE = {"kind": "shm", "name": "flux_1_0_1", "version": 3, "nbytes": 64, "host": "h"}
EXAMPLES = [
    P.Register(role="generator", name="gen-0", pid=123, host="localhost"),
    P.Welcome(run_id="run", version=3, weights=HANDLE),
    P.Welcome(run_id="run", version=0, weights=None),
    P.Heartbeat(role="learner", name="learner-0", busy_frac=0.5, stats={"tok/s": 1e3, "n": {"a": [1, 2]}}),
    P.AdmitRequest(name="gen-0", max_groups=4),
    P.Admit(groups=[{"group_id": 1, "prompt_index": 9, "token": "ab"}, {"group_id": 2, "prompt_index": 0, "token": ""}]),
    P.Admit(groups=[]),
    P.GroupDone(name="gen-0", group_id=1, n_samples=8),
    P.GroupDone(name="gen-0", group_id=2, n_samples=8, dropped="reward_failed"),
    P.Published(version=3, weights=HANDLE),
    P.StepReport(step=2, version=3, metrics={"staleness": 0.1, "trained_ids": [1, 2], "dropped_ids": []}),
    P.BufferReport(depth=5, dropped_stale=1, stats={}),
    P.BufferReport(depth=5, dropped_stale=1, stats={}, received=[3, 4], dropped={"stale": [1], "bad_tokens": [2]}),
    P.Goodbye(role="buffer", name="buffer", reason="SIGTERM", ok=True),
    P.NewVersion(version=3, weights={**HANDLE, "ipc": {"handle": b"\x00\xff", "size": [64]}}),
    P.Control(async_ratio=0.25, knobs={"eta_max": 2}),
    P.Stop(reason="done"),
    group(),
    P.BatchRequest(step=1, version=3, groups=2),
    P.Batch.from_groups(1, [group(1), group(2, lens=(1, 1, 4), version=2)], dropped_stale=1, dropped_ids=[0]),
    P.Batch.from_groups(1, []),
    M.RunInfoRequest(name="far", host="gpu-7"),
    M.RunInfo(run_id="run", name="far", version=3, model_path="/m", num_prompts=10, prompts_digest="ab" * 32,
              config={"rollout": {"group_size": 4}}, ports={"pub": 5001, "pull": 5002, "weights": 5003},
              weights_token="9f" * 16),
    M.WeightFetch(version=3, first=2, count=4, token="9f" * 16),
    M.WeightManifest(version=3, nbytes=192, chunk_bytes=64, n_chunks=3, checksum=2**64 - 1,
                     tensors=[["w", "float32", [4, 8], 0, 128], ["b", "bfloat16", [3], 128, 6]]),
    M.WeightChunk(version=3, index=1, checksum=12345, data=np.arange(64, dtype=np.uint8)),
    M.WeightUnavailable(version=2, newest=3, reason="superseded"),
]


def same(a: P.Message, b: P.Message) -> bool:
    if type(a) is not type(b):
        return False
    for name in a.__struct_fields__:
        x, y = getattr(a, name), getattr(b, name)
        if name in a.ARRAYS:
            if x.dtype != np.dtype(a.ARRAYS[name]) or not np.array_equal(x, y):
                return False
        elif x != y or type(x) is not type(y):
            return False
    return True


def with_header(msg: P.Message, edit) -> list:
    """Encode ``msg``, then let ``edit`` mutate its decoded header ``[version, body]`` in place."""
    frames = encode(msg)
    header = msgspec.msgpack.decode(frames[0])
    edit(header)
    return [msgspec.msgpack.encode(header), *frames[1:]]


def with_body(msg: P.Message, edit) -> list:
    """Encode ``msg``, then let ``edit`` mutate the message map in its header in place."""
    return with_header(msg, lambda h: edit(h[1]))


def reason(frames) -> str:
    with pytest.raises(ProtocolError) as e:
        decode(frames)
    return e.value.reason


# ---------------------------------------------------------------- round trips
@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda m: m.TYPE)
def test_round_trip(msg):
    out = decode(encode(msg))
    assert type(out) is type(msg)
    assert same(out, decode(encode(out)))
    for name in msg.ARRAYS:
        assert np.array_equal(getattr(out, name), getattr(msg, name).astype(msg.ARRAYS[name]))


def test_decode_is_zero_copy():
    frames = encode(group())
    out = decode(frames)
    assert np.shares_memory(out.response_ids, np.frombuffer(frames[2], np.uint8))


def test_encode_normalises_scalars_and_arrays():
    msg = P.Heartbeat(role="generator", name="g", busy_frac=1, stats={"x": np.float32(0.5), "n": np.int64(3)})
    out = decode(encode(msg))
    assert out.busy_frac == 1.0 and type(out.busy_frac) is float
    assert out.stats == {"x": 0.5, "n": 3}
    g = decode(encode(msgspec.structs.replace(group(), group_id=np.int64(9))))
    assert g.group_id == 9 and type(g.group_id) is int
    assert g.response_ids.dtype == np.dtype("<i4") and g.logprobs.dtype == np.dtype("<f4")
    assert g.finish.tolist() == [1, 0] and g.finish.dtype == np.uint8


def test_header_layout():
    frames = encode(group())
    version, body = msgspec.msgpack.decode(frames[0])
    assert body["type"] == "TrajectoryGroup" and version == P.PROTOCOL_VERSION
    assert body["prompt_ids"] == ["<i4", 3, 1]
    assert [body[name][2] for name in P.TrajectoryGroup.ARRAYS] == list(range(1, 8))
    assert len(frames) == 1 + len(P.TrajectoryGroup.ARRAYS)
    assert bytes(frames[2]) == np.arange(10, 15, dtype="<i4").tobytes()


@pytest.mark.parametrize("bad", [
    P.Register(role="wizard", name="x", pid=1, host="h"),
    P.Register(role="learner", name="x", pid=-1, host="h"),
    P.Heartbeat(role="learner", name="x", busy_frac=float("nan"), stats={}),
    P.Heartbeat(role="learner", name="x", busy_frac=1.5, stats={}),
    P.Goodbye(role="learner", name="x", reason="r", ok=1),
    P.Admit(groups=[{"group_id": 1}]),
    P.Published(version=4, weights=HANDLE),
    P.Stop(reason=None),
    P.StepReport(step=1, version=1, metrics={"t": object()}),
    msgspec.structs.replace(group(), sample_count=3),
    msgspec.structs.replace(group(), logprobs=np.zeros(2)),
    msgspec.structs.replace(group(), response_ids=np.arange(5.0)),
    msgspec.structs.replace(group(), rewards=np.array([0.0, np.inf])),
    M.RunInfo(run_id="r", name="far", version=0, model_path="/m", num_prompts=1, prompts_digest="", config={},
              ports={"pub": 1, "pull": 70000, "weights": 3}, weights_token=""),
    M.WeightManifest(version=1, nbytes=192, chunk_bytes=64, n_chunks=2, checksum=0, tensors=[]),
    M.WeightManifest(version=1, nbytes=64, chunk_bytes=64, n_chunks=1, checksum=0,
                     tensors=[["w", "float32", [32], 0, 128]]),
    M.WeightChunk(version=1, index=0, checksum=0, data=np.zeros(7, np.uint8)),
], ids=lambda m: m.TYPE)
def test_encode_rejects_invalid_messages(bad):
    with pytest.raises(ProtocolError):
        encode(bad)


# ---------------------------------------------------------------- the decoder, targeted
def test_decode_rejects_each_kind_of_malformation(monkeypatch):
    good = encode(group())
    assert reason([b"\xc1"]) == "not_msgpack"
    assert reason([msgspec.msgpack.encode([1, 2])]) == "bad_header"
    assert reason([msgspec.msgpack.encode({"v": 1})]) == "bad_header"
    assert reason(with_header(group(), lambda h: h.__setitem__(0, P.PROTOCOL_VERSION + 1))) == "bad_header"
    assert reason(with_header(group(), lambda h: h.__setitem__(0, True))) == "bad_header"
    assert reason(with_body(group(), lambda b: b.update(type="Nope"))) == "unknown_type"
    assert reason(with_body(group(), lambda b: b.pop("type"))) == "unknown_type"
    assert reason(with_body(group(), lambda b: b.pop("meta"))) == "bad_fields"
    assert reason(with_body(group(), lambda b: b.update(extra=1))) == "bad_fields"
    assert reason(with_body(group(), lambda b: b.update(group_id=1.0))) == "bad_value"
    assert reason(with_body(group(), lambda b: b.update(group_id=True))) == "bad_value"
    assert reason(with_body(group(), lambda b: b.update(group_id=-1))) == "bad_value"
    assert reason(with_body(group(), lambda b: b.update(gen_seconds=-1.0))) == "bad_value"
    assert reason(with_body(group(), lambda b: b.update(meta=None))) == "bad_value"
    assert reason(with_body(group(), lambda b: b.update(meta={1: 2}))) == "bad_value"
    assert decode(with_body(group(), lambda b: b.update(gen_seconds=2))).gen_seconds == 2.0  # int for float
    welcome = P.Welcome(run_id="r", version=0, weights=None)
    assert reason(with_body(welcome, lambda b: b.update(weights=[]))) == "bad_value"
    assert reason(with_body(P.Register(role="learner", name="x", pid=1, host="h"),
                            lambda b: b.update(role="wizard"))) == "bad_value"
    assert reason(good[:-1]) == "bad_array"  # the last array's frame is missing
    assert reason([*good, b""]) == "bad_frames"
    assert reason(with_body(group(), lambda b: b["response_ids"].__setitem__(0, "<i8"))) == "bad_array"
    assert reason(with_body(group(), lambda b: b["response_ids"].__setitem__(0, "<c16"))) == "bad_array"
    assert reason(with_body(group(), lambda b: b["response_ids"].__setitem__(1, 4))) == "bad_array"
    assert reason(with_body(group(), lambda b: b["response_ids"].__setitem__(2, 1))) == "bad_array"
    assert reason(with_body(group(), lambda b: b.update(response_ids=[1, 2]))) == "bad_array"
    assert reason([*good[:2], bytes(good[2])[:-1], *good[3:]]) == "bad_array"
    swapped = [good[0], good[2], good[1], *good[3:]]
    assert reason(swapped) == "bad_array"
    as_float = with_body(group(), lambda b: b["versions"].__setitem__(0, "<f4"))  # right size, wrong dtype
    assert reason(as_float) == "bad_array"
    assert reason([b"", *good]) == "not_msgpack"
    monkeypatch.setattr(P, "MAX_FRAME_BYTES", 8)
    assert reason(good) == "too_large"
    monkeypatch.setattr(P, "MAX_HEADER_BYTES", 16)
    assert reason(good) == "too_large"


def test_decode_checks_consistency():
    g = encode(group())
    lens = np.array([2, 2], dtype="<i4")  # sums to 4, but 5 tokens travel
    assert reason([*g[:3], lens.tobytes(), *g[4:]]) == "inconsistent"
    assert reason([*g[:7], np.array([1, 2], "<u1").tobytes()]) == "inconsistent"  # finish must be 0/1
    nan = np.array([-0.1, np.nan, -0.3, -0.4, -0.5], "<f4")
    assert reason([*g[:4], nan.tobytes(), *g[5:]]) == "inconsistent"
    neg = np.array([4, 4, -1, 4, 4], "<i4")
    assert reason([*g[:5], neg.tobytes(), *g[6:]]) == "inconsistent"  # versions >= 0
    assert reason(with_body(group(), lambda b: b.update(sample_count=3))) == "inconsistent"
    admit = P.Admit(groups=[{"group_id": 1, "prompt_index": 0, "token": "t"}])
    credit = {"group_id": 1, "prompt_index": 2, "token": "t"}
    assert reason(with_body(admit, lambda b: b["groups"][0].update(group_id=-1))) == "bad_value"
    assert reason(with_body(admit, lambda b: b["groups"].append(credit))) == "inconsistent"
    assert reason(with_body(admit, lambda b: b["groups"][0].pop("group_id"))) == "bad_value"
    published = P.Published(version=3, weights=HANDLE)
    wrong_version = with_body(published, lambda b: b["weights"].update(version=9))
    assert reason(wrong_version) == "inconsistent"
    batch = P.Batch.from_groups(0, [group(1), group(2)])
    assert reason(with_body(batch, lambda b: b["generators"].pop())) == "inconsistent"
    frames = encode(batch)
    assert reason([*frames[:3], np.array([2, 1], "<i4").tobytes(), *frames[4:]]) == "inconsistent"


def test_pub_topic_is_skipped_and_checked():
    frames = encode(P.Stop(reason="bye"))
    assert decode([b"Stop", *frames]) == P.Stop(reason="bye")
    assert reason([b"Control", *frames]) == "bad_header"
    assert reason([b"Stop"]) == "bad_frames"


# ---------------------------------------------------------------- batches
def test_batch_flattens_and_splits_groups():
    groups = [group(1), group(2, lens=(1, 1, 4), version=2), group(5, lens=(3,))]
    batch = decode(encode(P.Batch.from_groups(8, groups, dropped_stale=2, dropped_ids=[3, 4])))
    assert batch.step == 8 and batch.dropped_ids == [3, 4] and batch.dropped_stale == 2
    assert batch.group_ids.tolist() == [1, 2, 5] and batch.group_sizes.tolist() == [2, 3, 1]
    assert batch.sample_groups().tolist() == [0, 0, 1, 1, 1, 2]
    assert batch.response_lens.tolist() == [2, 3, 1, 1, 4, 3]
    for got, want in zip(batch.to_groups(), groups):
        assert same(got, decode(encode(want)))
    assert decode(encode(P.Batch.from_groups(0, []))).to_groups() == []


# ---------------------------------------------------------------- dropping
def test_drop_counter_counts_and_rate_limits_logging(caplog):
    counter = P.DropCounter("buffer", interval_s=60.0)
    with caplog.at_level(logging.WARNING, logger="flux.run.protocol"):
        for _ in range(3):
            assert P.try_decode([b"\xc1junk"], counter) is None
        assert P.try_decode([msgspec.msgpack.encode({"v": 1})], counter) is None
        assert P.try_decode(encode(P.Stop(reason="x")), counter) == P.Stop(reason="x")
    assert counter.counts == {"not_msgpack": 3, "bad_header": 1} and counter.total == 4
    assert len(caplog.records) == 2  # one line per reason within the interval
    assert "buffer" in caplog.records[0].getMessage() and "not_msgpack" in caplog.records[0].getMessage()
    eager = P.DropCounter(interval_s=0.0)
    with caplog.at_level(logging.WARNING, logger="flux.run.protocol"):
        for _ in range(3):
            eager.drop("x", [b"ab"])
    assert len(caplog.records) == 5


def test_split_envelope():
    assert P.split_envelope([b"id", b"", b"h", b"a"]) == ((b"id",), [b"h", b"a"])
    assert P.split_envelope([b"", b"h", b""]) == ((), [b"h", b""])
    with pytest.raises(ProtocolError):
        P.split_envelope([b"id", b"h"])


# ---------------------------------------------------------------- real sockets
@pytest.fixture
def pair():
    ctx, sockets = zmq.Context(), []

    def make(bind_type, connect_type, addr):
        a, b = ctx.socket(bind_type), ctx.socket(connect_type)
        for s in (a, b):
            s.setsockopt(zmq.RCVTIMEO, 2000)
            sockets.append(s)
        a.bind(addr)
        b.connect(addr)
        return a, b

    yield make
    for s in sockets:
        s.close(linger=0)
    ctx.term()


def test_dealer_router_request_reply(pair):
    router, dealer = pair(zmq.ROUTER, zmq.DEALER, "inproc://rr")
    drops = P.DropCounter()
    P.send(dealer, P.AdmitRequest(name="gen-0", max_groups=2))
    ident, msg = P.recv(router, drops)
    assert msg == P.AdmitRequest(name="gen-0", max_groups=2) and len(ident) == 1
    P.send(router, P.Admit(groups=[{"group_id": 0, "prompt_index": 3, "token": ""}]), identity=ident)
    assert P.recv(dealer, drops) == (None, P.Admit(groups=[{"group_id": 0, "prompt_index": 3, "token": ""}]))
    dealer.send_multipart([b"no-delimiter"])
    ident, msg = P.recv(router, drops)
    assert msg is None and drops.counts == {"bad_envelope": 1}
    with pytest.raises(ValueError):
        P.send(router, P.Stop(reason="x"))


def test_push_pull_and_pub_sub(pair):
    pull, push = pair(zmq.PULL, zmq.PUSH, "inproc://pp")
    drops = P.DropCounter()
    P.send(push, group())
    _, got = P.recv(pull, drops)
    assert same(got, decode(encode(group())))
    push.send_multipart([b"garbage", b"x"])
    assert P.recv(pull, drops) == (None, None) and drops.total == 1

    pub, sub = pair(zmq.PUB, zmq.SUB, "inproc://ps")
    sub.subscribe(b"Stop")
    for _ in range(200):  # slow joiner: publish until the subscription has propagated
        P.send(pub, P.Control(async_ratio=0.5, knobs={}))
        P.send(pub, P.Stop(reason="bye"))
        if sub.poll(10):
            break
    assert P.recv(sub, drops) == (None, P.Stop(reason="bye"))


# ---------------------------------------------------------------- fuzzing: ProtocolError or a valid message
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12)


def check_decode(frames) -> None:
    try:
        msg = decode(frames)
    except ProtocolError as e:
        assert e.reason != "malformed", e  # caught by a named check, not by the decoder's safety net
        return
    assert same(msg, decode(encode(msg)))  # whatever decodes is valid enough to re-send unchanged


@FUZZ
@given(st.lists(st.binary(max_size=64), min_size=0, max_size=5))
def test_fuzz_random_bytes(frames):
    check_decode(frames)


@FUZZ
@given(st.sampled_from(EXAMPLES), st.data())
def test_fuzz_random_header_values(msg, data):
    frames = encode(msg)
    header = msgspec.msgpack.decode(frames[0])
    body = header[1]
    where = data.draw(st.sampled_from(["v", "body", "field", "array", "new", "extra"]))
    if where == "field":
        body[data.draw(st.sampled_from(sorted(body)))] = data.draw(values)  # "type" included
    elif where == "array" and msg.ARRAYS:
        entry = body[data.draw(st.sampled_from(sorted(msg.ARRAYS)))]
        entry[data.draw(st.integers(0, 2))] = data.draw(values)
    elif where == "new":
        body[data.draw(st.text(max_size=5))] = data.draw(values)
    elif where == "extra":
        header.append(data.draw(values))
    else:
        header[0 if where == "v" else 1] = data.draw(values)
    check_decode([msgspec.msgpack.encode(header), *frames[1:]])


@FUZZ
@given(st.sampled_from(EXAMPLES), st.data())
def test_fuzz_mutated_frames(msg, data):
    frames = [bytes(f) for f in encode(msg)]
    for _ in range(data.draw(st.integers(1, 3))):
        op = data.draw(st.sampled_from(["flip", "truncate", "drop", "duplicate", "swap"]))
        i = data.draw(st.integers(0, len(frames) - 1)) if frames else 0
        if op == "flip" and frames and frames[i]:
            j = data.draw(st.integers(0, len(frames[i]) - 1))
            flipped = frames[i][j] ^ data.draw(st.integers(1, 255))
            frames[i] = frames[i][:j] + bytes([flipped]) + frames[i][j + 1:]
        elif op == "truncate" and frames:
            frames[i] = frames[i][:data.draw(st.integers(0, max(0, len(frames[i]) - 1)))]
        elif op == "drop" and frames:
            frames.pop(i)
        elif op == "duplicate" and frames:
            frames.insert(i, frames[i])
        elif op == "swap" and len(frames) > 1:
            j = data.draw(st.integers(0, len(frames) - 1))
            frames[i], frames[j] = frames[j], frames[i]
    check_decode(frames)


def test_decode_never_raises_anything_else_on_odd_inputs():
    for frames in ([], None, "abc", [None], [object()], [12], [msgspec.msgpack.encode({"v": 1, "type": [], "fields": 1,
                                                                            "arrays": 2})]):
        with pytest.raises(ProtocolError):
            decode(frames)
