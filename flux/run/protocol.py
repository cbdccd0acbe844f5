"""Every message that travels between Flux actors, and the one validating decoder.

The conversation (socket types in capitals):

    any actor  DEALER -> controller ROUTER   Register -> Welcome, Heartbeat, AdmitRequest -> Admit,
                                             GroupDone, Published, StepReport, BufferReport, Goodbye
    controller PUB    -> every SUB           NewVersion, Control, Stop
    generator  PUSH   -> buffer PULL         TrajectoryGroup
    learner    DEALER -> buffer ROUTER       BatchRequest -> Batch
    remote generator DEALER -> controller's CURVE ROUTER   RunInfoRequest -> RunInfo, then as any generator
    remote generator DEALER -> weight server ROUTER        WeightFetch -> WeightManifest | WeightChunk...
                                                           | WeightUnavailable
    (the remote generators' messages are defined in flux/integrations/remote/messages.py, on this base)

Wire format (ZeroMQ multipart): ``[envelope | topic] header array_1 array_2 ...``

- ``header`` is MessagePack ``[PROTOCOL_VERSION, message]``; ``message`` is the msgspec Struct as a map
  tagged with its class name (``{"type": "Register", "role": ..., ...}``), each array field replaced by
  ``[dtype, length, frame]``: the index of the frame that holds its bytes.
- ``array_i`` are the raw little-endian bytes of the class's 1-D ``ARRAYS``, in declaration order. They
  are sent zero-copy and decoded with ``np.frombuffer``: decoded arrays are views of the frames.
- Envelopes follow the REQ/REP convention: a DEALER sends ``["", header, ...]``, so a ROUTER receives
  ``[identity, "", header, ...]`` and replies with the same envelope (``split_envelope``).
- A PUB sends the message TYPE as a topic frame first (``b"NewVersion"``), so a SUB can filter with
  ``sock.subscribe(b"Stop")``; ``decode`` recognises and skips it.

Field types are msgspec's: ``NonNeg`` for ids, counts, versions and steps, ``Seconds`` and
``Fraction`` (finite, bounded) floats, ``Literal`` roles; msgspec checks them on decode (an int is never
a bool) and each class's ``validate`` checks what types cannot say (lengths that must agree, handles
whose version must match). ``encode`` normalises (numpy scalars -> Python, arrays cast to their wire
dtype) and then decodes its own frames, so a bad message fails at its sender. ``decode`` trusts nothing:
on any malformed input it raises ``ProtocolError`` and nothing else.
"""
import logging
import math
import sys
import threading
import time
from typing import Annotated, Any, ClassVar, Literal, Sequence, TypedDict, Union

import msgspec
import numpy as np
import zmq
from msgspec import Meta

PROTOCOL_VERSION = 3  # 2: Admit carries its version's weights handle; 3: msgspec structs, header [v, message]
MAX_HEADER_BYTES = 16 * 2**20
MAX_FRAME_BYTES = 2**30

log = logging.getLogger("flux.run.protocol")

# Field types: msgspec checks them on decode (an int is never a bool, a float accepts an int).
_MAX = sys.float_info.max
NonNeg = Annotated[int, Meta(ge=0)]  # ids, counts, versions, steps
Positive = Annotated[int, Meta(ge=1)]
Seconds = Annotated[float, Meta(ge=0.0, le=_MAX)]  # NaN and infinity fail the bounds
Fraction = Annotated[float, Meta(ge=0.0, le=1.0)]
Map = dict[str, Any]
Role = Literal["controller", "generator", "buffer", "learner"]
Port = Annotated[int, Meta(ge=1, le=65535)]


class ProtocolError(ValueError):
    """A malformed message. ``reason`` is a short stable label (for counting), ``detail`` says more."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class Message(msgspec.Struct, tag=True, forbid_unknown_fields=True):
    """Base of every wire message: a msgspec Struct tagged with its class name (``TYPE``). ``ARRAYS``
    names its 1-D numpy array fields and their wire dtypes; they travel as frames of their own."""

    TYPE: ClassVar[str] = ""
    ARRAYS: ClassVar[dict[str, str]] = {}

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        cls.TYPE = cls.__name__
        cls.ARRAYS = {name: np.dtype(dt).str for name, dt in cls.ARRAYS.items()}
        MESSAGES[cls.TYPE] = cls
        _TOPICS.add(cls.TYPE.encode())

    def validate(self) -> None:
        """Consistency checks beyond field types; raise ProtocolError."""


MESSAGES: dict[str, type[Message]] = {}
_TOPICS: set[bytes] = set()


class Credit(TypedDict):
    """One admitted group (``Admit.groups``): its id, its prompt, and the admission token that goes back
    with it."""
    group_id: NonNeg
    prompt_index: NonNeg
    token: str


# ---------------------------------------------------------------- any actor DEALER -> controller ROUTER
class Register(Message):
    """Any actor -> controller, first message after connecting. Reply: Welcome."""
    role: Role
    name: str
    pid: NonNeg
    host: str


class Welcome(Message):
    """Controller -> a registering actor. ``weights`` is the newest weights handle (weights.py), or None."""
    run_id: str
    version: NonNeg
    weights: Map | None

    def validate(self) -> None:
        if self.weights is not None:
            _check_handle(self.weights, None)


class Heartbeat(Message):
    """Any actor -> controller, periodically (no reply). ``busy_frac`` in [0, 1]."""
    role: Role
    name: str
    busy_frac: Fraction
    stats: Map


class AdmitRequest(Message):
    """Generator -> controller: may I start up to ``max_groups`` prompt groups? Reply: Admit."""
    name: str
    max_groups: Positive


class Admit(Message):
    """Controller -> generator: credits, each ``{"group_id": int, "prompt_index": int, "token": str}``;
    [] = retry later. The token (``flux.control.admission.admission_token``) goes back with the group, so the buffer
    can tell that it was admitted, to that generator, with that many samples.

    ``version`` is the controller's policy version: the generator must run these groups on weights at
    least that new (in sync mode this is what makes every trained token lag 0). ``weights`` is that
    version's handle (as in Welcome), so a generator that missed its NewVersion broadcast (a PUB drops
    what it sends before a SUB has joined) can still fetch it instead of waiting forever.
    """
    groups: list[Credit]
    version: NonNeg = 0
    weights: Map | None = None

    def validate(self) -> None:
        if self.weights is not None:
            _check_handle(self.weights, None)
        _require(len({g["group_id"] for g in self.groups}) == len(self.groups), "duplicate group_id")


class GroupDone(Message):
    """Generator -> controller: group ``group_id`` (``n_samples`` samples) will never reach the buffer, for
    the ``dropped`` reason (e.g. ``reward_failed``), or ``requeue``: it was lost with its engine (a server
    that died) and its prompt goes back to the queue. Either way its credit comes back. (A pushed group
    needs no word from its generator: the buffer reports what it received. One with neither is ignored.)"""
    name: str
    group_id: NonNeg
    n_samples: Positive
    dropped: str = ""
    requeue: bool = False


class Published(Message):
    """Learner -> controller: version ``version`` is complete at ``weights`` (a handle); announce it."""
    version: NonNeg
    weights: Map

    def validate(self) -> None:
        _check_handle(self.weights, self.version)


class StepReport(Message):
    """Learner -> controller after each optimizer step (staleness, reward, trained/dropped group ids...)."""
    step: NonNeg
    version: NonNeg
    metrics: Map


class BufferReport(Message):
    """Buffer -> controller, periodically and whenever groups arrive or are dropped: queue depth, groups
    dropped as too stale (cumulative), the ids ``received`` since the last report, and the ids ``dropped``
    since then by reason (``{"stale": [3, 4], "bad_tokens": [7]}``)."""
    depth: NonNeg
    dropped_stale: NonNeg
    stats: Map
    received: list[NonNeg] = []
    dropped: dict[str, list[NonNeg]] = {}


class Goodbye(Message):
    """Any actor -> controller: I am exiting (``ok``) or dying (``not ok``, ``reason`` says why). ``fatal``:
    the reason stops the whole run (e.g. the policy's weights overflowed), even from a generator."""
    role: Role
    name: str
    reason: str
    ok: bool
    fatal: bool = False


# ---------------------------------------------------------------- controller PUB -> every SUB
class NewVersion(Message):
    """Controller -> all: weights ``version`` is complete and loadable from ``weights`` (a handle)."""
    version: NonNeg
    weights: Map

    def validate(self) -> None:
        _check_handle(self.weights, self.version)


class Control(Message):
    """Controller -> all: admission has room again without a new version (credit given back, a higher
    async ratio): the current async ratio in [0, 1] and other live knobs (``room``: samples)."""
    async_ratio: Fraction
    knobs: Map


class Stop(Message):
    """Controller -> all: drain and exit. Also the reply to a remote generator that is cut off (KEY_REMOVED)."""
    reason: str


KEY_REMOVED = "this generator's key was removed from the run's authorized keys"


# ---------------------------------------------------------------- generator PUSH -> buffer PULL
class TrajectoryGroup(Message):
    """Generator -> buffer: all n samples of one prompt. Token arrays are the n responses concatenated.

    Shapes: prompt_ids (p,); response_lens, rewards, finish (n,); response_ids, logprobs, versions
    (sum(response_lens),). ``versions`` is the policy version that sampled each token; ``logprobs``
    are the behaviour log-probs; ``finish`` is 1 when a sample stopped at EOS, 0 when truncated.
    ``token`` is the admission token of the group's credit (see ``Admit``).
    """
    ARRAYS: ClassVar[dict[str, str]] = {
        "prompt_ids": "<i4", "response_ids": "<i4", "response_lens": "<i4", "logprobs": "<f4",
        "versions": "<i4", "rewards": "<f4", "finish": "<u1"}
    group_id: NonNeg
    prompt_index: NonNeg
    generator: str
    sample_count: Positive
    prompt_ids: np.ndarray
    response_ids: np.ndarray
    response_lens: np.ndarray
    logprobs: np.ndarray
    versions: np.ndarray
    rewards: np.ndarray
    finish: np.ndarray
    gen_seconds: Seconds
    meta: Map
    token: str = ""

    def validate(self) -> None:
        _require(len(self.response_lens) == self.sample_count, "len(response_lens) != sample_count")
        _require(len(self.prompt_ids) >= 1 and _nonneg(self.prompt_ids), "the prompt needs token ids >= 0")
        _check_samples(self)


# ---------------------------------------------------------------- learner DEALER <-> buffer ROUTER
class BatchRequest(Message):
    """Learner -> buffer: ``groups`` whole groups for optimizer step ``step`` at policy ``version``."""
    step: NonNeg
    version: NonNeg
    groups: Positive


class Batch(Message):
    """Buffer -> learner: g whole groups, flattened; zero groups means nothing is ready yet.

    Shapes: group_ids, prompt_indices, group_sizes (samples per group), prompt_lens (g,); prompt_ids
    (sum(prompt_lens),); response_lens, rewards, finish (N,) with N = sum(group_sizes), samples in
    group order; response_ids, logprobs, versions (sum(response_lens),). ``generators``,
    ``gen_seconds`` and ``metas`` are per group. ``dropped_stale`` counts the groups dropped as too
    stale since the previous batch, ``dropped_ids`` are their ids.
    """
    ARRAYS: ClassVar[dict[str, str]] = {
        "group_ids": "<i8", "prompt_indices": "<i8", "group_sizes": "<i4", "prompt_lens": "<i4",
        "prompt_ids": "<i4", "response_lens": "<i4", "response_ids": "<i4", "logprobs": "<f4",
        "versions": "<i4", "rewards": "<f4", "finish": "<u1"}
    step: NonNeg
    group_ids: np.ndarray
    prompt_indices: np.ndarray
    group_sizes: np.ndarray
    prompt_lens: np.ndarray
    prompt_ids: np.ndarray
    response_lens: np.ndarray
    response_ids: np.ndarray
    logprobs: np.ndarray
    versions: np.ndarray
    rewards: np.ndarray
    finish: np.ndarray
    generators: list[str]
    gen_seconds: list[Seconds]
    metas: list[Map]
    dropped_stale: NonNeg
    dropped_ids: list[NonNeg]

    def validate(self) -> None:
        g = len(self.group_ids)
        _require(len(self.prompt_indices) == len(self.group_sizes) == len(self.prompt_lens) == g
                 and len(self.generators) == len(self.gen_seconds) == len(self.metas) == g,
                 "per-group fields disagree on the number of groups")
        _require(_nonneg(self.group_ids) and _nonneg(self.prompt_indices), "negative group id/index")
        _require(len(np.unique(self.group_ids)) == g, "duplicate group id")
        _check_runs("prompt", len(self.prompt_ids), self.prompt_lens)
        _require(_nonneg(self.prompt_ids), "negative token id")
        _check_runs("group", len(self.response_lens), self.group_sizes)
        _check_samples(self)

    @classmethod
    def from_groups(cls, step: int, groups: Sequence[TrajectoryGroup], dropped_stale: int = 0,
                    dropped_ids: Sequence[int] = ()) -> "Batch":
        """Concatenate whole groups into one Batch (one copy of the token arrays)."""
        def cat(name: str) -> np.ndarray:
            parts = [getattr(g, name) for g in groups]
            return np.concatenate(parts) if parts else np.zeros(0, TrajectoryGroup.ARRAYS[name])
        return cls(
            step=step, group_ids=np.array([g.group_id for g in groups], "<i8"),
            prompt_indices=np.array([g.prompt_index for g in groups], "<i8"),
            group_sizes=np.array([g.sample_count for g in groups], "<i4"),
            prompt_lens=np.array([len(g.prompt_ids) for g in groups], "<i4"),
            prompt_ids=cat("prompt_ids"), response_lens=cat("response_lens"),
            response_ids=cat("response_ids"), logprobs=cat("logprobs"), versions=cat("versions"),
            rewards=cat("rewards"), finish=cat("finish"),
            generators=[g.generator for g in groups], gen_seconds=[g.gen_seconds for g in groups],
            metas=[g.meta for g in groups], dropped_stale=dropped_stale, dropped_ids=list(dropped_ids))

    def sample_groups(self) -> np.ndarray:
        """Index (into the g groups) of each sample. Shape: (N,)."""
        return np.repeat(np.arange(len(self.group_ids)), self.group_sizes)

    def to_groups(self) -> list[TrajectoryGroup]:
        """Split back into TrajectoryGroups whose arrays are views of this batch's arrays."""
        p_off, s_off = _offsets(self.prompt_lens), _offsets(self.group_sizes)
        t_off = _offsets(self.response_lens)
        out = []
        for i in range(len(self.group_ids)):
            s0, s1 = s_off[i], s_off[i + 1]
            t0, t1 = t_off[s0], t_off[s1]
            out.append(TrajectoryGroup(
                group_id=int(self.group_ids[i]), prompt_index=int(self.prompt_indices[i]),
                generator=self.generators[i], sample_count=int(s1 - s0),
                prompt_ids=self.prompt_ids[p_off[i]:p_off[i + 1]], response_ids=self.response_ids[t0:t1],
                response_lens=self.response_lens[s0:s1], logprobs=self.logprobs[t0:t1],
                versions=self.versions[t0:t1], rewards=self.rewards[s0:s1], finish=self.finish[s0:s1],
                gen_seconds=self.gen_seconds[i], meta=self.metas[i]))
        return out


# ---------------------------------------------------------------- consistency checks
def _require(ok: bool, detail: str) -> None:
    if not ok:
        raise ProtocolError("inconsistent", detail)


def _check_handle(weights: dict, version: int | None) -> None:
    _require(type(weights.get("kind")) is str and type(weights.get("version")) is int
             and weights["version"] >= 0, "a weights handle needs kind: str and version: int >= 0")
    _require(version is None or weights["version"] == version, "weights handle version != message version")


def _offsets(lens: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(lens, dtype=np.int64)])


def _nonneg(a: np.ndarray) -> bool:
    return len(a) == 0 or a.min() >= 0


def _check_runs(what: str, total: int, lens: np.ndarray) -> None:
    """An array of length ``total`` is the concatenation of non-empty runs of lengths ``lens``."""
    _require(len(lens) == 0 or lens.min() >= 1, f"every {what} needs at least one element")
    _require(int(lens.sum(dtype=np.int64)) == total, f"{what} lengths do not sum to the array length")


def _check_samples(m: TrajectoryGroup | Batch) -> None:
    n = len(m.response_lens)
    _require(len(m.rewards) == len(m.finish) == n, "rewards/finish must have one entry per sample")
    _check_runs("response", len(m.response_ids), m.response_lens)
    _require(len(m.logprobs) == len(m.versions) == len(m.response_ids),
             "logprobs/versions must match response_ids")
    _require(_nonneg(m.response_ids) and _nonneg(m.versions), "negative token id or version")
    _require(n == 0 or m.finish.max() <= 1, "finish must be 0 or 1")
    # A NaN/inf reward or behaviour log-prob would poison every loss it touches: drop at the door.
    _require(bool(np.isfinite(m.logprobs).all() and np.isfinite(m.rewards).all()),
             "non-finite logprob/reward")


# ---------------------------------------------------------------- encode / decode
def _wire_array(owner: str, name: str, value: Any, dtype: str) -> np.ndarray:
    if not isinstance(value, np.ndarray) or value.ndim != 1:
        raise ProtocolError("bad_array", f"{owner}.{name}: expected a 1-D np.ndarray")
    src, dst = value.dtype, np.dtype(dtype)
    if not (np.can_cast(src, dst, "same_kind") or (src.kind in "biu" and dst.kind in "iu")):
        raise ProtocolError("bad_array", f"{owner}.{name}: cannot send {src} as {dst}")
    return np.ascontiguousarray(value, dtype=dst)


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise NotImplementedError(f"cannot send a {type(obj).__name__} in a header")


class _Codec:
    """msgspec's encoder and the validating decoder of every message, one per thread: a decode hook takes
    no per-call argument, so the frames of the message being decoded are held here while it runs."""

    def __init__(self):
        self.encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
        wire = tuple[Literal[PROTOCOL_VERSION], Union[tuple(MESSAGES.values())]]  # type: ignore[misc]
        self.decoder = msgspec.msgpack.Decoder(wire, dec_hook=self._array)
        self.dtypes = {dt: np.dtype(dt) for cls in MESSAGES.values() for dt in cls.ARRAYS.values()}
        self.frames: list[memoryview] = []
        self.used: list[int] = []

    def _array(self, tp: type, entry: Any) -> Any:
        """An array field's header entry ``[dtype, length, frame]`` -> a view of that frame."""
        if tp is not np.ndarray:
            raise NotImplementedError(tp)
        if (type(entry) is not list or len(entry) != 3 or type(entry[0]) is not str
                or type(entry[1]) is not int or type(entry[2]) is not int):
            raise ValueError("an array is [dtype, length, frame]")
        dtype, n, i = self.dtypes.get(entry[0]), entry[1], entry[2]
        if dtype is None:
            raise ValueError(f"an array is [dtype, length, frame]; {entry[0]!r:.20} is no wire dtype")
        if not 1 <= i < len(self.frames) or i in self.used:
            raise ValueError(f"no frame {i}")
        self.used.append(i)
        buf = self.frames[i]
        if len(buf) > MAX_FRAME_BYTES:
            raise ValueError(f"too large: {len(buf)} bytes")
        if n < 0 or n * dtype.itemsize != len(buf):
            raise ValueError(f"{len(buf)} bytes for {n} x {dtype}")
        return np.frombuffer(buf, dtype=dtype)

    def decode(self, bufs: list[memoryview]) -> Message:
        self.frames, self.used = bufs, []
        try:
            _, msg = self.decoder.decode(bufs[0])
        finally:
            self.frames = []
        return msg


_local = threading.local()


def _codec() -> _Codec:
    codec = getattr(_local, "codec", None)
    if codec is None:
        codec = _local.codec = _Codec()
    return codec


def encode(msg: Message) -> list[bytes | memoryview]:
    """Header frame + one zero-copy frame per array. Raises ProtocolError if ``msg`` is invalid: it is
    checked by decoding it, so the sender fails exactly where a receiver would.

    The array frames alias the message's arrays when they already have their wire dtype: do not
    mutate them until the send has completed.
    """
    cls = type(msg)
    if MESSAGES.get(getattr(cls, "TYPE", None)) is not cls:
        raise ProtocolError("unknown_type", f"{cls.__name__} is not a registered message")
    arrays = [_wire_array(cls.TYPE, n, getattr(msg, n), dt) for n, dt in cls.ARRAYS.items()]
    if arrays:
        refs = {n: [a.dtype.str, len(a), i + 1] for i, (n, a) in enumerate(zip(cls.ARRAYS, arrays))}
        msg = msgspec.structs.replace(msg, **refs)
    encoder = _codec().encoder
    try:
        head = encoder.encode((PROTOCOL_VERSION, msg))
    except (TypeError, ValueError, OverflowError, NotImplementedError) as e:
        raise ProtocolError("bad_value", f"{cls.TYPE}: {e}") from e
    frames = [head, *(memoryview(a.view(np.uint8)) for a in arrays)]
    decode(frames)
    return frames


def _buffer(frame: Any) -> memoryview:
    view = frame.buffer if isinstance(frame, zmq.Frame) else memoryview(frame)
    return view if view.ndim == 1 and view.itemsize == 1 else view.cast("B")


def decode(frames: Sequence[bytes | memoryview | zmq.Frame]) -> Message:
    """The validating decoder: a Message, or ProtocolError whatever the input (never another exception)."""
    try:
        return _decode(frames)
    except ProtocolError:
        raise
    except Exception as e:  # untrusted bytes: any surprise is a malformed message, never a crash
        raise ProtocolError("malformed", f"{type(e).__name__}: {e}") from e


def _decode(frames: Sequence[Any]) -> Message:
    if not isinstance(frames, (list, tuple)) or not frames:
        raise ProtocolError("bad_frames", "no frames")
    bufs = [_buffer(f) for f in frames]
    topic = bufs[0].tobytes() if len(bufs[0]) < 32 and bufs[0].tobytes() in _TOPICS else None
    if topic is not None:
        bufs = bufs[1:]
        if not bufs:
            raise ProtocolError("bad_frames", "topic without a header")
    if len(bufs[0]) > MAX_HEADER_BYTES:
        raise ProtocolError("too_large", f"header of {len(bufs[0])} bytes")
    codec = _codec()
    try:
        msg = codec.decode(bufs)
    except msgspec.ValidationError as e:  # a DecodeError too: catch it first
        raise ProtocolError(_reason(str(e)), str(e)) from e
    except msgspec.DecodeError as e:
        raise ProtocolError("not_msgpack", str(e)) from e
    cls = type(msg)
    if topic is not None and topic != cls.TYPE.encode():
        raise ProtocolError("bad_header", f"topic {topic!r} carries a {cls.TYPE}")
    if len(codec.used) != len(bufs) - 1 or len(cls.ARRAYS) != len(bufs) - 1:
        raise ProtocolError("bad_frames", f"{cls.TYPE} takes {len(cls.ARRAYS)} arrays, got {len(bufs) - 1}")
    for name, dtype in cls.ARRAYS.items():
        if getattr(msg, name).dtype.str != dtype:
            raise ProtocolError("bad_array", f"{cls.TYPE}.{name} must be {dtype}")
    msg.validate()
    return msg


def _reason(error: str) -> str:
    """The drop reason of a msgspec ValidationError, from where it happened (``... - at `$[1].name```)."""
    where = error.rpartition(" - at `")[2].rstrip("`") if " - at `" in error else "$"
    if where in ("$", "$[0]"):
        return "bad_header"
    if where == "$[1].type" or "missing required field `type`" in error:
        return "unknown_type"
    if where == "$[1]" and ("missing required field" in error or "unknown field" in error):
        return "bad_fields"
    if where.count(".") == 1 and "an array is" in error or "no frame" in error or " bytes for " in error:
        return "bad_array"
    if "too large" in error:
        return "too_large"
    return "bad_value"


# ---------------------------------------------------------------- dropping, envelopes, sockets
class DropCounter:
    """Counts malformed messages per reason and logs them: one line per reason per ``interval_s`` at most."""

    def __init__(self, owner: str = "", interval_s: float = 5.0):
        self.owner = owner
        self.interval_s = interval_s
        self._counts: dict[str, int] = {}
        self._last_log: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def drop(self, reason: str, frames: Sequence[Any] = (), detail: str = "") -> None:
        self._counts[reason] = self._counts.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._last_log.get(reason, -math.inf) < self.interval_s:
            self._unlogged[reason] = self._unlogged.get(reason, 0) + 1
            return
        self._last_log[reason] = now
        size = sum(_nbytes(f) for f in frames) if isinstance(frames, (list, tuple)) else -1
        log.warning("%sdropped a message (%s%s): %d frames, %d bytes; %d dropped for this reason, "
                    "%d not logged",
                    f"{self.owner}: " if self.owner else "", reason, f": {detail}" if detail else "",
                    len(frames) if isinstance(frames, (list, tuple)) else -1, size, self._counts[reason],
                    self._unlogged.pop(reason, 0))

    @property
    def counts(self) -> dict[str, int]:
        return dict(self._counts)

    @property
    def total(self) -> int:
        return sum(self._counts.values())


def _nbytes(frame: Any) -> int:
    try:
        return len(_buffer(frame))
    except Exception:
        return -1


def try_decode(frames: Sequence[Any], counter: DropCounter) -> Message | None:
    """``decode``, but a malformed message is counted and logged by ``counter`` and None returned."""
    try:
        return decode(frames)
    except ProtocolError as e:
        counter.drop(e.reason, frames, e.detail)
        return None


def split_envelope(frames: Sequence[Any]) -> tuple[tuple[bytes, ...], list[Any]]:
    """Split ``[identity..., b"", payload...]`` at the first empty frame. Raises ProtocolError if none."""
    for i, frame in enumerate(frames):
        if _nbytes(frame) == 0:
            return tuple(_buffer(f).tobytes() for f in frames[:i]), list(frames[i + 1:])
    raise ProtocolError("bad_envelope", "no empty delimiter frame")


def send(sock: zmq.Socket, msg: Message, identity: bytes | Sequence[bytes] | None = None,
         flags: int = 0) -> None:
    """Encode and send ``msg`` with the framing the type of ``sock`` needs; a ROUTER needs ``identity``."""
    frames: list[Any] = encode(msg)
    kind = sock.type
    if kind == zmq.ROUTER:
        if identity is None:
            raise ValueError("a ROUTER socket needs the identity of the peer to send to")
        frames = [*([identity] if isinstance(identity, bytes) else identity), b"", *frames]
    elif kind == zmq.DEALER:
        frames = [b"", *frames]
    elif kind == zmq.PUB:
        frames = [msg.TYPE.encode(), *frames]
    sock.send_multipart(frames, flags=flags, copy=False)


def recv(sock: zmq.Socket, counter: DropCounter,
         flags: int = 0) -> tuple[tuple[bytes, ...] | None, Message | None]:
    """Receive one message: (identity for a ROUTER else None, message or None if it was dropped).

    Raises ``zmq.Again`` with ``flags=zmq.NOBLOCK`` when nothing is waiting, like ``sock.recv``.
    """
    identity, msg, _ = recv_from(sock, counter, flags)
    return identity, msg


def recv_from(sock: zmq.Socket, counter: DropCounter,
              flags: int = 0) -> tuple[tuple[bytes, ...] | None, Message | None, str]:
    """``recv``, plus who sent it on a CURVE socket: the sender's public key (z85, the ZAP User-Id), or ""."""
    frames = sock.recv_multipart(flags=flags, copy=False)
    try:
        user = frames[0].get("User-Id") or ""
    except (zmq.ZMQError, AttributeError, UnicodeDecodeError):
        user = ""
    identity = None
    if sock.type in (zmq.ROUTER, zmq.DEALER):
        try:
            envelope, frames = split_envelope(frames)
        except ProtocolError as e:
            counter.drop(e.reason, frames, e.detail)
            return None, None, user
        identity = envelope if sock.type == zmq.ROUTER else None
    return identity, try_decode(frames, counter), user
