"""CUDA IPC for the shared-memory weight path (flux/run/weights.py): a learner's per-slot GPU bucket is
shared once with `reduce_tensor` and opened by each local generator with `rebuild_cuda_tensor`; the
handle is a plain msgpack-able dict, announced with every version that lives in the bucket."""

from __future__ import annotations

import torch


def share_bucket(nbytes: int, device: torch.device) -> tuple[torch.Tensor, dict]:
    """A new uint8 bucket of `nbytes` on `device`, and the IPC handle that opens it in another process."""
    from torch.multiprocessing.reductions import reduce_tensor

    bucket = torch.empty(nbytes, dtype=torch.uint8, device=device)
    _, args = reduce_tensor(bucket)  # the positional arguments of rebuild_cuda_tensor, named below
    keys = ("cls", "size", "stride", "offset", "storage_cls", "dtype", "device", "handle", "storage_size",
            "storage_offset", "requires_grad", "ref_counter_handle", "ref_counter_offset", "event_handle",
            "event_sync")
    ipc = dict(zip(keys, args))
    ipc.update(size=list(ipc["size"]), stride=list(ipc["stride"]),
               storage_cls=ipc["storage_cls"].__name__)
    del ipc["cls"], ipc["dtype"], ipc["requires_grad"]  # always torch.Tensor, uint8, False
    return bucket, ipc


_opened: dict[tuple, torch.Tensor] = {}  # (IPC handle, where in its block, device) -> the open bucket
KEEP_OPEN = 4  # a learner has `slots` buckets (2); a resized slot's old bucket ages out


def open_bucket(ipc: dict, device: int | None) -> torch.Tensor:
    """The bucket a `share_bucket` handle names, mapped into this process (on `device` if given). A
    bucket stays open across the versions written into it: opening one (cudaIpcOpenMemHandle) costs
    milliseconds, and the learner rewrites the same two buckets in place."""
    key = (bytes(ipc["handle"]), ipc["storage_offset"], ipc["offset"], tuple(ipc["size"]), device)
    if (bucket := _opened.get(key)) is None:
        while len(_opened) >= KEEP_OPEN:
            _opened.pop(next(iter(_opened)))
        bucket = _opened[key] = _rebuild(ipc, device)
    return bucket


def _rebuild(ipc: dict, device: int | None) -> torch.Tensor:
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    storage_cls = {"TypedStorage": torch.storage.TypedStorage, "UntypedStorage": torch.UntypedStorage}
    return rebuild_cuda_tensor(
        torch.Tensor, torch.Size(ipc["size"]), tuple(ipc["stride"]), ipc["offset"],
        storage_cls[ipc["storage_cls"]], torch.uint8, ipc["device"] if device is None else device,
        ipc["handle"], ipc["storage_size"], ipc["storage_offset"], False, ipc["ref_counter_handle"],
        ipc["ref_counter_offset"], ipc["event_handle"], ipc["event_sync"])
