"""The reward pool: slow, async and remote rewards are scored concurrently, bounded, and counted when they
fail; the HTTP client is tested against a real HTTP server (the standard library's, on localhost)."""

import asyncio
import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from flux.integrations.rewards.http import HttpReward
from flux.rewards import Part, RewardPool, Sample, adapt
from flux.run.runtime import FluxRunError


def samples(n: int, record=None) -> list[Sample]:
    return [Sample(f"c{i}", record or {"answer": "1"}, [i, 2], "stop") for i in range(n)]


class Gauge:
    """How many calls run at once, at most."""

    def __init__(self):
        self.now = self.peak = 0
        self.lock = threading.Lock()

    def __enter__(self):
        with self.lock:
            self.now += 1
            self.peak = max(self.peak, self.now)

    def __exit__(self, *exc):
        with self.lock:
            self.now -= 1


def test_slow_rewards_run_side_by_side_within_the_worker_limit():
    gauge = Gauge()

    def slow(completion, record):
        with gauge:
            time.sleep(0.05)
        return 1.0

    pool = RewardPool([adapt(slow)], workers=8)
    t0 = time.monotonic()
    assert pool.score(samples(32)) == [1.0] * 32
    took = time.monotonic() - t0
    assert gauge.peak == 8 and 0.2 <= took < 1.2, (gauge.peak, took)  # 4 waves of 8, not 32 in a row (1.6 s)
    pool.close()


def test_async_rewards_are_awaited_in_both_styles():
    gauge = Gauge()

    async def native(completion, record):
        with gauge:
            await asyncio.sleep(0.05)
        return float(record["answer"])

    async def trl(completions, **kw):
        return [float(c == "c1") for c in completions]

    pool = RewardPool([adapt(native)], workers=16)
    t0 = time.monotonic()
    assert pool.score(samples(32)) == [1.0] * 32 and time.monotonic() - t0 < 0.6 and gauge.peak == 16
    pool.close()
    pool = RewardPool([adapt(trl)])
    assert pool.score(samples(3)) == [0.0, 1.0, 0.0]
    pool.close()


def test_failures_are_counted_by_kind_and_the_pool_goes_on(caplog):
    def flaky(completion, record):
        k = int(completion[1:])
        if k == 0:
            raise KeyError("answer")
        if k == 1:
            return math.nan
        if k == 2:
            time.sleep(5)  # past the timeout: abandoned, its thread runs on
        if k == 3:
            return "1.0"
        return 1.0

    pool = RewardPool([adapt(flaky)], timeout_s=0.3)
    t0 = time.monotonic()
    assert pool.score(samples(6)) == [None, None, None, None, 1.0, 1.0]
    assert time.monotonic() - t0 < 2
    assert pool.failures == {"raised": 1, "non_finite": 1, "timeout": 1, "not_a_number": 1}
    assert pool.score(samples(6)[4:]) == [1.0, 1.0]
    assert sum("KeyError: 'answer'" in r.getMessage() for r in caplog.records) == 1
    pool.close()


def test_calls_abandoned_past_their_timeout_keep_their_threads_and_the_rest_go_on():
    gauge = Gauge()

    def reward(completion, record):
        if completion.startswith("hang"):
            time.sleep(2)
        with gauge:
            time.sleep(0.1)
        return 1.0

    pool = RewardPool([adapt(reward)], workers=4, timeout_s=0.3)
    assert pool.score([Sample("hang0", {}), Sample("hang1", {})]) == [None, None]
    t0 = time.monotonic()
    assert pool.score(samples(4)) == [1.0] * 4  # two threads are still asleep: two more start
    assert len(pool.threads) == 4 and time.monotonic() - t0 < 0.3 * 2 and gauge.peak == 2
    pool.close()


def test_a_fast_function_scores_a_group_in_one_thread_call_and_a_slow_one_a_call_each(monkeypatch):
    import flux.rewards

    monkeypatch.setattr(flux.rewards, "FAST_CALL_S", 0.01)  # (a busy 2-core machine can take 1 ms to switch)
    def seen(calls):
        def reward(completion, record):
            calls.append(threading.get_ident())
            if completion == "c3" and record.get("raise"):
                raise ValueError("three")
            time.sleep(record.get("sleep", 0))
            return 1.0
        return reward

    fast, slow = [], []
    pool = RewardPool([adapt(seen(fast))], workers=8)
    assert pool.score(samples(8)) == [1.0] * 8  # not yet measured: a call per sample (and now measured)
    fast.clear()
    assert pool.score(samples(8)) == [1.0] * 8 and len(set(fast)) == 1  # one thread for the group
    # One sample raises inside the group call: the group is scored again a call per sample, so only
    # that sample fails (counted once), the others keep their scores.
    assert pool.score(samples(8, {"raise": 1})) == [1.0] * 3 + [None] + [1.0] * 4
    assert pool.failures == {"raised": 1}
    pool.close()
    pool = RewardPool([adapt(seen(slow))], workers=8)
    pool.score(samples(8, {"sleep": 0.02}))
    slow.clear()
    t0 = time.monotonic()
    assert pool.score(samples(8, {"sleep": 0.02})) == [1.0] * 8
    assert len(set(slow)) > 1 and time.monotonic() - t0 < 8 * 0.02  # side by side, not one after another
    pool.close()


def test_a_function_that_times_out_in_a_group_call_gets_a_call_per_sample_from_then_on():
    calls = []

    def reward(completion, record):
        calls.append(threading.get_ident())
        time.sleep(1.0 if record.get("hang") and completion == "c2" else 0)
        return 1.0

    pool = RewardPool([adapt(reward)], workers=16, timeout_s=0.3)
    assert pool.score(samples(4)) == [1.0] * 4  # measured fast
    assert pool.score(samples(4, {"hang": 1})) == [1.0, 1.0, None, 1.0]  # the group call, then one each
    assert pool.failures == {"timeout": 1} and math.isnan(pool.parts[0].call_s)
    assert pool.score(samples(8)) == [1.0] * 8 and math.isnan(pool.parts[0].call_s)  # still one each
    pool.close()


def test_a_batch_reward_must_answer_once_per_sample():
    pool = RewardPool([adapt(lambda completions, **kw: [1.0])])
    assert pool.score(samples(3)) == [None] * 3 and pool.failures == {"bad_batch": 3}
    pool.close()


def test_a_reward_that_keeps_failing_stops_the_run():
    pool = RewardPool([adapt(lambda completion, record: 1 / 0)], window=10, max_failure_rate=0.5)
    pool.score(samples(5))
    pool.check()  # the window is not full yet
    pool.score(samples(5))
    with pytest.raises(FluxRunError, match=r"failed on 10 of the last 10 samples \(raised: 10\)"):
        pool.check()
    pool.close()


class RewardServer:
    """A real HTTP reward server on localhost: scores each sample `len(completion)`, counts requests, can
    fail the first `fail_first` with a status, sleep before answering, and reports the peak concurrency."""

    def __init__(self, fail_first: int = 0, status: int = 503, delay_s: float = 0.0):
        self.requests, self.bodies, self.gauge = 0, [], Gauge()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.gauge:
                    server.requests += 1
                    n = server.requests
                    server.bodies.append(body)
                    time.sleep(delay_s)
                if n <= fail_first:
                    reply, code = b"overloaded", status
                else:
                    scores = [{"score": float(len(s["completion"])), "ids": float(len(s["completion_ids"]))}
                              for s in body["samples"]]
                    reply, code = json.dumps({"scores": scores}).encode(), 200
                self.send_response(code)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/score"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server_factory():
    servers = []

    def make(**kw):
        servers.append(RewardServer(**kw))
        return servers[-1]

    yield make
    for s in servers:
        s.close()


def http_pool(server, timeout_s=5.0, retries=2, workers=4):
    part = Part("http", HttpReward(server.url, timeout_s, retries, workers), batched=True, is_async=True,
                timeout_s=None)
    return RewardPool([part], workers=workers, timeout_s=timeout_s)


def test_http_scores_a_batch_per_request(server_factory):
    server = server_factory()
    pool = http_pool(server)
    assert pool.submit(samples(3, {"prompt": "p", "answer": "7"})).result() == [(2.0, {"ids": 2.0})] * 3
    [body] = server.bodies
    assert body["samples"][1] == {"prompt": "p", "completion": "c1", "finish_reason": "stop",
                                  "completion_ids": [1, 2], "record": {"prompt": "p", "answer": "7"}}
    pool.close()


def test_http_retries_an_overloaded_server_and_fails_fast_on_a_bad_request(server_factory):
    server = server_factory(fail_first=2, status=503)
    pool = http_pool(server)
    assert pool.score(samples(2)) == [2.0, 2.0] and server.requests == 3  # 503, 503, then 200
    pool.close()
    refused = server_factory(fail_first=10, status=400)
    pool = http_pool(refused)
    assert pool.score(samples(2)) == [None, None] and refused.requests == 1 and pool.failures == {"raised": 2}
    pool.close()


def test_http_timeouts_are_retried_then_fail(server_factory, caplog):
    server = server_factory(delay_s=0.5)
    pool = http_pool(server, timeout_s=0.1, retries=1)
    t0 = time.monotonic()
    assert pool.score(samples(2)) == [None, None]
    assert server.requests == 2 and time.monotonic() - t0 < 3
    assert any("ReadTimeout" in r.getMessage() and "tried 2 times" in r.getMessage() for r in caplog.records)
    pool.close()


def test_http_requests_in_flight_stay_within_the_limit(server_factory):
    server = server_factory(delay_s=0.1)
    pool = http_pool(server, workers=3)
    futures = [pool.submit(samples(2)) for _ in range(12)]
    assert all(f.result() == [(2.0, {"ids": 2.0})] * 2 for f in futures)
    assert server.gauge.peak == 3
    pool.close()


@pytest.mark.slow
def test_a_run_trains_on_an_http_reward(server_factory, default_model, tmp_path):
    from tests.test_e2e import SMALL, assert_nothing_left, flux_train, metrics

    server = server_factory()
    out = tmp_path / "run"
    proc = flux_train("--max-steps", "3", *SMALL, "--set", f"reward_url={server.url}", "--out", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = metrics(out)
    assert len(rows) == 3 and all("reward/ids" in r for r in rows), rows
    groups = json.loads((out / "groups.json").read_text())
    assert groups["trained"] == 3 * 2 and groups["dropped_by"] == {}, groups
    # one request per generated group, plus the evaluations' (one batch each)
    assert server.requests >= groups["trained"] + 1
    assert_nothing_left(out)
