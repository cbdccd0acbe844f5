"""flux.integrations.remote.weight_stream: chunked, checksummed, resumable weights over TCP (CURVE), against a real shm slot.

A forced disconnect goes through a TCP proxy that cuts the connection mid-transfer; corruption is
injected by a server that flips a byte of a chunk it sends (or of its whole snapshot).
"""

import logging
import socket
import threading
import time

import numpy as np
import pytest
import torch
import zmq

from flux.integrations.remote import messages as M
from flux.run import protocol as P
from flux.integrations.remote.auth import Gatekeeper, client_keys, make_keys, secure_client
from flux.integrations.remote.weight_stream import WeightFetcher, WeightServer, chunk_sums
from flux.run.weights import WeightPublisher
from flux.run.weights import _sum64 as checksum

CHUNK = 16 * 1024


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"embed.weight": torch.randn(300, 257, generator=g), "norm.weight": torch.randn(33, generator=g),
            "head.bias": torch.randn(7, generator=g).to(torch.bfloat16), "empty": torch.zeros(0)}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def keys(tmp_path):
    make_keys(tmp_path / "keys", ["good"])
    make_keys(tmp_path / "other", ["bad"])
    return tmp_path


@pytest.fixture
def published(tmp_path):
    pub = WeightPublisher(f"flux-test-ws-{tmp_path.name[-12:]}")
    yield pub
    pub.close()


class Harness:
    """A context with a gatekeeper, a CURVE weight server on a free port, and fetchers on demand."""

    def __init__(self, keys, server_cls=WeightServer, chunk=CHUNK):
        self.ctx = zmq.Context()
        self.log = logging.getLogger("test.weight_stream")
        self.gate = Gatekeeper(self.ctx, keys / "keys", self.log)
        self.gate.start()
        self.server = server_cls(self.ctx, "tcp://127.0.0.1:0", keys / "keys", chunk, self.log)
        self.server.start()
        assert self.server.ready.wait(5)
        self.curve = client_keys(keys / "keys" / "good.key_secret")
        self.fetchers = []

    def fetcher(self, address=None, **kw) -> WeightFetcher:
        f = WeightFetcher(self.ctx, address or self.server.endpoint, kw.pop("curve", self.curve), logger=self.log,
                          **kw)
        self.fetchers.append(f)
        return f

    def close(self):
        for f in self.fetchers:
            f.stop()
            f._close()
        self.server.stop()
        self.gate.stop()
        self.ctx.term()


@pytest.fixture
def harness(keys):
    h = Harness(keys)
    yield h
    h.close()


def test_chunk_sums_add_up_to_the_learners_checksum():
    data = np.random.default_rng(0).integers(0, 256, 10 * 64 + 128, dtype=np.uint8)
    sums = chunk_sums(data, 128)
    assert len(sums) == 6
    assert int(sums.sum(dtype=np.uint64)) == checksum(data)
    assert int(sums[2]) == checksum(data[256:384])


def test_a_version_arrives_whole_and_equal(harness, published):
    sd = state(1)
    harness.server.announce(published.publish(3, sd))
    f = harness.fetcher()
    got = f.fetch(3)
    assert got is not None and same(got, sd)
    assert f.stats["versions"] == 1 and f.stats["chunks"] > 5 and f.stats["resumed"] == 0
    assert harness.server.stats["snapshots"] == 1


def test_a_version_no_longer_held_is_refused_with_the_newest(harness, published):
    harness.server.announce(published.publish(1, state(1)))
    harness.server.announce(published.publish(2, state(2)))
    f = harness.fetcher()
    assert f.fetch(1) is None                     # superseded before anyone asked for it
    assert f.target == 2                          # told which version to get instead
    assert same(f.fetch(2), state(2))


class CuttingProxy:
    """TCP proxy client <-> server that cuts every open connection once `cut_after` bytes went to the
    client (a dropped link); later connections pass through."""

    def __init__(self, target: str, cut_after: int):
        host, port = target.removeprefix("tcp://").rsplit(":", 1)
        self.target, self.cut_after = (host, int(port)), cut_after
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.address = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.cuts, self.sent, self.connections = 0, 0, 0
        self.halt = False
        self.socks = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.halt:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.connections += 1
            self.socks += [client, upstream]
            pair = (client, upstream)
            threading.Thread(target=self._pump, args=(client, upstream, pair, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, pair, True), daemon=True).start()

    def _pump(self, src, dst, pair, to_client):
        while True:
            try:
                data = src.recv(65536)
                if not data:
                    break
                if to_client:
                    self.sent += len(data)
                    if not self.cuts and self.sent >= self.cut_after:
                        self.cuts += 1  # these bytes are lost with the link
                        break
                dst.sendall(data)
            except OSError:
                break
        for s in pair:  # a dropped link: both ends see it go
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def close(self):
        self.halt = True
        self.listener.close()
        for s in self.socks:
            s.close()


def test_a_dropped_connection_resumes_from_the_first_missing_chunk(harness, published):
    sd = state(2)
    handle = published.publish(5, sd)
    harness.server.announce(handle)
    n_chunks = -(-handle["nbytes"] // CHUNK)
    proxy = CuttingProxy(harness.server.endpoint, cut_after=handle["nbytes"] // 2)
    try:
        f = harness.fetcher(proxy.address, stall_s=1.0, window=2)
        got = f.fetch(5)
    finally:
        proxy.close()
    assert proxy.cuts == 1 and proxy.connections >= 2
    assert got is not None and same(got, sd)
    assert f.stats["resumed"] >= 1
    # resumed, not restarted: the server sent little more than one copy (the chunks lost in the cut)
    assert harness.server.stats["chunks"] <= n_chunks + 2 * 2, (harness.server.stats, n_chunks)


class FlakyServer(WeightServer):
    """Sends chunk 1 with one byte flipped, the first `bad_sends` times it is asked for."""

    bad_sends = 1

    def serve(self, sock, ident, req):
        if req.count == 0 or not req.first <= 1 < req.first + req.count or self.bad_sends <= 0:
            return super().serve(sock, ident, req)
        self.bad_sends -= 1
        snap = self.current(req.version)
        for i in range(req.first, min(req.first + req.count, len(snap.sums))):
            part = snap.data[i * self.chunk_bytes:(i + 1) * self.chunk_bytes].copy()
            if i == 1:
                part[17] ^= 0x40
            P.send(sock, M.WeightChunk(snap.version, i, int(snap.sums[i]), part), identity=ident)


def test_a_corrupted_chunk_is_rejected_and_fetched_again(keys, published):
    h = Harness(keys, FlakyServer)
    try:
        sd = state(3)
        h.server.announce(published.publish(1, sd))
        f = h.fetcher()
        got = f.fetch(1)
        assert got is not None and same(got, sd)
        assert f.stats["corrupt_chunks"] == 1 and f.stats["rejected"] == 0
    finally:
        h.close()


def test_a_chunk_corrupted_every_time_rejects_the_version(keys, published):
    h = Harness(keys, FlakyServer)
    h.server.bad_sends = 100
    try:
        h.server.announce(published.publish(1, state(3)))
        f = h.fetcher(max_corrupt=2)
        assert f.fetch(1) is None
        assert f.stats["rejected"] == 1 and f.stats["versions"] == 0
    finally:
        h.close()


class RottenServer(WeightServer):
    """Its snapshot differs from what the learner published (one flipped bit), and its chunk sums agree
    with the rotten bytes: only the version's checksum, the learner's, can tell."""

    def current(self, version):
        snap = super().current(version)
        if snap is not None and not getattr(snap, "rotten", False):
            snap.data = snap.data.copy()
            snap.data[100] ^= 1
            snap.sums = chunk_sums(snap.data, self.chunk_bytes)
            snap.rotten = True
        return snap


def test_the_versions_checksum_keeps_a_corrupted_version_from_the_engine(keys, published):
    h = Harness(keys, RottenServer)
    delivered = []
    try:
        h.server.announce(published.publish(4, state(4)))
        f = h.fetcher(deliver=lambda v, sd: delivered.append(v))
        f.start()
        f.want(4)
        deadline = time.monotonic() + 10
        while f.stats["rejected"] == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert f.stats["rejected"] >= 1
        assert delivered == [] and f.delivered == -1       # the engine never saw it
    finally:
        h.close()


def test_the_thread_delivers_the_newest_whole_version(harness, published):
    delivered = []
    f = harness.fetcher(deliver=lambda v, sd: delivered.append((v, sd)))
    f.start()
    for v in (1, 2, 3):
        harness.server.announce(published.publish(v, state(v)))
        f.want(v)
    deadline = time.monotonic() + 10
    while (not delivered or delivered[-1][0] != 3) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert delivered and delivered[-1][0] == 3 and same(delivered[-1][1], state(3))
    assert [v for v, _ in delivered] == sorted({v for v, _ in delivered})   # never backwards


def test_a_newer_version_supersedes_a_download_in_progress(harness, published):
    harness.server.announce(published.publish(1, state(1)))
    f = harness.fetcher(window=1)
    orig = f._send
    sent = []

    def send(msg):  # the newer version is announced while the first download runs
        sent.append(msg)
        if len(sent) == 3:
            harness.server.announce(published.publish(2, state(2)))
            f.want(2)
        orig(msg)

    f._send = send
    assert f.fetch(1) is None
    assert f.stats["superseded"] == 1 and f.target == 2
    assert same(f.fetch(2), state(2))


@pytest.mark.parametrize("client", ["unauthorised key", "no CURVE"])
def test_a_client_without_an_authorised_key_gets_nothing(harness, published, keys, client, caplog):
    harness.server.announce(published.publish(1, state(1)))
    sock = harness.ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    if client == "unauthorised key":
        secure_client(sock, client_keys(keys / "other" / "bad.key_secret", keys / "keys" / "server.key"))
    sock.connect(harness.server.endpoint)
    with caplog.at_level(logging.WARNING, logger="test.weight_stream"):
        for count in (0, 1):
            try:  # never block: once the handshake is refused the DEALER may have no peer to queue to
                P.send(sock, M.WeightFetch(1, 0, count), flags=zmq.NOBLOCK)
            except zmq.Again:
                pass
        assert sock.poll(1500) == 0                  # no manifest, no chunk: nothing at all
    sock.close()
    assert harness.server.stats["requests"] == 0
    if client == "unauthorised key":
        assert harness.gate.refused >= 1
        assert any("refused a CURVE client" in r.getMessage() for r in caplog.records)


def test_a_key_added_to_authorized_counts_from_the_next_connection(harness, published, keys):
    import shutil

    harness.server.announce(published.publish(1, state(1)))
    late = client_keys(keys / "other" / "bad.key_secret", keys / "keys" / "server.key")
    assert harness.fetcher(curve=late, stall_s=0.5, max_resumes=1).fetch(1) is None
    shutil.copy(keys / "other" / "authorized" / "bad.key", keys / "keys" / "authorized" / "late.key")
    assert same(harness.fetcher(curve=late).fetch(1), state(1))     # no restart of anything


def test_the_plain_stream_serves_only_requests_with_a_granted_token(keys, published):
    tokens = {"t-good"}
    ctx = zmq.Context()
    server = WeightServer(ctx, "tcp://127.0.0.1:0", None, CHUNK, logging.getLogger("test"), tokens=tokens)
    server.start()
    assert server.ready.wait(5)
    fetchers = []
    try:
        server.announce(published.publish(1, state(1)))

        def fetcher(token):
            fetchers.append(WeightFetcher(ctx, server.endpoint, None, token=token, stall_s=0.5, max_resumes=1))
            return fetchers[-1]

        assert fetcher("").fetch(1) is None and fetcher("t-forged").fetch(1) is None
        assert server.stats["requests"] == 0 and server.drops.counts["no_token"] >= 2
        assert same(fetcher("t-good").fetch(1), state(1))
        tokens.discard("t-good")                          # its generator left: no more weights for it
        assert fetcher("t-good").fetch(1) is None
    finally:
        for f in fetchers:
            f._close()
        server.stop()
        ctx.term()
