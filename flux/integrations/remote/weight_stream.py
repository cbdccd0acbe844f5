"""Weights for remote generators: a chunked, checksummed, resumable stream over TCP (CURVE).

    weight server (thread of the controller process)       WeightFetcher (thread of a remote generator)
      announce(handle) for every published version            want(v) when NewVersion(v) arrives
      snapshot: copy the learner's shm slot once,             WeightFetch(v, 0, 0)  -> WeightManifest
        sum each chunk; check the version's checksum         WeightFetch(v, i, k)  -> WeightChunk i .. i+k-1
      WeightFetch(v, first, count) -> those chunks            keep `window` chunks requested; a chunk whose
      a version it no longer holds -> WeightUnavailable         sum is wrong is dropped and asked for again
                                                              silent for `stall_s`: reconnect and ask again
                                                                from the first missing chunk (resume)
                                                              complete: the version's checksum must hold,
                                                                then deliver(v, state_dict) to the engine

The engine never sees a half-loaded or corrupted version: it gets a state dict only once every chunk is
in place and the whole version's checksum (the learner's, or taken as the server copied the locked
slot) matches. A
newer announced version supersedes a download in progress. Checksums are wrapping uint64 sums of 64-bit
words (weights.py): about twice memcpy speed, and additive, so the version's sum is the sum of its
chunks' sums. The server keeps one snapshot (the newest version asked for), serves from it without
copying (zero-copy frames), and never goes through the controller's loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zmq

from flux.integrations.remote import messages as M
from flux.run import protocol as P

log = logging.getLogger("flux.integrations.remote.weight_stream")


def chunk_sums(data: np.ndarray, chunk_bytes: int) -> np.ndarray:
    """Wrapping uint64 sum of each chunk's 64-bit words. Shape: data (nbytes,) uint8 -> (n_chunks,)."""
    words = data.view("<u8")
    if not len(words):
        return np.zeros(0, np.uint64)
    return np.add.reduceat(words, np.arange(0, len(words), chunk_bytes // 8), dtype=np.uint64)


@dataclass
class Snapshot:
    """One version as the server serves it: the slot's bytes, copied once, and each chunk's sum."""

    version: int
    manifest: list
    data: np.ndarray
    checksum: int
    sums: np.ndarray


def _load_raw(handle: dict, chunk_bytes: int) -> tuple[list, np.ndarray, int, np.ndarray]:
    # Imports torch: only a run with remote generators pays for it, in the weight server's thread.
    from flux.run.weights import load_raw

    return load_raw(handle, chunk_bytes=chunk_bytes)


class WeightServer(threading.Thread):
    """Serves the newest announced weights version in chunks on a ROUTER (CURVE when `key_dir` is set).

    The learner rewrites a shared-memory slot once it is unlocked, so the bytes of a download are copied
    out once into a snapshot: on the first request for a version, and at every announcement once a
    remote generator has asked (so a slow client finds its version still there).

    With `tokens` (a set the controller keeps: one token per remote generator, handed out over CURVE and
    withdrawn when it leaves or dies), a request is served only if it carries one of them: the
    unencrypted stream of `net.weight_stream: plain`. The set is only read here (atomic under the GIL).
    With `allowed` (the Gatekeeper's check, CURVE stream), a request from a key removed since it connected
    is not answered.
    """

    def __init__(self, ctx: zmq.Context, address: str, key_dir: str | Path | None, chunk_bytes: int,
                 logger: logging.Logger = log, load: Callable[[dict, int], tuple] = _load_raw,
                 tokens: set[str] | None = None, allowed: Callable[[str], bool] | None = None):
        super().__init__(name="weight-server", daemon=True)
        if chunk_bytes < 64 or chunk_bytes % 64:
            raise ValueError("chunk_bytes must be a positive multiple of 64")
        self.ctx, self.address, self.key_dir, self.chunk_bytes = ctx, address, key_dir, chunk_bytes
        self.log, self.load, self.tokens, self.allowed = logger, load, tokens, allowed
        self.snapshot: Snapshot | None = None
        self.endpoint = ""  # the bound address (a port 0 resolved), once `ready` is set
        self.ready, self.halt = threading.Event(), threading.Event()
        self.stats = {"requests": 0, "chunks": 0, "bytes": 0, "unavailable": 0, "snapshots": 0}
        self.drops = P.DropCounter("weight-server")
        self._announced: dict | None = None
        self._lock = threading.Lock()
        self._eager = False

    def announce(self, handle: dict) -> None:
        """A new version is complete (thread-safe): serve it from now on."""
        with self._lock:
            if self._announced is None or handle["version"] > self._announced["version"]:
                self._announced = handle

    @property
    def newest(self) -> int:
        with self._lock:
            return self._announced["version"] if self._announced else 0

    def stop(self) -> None:
        self.halt.set()
        if self.ident is not None:
            self.join(5)

    def run(self) -> None:
        if self.key_dir:
            from flux.integrations.remote.auth import curve_socket

            sock = curve_socket(self.ctx, zmq.ROUTER, self.key_dir)
        else:
            sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, 2**16)  # requests only: a peer sending more is disconnected
        sock.bind(self.address)
        self.endpoint = sock.last_endpoint.decode()
        self.ready.set()
        if self.load is _load_raw:
            import flux.run.weights  # noqa: F401  (torch: at start, not while the first generator waits)
        try:
            while not self.halt.is_set():
                if self._eager:
                    self.current(self.newest)
                if not sock.poll(50):
                    continue
                while True:
                    try:
                        ident, msg, key = P.recv_from(sock, self.drops, zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    if key and self.allowed is not None and not self.allowed(key):
                        self.drops.drop("key_revoked", detail="a weights request from a removed key")
                    elif isinstance(msg, M.WeightFetch):
                        self.serve(sock, ident, msg)
                    elif msg is not None:
                        self.drops.drop("unexpected_type", detail=msg.TYPE)
        finally:
            sock.close()

    def serve(self, sock: zmq.Socket, ident, req: M.WeightFetch) -> None:
        if self.tokens is not None and req.token not in self.tokens:
            self.drops.drop("no_token", detail="a weights request without a valid token (not answered)")
            return
        self._eager = True
        self.stats["requests"] += 1
        snap = self.current(req.version)
        if snap is None:
            self.stats["unavailable"] += 1
            newest = self.newest
            why = "superseded" if req.version < newest else "not announced yet" if req.version > newest else \
                "could not be read"
            P.send(sock, M.WeightUnavailable(req.version, newest, why), identity=ident)
            return
        n = len(snap.sums)
        if req.count == 0:
            P.send(sock, M.WeightManifest(snap.version, len(snap.data), self.chunk_bytes, n, snap.checksum,
                                          snap.manifest), identity=ident)
            return
        for i in range(req.first, min(req.first + req.count, n)):
            part = snap.data[i * self.chunk_bytes:(i + 1) * self.chunk_bytes]
            P.send(sock, M.WeightChunk(snap.version, i, int(snap.sums[i]), part), identity=ident)
            self.stats["chunks"] += 1
            self.stats["bytes"] += len(part)

    def current(self, version: int) -> Snapshot | None:
        """The snapshot of `version`: the one held, or a fresh copy if it is the newest announced."""
        if self.snapshot is not None and self.snapshot.version == version:
            return self.snapshot
        with self._lock:
            handle = self._announced
        if handle is None or handle["version"] != version:
            return None
        from flux.run.weights import WeightsError

        try:
            manifest, data, checksum, sums = self.load(handle, self.chunk_bytes)
        except WeightsError as e:  # StaleWeights, TornRead: the slot moved on, and a newer version is coming
            self.log.warning("weight server: version %d could not be read (%s: %s)", version, type(e).__name__, e)
            return None
        if int(sums.sum(dtype=np.uint64)) != checksum:
            self.log.error("weight server: version %d does not match its checksum; not served", version)
            return None
        self.snapshot = Snapshot(version, manifest, data, checksum, sums)
        self.stats["snapshots"] += 1
        return self.snapshot


class WeightFetcher(threading.Thread):
    """A remote generator's side of the stream: downloads the newest announced version, hands it to
    `deliver(version, state_dict)` only when it is complete and its checksum holds.

    `fetch(version)` does one download synchronously (tests and benchmarks call it directly); the thread
    (`start()`, then `want(v)` per announcement) downloads in the background, so generation goes on with
    the weights it has until the new ones are whole.
    """

    def __init__(self, ctx: zmq.Context, address: str, curve: dict | None,
                 deliver: Callable[[int, dict], None] | None = None, logger: logging.Logger = log,
                 window: int = 4, stall_s: float = 5.0, max_resumes: int = 20, max_corrupt: int = 3,
                 token: str = ""):
        super().__init__(name="weight-fetcher", daemon=True)
        self.ctx, self.address, self.curve, self.deliver, self.log = ctx, address, curve or {}, deliver, logger
        self.window, self.stall_s, self.max_resumes, self.max_corrupt = window, stall_s, max_resumes, max_corrupt
        self.token = token
        self.target, self.delivered = -1, -1
        self.halt = threading.Event()
        self.drops = P.DropCounter("weight-fetcher")
        self.stats = {"versions": 0, "bytes": 0, "chunks": 0, "corrupt_chunks": 0, "resumed": 0,
                      "superseded": 0, "rejected": 0, "seconds": 0.0}
        self._wake = threading.Condition()
        self._sock: zmq.Socket | None = None

    # ---- background use --------------------------------------------------------------------------
    def want(self, version: int) -> None:
        """Version `version` is announced: download it (a newer one supersedes a download in progress)."""
        with self._wake:
            if version > self.target:
                self.target = version
                self._wake.notify()

    def stop(self) -> None:
        self.halt.set()
        with self._wake:
            self._wake.notify()
        if self.ident is not None:
            self.join(5)

    def run(self) -> None:
        try:
            while not self.halt.is_set():
                with self._wake:
                    while self.target <= self.delivered and not self.halt.is_set():
                        self._wake.wait(0.5)
                    version = self.target
                if self.halt.is_set():
                    break
                state = self.fetch(version)
                if state is not None:
                    self.delivered = version
                    if self.deliver is not None:
                        self.deliver(version, state)
                elif self.target == version:  # failed, not superseded: try again shortly
                    self.halt.wait(0.2)
        finally:
            self._close()

    # ---- one download ----------------------------------------------------------------------------
    def fetch(self, version: int) -> dict | None:
        """Download, assemble and verify `version`; the state dict, or None (superseded, unavailable,
        rejected, or stopped)."""
        t0 = time.monotonic()
        man = self._manifest(version)
        if man is None:
            return None
        n, cb = man.n_chunks, man.chunk_bytes
        data = np.empty(man.nbytes, np.uint8)
        sums = np.zeros(n, np.uint64)
        have = np.zeros(n, bool)
        asked: set[int] = set()
        corrupt: dict[int, int] = {}
        missing, cursor, resumes = n, 0, 0

        def ask_more() -> None:
            nonlocal cursor
            run_start, run_len = None, 0
            while len(asked) < self.window and cursor < n:
                if not have[cursor] and cursor not in asked:
                    asked.add(cursor)
                    if run_start is not None and run_start + run_len == cursor:
                        run_len += 1
                    else:
                        if run_start is not None:
                            self._send(M.WeightFetch(version, run_start, run_len, self.token))
                        run_start, run_len = cursor, 1
                cursor += 1
            if run_start is not None:  # "chunk i onward": one request per contiguous run
                self._send(M.WeightFetch(version, run_start, run_len, self.token))

        ask_more()
        last = time.monotonic()
        while missing:
            if self.halt.is_set():
                return None
            if self.target > version:
                self.stats["superseded"] += 1
                self.log.info("weights v%d superseded by v%d after %d/%d chunks", version, self.target, n - missing, n)
                return None
            if not self._sock.poll(50):
                if time.monotonic() - last < self.stall_s:
                    continue
                resumes += 1
                if resumes > self.max_resumes:
                    self.log.warning("weights v%d: no progress after %d reconnects; giving up", version, resumes - 1)
                    return None
                self.stats["resumed"] += 1
                self.log.warning("weights v%d: silent for %.1fs at %d/%d chunks; reconnecting and resuming from "
                                 "chunk %d", version, self.stall_s, n - missing, n, int(np.argmin(have)))
                self._reconnect()
                asked.clear()
                cursor = int(np.argmin(have))
                ask_more()
                last = time.monotonic()
                continue
            _, msg = P.recv(self._sock, self.drops)
            if isinstance(msg, M.WeightUnavailable) and msg.version == version:
                self.log.info("weights v%d unavailable (%s; newest %d)", version, msg.reason, msg.newest)
                self.want(msg.newest)
                return None
            if not isinstance(msg, M.WeightChunk) or msg.version != version or not 0 <= msg.index < n:
                continue  # a late answer of an earlier download or request
            i = msg.index
            if have[i]:
                continue  # asked twice around a reconnect
            asked.discard(i)
            lo, hi = i * cb, min((i + 1) * cb, man.nbytes)
            ok = len(msg.data) == hi - lo
            if ok:
                np.copyto(data[lo:hi], msg.data)
                sums[i] = np.uint64(chunk_sums(data[lo:hi], cb)[0])
                ok = int(sums[i]) == msg.checksum
            if not ok:
                self.stats["corrupt_chunks"] += 1
                corrupt[i] = corrupt.get(i, 0) + 1
                self.log.warning("weights v%d: chunk %d failed its checksum (%d times); asking again", version, i,
                                 corrupt[i])
                if corrupt[i] > self.max_corrupt:
                    self.stats["rejected"] += 1
                    return None
                cursor = min(cursor, i)
            else:
                have[i] = True
                missing -= 1
                self.stats["chunks"] += 1
                last = time.monotonic()
            ask_more()
        total = int(sums.sum(dtype=np.uint64))
        if total != man.checksum:
            self.stats["rejected"] += 1
            self.log.error("weights v%d rejected: the assembled data does not match the version's checksum "
                           "(%d != %d)", version, total, man.checksum)
            return None
        from flux.run.weights import WeightsError, unpack

        try:
            state = unpack(data, man.tensors)
        except (WeightsError, RuntimeError, ValueError, TypeError) as e:
            self.stats["rejected"] += 1
            self.log.error("weights v%d rejected: bad manifest (%s)", version, e)
            return None
        self.stats["versions"] += 1
        self.stats["bytes"] += man.nbytes
        self.stats["seconds"] += time.monotonic() - t0
        return state

    def _manifest(self, version: int) -> M.WeightManifest | None:
        if self._sock is None:
            self._reconnect()
        for attempt in range(self.max_resumes + 1):
            self._send(M.WeightFetch(version, 0, 0, self.token))
            end = time.monotonic() + self.stall_s
            while time.monotonic() < end and not self.halt.is_set() and self.target <= version:
                if not self._sock.poll(50):
                    continue
                _, msg = P.recv(self._sock, self.drops)
                if isinstance(msg, M.WeightManifest) and msg.version == version:
                    return msg
                if isinstance(msg, M.WeightUnavailable) and msg.version == version:
                    self.want(msg.newest)
                    return None
            if self.halt.is_set() or self.target > version:
                return None
            self.stats["resumed"] += 1
            self._reconnect()
        return None

    def _send(self, msg: P.Message) -> None:
        try:
            P.send(self._sock, msg)
        except zmq.Again:  # no peer to queue to (a refused handshake): the stall logic reconnects or gives up
            pass

    def _reconnect(self) -> None:
        from flux.integrations.remote.auth import secure_client

        self._close()
        self._sock = self.ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDTIMEO, int(self.stall_s * 1000))  # never block forever (see _send)
        secure_client(self._sock, self.curve)
        self._sock.connect(self.address)

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def start_fetcher(ctx: zmq.Context, spec, deliver, log) -> WeightFetcher:
    """A remote generator's fetcher for its run (spec.remote), started; `deliver(version, state)` gets each
    whole, verified version."""
    net = spec.config.net
    curve = spec.curve if net.weight_stream == "curve" else None  # plain: a token instead
    fetcher = WeightFetcher(ctx, spec.remote["weights"], curve, deliver, log, window=net.weight_window,
                            stall_s=net.heartbeat_timeout_s, token=spec.remote.get("token", ""))
    fetcher.start()
    return fetcher
