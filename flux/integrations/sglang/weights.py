"""New weights for an SGLang server, in the wire formats of its two update endpoints (SGLang 0.5.23).

Both paths cut the state dict into *flattened buckets*, SGLang's `FlattenedTensorBucket`
(sglang/srt/weight_sync/tensor_bucket.py): the tensors' bytes concatenated into one 1-D **uint8**
tensor of at most `max_bytes` (one oversized tensor makes a bucket of its own), with per-tensor metadata
(name, shape, dtype, start/end *byte* offset, byte count). The receiver slices the bytes and views them
as each dtype, so an offset must be a multiple of its dtype's size: a bucket holds one dtype, which keeps
every offset aligned without padding (the receiving side of a broadcast computes the offsets itself,
from the names, dtypes and shapes, with no room for padding).

- `/update_weights_from_tensor` (`load_format: "flattened_bucket"`): each bucket is pickled as
  `{"flattened_tensor": flat, "metadata": [...]}` and base64-encoded, **once per TP rank**: every rank
  opens only its own copy (`tp_worker.deserialize_own_rank`), and with CUDA tensors each copy holds its
  own IPC reference counts. CUDA tensors travel as CUDA IPC handles (torch's `ForkingPickler` reductions:
  the server maps the sender's memory, zero copy) naming the GPU by UUID, not by index, as SGLang's
  `monkey_patch_torch_reductions()` does: the server resolves the UUID against the GPUs it sees, so the
  two processes may see different `CUDA_VISIBLE_DEVICES`. CPU tensors travel by value (plain pickle),
  which is how CPU tests reach a mock server. Metadata entries are `types.SimpleNamespace`: SGLang reads
  them by attribute and its `SafeUnpickler` admits `types.SimpleNamespace`, `torch.Size` and the dtypes,
  so no SGLang class (and no `import sglang`) is needed to build the payload.
- `/update_weights_from_distributed`: the bucket's names/dtypes/shapes go over HTTP while its uint8 bytes
  are broadcast from rank 0 of a process group the server joined through `/init_weights_update_group`
  (`WeightGroup`); the server receives into a uint8 buffer of the same byte size.

Either call must run inside a weight-update session (`/begin_weight_update` ... `/end_weight_update`);
the engine opens and closes it (flux/integrations/sglang/engine.py).
"""

from __future__ import annotations

import base64
import io
import pickle
import types
from collections.abc import Iterable, Mapping
from datetime import timedelta

import torch

Bucket = list[tuple[str, torch.Tensor]]


def buckets(state: Mapping[str, torch.Tensor], max_bytes: int) -> list[Bucket]:
    """Group a state dict into flattened-bucket inputs: one dtype each, at most `max_bytes` each.

    Order is kept within a dtype (state-dict order), so a model's load_weights sees tensors in the
    order it would read them from a checkpoint.
    """
    if max_bytes < 1:
        raise ValueError(f"max_bytes must be >= 1, got {max_bytes}")
    open_: dict[torch.dtype, tuple[Bucket, int]] = {}
    out: list[Bucket] = []
    for name, tensor in state.items():
        tensor = tensor.detach()
        nbytes = tensor.numel() * tensor.element_size()
        current, size = open_.get(tensor.dtype, ([], 0))
        if current and size + nbytes > max_bytes:
            out.append(current)
            current, size = [], 0
        current.append((name, tensor))
        open_[tensor.dtype] = (current, size + nbytes)
    out.extend(b for b, _ in open_.values() if b)
    return out


def flatten(bucket: Bucket) -> tuple[torch.Tensor, list[types.SimpleNamespace]]:
    """The bytes of every tensor of `bucket` (one dtype) as one uint8 tensor, and SGLang's per-tensor
    metadata (byte offsets), as `FlattenedTensorBucket(named_tensors=...)` builds them."""
    if not bucket:
        raise ValueError("cannot flatten an empty bucket")
    dtypes = {t.dtype for _, t in bucket}
    if len(dtypes) != 1:
        raise ValueError(f"a flattened bucket holds one dtype, got {sorted(map(str, dtypes))}")
    metadata, start = [], 0
    for name, t in bucket:
        nbytes = t.numel() * t.element_size()
        metadata.append(types.SimpleNamespace(name=name, shape=t.shape, dtype=t.dtype, start_idx=start,
                                              end_idx=start + nbytes, numel=nbytes))
        start += nbytes
    # Always a fresh tensor: a view would drag its whole storage along (pickle sends storages whole).
    return torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for _, t in bucket]), metadata


def unflatten(flat: torch.Tensor, metadata) -> list[tuple[str, torch.Tensor]]:
    """The inverse of `flatten` (SGLang's `FlattenedTensorBucket.reconstruct_tensors`): views, no copy."""
    return [(m.name, flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape)) for m in metadata]


# The position of the device index in the arguments of torch's `rebuild_cuda_tensor` (torch's
# reductions.reduce_tensor; SGLang's utils/patch_torch.py relies on the same position).
_CUDA_DEVICE_ARG = 6


def _reduce_cuda_tensor_by_uuid(tensor: torch.Tensor):
    """torch's IPC reduction of a tensor, naming its GPU by UUID (SGLang's `_reduce_tensor_modified`).

    Only a CUDA tensor's reduction has a device argument: a CPU tensor's is left as it is (the
    IndexError verl once hit on CPU tensors)."""
    from torch.multiprocessing import reductions

    rebuild, args = reductions.reduce_tensor(tensor)
    if tensor.is_cuda and len(args) > _CUDA_DEVICE_ARG and isinstance(args[_CUDA_DEVICE_ARG], int):
        uuid = str(torch.cuda.get_device_properties(args[_CUDA_DEVICE_ARG]).uuid)
        args = (*args[:_CUDA_DEVICE_ARG], uuid, *args[_CUDA_DEVICE_ARG + 1:])
    return rebuild, args


def serialize(flat: torch.Tensor, metadata: list[types.SimpleNamespace]) -> str:
    """A flattened bucket as one base64 string of `serialized_named_tensors` (see the module docstring).

    With CUDA tensors the caller must keep `flat` alive until the server has answered.
    """
    buf = io.BytesIO()
    payload = {"flattened_tensor": flat, "metadata": metadata}
    if flat.is_cuda:
        from multiprocessing.reduction import ForkingPickler

        import torch.multiprocessing  # noqa: F401  (registers the CUDA IPC reductions with ForkingPickler)

        pickler = ForkingPickler(buf)
        pickler.dispatch_table[torch.Tensor] = _reduce_cuda_tensor_by_uuid  # this pickler only
        pickler.dump(payload)
    else:
        pickle.Pickler(buf).dump(payload)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def tensor_requests(state: Mapping[str, torch.Tensor], version: int, *, max_bytes: int, tp_size: int
                    ) -> Iterable[tuple[dict, torch.Tensor]]:
    """`/update_weights_from_tensor` bodies, one per bucket, each with the flat tensor it refers to.

    Only the last body carries `weight_version`: the server's version moves once every byte is in.
    `flush_cache` is always false; the engine flushes the radix cache itself, when no request is pending
    (a flush the server refuses fails the update call, which a paused in-place request would cause).
    Every TP rank gets a serialization of its own (each opens only its own, and keeps its shard).
    """
    groups = buckets(state, max_bytes)
    for i, bucket in enumerate(groups):
        flat, metadata = flatten(bucket)
        body = {"serialized_named_tensors": [serialize(flat, metadata) for _ in range(tp_size)],
                "load_format": "flattened_bucket", "flush_cache": False}
        if i == len(groups) - 1:
            body["weight_version"] = str(version)
        yield body, flat


def distributed_request(bucket: Bucket, *, group_name: str) -> dict:
    """The `/update_weights_from_distributed` body announcing one bucket (the tensor goes by broadcast)."""
    return {"names": [n for n, _ in bucket], "dtypes": [str(t.dtype).removeprefix("torch.") for _, t in bucket],
            "shapes": [list(t.shape) for _, t in bucket], "group_name": group_name,
            "load_format": "flattened_bucket", "flush_cache": False}


class WeightGroup:
    """Rank 0 (the sender) of the process group an SGLang server joins via `/init_weights_update_group`.

    Built the way SGLang builds its side (a TCP rendezvous at `host:port`, the store prefixed with the
    group name, a group that is not torch.distributed's default one), so the two ends meet. Rank 0 hosts
    the rendezvous store, so `host` must be an address of this machine that the server can reach.
    """

    def __init__(self, *, host: str, port: int, world_size: int, group_name: str, backend: str,
                 timeout_s: float = 300.0):
        from torch.distributed.distributed_c10d import (
            Backend,
            PrefixStore,
            _new_process_group_helper,
            _world,
            rendezvous,
        )

        self.backend, self.group_name = backend, group_name
        # The GPU of the thread that builds the group: a broadcast from another thread (whose current
        # device is cuda:0) must still send from here.
        self.device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else None
        timeout = timedelta(seconds=timeout_s)
        address = f"[{host}]" if ":" in host else host  # an IPv6 address in brackets, as SGLang writes it
        store, rank, world_size = next(rendezvous(f"tcp://{address}:{port}", 0, world_size, timeout=timeout))
        store.set_timeout(timeout)
        store = PrefixStore(group_name, store)
        self.group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store,
                                                  group_name=group_name, timeout=timeout)
        _world.pg_group_ranks[self.group] = {i: i for i in range(world_size)}

    def broadcast(self, flat: torch.Tensor) -> None:
        """Send one flattened bucket (uint8, as the receiver allocates it) to every rank of the group."""
        if flat.dtype != torch.uint8:
            raise ValueError(f"a broadcast bucket is uint8 bytes, got {flat.dtype}")
        if self.device is not None:
            torch.cuda.set_device(self.device)
            flat = flat.to(self.device)
        torch.distributed.broadcast(flat, src=0, group=self.group)

    def close(self) -> None:
        if self.group is not None:
            torch.distributed.destroy_process_group(self.group)
            self.group = None
