"""New weights for an SGLang server, in the wire formats of its two update endpoints.

Both paths cut the state dict into *flattened buckets*: tensors of one dtype, concatenated into one 1-D
tensor of at most `max_bytes` (one oversized tensor makes a bucket of its own), with per-tensor metadata
(name, shape, dtype, start/end element index). One dtype per bucket because SGLang rebuilds a bucket by
slicing and reshaping its flat tensor, and because its receiving side of a broadcast builds the flat
tensor with `torch.cat` of empty tensors of the announced dtypes.

- `/update_weights_from_tensor` (`load_format: "flattened_bucket"`): each bucket is pickled as
  `{"flattened_tensor": flat, "metadata": [...]}` and base64-encoded. CUDA tensors travel as CUDA IPC
  handles (torch's `ForkingPickler` reductions: the server maps the sender's memory, zero copy), so
  the server must be on the same node and see the GPU under the same device index. CPU tensors travel
  by value (plain pickle), which is how CPU tests reach a mock server. Metadata entries are
  `types.SimpleNamespace`: SGLang reads them by attribute, and its restricted unpickler admits
  `types.*` and `torch.*`, so no SGLang class (and no `import sglang`) is needed to build the payload.
- `/update_weights_from_distributed`: the bucket's names/dtypes/shapes go over HTTP while the flat
  tensor is broadcast from rank 0 of a process group the server joined through
  `/init_weights_update_group` (`WeightGroup`).
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
    """One 1-D tensor holding every tensor of `bucket` (one dtype), and SGLang's per-tensor metadata."""
    if not bucket:
        raise ValueError("cannot flatten an empty bucket")
    dtypes = {t.dtype for _, t in bucket}
    if len(dtypes) != 1:
        raise ValueError(f"a flattened bucket holds one dtype, got {sorted(map(str, dtypes))}")
    metadata, start = [], 0
    for name, t in bucket:
        metadata.append(types.SimpleNamespace(name=name, shape=t.shape, dtype=t.dtype, start_idx=start,
                                              end_idx=start + t.numel(), numel=t.numel()))
        start += t.numel()
    # Always a fresh tensor: a view would drag its whole storage along (pickle sends storages whole).
    return torch.cat([t.reshape(-1) for _, t in bucket]), metadata


def serialize(flat: torch.Tensor, metadata: list[types.SimpleNamespace]) -> str:
    """A flattened bucket as one base64 string of `serialized_named_tensors` (see the module docstring).

    With CUDA tensors the caller must keep `flat` alive until the server has answered.
    """
    buf = io.BytesIO()
    payload = {"flattened_tensor": flat, "metadata": metadata}
    if flat.is_cuda:
        from multiprocessing.reduction import ForkingPickler

        import torch.multiprocessing  # noqa: F401  (registers the CUDA IPC reductions with ForkingPickler)

        ForkingPickler(buf).dump(payload)
    else:
        pickle.Pickler(buf).dump(payload)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def tensor_requests(state: Mapping[str, torch.Tensor], version: int, *, max_bytes: int, tp_size: int
                    ) -> Iterable[tuple[dict, torch.Tensor]]:
    """`/update_weights_from_tensor` bodies, one per bucket, each with the flat tensor it refers to.

    Only the last body carries `weight_version`: the server's version moves once every byte is in.
    `flush_cache` is always false; the engine flushes the radix cache itself, when no request is pending
    (SGLang asserts that a flush after an update succeeds, which a paused in-place request would break).
    Every TP rank gets the same payload: each one opens it and keeps its own shard.
    """
    groups = buckets(state, max_bytes)
    for i, bucket in enumerate(groups):
        flat, metadata = flatten(bucket)
        body = {"serialized_named_tensors": [serialize(flat, metadata)] * tp_size,
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
        timeout = timedelta(seconds=timeout_s)
        store, rank, world_size = next(rendezvous(f"tcp://{host}:{port}", 0, world_size, timeout=timeout))
        store.set_timeout(timeout)
        store = PrefixStore(group_name, store)
        self.group, _ = _new_process_group_helper(world_size, rank, [], Backend(backend), store,
                                                  group_name=group_name, timeout=timeout)
        _world.pg_group_ranks[self.group] = {i: i for i in range(world_size)}

    def broadcast(self, flat: torch.Tensor) -> None:
        if self.backend == "nccl" and not flat.is_cuda:
            flat = flat.cuda()
        torch.distributed.broadcast(flat, src=0, group=self.group)

    def close(self) -> None:
        if self.group is not None:
            torch.distributed.destroy_process_group(self.group)
            self.group = None
