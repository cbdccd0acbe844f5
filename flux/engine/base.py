"""The rollout-engine interface: what a generator actor needs from any backend (the engine plane of
docs/architecture.md; docs/contributing.md, "A rollout engine")."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Protocol, Union

import numpy as np

# A state dict, or a zero-arg callable returning one (so the copy out of shared memory happens lazily).
WeightSource = Union[Mapping[str, Any], Callable[[], Mapping[str, Any]]]


@dataclass
class SamplingParams:
    """How to sample one completion per prompt."""

    max_new_tokens: int = 16
    """Hard cap on completion length; a completion that reaches it has `finished=False`."""
    temperature: float = 1.0
    """Logits are divided by this before softmax; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: sample only from the smallest token set whose probability reaches top_p."""
    top_k: int = 0
    """Sample only from the k most likely tokens; 0 disables."""
    stop_token_ids: tuple[int, ...] = ()
    """Sampling one of these ends the completion; the stop token is kept as its last token."""
    seed: int | None = None
    """When set, the call's random draws restart from this seed: the same prompts, weights and seed give
    the same completions (a resumed run re-samples exactly what the uninterrupted one would have)."""

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if any(not isinstance(t, (int, np.integer)) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative ints, got {self.stop_token_ids}")


@dataclass
class Completion:
    """One sampled completion. All arrays have shape (L,), L = number of generated tokens >= 1."""

    token_ids: np.ndarray
    """int32 token ids; ends with the stop token when `finished`."""
    logprobs: np.ndarray
    """float32 behaviour log-probs, log_softmax(logits / T)[token] of the full tempered distribution."""
    versions: np.ndarray
    """int32 policy version of the weights that sampled each token (may change mid-sequence)."""
    finished: bool
    """True: ended on a stop token. False: hit max_new_tokens."""


class EngineLost(RuntimeError):
    """The engine's backend is gone mid-call (an SGLang server that died). The generator hands the call's
    groups back to be re-queued, then asks `engine.recover()` (if the engine has it) to bring it back;
    without a recovery the generator exits with this message."""


class RolloutEngine(Protocol):
    """A backend that samples completions and takes new weights while it runs (docs/contributing.md)."""

    version: int
    tokens_generated: int
    busy_seconds: float

    def generate(self, prompts: list[list[int]], sampling: SamplingParams) -> list[Completion]:
        """One completion per prompt, in order."""
        ...

    def load_weights(self, version: int, source: WeightSource) -> None:
        """Queue new weights (thread-safe, returns at once); the engine applies them at a safe point."""
        ...

    def apply_pending(self) -> bool:
        """Apply queued weights now; True if the model changed."""
        ...

    def pause(self) -> None: ...

    def resume(self) -> None: ...

    def close(self) -> None: ...

    # Optional: `recover() -> bool` after an EngineLost: True once the backend serves again, at the base
    # version (the generator then queues the newest weights again); False when it cannot.


class CallBatch:
    """`add` / `step` (the built-in engine's continuous batching, as the generator drives it) over a plain
    call such as an engine's `generate`: each step makes one call on every request added since the last,
    so a request never joins a running call."""

    def __init__(self, call: Callable[[list, SamplingParams], list[Completion]]):
        self.call, self.queued = call, []

    def add(self, key: Any, prompts: list, sampling: SamplingParams) -> None:
        self.queued.append((key, prompts, sampling))

    @property
    def rows_in_flight(self) -> int:
        return sum(len(prompts) for _, prompts, _ in self.queued)

    def step(self) -> list[tuple[Any, list[Completion]]]:
        queued, self.queued = self.queued, []
        outs, done = self.call([p for _, prompts, _ in queued for p in prompts], queued[0][2]), []
        for key, prompts, _ in queued:
            done.append((key, outs[:len(prompts)]))
            outs = outs[len(prompts):]
        return done
