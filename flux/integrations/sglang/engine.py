"""The SGLang rollout backend (`rollout.engine: sglang`): an HTTP client of an SGLang server, and the
server process a generator may own.

    generate:  one `/generate` request per prompt (`input_ids`, `return_logprob`), in flight together;
               per-token log-probs from `meta_info.output_token_logprobs`, per-token policy versions
               from `meta_info.weight_versions` (half-open spans over the output tokens)
               each request has its own `rid` (so `close()` can abort what is still running) and,
               when the call is seeded, its own `sampling_seed`
    new weights (in flight, or between calls):
               /pause_generation {mode} → /flush_cache (abort, retract) → /begin_weight_update →
               weights → /end_weight_update → /continue_generation
               weights = /update_weights_from_tensor (flattened buckets; CUDA IPC handles, same node)
                      or /update_weights_from_distributed (broadcast from this process, any node)
               the last call carrying `weight_version`, so the server labels every later token with it
    abort:     a request the pause aborted comes back with its tokens so far; it is resubmitted with
               prompt + those tokens as input and the rest of the token budget
    pause modes: `abort` empties the server; `retract` moves running requests back to the waiting queue,
               where a flush may run (their KV is recomputed with the new weights when they resume);
               `in_place` keeps them running on their old KV, so the radix cache is flushed only once
               nothing of ours is held (a flush with requests in the running batch fails)
    a dead server: a request that finds nothing listening, or whose connection drops, raises
               SGLangServerGone (an EngineLost); `recover()` starts an owned server again, up to
               `restarts` times, at the base version

SGLang 0.5.23 crashes (the scheduler dies, and the server with it) on a weight payload it cannot load (a
name or shape the model does not have), rather than answering an error: Flux reports that as the server
gone during that update, with the server's log when the generator owns it.

SGLang samples with log_softmax(logits / T) over the full tempered distribution and keeps top-k/top-p
out of the returned log-prob, the convention Flux's learner recomputes. No module here imports
`sglang`: the server is a separate process and everything goes over HTTP (flux/integrations/sglang/weights.py
builds the weight payloads), so `import flux` and CPU tests work without it.
"""

from __future__ import annotations

import http.client
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
import weakref
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np

from flux.engine.base import Completion, EngineLost, SamplingParams, WeightSource

PAUSE_MODES = ("abort", "retract", "in_place")
WEIGHT_SYNCS = ("tensor", "distributed")
UPDATE_MODES = ("inflight", "between_sequences")
CONTROL_TIMEOUT_S = 120.0  # pause, flush, version: quick calls (a retracting pause may take a moment)
LONG_TIMEOUT_S = 3600.0  # a generation or a weight update may legitimately take long
GROUP_PREFIX = "flux_weights"  # + a per-engine suffix: a reused server may hold an older run's group

log = logging.getLogger("flux.sglang")


class SGLangError(RuntimeError):
    """An SGLang server could not be started or reached, or refused a request (the message says which)."""


class SGLangServerGone(SGLangError, EngineLost):
    """The server stopped answering mid-run: nothing listens at its URL, or it dropped a connection."""


class SGLangClient:
    """JSON over HTTP to one server, straight to it (no proxy), standard library only."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def request(self, path: str, body: dict | None = None, *, timeout: float = CONTROL_TIMEOUT_S,
                method: str | None = None) -> tuple[int, Any]:
        """(HTTP status, decoded JSON or text). Raises SGLangError only if the server cannot be reached."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method or ("GET" if data is None else "POST"),
                                     headers={"Content-Type": "application/json"})
        try:
            with self._opener.open(req, timeout=timeout) as resp:
                status, raw = resp.status, resp.read()
        except urllib.error.HTTPError as e:
            status, raw = e.code, e.read()
        except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
            reason = getattr(e, "reason", e)
            if isinstance(reason, TimeoutError):
                raise SGLangError(f"the SGLang server at {self.url} did not answer {path} "
                                  f"within {timeout:.0f}s") from None
            raise SGLangServerGone(f"cannot reach the SGLang server at {self.url} ({path}): "
                                   f"{reason or type(reason).__name__}") from None
        text = raw.decode(errors="replace")
        try:
            return status, json.loads(text) if text.strip() else None
        except json.JSONDecodeError:
            return status, text

    def call(self, path: str, body: dict | None = None, *, timeout: float = CONTROL_TIMEOUT_S) -> Any:
        """POST (or GET without a body); any status but 200, or `"success": false`, is an SGLangError."""
        status, out = self.request(path, body, timeout=timeout)
        if status != 200 or (isinstance(out, dict) and out.get("success") is False):
            raise SGLangError(f"{path} failed (HTTP {status}): {_message(out)}")
        return out


def _message(out: Any) -> str:
    """The error text of an SGLang response, whichever of its error shapes it has."""
    if isinstance(out, dict):
        err = out.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        for key in ("message", "detail"):
            if out.get(key):
                return str(out[key])
    return str(out)[:500]


class SGLangServer:
    """`python -m sglang.launch_server --model-path M --host H --port P [args]`, owned by one generator.

    The server runs in its own session, so `stop()` takes its scheduler and detokenizer processes along
    (SIGTERM to the group, then SIGKILL after a deadline); it gets SIGTERM if the generator dies, and
    `stop()` also runs at garbage collection and interpreter exit.
    """

    def __init__(self, model_path: str, *, host: str = "127.0.0.1", port: int = 0, args: list[str] = (),
                 module: str = "sglang.launch_server", log_path: str | Path | None = None):
        from flux.run.runtime import free_port

        self.port = port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.command = [sys.executable, "-m", module, "--model-path", str(model_path), "--host", host,
                        "--port", str(self.port), *map(str, args)]
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None
        self._finalizer = None

    def start(self, timeout_s: float = 900.0) -> str:
        """Launch and wait until `/health` answers 200; returns the URL. Raises SGLangError on failure."""
        from flux.run.runtime import die_with_parent

        log_file = open(self.log_path, "ab") if self.log_path else None  # noqa: SIM115 (closed below)
        try:
            # preexec_fn: the kernel sends the server SIGTERM if the generator dies; no thread of the
            # generator runs yet when its engine (and so this server) is built.
            self.proc = subprocess.Popen(self.command, stdout=log_file or subprocess.DEVNULL,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=die_with_parent)  # noqa: PLW1509
        except OSError as e:
            raise SGLangError(f"cannot start the SGLang server ({' '.join(self.command[:3])}): {e}") from None
        finally:
            if log_file is not None:
                log_file.close()  # the server holds its own copy of the descriptor
        self._finalizer = weakref.finalize(self, _stop_group, self.proc, 10.0)
        try:
            wait_until_healthy(self.url, timeout_s, self)
        except SGLangError:
            self.stop()
            raise
        return self.url

    def _last_words(self) -> str:
        if not self.log_path or not self.log_path.exists():
            return ""
        lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
        return f": {lines[-1].strip()[:300]} (log: {self.log_path})" if lines else f" (log: {self.log_path})"

    def stop(self, deadline_s: float = 10.0) -> None:
        """Terminate the server and its children (idempotent)."""
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
            _stop_group(self.proc, deadline_s)


def wait_until_healthy(url: str, timeout_s: float, server: SGLangServer | None = None) -> None:
    """Poll `/health` until it answers 200 (a starting server answers 503, or nothing at all)."""
    client, end = SGLangClient(url), time.monotonic() + timeout_s
    while True:
        if server is not None and server.proc.poll() is not None:
            raise SGLangError(f"the SGLang server exited with code {server.proc.returncode} while starting"
                              f"{server._last_words()}")
        try:
            if client.request("/health", timeout=5.0)[0] == 200:
                return
        except SGLangError:
            if server is None and time.monotonic() > end:
                raise
        if time.monotonic() > end:
            raise SGLangError(f"the SGLang server at {url} was not healthy after {timeout_s:.0f}s"
                              f"{server._last_words() if server else ''}")
        time.sleep(0.25)


def _stop_group(proc: subprocess.Popen, deadline_s: float) -> None:
    """SIGTERM to the process group → wait → SIGKILL to whatever of the group is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            continue
        try:  # the leader is gone; children it left behind still carry its group id
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return


class SGLangEngine:
    """Rollout engine over an SGLang server (the RolloutEngine interface of flux/engine/base.py).

    `generate` and `score` are not re-entrant: one call at a time. `load_weights`, `pause` and `resume`
    are safe from other threads; queued weights are applied by `apply_pending`, which `generate` calls
    while its requests are in flight (update_mode `inflight`) and before each call (both modes).
    """

    def __init__(self, url: str, *, version: int = 0, update_mode: str = "inflight", pause_mode: str = "abort",
                 weight_sync: str = "tensor", bucket_bytes: int = 512 << 20, group_backend: str = "nccl",
                 group_host: str = "127.0.0.1", server: SGLangServer | None = None, max_concurrency: int = 256,
                 restarts: int = 0, startup_timeout_s: float = 900.0):
        for name, value, allowed in (("update_mode", update_mode, UPDATE_MODES),
                                     ("pause_mode", pause_mode, PAUSE_MODES),
                                     ("weight_sync", weight_sync, WEIGHT_SYNCS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        self.client = SGLangClient(url)
        self.url, self.server = self.client.url, server
        self.version = self._base_version = version
        self.update_mode, self.pause_mode, self.weight_sync = update_mode, pause_mode, weight_sync
        self.bucket_bytes, self.group_backend, self.group_host = bucket_bytes, group_backend, group_host
        self.tokens_generated = 0
        self.busy_seconds = 0.0
        self.load_seconds, self.loads = 0.0, 0  # weight updates: time and count (as the built-in engine's)
        self.restarts_left, self.startup_timeout_s, self.restarts = restarts, startup_timeout_s, 0
        self._tag = f"flux-{os.getpid()}-{uuid.uuid4().hex[:8]}"  # this engine's requests and group
        self._rid = itertools.count()
        self._meet_server()
        self._pending: tuple[int, WeightSource] | None = None
        self._pending_lock = threading.Lock()
        self._update_lock = threading.Lock()  # one weight update at a time
        self._state = threading.Condition()  # guards the fields below
        self._holds: set[str] = set()  # why the server is paused: "user" and/or "update"
        self._epoch = 0  # +1 at every pause: an abort seen under a newer epoch is ours, so resubmit
        self._inflight = 0  # /generate requests of ours the server holds now
        self._user_paused_s, self._user_paused_at = 0.0, None
        self._cache_dirty = False  # weights changed while requests were pending: flush before the next call
        self._closed = False
        self._gone = False  # the server died during an update (until `recover()`)
        self._rids: set[str] = set()  # our requests the server is running now (`close()` aborts them)
        self._group = None  # WeightGroup of the distributed path, built at the first update
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="sglang-req")

    def _meet_server(self) -> None:
        """Read the server's TP size; label its tokens with our version number from now on."""
        status, info = self.client.request("/server_info")
        if status == 404:  # a server older than the /server_info name
            info = self.client.call("/get_server_info")
        elif status != 200:
            raise SGLangError(f"/server_info failed (HTTP {status}): {_message(info)}")
        self.tp_size = int(info.get("tp_size") or 1) if isinstance(info, dict) else 1
        self.client.call("/update_weight_version", {"new_version": str(self.version), "abort_all_requests": False})

    # ---- weights -------------------------------------------------------------------------------

    def load_weights(self, version: int, source: WeightSource) -> None:
        """Queue weights `version` (a state dict or a zero-arg callable returning one); returns at once."""
        with self._pending_lock:
            if self._pending is None or version > self._pending[0]:
                self._pending = (version, source)

    def apply_pending(self) -> bool:
        """Send the queued weights to the server now; True if its weights changed. Never goes back."""
        with self._update_lock:
            with self._pending_lock:
                pending, self._pending = self._pending, None
            if pending is None or pending[0] <= self.version or self._closed:
                return False
            version, source = pending
            state = source() if callable(source) else source
            if state is None:  # the source gave up on this version (overwritten); a newer one is on its way
                return False
            self._hold("update")
            t0 = time.perf_counter()
            try:
                # An aborting pause empties the server and a retracting one moves our requests to the
                # waiting queue: either way the radix cache (the old weights' KV) can be flushed now. An
                # in-place pause keeps them in the running batch, so the flush waits until none is held.
                if (self.pause_mode == "in_place" and self._inflight) or not self._flush():
                    self._cache_dirty = True
                self.client.call("/begin_weight_update", {})
                try:
                    if self.weight_sync == "tensor":
                        self._send_tensors(state, version)
                    else:
                        self._send_distributed(state, version)
                finally:
                    self._end_session()
                self.version = version
                self.load_seconds += time.perf_counter() - t0
                self.loads += 1
            except SGLangServerGone as e:
                self._gone = True  # nothing to un-pause
                raise SGLangServerGone(f"{e}, during the update to version {version}"
                                       f"{self.server._last_words() if self.server else ''}") from None
            finally:
                self._release("update")
            return True

    def _end_session(self) -> None:
        """Close the weight-update session, even after a failed update (the next one opens a new one)."""
        try:
            self.client.call("/end_weight_update", {})
        except SGLangServerGone:
            pass  # the update's own error says what happened

    def _send_tensors(self, state, version: int) -> None:
        from flux.integrations.sglang.weights import tensor_requests

        cuda = False
        for body, flat in tensor_requests(state, version, max_bytes=self.bucket_bytes, tp_size=self.tp_size):
            cuda |= flat.is_cuda
            self.client.call("/update_weights_from_tensor", body, timeout=LONG_TIMEOUT_S)
            del flat  # the server has copied the bucket: its IPC-shared memory may go
        if cuda:
            import torch

            torch.cuda.ipc_collect()

    def _send_distributed(self, state, version: int) -> None:
        from flux.integrations.sglang.weights import buckets, distributed_request, flatten

        if self._group is None:
            self._group = self._join_group()
        groups = buckets(state, self.bucket_bytes)
        for i, bucket in enumerate(groups):
            body = distributed_request(bucket, group_name=self._group.group_name)
            if i == len(groups) - 1:
                body["weight_version"] = str(version)
            flat, _ = flatten(bucket)
            # The server answers once it has received the broadcast, so the broadcast runs beside the call.
            sender = _Background(self._group.broadcast, flat)
            self.client.call("/update_weights_from_distributed", body, timeout=LONG_TIMEOUT_S)
            sender.result(CONTROL_TIMEOUT_S)

    def _join_group(self):
        from flux.integrations.sglang.weights import WeightGroup
        from flux.run.runtime import free_port

        port, world = free_port(self.group_host), 1 + self.tp_size
        name = f"{GROUP_PREFIX}-{self._tag}-{self.restarts}"  # unique: a reused server keeps old groups
        joining = _Background(lambda: WeightGroup(host=self.group_host, port=port, world_size=world,
                                                  group_name=name, backend=self.group_backend))
        self.client.call("/init_weights_update_group", {
            "master_address": self.group_host, "master_port": port, "rank_offset": 1, "world_size": world,
            "group_name": name, "backend": self.group_backend}, timeout=LONG_TIMEOUT_S)
        return joining.result(CONTROL_TIMEOUT_S)

    def _leave_group(self, server_alive: bool = True) -> None:
        """Destroy the weight-update group on both ends (the server's end first, so a later run that reuses
        the server can join it again)."""
        if self._group is None:
            return
        group, self._group = self._group, None
        if server_alive:
            try:
                self.client.call("/destroy_weights_update_group", {"group_name": group.group_name})
            except SGLangError as e:
                log.warning("destroying the weight-update group on the server: %s", e)
        try:
            group.close()
        except RuntimeError as e:  # the server may be gone already; the group ends with this process
            log.warning("closing the weight-update group: %s", e)

    # ---- flow control --------------------------------------------------------------------------

    def _hold(self, reason: str) -> None:
        """Pause the server (`pause_mode`) for `reason`; requests of ours wait until every hold is gone."""
        with self._state:
            first = not self._holds
            self._holds.add(reason)
            if first:
                self._epoch += 1  # before the pause: an abort it causes is always seen under the new epoch
        if first:
            self.client.call("/pause_generation", {"mode": self.pause_mode})

    def _release(self, reason: str) -> None:
        with self._state:
            self._holds.discard(reason)
            last = not self._holds
        if last and not self._gone:
            self.client.call("/continue_generation", {})
            with self._state:
                self._state.notify_all()

    def pause(self) -> None:
        """Pause generation on the server until `resume()` (requests in flight are kept or resubmitted)."""
        with self._state:
            if "user" in self._holds:
                return
            self._user_paused_at = time.perf_counter()
        self._hold("user")

    def resume(self) -> None:
        with self._state:
            if "user" not in self._holds:
                return
            self._user_paused_s += time.perf_counter() - self._user_paused_at
        self._release("user")

    def close(self) -> None:
        """Stop using the server (and stop it, if this engine started it); calls in flight raise, and
        our requests still running on a server we do not own are aborted there."""
        with self._state:
            self._closed = True
            self._state.notify_all()
            rids = sorted(self._rids)
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.server is None:
            for rid in rids:
                try:
                    self.client.request("/abort_request", {"rid": rid}, timeout=5.0)
                except SGLangError:
                    break  # the server is gone: nothing runs there any more
        self._leave_group(server_alive=self.server is None)
        if self.server is not None:
            self.server.stop()

    def recover(self) -> bool:
        """After SGLangServerGone: start an owned server again (up to `restarts` times) at the base version.

        False when the server is not ours (an external `sglang_url`) or no restart is left. The caller
        queues the newest weights again (`load_weights`); requests of the lost call are not resubmitted.
        """
        if self.server is None or self.restarts_left <= 0 or self._closed:
            return False
        self.restarts_left -= 1
        self.restarts += 1
        self._leave_group(server_alive=False)
        self.server.stop()
        self.server.start(self.startup_timeout_s)
        with self._state:
            self._holds.clear()
            self._inflight = 0
            self._rids.clear()
            self._state.notify_all()
        self._cache_dirty = self._gone = False
        with self._pending_lock:
            self._pending = None
        self.version = self._base_version  # the new server loaded the model from disk
        self._meet_server()
        return True

    def _flush(self, timeout_s: float = 10.0) -> bool:
        """Flush the radix cache; it succeeds only once the server holds no request, so retry briefly."""
        end = time.monotonic() + timeout_s
        while True:
            status, _ = self.client.request("/flush_cache", {}, timeout=CONTROL_TIMEOUT_S)
            if status == 200:
                self._cache_dirty = False
                return True
            if time.monotonic() > end:
                return False
            time.sleep(0.05)

    def _admit(self) -> int:
        """Wait until the server is not paused, count one request in flight; returns the current epoch."""
        with self._state:
            while self._holds and not self._closed:
                self._state.wait()
            if self._closed:
                raise SGLangError("the engine was closed during generate")
            self._inflight += 1
            return self._epoch

    def _new_rid(self) -> str:
        # SGLang aborts every request whose rid *starts with* the one named: the trailing "." keeps
        # `…-1.` from matching `…-10.`
        rid = f"{self._tag}-{next(self._rid)}."
        with self._state:
            self._rids.add(rid)
        return rid

    def _done(self, rid: str | None = None) -> None:
        with self._state:
            self._inflight -= 1
            self._rids.discard(rid)

    # ---- sampling ------------------------------------------------------------------------------

    def _begin_call(self) -> tuple[float, float]:
        if self._closed:
            raise SGLangError("the engine is closed")
        self.apply_pending()  # both update modes take new weights before a call starts
        if self._cache_dirty:
            self._flush()
        return time.perf_counter(), self._user_paused_s

    def _end_call(self, start: float, paused_before: float) -> None:
        self.busy_seconds += time.perf_counter() - start - (self._user_paused_s - paused_before)

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        """Sample one completion per prompt (all requests in flight at once); returns them in prompt order."""
        sampling.validate()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs at least one prompt, and no empty prompt")
        call = self._begin_call()
        params = {"temperature": sampling.temperature, "top_p": sampling.top_p,
                  "top_k": sampling.top_k if sampling.top_k > 0 else -1,  # SGLang spells "off" as -1
                  "stop_token_ids": [int(t) for t in sampling.stop_token_ids]}

        def seeded(i: int) -> dict:  # each prompt its own seed: a group's samples must differ
            if sampling.seed is None:
                return params
            return {**params, "sampling_seed": (int(sampling.seed) * 1_000_003 + i) % (1 << 63)}

        futures = [self._pool.submit(self._complete, [int(t) for t in p], sampling, seeded(i))
                   for i, p in enumerate(prompts)]
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.05, return_when=FIRST_COMPLETED)
            for f in done:
                f.result()  # a failed request fails the call now, not after the others
            if pending and self.update_mode == "inflight" and self._pending is not None:
                self.apply_pending()
        self._end_call(*call)
        return [f.result() for f in futures]

    def _complete(self, prompt: list[int], sampling: SamplingParams, params: dict) -> Completion:
        """One prompt to the end: resubmitted with its tokens so far whenever a pause of ours aborts it."""
        tokens: list[int] = []
        logprobs: list[float] = []
        versions: list[np.ndarray] = []
        stops = {int(t) for t in sampling.stop_token_ids}
        finished = False
        while len(tokens) < sampling.max_new_tokens:
            epoch, submitted_version = self._admit(), self.version
            rid = self._new_rid()
            try:
                out = self.client.call("/generate", {
                    "rid": rid, "input_ids": prompt + tokens, "return_logprob": True,
                    "sampling_params": {**params, "max_new_tokens": sampling.max_new_tokens - len(tokens)},
                }, timeout=LONG_TIMEOUT_S)
            finally:
                self._done(rid)
            meta = out.get("meta_info") if isinstance(out, dict) else None
            if not isinstance(meta, dict) or not isinstance(meta.get("output_token_logprobs"), list):
                raise SGLangError(f"/generate answered without meta_info.output_token_logprobs: {str(out)[:300]}")
            new = [(int(e[1]), float(e[0])) for e in meta["output_token_logprobs"]]
            tokens += [t for t, _ in new]
            logprobs += [lp for _, lp in new]
            versions.append(self._token_versions(meta, len(new), submitted_version))
            with self._state:
                self.tokens_generated += len(new)
            reason = meta.get("finish_reason") or {}
            kind = reason.get("type") if isinstance(reason, dict) else str(reason)
            if kind == "stop" or (tokens and tokens[-1] in stops):
                finished = True
                break
            if kind == "abort":
                if self._epoch == epoch:  # not a pause of ours: the server gave up on the request
                    raise SGLangError(f"the SGLang server aborted a request: {_message(reason)}")
                continue  # resubmit prompt + tokens so far, for the rest of the budget
            break  # "length" (or a context limit)
        if not tokens:
            raise SGLangError("the SGLang server returned no tokens for a prompt (longer than its context?)")
        return Completion(np.asarray(tokens, np.int32), np.asarray(logprobs, np.float32),
                          np.concatenate(versions).astype(np.int32), finished)

    def _token_versions(self, meta: dict, n: int, fallback: int) -> np.ndarray:
        """Per-token versions of `n` output tokens: `weight_versions` spans, else `weight_version`, else
        the engine's version when the request was sent (servers older than the spans)."""
        spans = meta.get("weight_versions")
        if spans:
            out = np.full(n, -1, np.int64)
            for span in spans:
                version, start, end = (span["version"], span["start"], span["end"]) if isinstance(span, dict) \
                    else span  # msgspec's array form [version, start, end]
                out[int(start):int(end)] = self._as_version(version)
            if (out < 0).any():
                raise SGLangError(f"weight_versions {spans} do not cover the {n} output tokens")
            return out
        if meta.get("weight_version") is not None:
            return np.full(n, self._as_version(meta["weight_version"]), np.int64)
        return np.full(n, fallback, np.int64)

    def _as_version(self, label: Any) -> int:
        """SGLang's version label as a Flux version; a non-number (its default "default") is the base one."""
        try:
            return int(label)
        except (TypeError, ValueError):
            return self._base_version

    def score(self, prompts: list[list[int]], responses: list[list[int]], temperature: float = 1.0
              ) -> list[Completion]:
        """Teacher-forced log-probs of given responses (offline preference pairs) under the current weights.

        `/generate` with `max_new_tokens: 0` and `logprob_start_len` at the prompt's last token: SGLang
        returns the input tokens' log-probs from there, the first of them None (nothing precedes it in the
        scored span), so the response's tokens are the last len(response) entries. SGLang scores input
        tokens with the raw logits (T = 1) whatever the sampling temperature, so only T = 1 is accepted.
        Versions are the server's weight version.
        """
        if len(prompts) != len(responses) or any(not p or not r for p, r in zip(prompts, responses)):
            raise ValueError("score needs one non-empty response per non-empty prompt")
        if temperature != 1.0:
            raise ValueError(f"SGLang scores given tokens at temperature 1 (log_softmax of the raw logits), not "
                             f"{temperature}: use rollout.temperature: 1 for preference data with rollout.engine=sglang")
        call = self._begin_call()

        def one(prompt: list[int], response: list[int]) -> Completion:
            self._admit()
            rid = self._new_rid()
            try:
                out = self.client.call("/generate", {
                    "rid": rid, "input_ids": [int(t) for t in prompt + response], "return_logprob": True,
                    "logprob_start_len": len(prompt) - 1,
                    "sampling_params": {"max_new_tokens": 0},
                }, timeout=LONG_TIMEOUT_S)
            finally:
                self._done(rid)
            meta = out.get("meta_info", {}) if isinstance(out, dict) else {}
            entries = (meta.get("input_token_logprobs") or [])[-len(response):]
            if len(entries) != len(response) or any(e[0] is None for e in entries):
                raise SGLangError(f"/generate did not score the {len(response)} response tokens: {str(out)[:300]}")
            version = self._as_version(meta.get("weight_version", self.version))
            return Completion(np.asarray(response, np.int32), np.asarray([e[0] for e in entries], np.float32),
                              np.full(len(response), version, np.int32), True)

        futures = [self._pool.submit(one, list(p), list(r)) for p, r in zip(prompts, responses)]
        outs = [f.result() for f in futures]
        self._end_call(*call)
        return outs


class _Background:
    """Run `fn(*args)` on a daemon thread; `result(timeout)` re-raises its error, or times out."""

    def __init__(self, fn, *args):
        self._out: list = []
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True)
        self._thread.start()

    def _run(self, fn, args) -> None:
        try:
            self._out.append((True, fn(*args)))
        except BaseException as e:  # noqa: BLE001 (re-raised by result(), in the caller's thread)
            self._out.append((False, e))

    def result(self, timeout: float):
        self._thread.join(timeout)
        if not self._out:
            raise SGLangError(f"the weight-update group did not finish within {timeout:.0f}s")
        ok, value = self._out[0]
        if not ok:
            raise value
        return value


def server_urls(rollout) -> list[str]:
    """`rollout.sglang_url` as a list (it may name one server per generator, comma-separated)."""
    return [u.strip() for u in rollout.sglang_url.split(",") if u.strip()]


def check_setup(rollout) -> None:
    """What the launcher checks before any actor starts: the servers answer, or sglang can be launched.

    Imports nothing heavy: finding the `sglang` package is not importing it.
    """
    import importlib.util

    urls = server_urls(rollout)
    for url in urls:
        status, out = SGLangClient(url).request("/health", timeout=5.0)
        if status not in (200, 503):  # 503: still starting (the generator waits for it)
            raise SGLangError(f"{url}/health answered HTTP {status}: {_message(out)}")
    if not urls and importlib.util.find_spec(rollout.sglang_module.split(".")[0]) is None:
        raise SGLangError(f"cannot start an SGLang server: the `{rollout.sglang_module.split('.')[0]}` package is "
                          f"not installed (pip install 'flux-rlhf[sglang]'), and no rollout.sglang_url is given")


def build(cfg, model_path: str, *, index: int = 0, log_dir: str | Path | None = None) -> SGLangEngine:
    """The engine of generator number `index`: connect to its URL, or start its own server."""
    r = cfg.rollout
    urls, server = server_urls(r), None
    if urls:
        url = urls[index % len(urls)]
        wait_until_healthy(url, r.sglang_startup_timeout_s)
    else:
        server = SGLangServer(model_path, host=cfg.net.host, port=r.sglang_port + index if r.sglang_port else 0,
                              args=r.sglang_args, module=r.sglang_module,
                              log_path=Path(log_dir) / f"sglang-{index}.log" if log_dir else None)
        url = server.start(r.sglang_startup_timeout_s)
    try:
        return SGLangEngine(url, update_mode=r.update_mode, pause_mode=r.sglang_pause_mode,
                            weight_sync=r.sglang_weight_sync, bucket_bytes=r.sglang_bucket_mb << 20,
                            group_backend=r.sglang_group_backend, group_host=r.sglang_group_host or cfg.net.host,
                            server=server, restarts=r.sglang_restarts if server else 0,
                            startup_timeout_s=r.sglang_startup_timeout_s)
    except BaseException:
        if server is not None:
            server.stop()
        raise
