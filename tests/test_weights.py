"""flux.run.weights: round trips, seqlock (stale/torn/checksum), concurrent stress, cleanup, CUDA IPC."""
import json
import multiprocessing as mp
import os
import struct
import subprocess
import sys
import threading
import time
import uuid

import pytest
import torch

from flux.run import weights as W
from flux.run.weights import StaleWeights, TornRead, WeightPublisher, cleanup_prefix, load_weights

torch.set_num_threads(1)


@pytest.fixture
def prefix():
    name = f"fluxtest_{uuid.uuid4().hex[:8]}"
    yield name
    leftovers = cleanup_prefix(name)
    assert leftovers == [], f"segments left behind: {leftovers}"


def shm_names(prefix: str) -> list[str]:
    return sorted(n for n in os.listdir(W.SHM_DIR) if n.startswith(prefix))


def state(version: int, scale: int = 1) -> dict[str, torch.Tensor]:
    """Every value equals ``version``, so a torn or mixed copy is visible."""
    return {"embed.weight": torch.full((64 * scale, 33), float(version)),
            "layer.bias": torch.full((127,), float(version), dtype=torch.bfloat16),
            "step": torch.tensor(version, dtype=torch.int64),
            "mask": torch.full((5, 3), version, dtype=torch.int64)}


def poke(handle: dict, offset: int, data: bytes) -> None:
    fd = os.open(os.path.join(W.SHM_DIR, handle["name"]), os.O_RDWR)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def seq_of(handle: dict) -> int:
    with open(os.path.join(W.SHM_DIR, handle["name"]), "rb") as f:
        return struct.unpack_from("<Q", f.read(16), W.SEQ_OFFSET)[0]


def test_round_trip_dtypes_and_shapes(prefix):
    sd = {"f32": torch.randn(3, 5), "bf16": torch.randn(7, dtype=torch.bfloat16), "i64": torch.arange(-4, 8),
          "scalar": torch.tensor(2.5), "scalar_bf16": torch.tensor(-1.25, dtype=torch.bfloat16),
          "empty": torch.zeros(0, 4, dtype=torch.float16), "bool": torch.tensor([True, False, True]),
          "transposed": torch.arange(12.0).reshape(3, 4).t(), "param": torch.nn.Parameter(torch.ones(2, 2))}
    pub = WeightPublisher(prefix)
    handle = pub.publish(3, sd)
    assert handle["kind"] == "shm" and handle["version"] == 3 and handle["nbytes"] % 64 == 0
    out = load_weights(handle)
    assert list(out) == list(sd)
    for name, t in sd.items():
        assert out[name].dtype == t.dtype and out[name].shape == t.shape and torch.equal(out[name], t), name
        assert not out[name].requires_grad
    pub.publish(4, state(4))  # both slots rewritten: what we loaded must not change
    pub.publish(5, sd)
    assert torch.equal(out["f32"], sd["f32"]) and torch.equal(out["i64"], sd["i64"])
    pub.close()


def test_slots_round_robin_and_stale(prefix):
    pub = WeightPublisher(prefix, slots=2)
    h1, h2, h3 = (pub.publish(v, state(v)) for v in (1, 2, 3))
    assert h1["name"] == h3["name"] != h2["name"] and len(shm_names(prefix)) == 2
    with pytest.raises(StaleWeights):
        load_weights(h1)  # its slot now holds version 3
    assert load_weights(h2)["step"].item() == 2 and load_weights(h3)["step"].item() == 3
    h4 = pub.publish(4, state(4, scale=2))  # bigger: slot 1 is re-created under a new name
    assert h4["name"] != h2["name"] and len(shm_names(prefix)) == 2
    with pytest.raises(StaleWeights):
        load_weights(h2)
    assert load_weights(h4)["embed.weight"].shape == (128, 33)
    pub.close()


def test_odd_counter_means_being_written(prefix):
    pub = WeightPublisher(prefix)
    h = pub.publish(1, state(1))
    seq = seq_of(h)
    assert seq % 2 == 0
    poke(h, W.SEQ_OFFSET, struct.pack("<Q", seq + 1))
    with pytest.raises(TornRead):
        load_weights(h, retries=2)
    poke(h, W.SEQ_OFFSET, struct.pack("<Q", seq + 2))
    assert load_weights(h)["step"].item() == 1
    pub.close()


def test_a_writer_holding_the_slot_makes_readers_retry(prefix):
    import fcntl

    pub = WeightPublisher(prefix)
    h = pub.publish(1, state(1))
    fd = os.open(os.path.join(W.SHM_DIR, h["name"]), os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what publish holds while it writes the slot
    t0 = time.perf_counter()
    with pytest.raises(TornRead, match="being written"):
        load_weights(h, retries=2)
    assert time.perf_counter() - t0 >= 0.003  # backed off 1 + 2 ms between the three attempts
    os.close(fd)
    assert load_weights(h)["step"].item() == 1
    pub.close()


def test_views_hold_their_slot_and_the_writer_moves_to_a_fresh_segment(prefix):
    pub = WeightPublisher(prefix, slots=2)
    h1 = pub.publish(1, state(1))
    held = load_weights(h1)
    pub.publish(2, state(2))
    h3 = pub.publish(3, state(3))  # slot 0 is held by `held`: version 3 goes to a new segment
    assert h3["name"] != h1["name"] and h1["name"] not in shm_names(prefix) and len(shm_names(prefix)) == 2
    assert bool((held["embed.weight"] == 1).all()) and held["step"].item() == 1  # still version 1
    with pytest.raises(StaleWeights):
        load_weights(h1)
    del held
    h4 = pub.publish(4, state(4))
    mine = load_weights(h4)
    mine["embed.weight"][0, 0] = -5.0  # a reader's write lands in the slot (every reader of v4 sees it)...
    assert load_weights(h4)["embed.weight"][0, 0].item() == -5.0
    del mine
    h5, h6 = pub.publish(5, state(5)), pub.publish(6, state(6))
    assert h6["name"] == h4["name"] and h5["name"] == h3["name"]  # nothing holds a slot: rewritten in place
    assert load_weights(h6)["embed.weight"][0, 0].item() == 6.0  # ...and never hides a later version
    assert load_weights(h5)["step"].item() == 5
    pub.close()


def test_a_load_maps_each_segment_once(prefix):
    pub = WeightPublisher(prefix, slots=2)
    for v in range(1, 7):
        assert load_weights(pub.publish(v, state(v)))["step"].item() == v
    mine = [k for k in W._maps if k[0].startswith(prefix)]
    assert len(mine) == 2  # one mapping per slot, reused by every version
    pub.publish(7, state(7, scale=2))  # resized slots: the mappings of their old segments are dropped
    h8 = pub.publish(8, state(8, scale=2))
    load_weights(h8)
    assert [k[0] for k in W._maps if k[0].startswith(prefix)] == [h8["name"]]
    pub.close()


def test_checksum_catches_corruption_the_seqlock_cannot_see(prefix):
    for checksum in (True, False):
        pub = WeightPublisher(f"{prefix}_{checksum}", checksum=checksum)
        h = pub.publish(1, state(1))
        with open(os.path.join(W.SHM_DIR, h["name"]), "rb") as f:
            meta_len = struct.unpack_from("<Q", f.read(64), 24)[0]
        poke(h, W._align(W.HEADER_BYTES + meta_len) + 5, b"\x7f")
        if checksum:
            with pytest.raises(TornRead, match="checksum"):
                load_weights(h, retries=1)
        else:
            assert load_weights(h)["embed.weight"][0, 1].item() != 1.0
        pub.close()


def test_concurrent_writer_and_readers_never_see_a_torn_state(prefix):
    pub = WeightPublisher(prefix, slots=2)
    latest = [pub.publish(0, state(0, scale=64))]
    stop = threading.Event()
    results = {"ok": 0, "stale": 0, "torn": 0, "bad": []}

    def writer():
        version = 0
        while not stop.is_set():
            version += 1
            latest[0] = pub.publish(version, state(version, scale=64))  # ~0.5 MB per version

    def reader():
        while not stop.is_set():
            handle = latest[0]
            try:
                sd = load_weights(handle, retries=0)
            except StaleWeights:
                results["stale"] += 1
                continue
            except TornRead:
                results["torn"] += 1
                continue
            results["ok"] += 1
            v = handle["version"]
            if not all(bool((t == v).all()) for t in sd.values()):
                results["bad"].append(v)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join()
    pub.close()
    print(f"\nstress: {results['ok']} consistent loads, {results['stale']} stale, {results['torn']} torn, "
          f"{latest[0]['version']} versions published")
    assert results["bad"] == [] and results["ok"] > 10 and latest[0]["version"] > 10


def test_close_unlinks_everything_and_is_idempotent(prefix):
    pub = WeightPublisher(prefix)
    pub.publish(1, state(1))
    pub.publish(2, state(2))
    assert len(shm_names(prefix)) == 2
    pub.close()
    pub.close()
    assert shm_names(prefix) == []
    with pytest.raises(RuntimeError):
        pub.publish(3, state(3))


def test_cleanup_prefix_removes_leftovers_of_a_crashed_run(prefix):
    pub = WeightPublisher(prefix)
    h = pub.publish(1, state(1))
    pub.publish(2, state(2))
    names = shm_names(prefix)
    assert len(names) == 2 and cleanup_prefix(prefix) == names
    assert shm_names(prefix) == []
    with pytest.raises(StaleWeights):
        load_weights(h)
    pub.close()  # the segments are already gone: no error
    with pytest.raises(ValueError):
        cleanup_prefix("")


CHILD = """
import json, os, sys, torch
from flux.run.weights import WeightPublisher, load_weights
print(int(load_weights(json.loads(sys.argv[1]))["step"]))  # a reader of the parent's segment
own = WeightPublisher(sys.argv[2])  # a publisher that exits without close()
own.publish(1, {"w": torch.ones(3)})
own.publish(2, {"w": torch.ones(3)})
print(sum(n.startswith(sys.argv[2]) for n in os.listdir("/dev/shm")))
"""


def test_other_processes_neither_leak_nor_unlink_nor_warn(prefix):
    pub = WeightPublisher(prefix)
    h = pub.publish(7, state(7))
    child_prefix = f"{prefix}_child"
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(h), child_prefix], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.split() == ["7", "2"], proc.stderr
    assert proc.stderr == ""  # no resource_tracker complaints
    assert shm_names(prefix) == [h["name"]]  # the reader did not unlink ours; the child's own are gone
    pub.close()


def test_publish_and_load_speed(prefix):
    sd = {f"w{i}": torch.randn(1024, 1024) for i in range(8)}  # 32 MiB
    for checksum in (False, True):
        pub = WeightPublisher(f"{prefix}_{checksum}", checksum=checksum)
        pub.publish(0, sd)
        pub.publish(1, sd)  # both slots' pages are touched: time the steady state
        t0 = time.perf_counter()
        h = pub.publish(2, sd)
        t1 = time.perf_counter()
        load_weights(h)
        t2 = time.perf_counter()
        print(f"\nchecksum={checksum}: publish {h['nbytes'] / (t1 - t0) / 1e9:.2f} GB/s, "
              f"load {h['nbytes'] / (t2 - t1) / 1e9:.2f} GB/s")
        pub.close()


def test_a_cuda_bucket_is_opened_once_and_a_few_stay_open(monkeypatch):
    from flux.integrations.cuda import ipc

    opened = []
    monkeypatch.setattr(ipc, "_rebuild", lambda handle, device: opened.append(handle["handle"]) or object())
    monkeypatch.setattr(ipc, "_opened", {})
    slot0 = {"handle": b"h0", "storage_offset": 0, "offset": 0, "size": [64]}
    assert ipc.open_bucket(slot0, None) is ipc.open_bucket(dict(slot0), None)  # every version of the slot
    assert opened == [b"h0"]
    assert ipc.open_bucket({**slot0, "size": [128]}, None) is not ipc.open_bucket(slot0, None)  # resized
    for i in range(1, 6):
        ipc.open_bucket({**slot0, "handle": b"h%d" % i}, 0)
    assert len(ipc._opened) == ipc.KEEP_OPEN and opened[-1] == b"h5"


def _load_in_child(handles, queue):
    sums = []
    for handle in handles:  # the second load of a slot finds its bucket still open
        sd = load_weights(handle)
        assert all(t.is_cuda for t in sd.values())
        sums.append({k: v.float().sum().item() for k, v in sd.items()})
    queue.put(sums)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_ipc_round_trip(prefix):
    pub = WeightPublisher(prefix)
    sd3, sd4 = ({k: v.cuda() for k, v in state(v).items()} for v in (3, 4))
    h3, h4 = pub.publish(3, sd3), pub.publish(4, sd4)
    assert h3["kind"] == h4["kind"] == "cuda_ipc" and h3["ipc"]["handle"] != h4["ipc"]["handle"]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(target=_load_in_child, args=([h3, h4, h3], queue))
    child.start()
    sums = queue.get(timeout=120)
    child.join(timeout=60)
    assert child.exitcode == 0
    want3, want4 = ({k: v.float().sum().item() for k, v in sd.items()} for sd in (sd3, sd4))
    assert sums == [want3, want4, want3]
    h5 = pub.publish(5, {k: v.cuda() for k, v in state(5).items()})
    assert h5["ipc"]["handle"] == h3["ipc"]["handle"]  # slot 0's bucket is rewritten in place
    child = ctx.Process(target=_load_in_child, args=([h5], queue))
    child.start()
    assert queue.get(timeout=120)[0]["step"] == 5
    child.join(timeout=60)
    with pytest.raises(StaleWeights):
        load_weights(h3)  # the seqlock header says slot 0 now holds version 5
    pub.close()
