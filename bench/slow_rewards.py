"""Rewards that take 50 ms per sample (a stand-in for a reward model or a sandbox), for bench/reward_latency.py:
the built-in char_match score after a sleep, written as a plain function and as an `async def`."""

import asyncio
import time

from flux.rewards import char_match

DELAY_S = 0.05


def slow_char_match(completion, record):
    time.sleep(DELAY_S)
    return char_match(completion, record)


async def async_slow_char_match(completion, record):
    await asyncio.sleep(DELAY_S)
    return char_match(completion, record)
