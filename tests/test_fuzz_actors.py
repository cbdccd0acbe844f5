"""Thousands of malformed messages thrown at a live run's sockets: counted and dropped, no actor crashes,
the run finishes every step.

Per socket that accepts connections (the controller's ROUTER, the buffer's PULL and ROUTER): random
bytes, truncated and mutated real messages, wrong protocol versions, unknown types, fields of the wrong
type, arrays whose declared length disagrees with their frame, huge declared lengths, missing and
extra frames, and well-formed messages of a type that socket never expects. Then well-formed messages
of an expected type with bad contents (groups never admitted, duplicated, out of the vocabulary, from
a future version), at the local sockets and at the CURVE endpoints from an authorised key.
"""

import json
import random
import subprocess

import msgspec
import numpy as np
import zmq

from flux.run import protocol as P
from tests.test_e2e import SMALL, assert_nothing_left, metrics, train_cmd, wait_for

PER_SOCKET = 2500


def unexpected_messages(socket: str) -> list[P.Message]:
    """Real messages of the types `socket` never takes: mutated or whole, they must be ignored."""
    group = P.TrajectoryGroup(
        group_id=1, prompt_index=2, generator="fuzz", sample_count=2, prompt_ids=np.array([5, 6], np.int32),
        response_ids=np.array([7, 8, 9], np.int32), response_lens=np.array([1, 2], np.int32),
        logprobs=np.array([-1.0, -1.0, -1.0], np.float32), versions=np.array([0, 0, 0], np.int32),
        rewards=np.array([0.0, 1.0], np.float32), finish=np.array([1, 1], np.uint8), gen_seconds=0.0, meta={})
    beat, stop = P.Heartbeat("generator", "fuzz", 0.5, {}), P.Stop("fuzz")
    request, register = P.BatchRequest(0, 0, 1), P.Register("generator", "fuzz", 1, "host")
    return {"controller_router": [group, stop, request],
            "buffer_pull": [beat, stop, request, register],
            "buffer_router": [group, beat, stop, register]}[socket]


def malformed(rng: random.Random, messages: list[P.Message]) -> list[bytes]:
    kind = rng.randrange(9)
    frames = [bytes(f) for f in P.encode(rng.choice(messages))]
    head = msgspec.msgpack.decode(frames[0])  # [version, message map]
    body = head[1]
    if kind == 0:
        return [rng.randbytes(rng.randrange(0, 200)) for _ in range(rng.randrange(1, 4))]
    if kind == 1:  # a real message, bit-flipped and cut short
        i = rng.randrange(len(frames))
        f = bytearray(frames[i])
        if f:
            f[rng.randrange(len(f))] ^= 1 << rng.randrange(8)
            f = f[: rng.randrange(len(f))]
        frames[i] = bytes(f)
        return frames
    if kind == 2:
        head[0] = rng.choice([0, 2, 99, "1", None])
    elif kind == 3:
        body["type"] = rng.choice(["Nope", "", 7, None, "Message"])
    elif kind == 4:  # a field of the wrong type
        key = rng.choice(sorted(set(body) - {"type"}))
        body[key] = rng.choice(["x", -1, 1e308, None, [1, 2], {"a": 1}, float("nan")])
    elif kind == 5:  # declared array length disagrees with the frame, or is huge
        arrays = [k for k, v in body.items() if type(v) is list and len(v) == 3 and type(v[0]) is str]
        if arrays:
            body[rng.choice(arrays)][1] = rng.choice([10**12, 2**62, 0, 3])
        else:
            body["x"] = ["<f4", 2**40, 1]
    elif kind == 6:  # missing or extra frames
        return frames[:-1] if len(frames) > 1 and rng.random() < 0.5 else [*frames, rng.randbytes(16)]
    elif kind == 7:  # a header map of the wrong shape, or bigger than the limit claims
        return [msgspec.msgpack.encode(rng.choice([[1, 2, 3], "header", 12, {"v": 1}]))]
    else:  # a well-formed message of a type this socket does not take
        return frames
    return [msgspec.msgpack.encode(head), *frames[1:]]


def finish(proc, tmp_path, run_dir, steps) -> dict:
    """Wait for the fuzzed run to end: it must have finished every step without a crash. Returns its final
    status.json."""
    code = proc.wait(timeout=240)
    out = (tmp_path / "launcher.out").read_text()
    assert code == 0, out
    assert [r["step"] for r in metrics(run_dir)] == list(range(steps))
    assert "crashed" not in out and "Traceback" not in out
    return json.loads((run_dir / "status.json").read_text())


def cleanup(proc, ctx) -> None:
    ctx.term()
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_fuzzed_sockets_of_a_live_run(default_model, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    steps = 25
    with open(tmp_path / "launcher.out", "w") as log:
        proc = subprocess.Popen(train_cmd("--max-steps", str(steps), *SMALL, "--set", "eval.num_prompts=1",
                                          "--out", str(run_dir)), stdout=log, stderr=subprocess.STDOUT)
    ctx = zmq.Context()
    try:
        wait_for(lambda: metrics(run_dir), 120, "the first step")
        spec = json.loads((run_dir / "spec.json").read_text())
        rng = random.Random(0)
        sent = 0
        for where, kind in (("controller_router", zmq.DEALER), ("buffer_pull", zmq.PUSH),
                            ("buffer_router", zmq.DEALER)):
            messages = unexpected_messages(where)
            sock = ctx.socket(kind)
            sock.setsockopt(zmq.LINGER, 2000)
            sock.setsockopt(zmq.SNDHWM, 0)
            sock.connect(spec[where])
            for i in range(PER_SOCKET):
                frames = malformed(rng, messages)
                # DEALER frames need the empty delimiter; leave it out now and then (a bad envelope)
                if kind == zmq.DEALER and i % 50:
                    frames = [b"", *frames]
                sock.send_multipart(frames)
                sent += 1
            sock.close()
        status = finish(proc, tmp_path, run_dir, steps)
    finally:
        cleanup(proc, ctx)
    dropped = status["dropped_messages"]
    total = sum(sum(v.values()) for v in dropped.values())
    assert dropped["controller"] and dropped.get("buffer"), dropped
    assert total > PER_SOCKET, (total, sent, dropped)
    assert_nothing_left(run_dir)


K = 20  # well-formed messages with bad contents, per kind


def forged_group(gid, secret, generator="gen0", n=4, version=0, token_id=7, token=None, vocab=None):
    from flux.control.admission import admission_token

    total = 2 * n
    return P.TrajectoryGroup(
        group_id=gid, prompt_index=0, generator=generator, sample_count=n, prompt_ids=np.array([5, 6], np.int32),
        response_ids=np.full(total, token_id, np.int32), response_lens=np.full(n, 2, np.int32),
        logprobs=np.full(total, -1.0, np.float32), versions=np.full(total, version, np.int32),
        rewards=np.arange(n, dtype=np.float32), finish=np.ones(n, np.uint8), gen_seconds=0.0, meta={},
        token=admission_token(secret, gid, generator, 0, n) if token is None else token)


def test_well_formed_messages_with_bad_contents_and_the_curve_endpoints(default_model, tmp_path):
    """Messages that decode fine but lie: groups never admitted (no token, another generator's, another
    sample count), sent twice, with token ids past the vocabulary or versions from the future, done-reports
    of groups never admitted; and the same plus random garbage at the CURVE endpoints from an authorised
    key. Each is counted under its reason, none reaches training, the run finishes."""
    from flux.integrations.remote.auth import client_keys, make_keys, secure_client

    keys = tmp_path / "keys"
    make_keys(keys, ["fuzz"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    steps = 25
    with open(tmp_path / "launcher.out", "w") as log:
        proc = subprocess.Popen(train_cmd("--max-steps", str(steps), *SMALL, "--set", "eval.num_prompts=1",
                                          "--set", "net.remote=true", "--set", f"net.keys={keys}",
                                          "--set", "rollout.slowdown=0.002", "--out", str(run_dir)),
                                stdout=log, stderr=subprocess.STDOUT)
    ctx = zmq.Context()
    try:
        wait_for(lambda: metrics(run_dir), 120, "the first step")
        spec = json.loads((run_dir / "spec.json").read_text())
        secret, vocab = spec["secret"], spec["vocab_size"]
        push = ctx.socket(zmq.PUSH)
        dealer = ctx.socket(zmq.DEALER)
        for sock, where in ((push, "buffer_pull"), (dealer, "controller_router")):
            sock.setsockopt(zmq.LINGER, 2000)
            sock.connect(spec[where])
        base = 10**6
        for i in range(K):
            P.send(push, forged_group(base + i, secret, token=""))                    # no token
            bad = forged_group(base + K + i, secret, generator="gen9")                # gen9's credit...
            bad.generator = "gen0"                                                    # ...claimed by gen0
            P.send(push, bad)
            wrong_n = forged_group(base + 2 * K + i, secret)
            P.send(push, forged_group(base + 2 * K + i, secret, n=3, token=wrong_n.token))  # 3 samples, not 4
            future = forged_group(base + 3 * K + i, secret, version=10**6)
            P.send(push, future)
            P.send(push, future)                                                      # twice
            P.send(push, forged_group(base + 4 * K + i, secret, token_id=vocab))       # id past the vocabulary
            P.send(dealer, P.GroupDone("gen0", 10**7 + i, 4, dropped="reward_failed"))  # never admitted
        # The CURVE endpoints, from an authorised key: random garbage and the same lies.
        curve = client_keys(keys / "fuzz.key_secret")
        rng = random.Random(1)
        remote = spec["remote"]
        for where, kind in (("router", zmq.DEALER), ("pull", zmq.PUSH)):
            sock = ctx.socket(kind)
            secure_client(sock, curve)
            sock.setsockopt(zmq.LINGER, 2000)
            sock.connect(remote[where])
            messages = unexpected_messages("controller_router" if where == "router" else "buffer_pull")
            for i in range(500):
                frames = malformed(rng, messages)
                sock.send_multipart([b"", *frames] if kind == zmq.DEALER else frames)
            if where == "router":
                for msg in (P.StepReport(0, 9, {}), P.AdmitRequest("gen0", 4), P.Published(9, {"kind": "shm",
                            "name": "x", "version": 9})):
                    P.send(sock, msg)                                   # as the learner, or a local generator
            else:
                for i in range(K):
                    P.send(sock, forged_group(base + 5 * K + i, secret, token=""))
            sock.close()
        push.close()
        dealer.close()
        status = finish(proc, tmp_path, run_dir, steps)
    finally:
        cleanup(proc, ctx)
    buffer, controller = status["dropped_messages"]["buffer"], status["dropped_messages"]["controller"]
    assert buffer["future_version"] == K and buffer["duplicate_group"] == K and buffer["bad_tokens"] == K, buffer
    assert buffer["not_admitted"] >= 3 * K + K, buffer                  # local lies + the CURVE ones
    assert controller["unknown_group"] == K and controller["remote_not_allowed"] >= 3, controller
    # nothing forged was trained: the ledger counts only admitted groups as trained, two per step
    groups = json.loads((run_dir / "groups.json").read_text())
    assert groups["trained"] == steps * 2 and groups["admitted"] == (
        groups["trained"] + groups["dropped"] + groups["requeued"] + groups["unfinished_at_stop"]), groups
    assert_nothing_left(run_dir)
