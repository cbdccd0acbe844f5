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
- `/update_weights_from_tensor` decodes `serialized_named_tensors` like SGLang: base64, an unpickler
  that admits only SGLang's allowlist of modules, `load_format: "flattened_bucket"` rebuilt from the
  metadata's attributes; one payload per TP rank. An update while requests run (and no pause) waits for
  them (SGLang's model-update lock); `flush_cache: true` with requests still held is the assertion
  failure that kills a real scheduler (here: HTTP 500, and the server stays broken).
- `/init_weights_update_group` + `/update_weights_from_distributed`: a real torch.distributed group
  (gloo) joined at `rank_offset`, one flattened bucket received by broadcast per call.
- `/flush_cache` fails (400) while any request is held; `/update_weight_version`, `/abort_request`,
  `/health`, `/get_model_info`, `/get_server_info`.

The fake model: the next token is a hash of the last few context tokens, the context length and a
digest of the weights received so far (`next_token`), so new weights visibly change generations and
tests can predict every token. `python -m tests.sglang_mock --model-path M --port P` runs it standalone,
with the same flags as `sglang.launch_server` uses here.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import io
import json
import pickle
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
    "no_stop_trim", "custom_params", "stream_interval", "logit_bias", "sampling_seed",
}
# SGLang's SafeUnpickler (sglang/srt/utils/common.py): allowed module prefixes and denied classes.
ALLOWED_MODULE_PREFIXES = (
    "builtins.", "collections.", "copyreg.", "functools.", "itertools.", "operator.", "types.", "weakref.",
    "torch.", "multiprocessing.resource_sharer.", "multiprocessing.reduction.", "pickletools.", "peft.",
    "transformers.", "huggingface_hub.", "sglang.srt.weight_sync.tensor_bucket.",
    "sglang.srt.model_executor.model_runner.", "sglang.srt.layers.", "sglang.srt.utils.",
)
DENY_CLASSES = {("builtins", "eval"), ("builtins", "exec"), ("builtins", "compile"), ("os", "system"),
                ("subprocess", "Popen"), ("subprocess", "run"), ("codecs", "decode"), ("types", "CodeType"),
                ("types", "FunctionType")}
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


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in DENY_CLASSES:
            raise RuntimeError(f"Blocked unsafe class loading ({module}.{name})")
        if any((module + ".").startswith(p) for p in ALLOWED_MODULE_PREFIXES):
            return super().find_class(module, name)
        raise RuntimeError(f"Blocked unsafe class loading ({module}.{name}), "
                           f"to prevent exploitation of CVE-2025-10164")


def decode_named_tensors(payload: str, load_format: str | None) -> list[tuple[str, torch.Tensor]]:
    """One rank's `serialized_named_tensors` entry → (name, tensor) pairs, as SGLang's model runner does."""
    data = _SafeUnpickler(io.BytesIO(base64.b64decode(payload, validate=True))).load()
    if load_format == "flattened_bucket":
        flat, out = data["flattened_tensor"], []
        for meta in data["metadata"]:  # read by attribute, as FlattenedTensorBucket does
            t = flat[meta.start_idx:meta.end_idx].reshape(meta.shape)
            out.append((meta.name, t if t.dtype == meta.dtype else t.to(meta.dtype)))
        return out
    if load_format is None:
        return [(name, t) for name, t in data]
    raise ValueError(f"Unknown load_format={load_format}")


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
UPDATE_COMMON = {"flush_cache": bool, "abort_all_requests": bool, "weight_version": OPT_STR,
                 "load_format": OPT_STR, "selector": str, "torch_empty_cache": bool, "rid": OPT_STR}


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
                 model_path: str = "mock-model", expected: dict[str, tuple] | None = None):
        self.vocab_size, self.tp_size, self.token_delay_s = vocab_size, tp_size, token_delay_s
        self.model_path, self.expected = model_path, expected
        self.weights: dict[str, torch.Tensor] = {}
        self.digest = 0
        self.version = "default"
        self.paused, self.pause_mode = False, None
        self.broken = ""
        self.running: dict[str, _Request] = {}
        self.calls: list[tuple[str, dict]] = []
        self.fail: dict[str, tuple[int, dict]] = {}  # path → (status, body) answered once, for tests
        self.updates = 0
        self.group = None
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
                self._reply(*mock.dispatch(method, path, body))

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
        if self.group is not None:
            torch.distributed.destroy_process_group(self.group)
            self.group = None

    def dispatch(self, method: str, path: str, body: dict) -> tuple[int, object]:
        with self._cond:
            self.calls.append((path, body))
            canned = self.fail.pop(path, None)
        if canned is not None:
            return canned
        routes = {
            "/health": self.health, "/health_generate": self.health, "/get_model_info": self.model_info,
            "/get_server_info": self.server_info, "/generate": self.generate, "/flush_cache": self.flush_cache,
            "/pause_generation": self.pause_generation, "/continue_generation": self.continue_generation,
            "/abort_request": self.abort_request, "/update_weight_version": self.update_weight_version,
            "/update_weights_from_tensor": self.update_weights_from_tensor,
            "/init_weights_update_group": self.init_weights_update_group,
            "/update_weights_from_distributed": self.update_weights_from_distributed,
        }
        if path not in routes:
            return 404, {"detail": "Not Found"}
        if self.broken and path not in ("/health", "/health_generate"):
            return 500, {"message": self.broken}
        try:
            return routes[path](body)
        except BadRequest as e:
            return 400, _error(str(e))
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
                    if req.aborted:
                        finish = {"type": "abort", "message": req.aborted}
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
            start = body.get("logprob_start_len")
            start = len(ids) - 1 if start is None or start < 0 else start
            meta["input_token_logprobs"] = [
                [None if i == 0 else token_logprob(ids[:i], self.digest), ids[i], None]
                for i in range(min(start, len(ids)), len(ids))]
        return 200, {"text": "", "output_ids": req.out_ids, "meta_info": meta}

    def flush_cache(self, body):
        with self._cond:
            if self.running:
                return 400, ("Cache flushed.\nPlease check backend logs for more details. (When there are running "
                             "or waiting requests, the operation will not be performed.)\n")
        return 200, "Cache flushed.\n"

    def pause_generation(self, body):
        _check(body, {"mode": str, "rid": OPT_STR})
        mode = body.get("mode", "abort")
        if mode not in PAUSE_MODES:
            raise BadRequest(f"mode: Input should be 'abort', 'retract' or 'in_place', got {mode!r}")
        with self._cond:
            self.paused, self.pause_mode = True, mode
            if mode == "abort":
                for req in self.running.values():
                    req.aborted = "Abort in pause generation."
            self._cond.notify_all()
        return 200, {"message": "Generation paused successfully.", "status": "ok"}

    def continue_generation(self, body):
        _check(body, {"torch_empty_cache": bool, "rid": OPT_STR})
        with self._cond:
            self.paused, self.pause_mode = False, None
            self._cond.notify_all()
        return 200, {"message": "Generation continued successfully.", "status": "ok"}

    def abort_request(self, body):
        _check(body, {"rid": OPT_STR, "abort_all": bool, "abort_message": OPT_STR})
        with self._cond:
            for rid, req in self.running.items():
                if body.get("abort_all") or rid == body.get("rid"):
                    req.aborted = body.get("abort_message") or "Abort request."
            self._cond.notify_all()
        return 200, ""

    def update_weight_version(self, body):
        _check(body, {"new_version": str, "abort_all_requests": bool, "rid": OPT_STR}, required=("new_version",))
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

    def _apply(self, named: list[tuple[str, torch.Tensor]], body: dict) -> tuple[int, dict]:
        for name, t in named:
            if self.expected is not None:
                if name not in self.expected:
                    return 400, {"success": False, "message": f"Failed to update weights: unknown parameter {name}"}
                if tuple(t.shape) != tuple(self.expected[name]):
                    return 400, {"success": False, "message": f"Failed to update weights: {name} has shape "
                                                              f"{tuple(t.shape)}, the model {self.expected[name]}"}
        with self._cond:
            self.weights.update({name: t.clone() for name, t in named})
            self.digest = weights_digest(self.weights)
            self.updates += 1
            if body.get("flush_cache", True) and self.running:
                self.broken = "AssertionError: Cache flush failed after updating weights"
                return 500, {"message": self.broken}
            if body.get("weight_version") is not None:
                self.version = body["weight_version"]
        return 200, {"success": True, "message": "Succeeded to update model weights."}

    def update_weights_from_tensor(self, body):
        _check(body, {"serialized_named_tensors": list, **UPDATE_COMMON}, required=("serialized_named_tensors",))
        payloads = body["serialized_named_tensors"]
        if not all(isinstance(p, str) for p in payloads):
            raise BadRequest("serialized_named_tensors: Input should be a list of strings")
        if len(payloads) != self.tp_size:
            return 400, {"success": False, "message": f"got {len(payloads)} serialized payloads for "
                                                      f"{self.tp_size} TP ranks"}
        if body.get("abort_all_requests"):
            self.abort_request({"abort_all": True})
        self._wait_for_update_lock()
        try:
            per_rank = [decode_named_tensors(p, body.get("load_format")) for p in payloads]
        except (binascii.Error, pickle.UnpicklingError, RuntimeError, ValueError, KeyError, AttributeError) as e:
            return 400, {"success": False, "message": f"Failed to deserialize the weights: {e}"}
        return self._apply(per_rank[0], body)

    def init_weights_update_group(self, body):
        _check(body, {"master_address": str, "master_port": int, "rank_offset": int, "world_size": int,
                      "group_name": str, "backend": str},
               required=("master_address", "master_port", "rank_offset", "world_size"))
        if body.get("backend", "nccl") != "gloo" or self.tp_size != 1:
            return 400, {"success": False, "message": "the mock joins weight-update groups with gloo and TP 1"}
        try:
            self.group = join_group(body["master_address"], body["master_port"], body["rank_offset"],
                                    body["world_size"], body.get("group_name", "weight_update_group"))
        except Exception as e:  # noqa: BLE001 (SGLang answers any failure to join this way)
            return 400, {"success": False, "message": f"Failed to initialize custom process group: {e}."}
        return 200, {"success": True, "message": "Succeeded to initialize custom process group."}

    def update_weights_from_distributed(self, body):
        _check(body, {"names": list, "dtypes": list, "shapes": list, "group_name": str, **UPDATE_COMMON},
               required=("names", "dtypes", "shapes"))
        if self.group is None:
            return 400, {"success": False, "message": "Group not initialized: call init_weights_update_group"}
        self._wait_for_update_lock()
        named = [(n, torch.empty(s, dtype=getattr(torch, d))) for n, d, s in
                 zip(body["names"], body["dtypes"], body["shapes"])]
        if body.get("load_format") == "flattened_bucket":
            flat = torch.cat([t.reshape(-1) for _, t in named])
            torch.distributed.broadcast(flat, src=0, group=self.group)
            offsets = [0]
            for _, t in named:
                offsets.append(offsets[-1] + t.numel())
            named = [(n, flat[a:b].reshape(t.shape)) for (n, t), a, b in zip(named, offsets, offsets[1:])]
        else:
            for _, t in named:
                torch.distributed.broadcast(t, src=0, group=self.group)
        return self._apply(named, body)


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
                      model_path=args.model_path, expected=expected_shapes(args.model_path))
    url = mock.start(args.host, args.port)
    print(f"mock SGLang serving {args.model_path} at {url}", flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
