"""A stand-in SGLang server for CPU tests: the HTTP contract of SGLang 0.5.23, a deterministic fake model.

Real SGLang cannot serve on CPU from a PyPI install, so the SGLang backend is tested against this server.
It follows the endpoints Flux uses as SGLang defines them (request schemas, error shapes, status codes):

- `/generate` validates its body the way SGLang does: `sampling_params` with a key SGLang's
  SamplingParams does not take, or a value it rejects, is a 400; it answers
  `{"text", "output_ids", "meta_info"}` with `finish_reason`, `output_token_logprobs`
  ([logprob, token_id, null] per token), `input_token_logprobs` from `logprob_start_len`,
  `weight_version` and `weight_versions` (half-open spans over the output tokens, labelled with the
  version that sampled them).
- `/pause_generation {mode}`: `abort` ends every running request at once (it returns its tokens so
  far with finish_reason `abort`); `retract` and `in_place` hold them until `/continue_generation`.
  A request that arrives while paused waits at the door, as in SGLang's tokenizer manager.
- Weight updates run only inside a session (`/begin_weight_update` ... `/end_weight_update`, SGLang's
  `SchedulerWeightUpdaterManager`): outside one they answer `success: false` (HTTP 400).
- `/update_weights_from_tensor` decodes `serialized_named_tensors` like SGLang: each TP rank opens only
  its own entry (base64, then SGLang's `SafeUnpickler` with its exact allowlist of globals),
  `load_format: "flattened_bucket"` rebuilt as `FlattenedTensorBucket.reconstruct_tensors` does (uint8
  bytes sliced at byte offsets, viewed as each dtype). An update while requests run (and no pause) waits
  for them (SGLang's model-update lock); `flush_cache: true` with requests still running fails the call.
- A payload SGLang cannot load (it does not unpickle, or names a parameter or shape the model lacks)
  raises in the scheduler, which kills the real server: the mock dies too (`crash`: it stops listening and
  drops every open connection; run standalone, the process exits).
- `/init_weights_update_group` + `/update_weights_from_distributed`: a real torch.distributed group
  (gloo) joined at `rank_offset`, kept by name (a second group of the same name is refused, as torch
  refuses it) until `/destroy_weights_update_group`; a flattened bucket is received into a uint8 buffer
  of its byte size (`FlattenedTensorBucket.empty`), one broadcast per call.
- `/flush_cache` fails (400) while a request is running; during a pause, requests a `retract` pause
  moved to the waiting queue do not count (SGLang's `is_fully_idle(ignore_waiting=paused)`).
- `/update_weight_version`, `/abort_request` (by `rid`), `/health`, `/model_info`, `/server_info` (and
  their deprecated `/get_*` aliases), `/get_weights_by_name`.

ROUTES and REQUEST_FIELDS below name the routes and request fields the mock serves; the contract test
(tests/contract/test_sglang_contract.py) compares them, and every body Flux sends, with the real wheel.

The fake model: the next token is a hash of the last few context tokens, the context length and a
digest of the weights received so far (`next_token`), so new weights visibly change generations and
tests can predict every token. `python -m tests.sglang_mock --model-path M --port P` runs it standalone,
with the same flags as `sglang.launch_server` uses here.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import pickle
import sys
import threading
import time
import zlib
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

# SGLang's SamplingParams.__init__ keywords: anything else is a TypeError, answered 400.
SAMPLING_KEYS = {
    "max_new_tokens", "stop", "stop_token_ids", "stop_regex", "temperature", "top_p", "top_k", "min_p",
    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "n", "json_schema",
    "regex", "ebnf", "structural_tag", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens",
    "no_stop_trim", "custom_params", "stream_interval", "logit_bias", "sampling_seed", "beam_width",
    "watermark", "choice",
}
# SGLang's SafeUnpickler (sglang/srt/utils/common.py): the exact globals it admits.
ALLOWED_GLOBALS = {(module, name) for module, names in {
    "_codecs": "encode",
    "builtins": "bool bytearray bytes complex dict float frozenset int list range set slice str tuple",
    "collections": "Counter OrderedDict defaultdict deque",
    "copyreg": "__newobj__ __newobj_ex__",
    "functools": "partial",
    "itertools": "chain repeat",
    "multiprocessing.reduction": "_rebuild_partial _rebuild_socket",
    "multiprocessing.resource_sharer": "DupFd",
    "sglang.srt.disaggregation.encoder.receiver": "EmbeddingData",
    "sglang.srt.managers.io_struct": "EmbeddingReqInput GenerateReqInput",
    "sglang.srt.managers.schedule_batch": "Modality",
    "sglang.srt.model_executor.model_runner": "LocalSerializedTensor",
    "sglang.srt.model_executor.model_runner_components.weight_updater": "LocalSerializedTensor",
    "sglang.srt.multimodal.modality": "Modality",
    "sglang.srt.utils.patch_torch": "_rebuild_cuda_tensor_modified _rebuild_npu_tensor_modified",
    "sglang.srt.weight_sync.tensor_bucket": "FlattenedTensorBucket FlattenedTensorMetadata",
    "torch": "BFloat16Storage BFloat16Tensor BoolStorage BoolTensor ByteStorage ByteTensor CharStorage "
        "CharTensor ComplexDoubleStorage ComplexFloatStorage DoubleStorage DoubleTensor FloatStorage "
        "FloatTensor HalfStorage HalfTensor IntStorage IntTensor LongStorage LongTensor QInt32Storage "
        "QInt8Storage QUInt2x4Storage QUInt4x2Storage QUInt8Storage ShortStorage ShortTensor Size Tensor "
        "UntypedStorage bcomplex32 bfloat16 bit bits16 bits1x8 bits2x4 bits4x2 bits8 bool cdouble cfloat chalf "
        "complex128 complex32 complex64 device double dtype float float16 float32 float4_e2m1fn_x2 float64 "
        "float8_e4m3fn float8_e4m3fnuz float8_e5m2 float8_e5m2fnuz float8_e8m0fnu half int int1 int16 int2 "
        "int3 int32 int4 int5 int6 int64 int7 int8 long per_channel_affine per_channel_affine_float_qparams "
        "per_channel_symmetric per_tensor_affine per_tensor_symmetric qint32 qint8 quint2x4 quint4x2 quint8 "
        "short uint1 uint16 uint2 uint3 uint32 uint4 uint5 uint6 uint64 uint7 uint8",
    "torch._tensor": "_rebuild_from_type_v2",
    "torch._utils": "_rebuild_device_tensor_from_cpu_tensor _rebuild_device_tensor_from_numpy "
        "_rebuild_meta_tensor_no_storage _rebuild_parameter _rebuild_parameter_with_state _rebuild_qtensor "
        "_rebuild_sparse_tensor _rebuild_tensor _rebuild_tensor_v2 _rebuild_tensor_v3 "
        "_rebuild_wrapper_subclass",
    "torch.cuda": "BFloat16Storage BFloat16Tensor BoolStorage BoolTensor ByteStorage ByteTensor CharStorage "
        "CharTensor ComplexDoubleStorage ComplexFloatStorage DoubleStorage DoubleTensor FloatStorage "
        "FloatTensor HalfStorage HalfTensor IntStorage IntTensor LongStorage LongTensor ShortStorage "
        "ShortTensor",
    "torch.cuda.sparse": "BFloat16Tensor ByteTensor CharTensor DoubleTensor FloatTensor HalfTensor IntTensor "
        "LongTensor ShortTensor",
    "torch.multiprocessing.reductions": "rebuild_cuda_tensor rebuild_meta_tensor rebuild_nested_tensor "
        "rebuild_sparse_compressed_tensor rebuild_sparse_coo_tensor rebuild_storage_empty rebuild_storage_fd "
        "rebuild_storage_filename rebuild_tensor rebuild_typed_storage rebuild_typed_storage_child",
    "torch.nn.parameter": "Parameter",
    "torch.serialization": "_get_layout",
    "torch.sparse": "BFloat16Tensor ByteTensor CharTensor DoubleTensor FloatTensor HalfTensor IntTensor "
        "LongTensor ShortTensor",
    "torch.storage": "TypedStorage UntypedStorage _UntypedStorage",
    "torch_npu.multiprocessing.reductions": "rebuild_npu_tensor",
    "types": "SimpleNamespace",
}.items() for name in names.split()}
PAUSE_MODES = ("abort", "retract", "in_place")


def next_token(context: list[int], digest: int, vocab_size: int) -> int:
    """The fake model: a deterministic function of the recent context, its length and the weights."""
    h = zlib.crc32(json.dumps([context[-3:], len(context), digest]).encode())
    return h % vocab_size


def token_logprob(context: list[int], digest: int) -> float:
    h = zlib.crc32(json.dumps([context[-2:], digest, "lp"]).encode())
    return -0.05 - (h % 1000) / 250.0


def weights_digest(weights: dict[str, torch.Tensor]) -> int:
    """A digest of the received weights (0 before any): what the fake model's outputs depend on."""
    h = 0
    for name in sorted(weights):
        raw = weights[name].detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        h = zlib.crc32(name.encode() + raw, h)
    return h


def _safe_load_torch_storage(data: bytes):
    storage = torch.load(io.BytesIO(data), weights_only=True)
    if not isinstance(storage, (torch.storage.TypedStorage, torch.UntypedStorage)):
        raise pickle.UnpicklingError(f"Expected a Torch storage, got {type(storage).__name__}")
    return storage


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _safe_load_torch_storage
        if (module, name) in ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise RuntimeError(f"Blocked unsafe global ({module}.{name}) during pickle deserialization")


def decode_named_tensors(payload: str, load_format: str | None) -> list[tuple[str, torch.Tensor]]:
    """One rank's `serialized_named_tensors` entry → (name, tensor) pairs, as SGLang's model runner does."""
    data = _SafeUnpickler(io.BytesIO(base64.b64decode(payload, validate=True))).load()
    if load_format == "flattened_bucket":  # FlattenedTensorBucket.reconstruct_tensors, by attribute
        flat = data["flattened_tensor"]
        return [(m.name, flat[m.start_idx:m.end_idx].view(m.dtype).reshape(m.shape)) for m in data["metadata"]]
    if load_format is None:
        return [(name, t) for name, t in data]
    raise NotImplementedError(f"Unknown load_format={load_format}")


def empty_bucket(names: list[str], dtypes: list[str], shapes: list[list[int]]) -> tuple[torch.Tensor, list]:
    """FlattenedTensorBucket.empty: a uint8 receive buffer and (name, dtype, shape, start, end) per tensor."""
    metadata, offset = [], 0
    for name, dtype, shape in zip(names, dtypes, shapes, strict=True):
        dtype, shape = getattr(torch, dtype), torch.Size(shape)
        if offset % dtype.itemsize:
            raise ValueError(f"Unaligned received tensor {name}: byte offset {offset}, dtype {dtype}")
        size = shape.numel() * dtype.itemsize
        metadata.append((name, dtype, shape, offset, offset + size))
        offset += size
    if not metadata:
        raise ValueError("Cannot create empty tensor bucket")
    return torch.empty(offset, dtype=torch.uint8), metadata


class BadRequest(Exception):
    """A request body SGLang's validation would reject (HTTP 400)."""


def _check(body: dict, spec: dict, required: tuple = ()) -> dict:
    """Type-check the keys of `body` that SGLang's request model declares (extra keys are ignored)."""
    if not isinstance(body, dict):
        raise BadRequest("Input should be a valid dictionary")
    for key in required:
        if key not in body:
            raise BadRequest(f"{key}: Field required")
    for key, types_ in spec.items():
        if key not in body:
            continue
        allowed = types_ if isinstance(types_, tuple) else (types_,)
        value = body[key]
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise BadRequest(f"{key}: Input should be of type {'|'.join(t.__name__ for t in allowed)}, "
                             f"got {value!r}")
    return body


OPT_STR = (str, type(None))
BASE_REQ = {"rid": OPT_STR, "http_worker_ipc": OPT_STR}  # io_struct.BaseReq
UPDATE_COMMON = {"flush_cache": bool, "abort_all_requests": bool, "weight_version": OPT_STR,
                 "load_format": OPT_STR, "selector": str, "torch_empty_cache": bool, **BASE_REQ}
# The request fields of io_struct's classes behind the routes below (the contract test checks them).
REQUEST_FIELDS = {
    "UpdateWeightsFromTensorReqInput": {"serialized_named_tensors": list, **UPDATE_COMMON},
    "UpdateWeightsFromDistributedReqInput": {"names": list, "dtypes": list, "shapes": list, "group_name": str,
                                             **UPDATE_COMMON},
    "InitWeightsUpdateGroupReqInput": {"master_address": str, "master_port": int, "rank_offset": int,
                                       "world_size": int, "group_name": str, "backend": str, **BASE_REQ},
    "DestroyWeightsUpdateGroupReqInput": {"group_name": str, **BASE_REQ},
    "BeginWeightUpdateReqInput": {"selector": str, **BASE_REQ},
    "EndWeightUpdateReqInput": {**BASE_REQ},
    "PauseGenerationReqInput": {"mode": str, **BASE_REQ},
    "ContinueGenerationReqInput": {"torch_empty_cache": bool, **BASE_REQ},
    "AbortReq": {"abort_all": bool, "finished_reason": (dict, type(None)), "abort_message": OPT_STR,
                 "weight_versions": (list, type(None)), **BASE_REQ},
    "UpdateWeightVersionReqInput": {"new_version": str, "abort_all_requests": bool, **BASE_REQ},
    "GetWeightsByNameReqInput": {"name": str, "truncate_size": int, **BASE_REQ},
}
# path -> (methods, the io_struct class of its body or None): as sglang/srt/entrypoints/http_server.py
ROUTES = {
    "/health": (("GET",), None), "/health_generate": (("GET",), None),
    "/model_info": (("GET",), None), "/get_model_info": (("GET",), None),
    "/server_info": (("GET",), None), "/get_server_info": (("GET",), None),
    "/generate": (("POST", "PUT"), "GenerateReqInput"), "/flush_cache": (("GET", "POST"), None),
    "/pause_generation": (("POST",), "PauseGenerationReqInput"),
    "/continue_generation": (("POST",), "ContinueGenerationReqInput"),
    "/abort_request": (("POST",), "AbortReq"),
    "/update_weight_version": (("POST",), "UpdateWeightVersionReqInput"),
    "/begin_weight_update": (("POST",), "BeginWeightUpdateReqInput"),
    "/end_weight_update": (("POST",), "EndWeightUpdateReqInput"),
    "/update_weights_from_tensor": (("POST",), "UpdateWeightsFromTensorReqInput"),
    "/init_weights_update_group": (("POST",), "InitWeightsUpdateGroupReqInput"),
    "/destroy_weights_update_group": (("POST",), "DestroyWeightsUpdateGroupReqInput"),
    "/update_weights_from_distributed": (("POST",), "UpdateWeightsFromDistributedReqInput"),
    "/get_weights_by_name": (("GET", "POST"), "GetWeightsByNameReqInput"),
}
REQUIRED = {"UpdateWeightsFromTensorReqInput": ("serialized_named_tensors",),
            "UpdateWeightsFromDistributedReqInput": ("names", "dtypes", "shapes"),
            "InitWeightsUpdateGroupReqInput": ("master_address", "master_port", "rank_offset", "world_size"),
            "UpdateWeightVersionReqInput": ("new_version",), "GetWeightsByNameReqInput": ("name",)}


def _body(body: dict, request_class: str) -> dict:
    """`_check` of a body against the fields of its io_struct class."""
    return _check(body, REQUEST_FIELDS[request_class], REQUIRED.get(request_class, ()))


class Crashed(Exception):
    """The scheduler died (an exception while loading weights): the server goes with it."""


@dataclass
class _Request:
    rid: str
    input_ids: list[int]
    out_ids: list[int] = field(default_factory=list)
    out_lps: list[float] = field(default_factory=list)
    spans: list[list] = field(default_factory=list)  # [version, start, end]
    aborted: str = ""


class MockSGLang:
    """The server's state and endpoints; `start()` serves them on 127.0.0.1 from a thread."""

    def __init__(self, *, vocab_size: int = 64, tp_size: int = 1, token_delay_s: float = 0.0,
                 model_path: str = "mock-model", expected: dict[str, tuple] | None = None,
                 exit_on_crash: bool = False):
        self.vocab_size, self.tp_size, self.token_delay_s = vocab_size, tp_size, token_delay_s
        self.model_path, self.expected = model_path, expected
        self.weights: dict[str, torch.Tensor] = {}
        self.digest = 0
        self.version = "default"
        self.paused, self.pause_mode = False, None
        self.broken = ""
        self.crashed = ""  # why the scheduler died (the server stops listening)
        self.exit_on_crash = exit_on_crash  # standalone: the process exits, as SGLang's does
        self.session = False  # a weight-update session is open
        self.flushes: list[dict] = []  # every successful flush: {"paused", "mode", "held"}
        self.running: dict[str, _Request] = {}
        self.calls: list[tuple[str, dict]] = []
        self.fail: dict[str, tuple[int, dict]] = {}  # path → (status, body) answered once, for tests
        self.updates = 0
        self.groups: dict[str, object] = {}  # weight-update groups by name
        self._cond = threading.Condition()
        self._ids = 0
        self.httpd: ThreadingHTTPServer | None = None

    # ---- serving -------------------------------------------------------------------------------

    def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        mock = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _reply(self, status: int, payload) -> None:
                raw = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain" if isinstance(payload, str) else "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _handle(self, method: str) -> None:
                path = self.path.split("?")[0]
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw.strip() else {}
                except json.JSONDecodeError as e:
                    return self._reply(400, _error(f"JSON decode error: {e}"))
                try:
                    answer = mock.dispatch(method, path, body)
                except Crashed:  # the server died under this request: no answer, the connection drops
                    self.close_connection = True
                    return
                self._reply(*answer)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_PUT(self):
                self._handle("PUT")

        self.httpd = _Server((host, port), Handler)
        threading.Thread(target=self.httpd.serve_forever, args=(0.05,), name="sglang-mock", daemon=True).start()
        return f"http://{host}:{self.httpd.server_address[1]}"

    def stop(self) -> None:
        with self._cond:
            for req in self.running.values():
                req.aborted = "server stopped"
            self.paused = False
            self._cond.notify_all()
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None
        for group in self.groups.values():
            torch.distributed.destroy_process_group(group)
        self.groups.clear()

    def crash(self, reason: str) -> None:
        """The scheduler raised: the whole server dies (SGLang sends its parent SIGQUIT). Every open request
        loses its connection, nothing listens any more; standalone, the process exits."""
        if self.exit_on_crash:
            print(f"Scheduler hit an exception: {reason}", file=sys.stderr, flush=True)
            os._exit(1)
        with self._cond:
            self.crashed = reason
            for req in self.running.values():
                req.aborted = req.aborted or "crashed"
            self.paused = False
            self._cond.notify_all()
        threading.Thread(target=self.stop, name="sglang-mock-crash", daemon=True).start()
        raise Crashed(reason)

    def dispatch(self, method: str, path: str, body: dict) -> tuple[int, object]:
        if self.crashed:
            raise Crashed(self.crashed)
        with self._cond:
            self.calls.append((path, body))
            canned = self.fail.pop(path, None)
        if canned is not None:
            return canned
        handlers = {
            "/health": self.health, "/health_generate": self.health, "/get_model_info": self.model_info,
            "/model_info": self.model_info, "/get_server_info": self.server_info, "/server_info": self.server_info,
            "/generate": self.generate, "/flush_cache": self.flush_cache,
            "/pause_generation": self.pause_generation, "/continue_generation": self.continue_generation,
            "/abort_request": self.abort_request, "/update_weight_version": self.update_weight_version,
            "/begin_weight_update": self.begin_weight_update, "/end_weight_update": self.end_weight_update,
            "/update_weights_from_tensor": self.update_weights_from_tensor,
            "/init_weights_update_group": self.init_weights_update_group,
            "/destroy_weights_update_group": self.destroy_weights_update_group,
            "/update_weights_from_distributed": self.update_weights_from_distributed,
            "/get_weights_by_name": self.get_weights_by_name,
        }
        assert handlers.keys() == ROUTES.keys()
        if path not in ROUTES:
            return 404, {"detail": "Not Found"}
        if method not in ROUTES[path][0]:
            return 405, {"detail": "Method Not Allowed"}
        if self.broken and path not in ("/health", "/health_generate"):
            return 500, {"message": self.broken}
        try:
            if ROUTES[path][1] in REQUEST_FIELDS:
                _body(body, ROUTES[path][1])
            return handlers[path](body)
        except BadRequest as e:
            return 400, _error(str(e))
        except Crashed:
            raise
        except Exception as e:  # noqa: BLE001 (an internal error is a 500 with its message, as in SGLang)
            return 500, {"message": f"{type(e).__name__}: {e}"}

    # ---- endpoints -----------------------------------------------------------------------------

    def health(self, body):
        return (503, "") if self.broken else (200, "")

    def model_info(self, body):
        return 200, {"model_path": self.model_path, "tokenizer_path": self.model_path, "is_generation": True,
                     "preferred_sampling_params": None, "weight_version": self.version}

    def server_info(self, body):
        return 200, {"model_path": self.model_path, "tp_size": self.tp_size, "dp_size": 1,
                     "weight_version": self.version, "version": "0.5.23 (flux mock)"}

    def generate(self, body):
        _check(body, {"input_ids": list, "sampling_params": (dict, type(None)), "return_logprob": (bool, type(None)),
                      "logprob_start_len": (int, type(None)), "rid": OPT_STR, "stream": bool})
        if body.get("rid") is not None and body["rid"] in self.running:
            return 400, {"error": {"message": f"Duplicate request ID: {body['rid']}"}}
        ids = body.get("input_ids")
        if ids is None or body.get("text") is not None:
            raise BadRequest("this mock serves token ids only: give input_ids")
        if not ids or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise BadRequest("input_ids must be a non-empty list of ints (batched input is not mocked)")
        if body.get("stream"):
            raise BadRequest("streaming is not mocked")
        sp = dict(body.get("sampling_params") or {})
        unknown = set(sp) - SAMPLING_KEYS
        if unknown:
            return 400, {"error": {"message": f"SamplingParams.__init__() got an unexpected keyword argument "
                                              f"'{min(unknown)}'"}}
        seed = sp.get("sampling_seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not -(2**63) <= seed < 2**63):
            return 400, {"error": {"message": f"sampling_seed must be an integer in [-2**63, 2**63 - 1], got {seed!r}"}}
        max_new = sp.get("max_new_tokens", 128)
        temperature, top_p, top_k = sp.get("temperature", 1.0), sp.get("top_p", 1.0), sp.get("top_k", -1)
        problems = [(not isinstance(max_new, int) or max_new < 0, "max_new_tokens must be at least 0"),
                    (not isinstance(temperature, (int, float)) or temperature < 0, "temperature must be non-negative"),
                    (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1, "top_p must be in (0, 1]"),
                    (not isinstance(top_k, int) or (top_k < 1 and top_k != -1),
                     "top_k must be -1 (disable), or at least 1")]
        for bad, why in problems:
            if bad:
                return 400, {"error": {"message": why}}
        stops = set(sp.get("stop_token_ids") or [])
        if any(t >= self.vocab_size or t < 0 for t in ids):
            return 400, {"error": {"message": f"input id out of the vocabulary (size {self.vocab_size})"}}

        with self._cond:
            self._ids += 1
            req = _Request(body.get("rid") or f"mock-{self._ids}", list(ids))
            while self.paused:  # SGLang holds new requests at the door while paused
                self._cond.wait()
            self.running[req.rid] = req
        finish = {"type": "length", "length": max_new}
        try:
            for _ in range(max_new):
                with self._cond:
                    while self.paused and not req.aborted:  # retract / in_place: held until continue
                        self._cond.wait()
                    if req.aborted == "crashed":
                        raise Crashed(self.crashed)
                    if req.aborted:  # FINISH_ABORT.to_json()
                        finish = {"type": "abort", "message": req.aborted, "status_code": None, "err_type": None}
                        break
                    version, digest = self.version, self.digest
                context = req.input_ids + req.out_ids
                tok = next_token(context, digest, self.vocab_size)
                req.out_ids.append(tok)
                req.out_lps.append(token_logprob(context, digest))
                if req.spans and req.spans[-1][0] == version:
                    req.spans[-1][2] += 1
                else:
                    n = len(req.out_ids)
                    req.spans.append([version, n - 1, n])
                if tok in stops:
                    finish = {"type": "stop", "matched": tok}
                    break
                if self.token_delay_s:
                    time.sleep(self.token_delay_s)
        finally:
            with self._cond:
                self.running.pop(req.rid, None)
                self._cond.notify_all()
        meta = {"id": req.rid, "finish_reason": finish, "prompt_tokens": len(ids),
                "completion_tokens": len(req.out_ids), "cached_tokens": 0,
                "weight_versions": [{"version": v, "start": s, "end": e} for v, s, e in req.spans]
                or [{"version": self.version, "start": 0, "end": 0}]}
        meta["weight_version"] = meta["weight_versions"][-1]["version"]
        if body.get("return_logprob"):
            meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(req.out_lps, req.out_ids)]
            # from logprob_start_len on (absent or -1: none), the first entry None: SGLang's
            # LogprobResultProcessor shifts the values by one ([None] + logprobs[:-1])
            start = body.get("logprob_start_len")
            start = len(ids) if start is None or start < 0 else start
            meta["input_token_logprobs"] = [
                [None if i == start else token_logprob(ids[:i], self.digest), ids[i], None]
                for i in range(min(start, len(ids)), len(ids))]
        return 200, {"text": "", "output_ids": req.out_ids, "meta_info": meta}

    def flush_cache(self, body):
        with self._cond:
            # a retracting pause moved the running requests to the waiting queue, which a paused server's
            # flush ignores (Scheduler.is_fully_idle(ignore_waiting=self._engine_paused))
            retracted = self.paused and self.pause_mode == "retract"
            if self.running and not retracted:
                return 400, "Flush cache failed.\n"
            self.flushes.append({"paused": self.paused, "mode": self.pause_mode, "held": len(self.running)})
        return 200, ("Cache flushed.\nPlease check backend logs for more details. (When there are running or "
                     "waiting requests, the operation will not be performed.)\n")

    def pause_generation(self, body):
        mode = body.get("mode", "abort")
        if mode not in PAUSE_MODES:
            raise BadRequest(f"mode: Input should be 'abort', 'retract' or 'in_place', got {mode!r}")
        with self._cond:
            self.paused, self.pause_mode = True, mode
            if mode == "abort":  # aborts until no request is left (the tokenizer manager's loop), then answers
                for req in self.running.values():
                    req.aborted = "Aborted"
                self._cond.notify_all()
                while self.running:
                    self._cond.wait()
            self._cond.notify_all()
        return 200, {"message": "Generation paused successfully.", "status": "ok"}

    def continue_generation(self, body):
        with self._cond:
            self.paused, self.pause_mode = False, None
            self._cond.notify_all()
        return 200, {"message": "Generation continued successfully.", "status": "ok"}

    def abort_request(self, body):
        with self._cond:
            for rid, req in self.running.items():  # by prefix, as the scheduler matches rids
                if body.get("abort_all") or (body.get("rid") and rid.startswith(body["rid"])):
                    req.aborted = body.get("abort_message") or "Abort request."
            self._cond.notify_all()
        return 200, ""

    def update_weight_version(self, body):
        if body.get("abort_all_requests", True):
            self.abort_request({"abort_all": True})
        with self._cond:
            self.version = body["new_version"]
        return 200, {"success": True, "message": f"Weight version updated to {self.version}",
                     "new_version": self.version}

    def _wait_for_update_lock(self) -> None:
        """SGLang's model-update lock: an update waits for running requests unless generation is paused."""
        with self._cond:
            while self.running and not self.paused:
                self._cond.wait()

    def begin_weight_update(self, body):
        if self.session:
            return 400, {"success": False, "message": "a weight-update session is already open; "
                                                      "call end_weight_update() first"}
        self.session = True
        return 200, {"success": True, "message": "Success"}

    def end_weight_update(self, body):
        if not self.session:
            return 400, {"success": False, "message": "no weight-update session is open; "
                                                      "call begin_weight_update() first"}
        self.session = False
        return 200, {"success": True, "message": "Success"}

    def _outside_session(self, what: str):
        if self.session:
            return None
        return 400, {"success": False, "message": f"{what} must run between begin_weight_update() and "
                                                  f"end_weight_update()"}

    def _apply(self, named: list[tuple[str, torch.Tensor]], body: dict) -> tuple[int, dict]:
        """model.load_weights: a name or shape the model lacks raises in the scheduler, which dies."""
        for name, t in named:
            if self.expected is not None:
                if name not in self.expected:
                    self.crash(f"KeyError: '{name}'")
                if tuple(t.shape) != tuple(self.expected[name]):
                    self.crash(f"AssertionError: {name}: param size {self.expected[name]} != loaded weight "
                               f"size {tuple(t.shape)}")
        with self._cond:
            self.weights.update({name: t.clone() for name, t in named})
            self.digest = weights_digest(self.weights)
            self.updates += 1
            if body.get("weight_version") is not None:
                self.version = body["weight_version"]
        if body.get("flush_cache", True) and self.flush_cache({})[0] != 200:
            return 400, {"success": False, "message": "Weights were updated, but the cache was not flushed because "
                                                      "requests are still running or queued. Retract or finish "
                                                      "them, then call /flush_cache."}
        return 200, {"success": True, "message": "Success"}

    def update_weights_from_tensor(self, body):
        refused = self._outside_session("update_weights_from_tensor")
        if refused:
            return refused
        payloads = body["serialized_named_tensors"]
        if not all(isinstance(p, str) for p in payloads):
            raise BadRequest("serialized_named_tensors: Input should be a list of strings")
        if body.get("abort_all_requests"):
            self.abort_request({"abort_all": True})
        self._wait_for_update_lock()
        per_rank = []
        for rank in range(self.tp_size):  # each rank opens its own entry only (deserialize_own_rank)
            try:
                per_rank.append(decode_named_tensors(payloads[rank], body.get("load_format")))
            except Exception as e:  # noqa: BLE001 (any failure here raises in SGLang's scheduler)
                self.crash(f"{type(e).__name__}: {e}")
        return self._apply(per_rank[0], body)

    def init_weights_update_group(self, body):
        name = body.get("group_name", "weight_update_group")
        if body.get("backend", "nccl") != "gloo" or self.tp_size != 1:
            return 400, {"success": False, "message": "the mock joins weight-update groups with gloo and TP 1"}
        if name in self.groups:  # torch's _new_process_group_helper refuses a name it has
            return 400, {"success": False, "message": "Failed to initialize custom process group: The specified "
                                                      "group name has already been created, please use a "
                                                      "different group name."}
        try:
            self.groups[name] = join_group(body["master_address"], body["master_port"], body["rank_offset"],
                                           body["world_size"], name)
        except Exception as e:  # noqa: BLE001 (SGLang answers any failure to join this way)
            return 400, {"success": False, "message": f"Failed to initialize custom process group: {e}."}
        return 200, {"success": True, "message": "Succeeded to initialize custom process group."}

    def destroy_weights_update_group(self, body):
        group = self.groups.pop(body.get("group_name", "weight_update_group"), None)
        if group is None:
            return 400, {"success": False, "message": "The group to be destroyed does not exist."}
        torch.distributed.destroy_process_group(group)
        return 200, {"success": True, "message": "Succeeded to destroy custom process group."}

    def update_weights_from_distributed(self, body):
        refused = self._outside_session("update_weights_from_distributed")
        if refused:
            return refused
        name = body.get("group_name", "weight_update_group")
        if name not in self.groups:  # an AssertionError caught by the updater: success false
            return 400, {"success": False, "message": f"Failed to receive weights: Group {name} not in "
                                                      f"{list(self.groups)}. Please call `init_weights_update_group` "
                                                      f"first."}
        self._wait_for_update_lock()
        group = self.groups[name]
        try:
            if body.get("load_format") == "flattened_bucket":
                flat, metadata = empty_bucket(body["names"], body["dtypes"], body["shapes"])
                torch.distributed.broadcast(flat, src=0, group=group)
                named = [(n, flat[a:b].view(d).reshape(sh)) for n, d, sh, a, b in metadata]
            else:
                named = [(n, torch.empty(sh, dtype=getattr(torch, d)))
                         for n, d, sh in zip(body["names"], body["dtypes"], body["shapes"])]
                for _, t in named:
                    torch.distributed.broadcast(t, src=0, group=group)
        except Exception as e:  # noqa: BLE001 (receive_weights_from_distributed's failures are answered)
            return 400, {"success": False, "message": f"Failed to receive weights: {e}"}
        return self._apply(named, body)

    def get_weights_by_name(self, body):
        """The first `truncate_size` values of the flattened parameter (SGLang's weight_exporter)."""
        t = self.weights.get(body["name"])
        if t is None:
            return 200, None
        return 200, t.reshape(-1)[: body.get("truncate_size", 100)].float().tolist()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 512  # a rollout opens one connection per prompt at once


def join_group(host: str, port: int, rank: int, world_size: int, group_name: str):
    """SGLang's init_custom_process_group: a non-default group over a TCP rendezvous, prefixed store."""
    from datetime import timedelta

    from torch.distributed.distributed_c10d import (
        Backend,
        PrefixStore,
        _new_process_group_helper,
        _world,
        rendezvous,
    )

    timeout = timedelta(seconds=60)
    store, rank, world_size = next(rendezvous(f"tcp://{host}:{port}", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    group, _ = _new_process_group_helper(world_size, rank, [], Backend("gloo"), PrefixStore(group_name, store),
                                         group_name=group_name, timeout=timeout)
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group


def _error(message: str) -> dict:
    """SGLang's answer to a request that fails validation (its RequestValidationError handler: HTTP 400)."""
    return {"object": "error", "message": message, "type": "Bad Request", "param": None, "code": 400}


def expected_shapes(model_path: str) -> dict[str, tuple] | None:
    """Parameter shapes of a safetensors checkpoint (read from its header), to check received weights."""
    path = Path(model_path) / "model.safetensors"
    if not path.is_file():
        return None
    with path.open("rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.sglang_mock", description=__doc__.splitlines()[0])
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=30000)
    ap.add_argument("--tp-size", type=int, default=1)
    ap.add_argument("--token-delay", type=float, default=0.0, help="seconds per generated token")
    ap.add_argument("--vocab-size", type=int, default=0, help="0 = the model's config.json, else 64")
    args = ap.parse_args(argv)
    vocab = args.vocab_size
    config = Path(args.model_path) / "config.json"
    if not vocab and config.is_file():
        vocab = json.loads(config.read_text()).get("vocab_size", 0)
    mock = MockSGLang(vocab_size=vocab or 64, tp_size=args.tp_size, token_delay_s=args.token_delay,
                      model_path=args.model_path, expected=expected_shapes(args.model_path), exit_on_crash=True)
    url = mock.start(args.host, args.port)
    print(f"mock SGLang serving {args.model_path} at {url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
