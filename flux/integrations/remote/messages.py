"""The messages of remote generators (net.remote): joining a run over its CURVE endpoint, and fetching
weights from the weight server. Defined on flux.run.protocol's base, so the same codec sends and checks
them; a process decodes them once this module is imported (the remote side, the weight fetcher).
"""

from typing import ClassVar, NotRequired, TypedDict

import numpy as np

from flux.run.protocol import Map, Message, NonNeg, Port, Positive, _require


class Ports(TypedDict):
    """``RunInfo.ports``: the run's other TCP endpoints on the host a remote generator connected to."""
    pub: Port
    pull: Port
    weights: Port
    learners: NotRequired[Port]  # rank 0's torch.distributed store, for learner ranks joining (learner.local_ranks)


TensorEntry = tuple[str, str, list[NonNeg], NonNeg, NonNeg]  # WeightManifest: name, dtype, shape, offset, nbytes


class RunInfoRequest(Message):
    """Remote generator (or a learner rank joining, ``learner``) -> controller (its CURVE ROUTER), before
    registering: what does this run need?"""
    name: str
    host: str
    learner: bool = False  # a learner rank (`flux learner --join`): no generator name, no weight-stream token


class RunInfo(Message):
    """Controller -> remote generator: the run's resolved config and its other CURVE endpoints.

    ``name`` is the requested name, made unique in the run (register under it). ``ports`` holds the TCP
    ports of ``pub`` (controller PUB), ``pull`` (buffer PULL) and ``weights`` (weight server) on the host
    the generator connected to. ``model_path`` is the model directory on the controller's machine and
    ``prompts_digest`` the sha256 of the run's prompt records: a remote copy must match it.
    ``weights_token`` is this generator's pass to an unencrypted weight stream (net.weight_stream: plain;
    empty with CURVE).
    """
    run_id: str
    name: str
    version: NonNeg
    model_path: str
    num_prompts: NonNeg
    prompts_digest: str
    config: Map
    ports: Ports
    weights_token: str
    resume_from: str = ""  # the checkpoint a resumed run started from (a joining learner rank loads it too)
    run_dir: str = ""  # the run directory (megatron's joined TP/PP ranks write their optimizer files there)

    def validate(self) -> None:
        _require(bool(self.name), "empty name")


class WeightFetch(Message):
    """Generator -> weight server: chunks [first, first + count) of ``version``; count 0 asks for its
    WeightManifest. Resuming after a dropped connection is asking again from the first missing chunk.
    ``token``: the generator's RunInfo.weights_token (an unencrypted stream serves no one without one)."""
    version: NonNeg
    first: NonNeg
    count: NonNeg
    token: str = ""


class WeightManifest(Message):
    """Weight server -> generator: version ``version`` is ``nbytes`` of data in ``n_chunks`` chunks of
    ``chunk_bytes`` (the last may be shorter). ``checksum`` is the learner's wrapping uint64 sum of the
    data words (weights.py); ``tensors`` the layout [[name, dtype, shape, offset, nbytes], ...]."""
    version: NonNeg
    nbytes: NonNeg
    chunk_bytes: Positive
    n_chunks: NonNeg
    checksum: NonNeg  # MessagePack's ints stop at 2**64 - 1
    tensors: list[TensorEntry]

    def validate(self) -> None:
        _require(self.chunk_bytes >= 8 and self.chunk_bytes % 8 == 0 and self.nbytes % 8 == 0,
                 "chunk_bytes and nbytes must be multiples of 8 (checksums sum 64-bit words)")
        _require(self.n_chunks == -(-self.nbytes // self.chunk_bytes), "n_chunks != ceil(nbytes / chunk_bytes)")
        _require(all(t[3] + t[4] <= self.nbytes for t in self.tensors), "a tensor lies outside the data")


class WeightChunk(Message):
    """Weight server -> generator: chunk ``index`` of ``version``; ``checksum`` is the wrapping uint64 sum
    of its 64-bit words. Shape: data (chunk_bytes,), or shorter for the last chunk."""
    ARRAYS: ClassVar[dict[str, str]] = {"data": "|u1"}
    version: NonNeg
    index: NonNeg
    checksum: NonNeg  # MessagePack's ints stop at 2**64 - 1
    data: np.ndarray

    def validate(self) -> None:
        _require(len(self.data) >= 8 and len(self.data) % 8 == 0, "a chunk is a non-empty run of 64-bit words")


class WeightUnavailable(Message):
    """Weight server -> generator: it cannot serve ``version`` (superseded, or not announced yet);
    ``newest`` is the newest version it knows of (0: none)."""
    version: NonNeg
    newest: NonNeg
    reason: str
