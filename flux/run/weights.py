"""Versioned weight publication from the learner to generators on the same host.

``WeightPublisher.publish(version, state_dict)`` writes one of ``slots`` POSIX shared-memory segments,
round-robin, and returns a small msgpack-able handle to announce (``NewVersion``) once it returns;
``load_weights(handle)`` copies that version out in another process. Segment layout:

    [0, 64)          header: magic, seqlock counter, version, manifest length, data length, checksum, flags
    [64, D)          msgpack manifest [[name, dtype, shape, offset, nbytes], ...]; D = align64(64 + length)
    [D, D + data)    tensor bytes, each tensor at a 64-byte aligned offset (relative to D)

A reader copies nothing: ``load_weights`` maps each segment once (kept mapped across versions) and
returns views of it, which hold a shared ``flock`` on the segment for as long as any of them is alive.
The writer takes the exclusive lock to write a slot; when a reader still holds it, the writer leaves
that segment to the reader and writes the slot into a fresh one (the old name is unlinked: the reader
keeps its mapping until its views die). A locked slot can therefore never change under its views, and
the lock never makes the learner wait (a CUDA slot, which a reader holds only for its clone, is waited
for instead: a fresh bucket per version would cost GPU memory). The views map the slot itself (shared,
not copy-on-write: a page a reader wrote to must not hide the next version), so a reader clones what it
changes. Inside the lock the header keeps a counter, odd while a version
is being written (a writer that died mid-write leaves it odd), and the version, checked against the
handle, so a reader never returns a torn or wrong-version state dict. The optional checksum (a wrapping
sum of the data as uint64 words, taken by the writer after its copy and by the reader over its
views; +0.8x a memcpy in all) catches what the lock cannot: bytes corrupted in
place by something else writing the segment (mode 0600: the run's own user). It is off by default;
the TCP weight stream sums its own copy chunk by chunk, for the network.

With CUDA tensors the bytes stay on the GPU: each slot owns a uint8 bucket with the same layout, shared
once through CUDA IPC (``reduce_tensor``) and rewritten in place by later versions; the segment then
holds only the header and manifest, and the same lock guards the bucket (the writer synchronizes its
copies before unlocking; the reader synchronizes its clone, under the lock). Persistent buckets also keep torch's IPC reference counting
(one consumer per share) out of the way: a broadcast handle is opened by any number of readers, so a
per-version bucket could never be freed. The learner holds ``slots`` extra copies of the weights.

Readers open ``/dev/shm/<name>`` directly (Linux): no ``SharedMemory`` attach, so the resource tracker
never learns about (and never unlinks) segments it does not own. The writer's segments are registered
with it, which unlinks them if the learner dies without ``close()``; ``cleanup_prefix`` catches the rest.
"""
import fcntl
import mmap
import os
import socket
import struct
import time
import weakref
from contextlib import suppress
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import msgspec
import numpy as np
import torch

from flux.plugins import hook

SHM_DIR = "/dev/shm"
MAGIC = b"FLUXWTS1"
HEADER = struct.Struct("<8sQqQQQI")  # magic, seq, version, manifest_len, data_len, checksum, flags
HEADER_BYTES = 64
SEQ_OFFSET = 8
ALIGN = 64
FLAG_CHECKSUM, FLAG_CUDA = 1, 2


class WeightsError(RuntimeError):
    """A weights handle that cannot be loaded."""


class StaleWeights(WeightsError):
    """The slot now holds another version, or is gone: wait for the next announced version."""


class TornRead(WeightsError):
    """The slot was being rewritten during every attempt to copy it."""


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _layout(tensors: dict[str, torch.Tensor]) -> tuple[list[list], int]:
    """Manifest ``[[name, dtype, shape, offset, nbytes], ...]`` and the (64-aligned) data length."""
    manifest, offset = [], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        manifest.append([name, str(t.dtype).removeprefix("torch."), list(t.shape), offset, nbytes])
        offset = _align(offset + nbytes)
    return manifest, offset


def _pack(dst: torch.Tensor, manifest: list[list], tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` into the uint8 tensor ``dst`` (CPU view of a segment, or a CUDA bucket)."""
    with torch.no_grad():
        for name, _, shape, offset, nbytes in manifest:
            if nbytes:
                t = tensors[name]
                dst[offset:offset + nbytes].view(t.dtype).view(shape).copy_(t)


def unpack(blob: torch.Tensor | np.ndarray, manifest: list) -> dict[str, torch.Tensor]:
    """A state dict whose tensors are views of ``blob`` (uint8, the layout of ``manifest``)."""
    blob, out = torch.as_tensor(blob), {}
    for name, dtype, shape, offset, nbytes in manifest:
        dt = getattr(torch, dtype)
        if not isinstance(dt, torch.dtype):
            raise WeightsError(f"unknown dtype {dtype!r} in the manifest")
        out[name] = blob[offset:offset + nbytes].view(dt).view(shape)
    return out


def _sum64(data: np.ndarray) -> int:
    """Wrapping sum of ``data`` (uint8, length a multiple of 8) as little-endian uint64 words: the
    checksum of a slot, and of each chunk of the TCP weight stream."""
    return int(data.view("<u8").sum(dtype=np.uint64)) if len(data) else 0


class WeightPublisher:
    """Learner side: publishes versions into ``slots`` round-robin segments named ``{prefix}_...``.

    One thread publishes; ``close()`` (idempotent, also run at garbage collection and interpreter
    exit) unlinks every segment it created. ``cuda_ipc=False`` sends CUDA tensors through shm too.
    """

    def __init__(self, prefix: str, slots: int = 2, checksum: bool = False, cuda_ipc: bool = True):
        if not prefix or "/" in prefix or slots < 1:
            raise ValueError("prefix must be a non-empty name without '/', slots >= 1")
        self.prefix, self.slots, self.checksum, self.cuda_ipc = prefix, slots, checksum, cuda_ipc
        self._segments: dict[int, SharedMemory] = {}
        self._sizes: dict[int, int] = {}
        self._buckets: dict[int, tuple[torch.Tensor, dict]] = {}  # slot -> (CUDA bucket, its IPC handle)
        self._next = 0
        self._created = 0
        self._finalizer = weakref.finalize(self, _release, self._segments, self._buckets)

    def publish(self, version: int, state_dict: dict[str, torch.Tensor]) -> dict:
        """Write ``state_dict`` as ``version``; return its handle once every byte is in place."""
        if not self._finalizer.alive:
            raise RuntimeError("WeightPublisher is closed")
        if type(version) is not int or version < 0:
            raise ValueError(f"version must be an int >= 0, got {version!r}")
        tensors = {name: t.detach() for name, t in state_dict.items()}
        manifest, data_len = _layout(tensors)
        on_gpu = self.cuda_ipc and data_len > 0 and all(t.is_cuda for t in tensors.values())
        meta = msgspec.msgpack.encode(manifest)
        data_off = _align(HEADER_BYTES + len(meta))
        slot, self._next = self._next, (self._next + 1) % self.slots
        size = data_off + (0 if on_gpu else data_len)
        shm = self._segment(slot, size)
        if not (on_gpu or _lock(shm._fd, fcntl.LOCK_EX)):  # a reader's views still hold it: leave them that segment
            self._sizes.pop(slot), self._buckets.pop(slot, None)
            shm = self._segment(slot, size)
        fcntl.flock(shm._fd, fcntl.LOCK_EX)  # a CUDA reader holds its slot only while it clones the bucket
        buf = shm.buf
        seq = struct.unpack_from("<Q", buf, SEQ_OFFSET)[0] + 1  # odd while being written
        struct.pack_into("<Q", buf, SEQ_OFFSET, seq)
        buf[HEADER_BYTES:HEADER_BYTES + len(meta)] = meta
        checksum, flags = 0, 0
        if on_gpu:
            bucket, ipc = self._bucket(slot, data_len, next(iter(tensors.values())).device)
            _pack(bucket, manifest, tensors)
            torch.cuda.synchronize(bucket.device)  # the bytes are complete before the slot is unlocked
            handle_extra, flags = {"ipc": ipc}, flags | FLAG_CUDA
        else:
            handle_extra = {}
            data = np.frombuffer(buf, np.uint8, count=data_len, offset=data_off)
            _pack(torch.from_numpy(data), manifest, tensors)
            if self.checksum:
                checksum, flags = _sum64(data), flags | FLAG_CHECKSUM
            del data  # a live export of shm.buf would block closing the segment
        HEADER.pack_into(buf, 0, MAGIC, seq, version, len(meta), data_len, checksum, flags)
        struct.pack_into("<Q", buf, SEQ_OFFSET, seq + 1)  # even again: the version is complete
        fcntl.flock(shm._fd, fcntl.LOCK_UN)  # (an exception above leaves the slot locked and odd)
        return {"kind": "cuda_ipc" if on_gpu else "shm", "name": shm.name, "version": version,
                "nbytes": data_len, "host": socket.gethostname(), **handle_extra}

    def _segment(self, slot: int, size: int) -> SharedMemory:
        """The slot's segment, re-created under a new name when the needed size changed (or a reader
        holds it: ``publish`` forgets its size)."""
        if self._sizes.get(slot) == size:
            return self._segments[slot]
        if slot in self._segments:
            _unlink(self._segments.pop(slot))  # readers keep their mapping and views; then StaleWeights
        self._created += 1
        name = f"{self.prefix}_{os.getpid()}_{slot}_{self._created}"
        self._segments[slot] = SharedMemory(name=name, create=True, size=size)
        self._sizes[slot] = size
        return self._segments[slot]

    def _bucket(self, slot: int, nbytes: int, device: torch.device) -> tuple[torch.Tensor, dict]:
        """The slot's CUDA bucket and its msgpack-able IPC handle, (re)allocated when the size changed."""
        if slot in self._buckets and self._buckets[slot][0].numel() == nbytes \
                and self._buckets[slot][0].device == device:
            return self._buckets[slot]
        self._buckets[slot] = hook("cuda.share_bucket")(nbytes, device)
        return self._buckets[slot]

    def close(self) -> None:
        """Unlink every segment this publisher created and drop its CUDA buckets (idempotent)."""
        self._finalizer()


def _unlink(shm: SharedMemory) -> None:
    try:
        shm.close()
    except BufferError:
        pass  # a view of the mapping is still alive somewhere; unlinking the name is what matters
    try:
        shm.unlink()
    except FileNotFoundError:  # cleanup_prefix got there first; keep the tracker from warning at exit
        resource_tracker.unregister(shm._name, "shared_memory")


def _release(segments: dict[int, SharedMemory], buckets: dict[int, tuple[torch.Tensor, dict]]) -> None:
    buckets.clear()
    for shm in segments.values():
        _unlink(shm)
    segments.clear()


def load_weights(handle: dict, retries: int = 3, device: int | None = None) -> dict[str, torch.Tensor]:
    """The state dict that ``handle`` announces. Raises StaleWeights, TornRead or WeightsError.

    "shm": views of the segment, which keep it from being rewritten while any of them is alive (drop
    them once copied; ``.clone()`` what must outlive that or be changed: they map the slot itself, so a write
    reaches every reader of this version, until the writer replaces it).
    "cuda_ipc": views of one private clone on the GPU. ``device`` overrides the CUDA device index recorded
    in a "cuda_ipc" handle.
    """
    blob, manifest, _, lock = _load(handle, retries, device)
    if isinstance(blob, np.ndarray):  # the views keep the array alive; the lock goes with the last of them
        weakref.finalize(blob, lock.close)
    else:
        lock.close()
    return unpack(blob, manifest)


def load_raw(handle: dict, chunk_bytes: int, retries: int = 3) -> tuple[list, np.ndarray, int, np.ndarray]:
    """A private CPU copy of the version's bytes as its slot holds them: (manifest, uint8 data, checksum,
    the ``_sum64`` of each ``chunk_bytes`` chunk (uint64; they add up to the checksum)).

    What the TCP weight stream serves (flux/integrations/remote/weight_stream.py); ``unpack`` turns the pair back into a
    state dict. The checksum is the learner's, verified here (computed here for CUDA slots).
    """
    blob, manifest, checksum, lock = _load(handle, retries, None)
    with lock:
        data = blob.copy() if isinstance(blob, np.ndarray) else blob.cpu().numpy()
    sums = np.array([_sum64(data[i:i + chunk_bytes]) for i in range(0, len(data), chunk_bytes)], np.uint64)
    return manifest, data, int(sums.sum(dtype=np.uint64)) if checksum is None else checksum, sums


def _lock(fd: int, kind: int) -> bool:
    """``flock`` without waiting: False if another open file holds a conflicting lock."""
    try:
        return fcntl.flock(fd, kind | fcntl.LOCK_NB) is None
    except BlockingIOError:
        return False


def _load(handle: dict, retries: int, device: int | None) -> tuple:
    """(blob, manifest, the slot's checksum or None, the open segment holding a shared lock) of the
    version ``handle`` announces; blob is a uint8 array viewing this process's mapping of the segment, or
    a clone of its CUDA bucket. The caller closes the segment (so unlocks it) once done with blob."""
    name, version, kind = handle.get("name"), handle.get("version"), handle.get("kind")
    if kind not in ("shm", "cuda_ipc") or type(name) is not str or "/" in name or name in ("", ".", ".."):
        raise WeightsError(f"not a loadable weights handle: kind={kind!r} name={name!r}")
    for attempt in range(retries + 1):
        try:
            f = open(os.path.join(SHM_DIR, name), "rb", buffering=0)
        except FileNotFoundError:
            raise StaleWeights(f"{name} is gone: version {version} was replaced") from None
        try:
            return (*_read(f.fileno(), name, handle, device), f)
        except BaseException as e:
            f.close()
            if not isinstance(e, TornRead) or attempt == retries:
                raise
        time.sleep(0.001 * (attempt + 1))


_maps: dict[tuple[str, int], mmap.mmap] = {}  # (segment name, inode) -> this process's mapping of it


def _mapping(name: str, fd: int) -> mmap.mmap:
    """This process's mapping of segment ``fd`` (shared: each version the writer puts there is what it
    reads), kept across versions so its pages are faulted in once; mappings of replaced segments are dropped."""
    key = (name, os.fstat(fd).st_ino)
    for old in [k for k in list(_maps) if k != key]:
        with suppress(FileNotFoundError):
            if os.stat(os.path.join(SHM_DIR, old[0])).st_ino == old[1]:
                continue
        _maps.pop(old, None)  # its segment was replaced; views still alive keep their pages mapped
    if (m := _maps.get(key)) is None:  # from a file of its own: mmap keeps a dup of the fd (and lock)
        with open(f"/proc/self/fd/{fd}", "rb+") as f:
            m = _maps[key] = mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return m


def _read(fd: int, name: str, handle: dict, device: int | None) -> tuple:
    if not _lock(fd, fcntl.LOCK_SH):
        raise TornRead("the slot is being written")
    raw = os.pread(fd, HEADER.size, 0)
    if len(raw) < HEADER.size or raw[:8] != MAGIC:
        raise WeightsError("not a Flux weights segment")
    _, seq, version, meta_len, data_len, checksum, flags = HEADER.unpack(raw)
    if seq % 2:
        raise TornRead("the slot was left half-written")
    if version != handle["version"]:
        raise StaleWeights(f"the slot holds version {version}, not {handle['version']}")
    data_off, on_gpu = _align(HEADER_BYTES + meta_len), bool(flags & FLAG_CUDA)
    if on_gpu != (handle["kind"] == "cuda_ipc") or data_off + (0 if on_gpu else data_len) > os.fstat(fd).st_size:
        raise WeightsError("the segment does not match its header or handle")
    meta = os.pread(fd, meta_len, HEADER_BYTES)
    if on_gpu:
        try:
            blob = hook("cuda.open_bucket")(handle["ipc"], device).clone()
            torch.cuda.synchronize(blob.device)  # the copy must be over before the lock is released
        except RuntimeError as e:  # a resized slot frees its old bucket
            if os.fstat(fd).st_nlink == 0:
                raise StaleWeights("the slot moved on while opening its CUDA bucket") from e
            raise
    else:
        blob = np.frombuffer(_mapping(name, fd), np.uint8, data_len, data_off)
    if flags & FLAG_CHECKSUM and _sum64(blob) != checksum:
        raise TornRead("checksum mismatch")
    return blob, msgspec.msgpack.decode(meta), (checksum if flags & FLAG_CHECKSUM else None)


def cleanup_prefix(prefix: str) -> list[str]:
    """Unlink every segment in /dev/shm whose name starts with ``prefix`` (leftovers of a crashed run)."""
    if not prefix or "/" in prefix:
        raise ValueError("prefix must be a non-empty name without '/'")
    removed = []
    for name in sorted(os.listdir(SHM_DIR)) if os.path.isdir(SHM_DIR) else []:
        if name.startswith(prefix):
            with suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, name))
                removed.append(name)
    return removed
