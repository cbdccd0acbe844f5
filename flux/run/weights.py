"""Versioned weight publication from the learner to generators on the same host.

``WeightPublisher.publish(version, state_dict)`` writes one of ``slots`` POSIX shared-memory segments,
round-robin, and returns a small msgpack-able handle to announce (``NewVersion``) once it returns;
``load_weights(handle)`` copies that version out in another process. Segment layout:

    [0, 64)          header: magic, seqlock counter, version, manifest length, data length, checksum, flags
    [64, D)          msgpack manifest [[name, dtype, shape, offset, nbytes], ...]; D = align64(64 + length)
    [D, D + data)    tensor bytes, each tensor at a 64-byte aligned offset (relative to D)

Writer and readers follow a seqlock: the writer makes the counter odd, writes, then makes it even; a
reader accepts its copy only if the counter was even and unchanged across the copy and the version is
the one it was asked for, so it never returns a torn or wrong-version state dict. The optional checksum
(a wrapping sum of the data as uint64 words, ~2x memcpy speed where crc32 is ~0.4x) guards against
what the seqlock cannot see: bytes corrupted in place, or stores reordered on weakly ordered CPUs.

With CUDA tensors the bytes stay on the GPU: each slot owns a uint8 bucket with the same layout, shared
once through CUDA IPC (``reduce_tensor``) and rewritten in place by later versions; the segment then
holds only the header and manifest, and the same seqlock guards the bucket (the writer makes the
counter odd before launching its copies and even after synchronizing; the reader synchronizes its
clone before re-reading the counter). Persistent buckets also keep torch's IPC reference counting
(one consumer per share) out of the way: a broadcast handle is opened by any number of readers, so a
per-version bucket could never be freed. The learner holds ``slots`` extra copies of the weights.

Readers open ``/dev/shm/<name>`` directly (Linux): no ``SharedMemory`` attach, so the resource tracker
never learns about (and never unlinks) segments it does not own. The writer's segments are registered
with it, which unlinks them if the learner dies without ``close()``; ``cleanup_prefix`` catches the rest.
"""
import os
import socket
import struct
import time
import weakref
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


def _unpack(blob: torch.Tensor, manifest: list) -> dict[str, torch.Tensor]:
    """Tensors as views of the private uint8 ``blob``: they own their memory, one storage for all."""
    out = {}
    for name, dtype, shape, offset, nbytes in manifest:
        dt = getattr(torch, dtype)
        if not isinstance(dt, torch.dtype):
            raise WeightsError(f"unknown dtype {dtype!r} in the manifest")
        out[name] = blob[offset:offset + nbytes].view(dt).view(shape)
    return out


def _sum64(data: np.ndarray) -> int:
    """Wrapping sum of ``data`` (uint8, length a multiple of 8) as little-endian uint64 words."""
    return int(data.view("<u8").sum(dtype=np.uint64)) if len(data) else 0


# Checksums are summed block by block right after each block is copied, while it is still in cache:
# a separate pass over a few hundred MB would read it all back from memory (~30% of a publish or load).
BLOCK = 2**22
MASK64 = 2**64 - 1


def _pack_summed(data: np.ndarray, manifest: list[list], tensors: dict[str, torch.Tensor]) -> int:
    """``_pack`` into the CPU buffer ``data`` (uint8), returning ``_sum64(data)`` computed on the way."""
    dst, total, summed = torch.from_numpy(data), 0, 0
    with torch.no_grad():
        for name, _, _, offset, nbytes in manifest:
            flat = tensors[name].reshape(-1).view(torch.uint8) if nbytes else None
            for a in range(0, nbytes, BLOCK):
                b = min(nbytes, a + BLOCK)
                dst[offset + a:offset + b].copy_(flat[a:b])
                end = (offset + b) // 8 * 8
                if end > summed:
                    total, summed = (total + _sum64(data[summed:end])) & MASK64, end
    return (total + _sum64(data[summed:])) & MASK64


class WeightPublisher:
    """Learner side: publishes versions into ``slots`` round-robin segments named ``{prefix}_...``.

    One thread publishes; ``close()`` (idempotent, also run at garbage collection and interpreter
    exit) unlinks every segment it created. ``cuda_ipc=False`` sends CUDA tensors through shm too.
    """

    def __init__(self, prefix: str, slots: int = 2, checksum: bool = True, cuda_ipc: bool = True):
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
        shm = self._segment(slot, data_off + (0 if on_gpu else data_len))
        buf = shm.buf
        seq = struct.unpack_from("<Q", buf, SEQ_OFFSET)[0] + 1  # odd: readers of this slot back off
        struct.pack_into("<Q", buf, SEQ_OFFSET, seq)
        buf[HEADER_BYTES:HEADER_BYTES + len(meta)] = meta
        checksum, flags = 0, 0
        if on_gpu:
            bucket, ipc = self._bucket(slot, data_len, next(iter(tensors.values())).device)
            _pack(bucket, manifest, tensors)
            torch.cuda.synchronize(bucket.device)  # the bytes are complete before the counter is even
            handle_extra, flags = {"ipc": ipc}, flags | FLAG_CUDA
        else:
            handle_extra = {}
            data = np.frombuffer(buf, np.uint8, count=data_len, offset=data_off)
            if self.checksum:
                checksum, flags = _pack_summed(data, manifest, tensors), flags | FLAG_CHECKSUM
            else:
                _pack(torch.from_numpy(data), manifest, tensors)
            del data  # a live export of shm.buf would block closing the segment
        HEADER.pack_into(buf, 0, MAGIC, seq, version, len(meta), data_len, checksum, flags)
        struct.pack_into("<Q", buf, SEQ_OFFSET, seq + 1)  # even again: the version is complete
        return {"kind": "cuda_ipc" if on_gpu else "shm", "name": shm.name, "version": version,
                "nbytes": data_len, "host": socket.gethostname(), **handle_extra}

    def _segment(self, slot: int, size: int) -> SharedMemory:
        """The slot's segment, re-created under a new name when the needed size changed."""
        if self._sizes.get(slot) == size:
            return self._segments[slot]
        if slot in self._segments:
            _unlink(self._segments.pop(slot))  # readers still copying keep their mapping; then StaleWeights
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
    """Copy the state dict that ``handle`` announces. Raises StaleWeights, TornRead or WeightsError.

    Tensors are views of one private buffer (CPU for "shm", the GPU for "cuda_ipc"), so the segment may
    be reused right after; ``.clone()`` them where separate storages matter (e.g. safetensors).
    ``device`` overrides the CUDA device index recorded in a "cuda_ipc" handle.
    """
    blob, manifest, _, _ = _load(handle, retries, device, BLOCK)
    return _unpack(blob, manifest)


def load_raw(handle: dict, retries: int = 3,
             chunk_bytes: int = BLOCK) -> tuple[list, np.ndarray, int, np.ndarray]:
    """The version's bytes as its slot holds them, on the CPU: (manifest, uint8 data, checksum, the
    ``_sum64`` of each ``chunk_bytes`` chunk (uint64; they add up to the checksum)).

    What the TCP weight stream serves (flux/integrations/remote/weight_stream.py); ``unpack`` turns the pair back into a
    state dict. The checksum is the learner's, verified here (computed here for CUDA slots).
    """
    blob, manifest, checksum, sums = _load(handle, retries, None, chunk_bytes)
    data = blob.cpu().numpy()
    if sums is None:
        sums = [_sum64(data[i:i + chunk_bytes]) for i in range(0, len(data), chunk_bytes)]
    sums = np.array(sums, np.uint64)
    return manifest, data, int(sums.sum(dtype=np.uint64)) if checksum is None else checksum, sums


def unpack(data: np.ndarray, manifest: list) -> dict[str, torch.Tensor]:
    """A state dict whose tensors are views of ``data`` (uint8, the layout of ``manifest``)."""
    return _unpack(torch.from_numpy(data), manifest)


def checksum(data: np.ndarray) -> int:
    """The wrapping uint64 sum of ``data``'s 64-bit words (uint8, length a multiple of 8)."""
    return _sum64(data)


def _load(handle: dict, retries: int, device: int | None,
          block: int) -> tuple[torch.Tensor, list, int | None, list[int] | None]:
    """(private blob, manifest, the slot's checksum or None, the sum of each ``block`` bytes or None) of
    the version ``handle`` announces."""
    name, version, kind = handle.get("name"), handle.get("version"), handle.get("kind")
    if kind not in ("shm", "cuda_ipc") or type(name) is not str or "/" in name or name in ("", ".", ".."):
        raise WeightsError(f"not a loadable weights handle: kind={kind!r} name={name!r}")
    try:
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDONLY)
    except FileNotFoundError:
        raise StaleWeights(f"{name} is gone: version {version} was replaced") from None
    try:
        for attempt in range(retries + 1):
            try:
                return _read(fd, handle, device, block)
            except TornRead:
                if attempt == retries:
                    raise
                time.sleep(0.001 * (attempt + 1))
    finally:
        os.close(fd)
    raise AssertionError("unreachable")


def _header(fd: int) -> tuple:
    raw = os.pread(fd, HEADER.size, 0)
    if len(raw) < HEADER.size or raw[:8] != MAGIC:
        raise WeightsError("not a Flux weights segment")
    return HEADER.unpack(raw)


def _read(fd: int, handle: dict, device: int | None,
          block: int = BLOCK) -> tuple[torch.Tensor, list, int | None, list[int] | None]:
    _, seq, version, meta_len, data_len, checksum, flags = _header(fd)
    if seq % 2:
        raise TornRead("the slot is being written")
    if version != handle["version"]:
        raise StaleWeights(f"the slot holds version {version}, not {handle['version']}")
    data_off = _align(HEADER_BYTES + meta_len)
    on_gpu = bool(flags & FLAG_CUDA)
    stored = data_off + (0 if on_gpu else data_len)
    if on_gpu != (handle["kind"] == "cuda_ipc") or stored > os.fstat(fd).st_size:
        raise WeightsError("the segment does not match its header or handle")
    meta = os.pread(fd, meta_len, HEADER_BYTES)
    if on_gpu:
        try:
            blob = hook("cuda.open_bucket")(handle["ipc"], device).clone()
            torch.cuda.synchronize(blob.device)  # the copy must be over before the counter is re-read
        except RuntimeError as e:  # a resized slot frees its old bucket
            if _header(fd)[1] != seq:
                raise StaleWeights("the slot moved on while opening its CUDA bucket") from e
            raise
    else:
        # numpy, not torch.empty: numpy asks for transparent huge pages on big buffers (madvise), so the
        # fresh copy takes 512x fewer page faults (~3x faster for 400 MB here); torch shares the memory.
        blob = torch.from_numpy(np.empty(data_len, np.uint8))
        sums = _pread_into(fd, blob.numpy(), data_off, block if flags & FLAG_CHECKSUM else 0)
    if _header(fd)[1] != seq:
        raise TornRead("the slot was rewritten during the copy")
    if flags & FLAG_CHECKSUM and (_sum64(blob.numpy()) if on_gpu else sum(sums) & MASK64) != checksum:
        raise TornRead("checksum mismatch")
    return blob, msgspec.msgpack.decode(meta), (checksum if flags & FLAG_CHECKSUM else None), \
        (sums if flags & FLAG_CHECKSUM and not on_gpu else None)


def _pread_into(fd: int, out: np.ndarray, offset: int, block: int = 0) -> list[int]:
    """Read ``len(out)`` bytes at ``offset`` into ``out``. With ``block`` (a multiple of 8), read block by
    block and return each block's ``_sum64``, summed as it arrives (in cache); else []."""
    view, done, sums = memoryview(out), 0, []
    step = block or len(view)
    while done < len(view):  # one syscall copies up to ~2 GiB
        end = min(len(view), done + step)
        start = done
        while done < end:
            n = os.preadv(fd, [view[done:end]], offset + done)
            if n == 0:
                raise WeightsError("the segment is shorter than its header says")
            done += n
        if block:
            sums.append(_sum64(out[start:end]))
    return sums


def cleanup_prefix(prefix: str) -> list[str]:
    """Unlink every segment in /dev/shm whose name starts with ``prefix`` (leftovers of a crashed run)."""
    if not prefix or "/" in prefix:
        raise ValueError("prefix must be a non-empty name without '/'")
    removed = []
    for name in sorted(os.listdir(SHM_DIR)) if os.path.isdir(SHM_DIR) else []:
        if name.startswith(prefix):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed
