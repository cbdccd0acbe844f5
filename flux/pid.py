"""The adaptive-asynchrony regulator: a PID on (target staleness − EMA of measured staleness).

Position form, one update per learner step (dt = 1 step):

    S̄_k   = S̄_{k-1} + α (S_k − S̄_{k-1}),            α = 2 / (horizon + 1)
    e_k   = target − S̄_k
    I_k   = I_{k-1} + ki · e_k                       (frozen while the output is saturated and
                                                      e_k would push it further: anti-windup)
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
        derivative = self.ema - prev
        unclamped = self.bias + self.kp * error + self.integral + self.ki * error - self.kd * derivative
        saturated_high = unclamped > self.out_max and error > 0
        saturated_low = unclamped < self.out_min and error < 0
        if not (saturated_high or saturated_low):
            self.integral += self.ki * error
        raw = self.bias + self.kp * error + self.integral - self.kd * derivative
        self.output = min(self.out_max, max(self.out_min, raw))
        return self.output

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> "PID":
        return cls(**state)
