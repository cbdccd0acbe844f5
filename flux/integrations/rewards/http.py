"""The HTTP reward client: a reward model or a code sandbox served elsewhere scores each batch.

    POST <url>  {"samples": [{"prompt", "completion", "completion_ids", "finish_reason", "record"}, ...]}
    200         {"scores": [0.5, {"score": 1.0, "passed": 3}, null, ...]}   (or the bare list)

One request per prompt group (its samples together, as a reward model batches them). A score is a
number, a dict with `score` and more numbers (logged as reward/<k>), or null (not applicable). A request
that fails to connect, times out, or is answered 429 or 5xx is tried again `retries` times (waiting
0.5 s, 1 s, 2 s, ...); any other answer fails the batch at once, with the server's words. The pool
(flux.rewards.RewardPool) counts a failed batch's samples and drops their group.
"""

from __future__ import annotations

import asyncio

import httpx


class RewardServerError(RuntimeError):
    """The reward server refused a batch, or never answered it."""


class HttpReward:
    """An async batched reward part: `await HttpReward(url, ...)(samples)` → a value per sample."""

    def __init__(self, url: str, timeout_s: float = 30.0, retries: int = 2, concurrency: int = 32):
        self.url, self.retries, self.timeout_s, self.concurrency = url, retries, timeout_s, concurrency
        self.client: httpx.AsyncClient | None = None  # made on the first call, on the pool's event loop

    async def __call__(self, samples) -> list:
        if self.client is None:
            self.client = httpx.AsyncClient(timeout=self.timeout_s or None,
                                            limits=httpx.Limits(max_connections=max(1, self.concurrency)))
        body = {"samples": [{"prompt": s.prompt, "completion": s.completion, "finish_reason": s.finish_reason,
                             "completion_ids": list(s.completion_ids or []), "record": s.record}
                            for s in samples]}
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                reply = await self.client.post(self.url, json=body)
            except httpx.TransportError as e:
                if last:
                    raise RewardServerError(f"{self.url}: {type(e).__name__}: {e} "
                                            f"(tried {self.retries + 1} times)") from None
            else:
                if reply.status_code == 200:
                    scores = reply.json()
                    return scores.get("scores") if isinstance(scores, dict) else scores
                if last or not (reply.status_code == 429 or reply.status_code >= 500):
                    raise RewardServerError(f"{self.url} answered {reply.status_code}: {reply.text[:200]}")
            await asyncio.sleep(0.5 * 2 ** attempt)

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()
