"""The adaptive-asynchrony regulator: a PID on (target staleness − EMA of measured staleness).

Position form, one update per learner step (dt = 1 step):

    S̄_k   = S̄_{k-1} + α (S_k − S̄_{k-1}),            α = 2 / (horizon + 1)
    e_k   = target − S̄_k
    I_k   = I_{k-1} + ki · e_k                       (clamped so the output never winds past its
                                                      limits: anti-windup)
    a_k   = clamp(a_0 + kp · e_k + I_k − kd · (S̄_k − S̄_{k-1}), a_min, a_max)

Derivative on the measurement (not the error) so that a change of target does not kick the output.
Staleness below target (e > 0) raises the async ratio — more lead, more throughput — and staleness
above target lowers it towards synchronous.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass
class PID:
    target: float
    kp: float = 1.0
    ki: float = 0.2
    kd: float = 0.0
    out_min: float = 0.0
    out_max: float = 1.0
    bias: float = 0.5
    ema_horizon: float = 5.0
    integral: float = 0.0
    ema: float | None = None
    output: float | None = None

    def update(self, measured: float) -> float:
        """Feed one staleness measurement; return the new (clamped) async ratio."""
        alpha = 2.0 / (self.ema_horizon + 1.0)
        prev = measured if self.ema is None else self.ema
        self.ema = prev + alpha * (measured - prev)
        error = self.target - self.ema
        rest = self.bias + self.kp * error - self.kd * (self.ema - prev)
        # Anti-windup by clamped integration: the integral grows only as far as the output can still
        # move, so it never winds past the clamp, yet a constant error drives the output all the way to it.
        step = self.ki * error
        if step > 0:
            step = max(0.0, min(step, self.out_max - rest - self.integral))
        elif step < 0:
            step = min(0.0, max(step, self.out_min - rest - self.integral))
        self.integral += step
        self.output = min(self.out_max, max(self.out_min, rest + self.integral))
        return self.output

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> "PID":
        return cls(**state)
