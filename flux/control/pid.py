"""The adaptive-asynchrony regulator: a PID on (target − EMA of its input). The controller's input is
S²/target (`rms_input`), so what it holds at the target is the root-mean-square of the staleness S.

Position form, one update per learner step (dt = 1 step):

    S̄_k   = S̄_{k-1} + α (S_k − S̄_{k-1}),            α = 2 / (horizon + 1)
    e_k   = target − S̄_k
    I_k   = I_{k-1} + ki · e_k                       (clamped: anti-windup, see below)
    a_k   = clamp(a_0 + kp · e_k + I_k − kd · (S̄_k − S̄_{k-1}), a_min, a_max)

Derivative on the measurement (not the error) so that a change of target does not kick the output.
Staleness below target (e > 0) raises the async ratio — more lead, more throughput — and staleness
above target lowers it towards synchronous.

Anti-windup is asymmetric. At the top the integral stops where the output reaches a_max, so the loop
leaves the clamp as soon as the error turns. At the bottom the unclamped output (P + I + D) may go on,
down to one range (a_max − a_min) below a_min: staleness above target while the ratio is already at
a_min is a debt, paid back (at ki · target per step at S = 0) before the lead opens again. While a large
S keeps the P part itself below that floor the integral holds still, and the debt builds as the EMA
decays. Without it (and holding the mean of S, not its RMS: `rms_input`) the loop returned to the same
harmful lead every ~9 steps on a simulated plant, ~14 on the built-in sensitive task, however harmful it
had just proved (docs/concepts.md, "The controller and the three modes").
"""

from __future__ import annotations

import math
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
        # Clamped integration: up to the top clamp, and one range of debt below the bottom one (a step
        # never moves against the error).
        top = self.out_max - rest - self.integral
        bottom = self.out_min - (self.out_max - self.out_min) - rest - self.integral
        self.integral += min(max(self.ki * error, min(0.0, bottom)), max(0.0, top))
        self.output = min(self.out_max, max(self.out_min, rest + self.integral))
        return self.output

    def state(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state(cls, state: dict) -> "PID":
        return cls(**state)


def rms_input(s: float, target: float) -> float:
    """What the controller feeds the PID for one step's staleness S: S²/target. The PID drives the EMA of
    its input to the target, so it holds the root-mean-square of S there: a steady S = target reads the
    same, but a batch at ten times the target counts a hundred times, not ten (harm grows faster than S:
    docs/concepts.md, "The controller and the three modes"). At target 0, S itself."""
    return s * s / target if target > 0 else s


def rms_reading(ema: float | None, target: float) -> float | None:
    """The inverse of `rms_input` for the PID's EMA: the smoothed S in units of S (an RMS)."""
    return ema if ema is None or target <= 0 else math.sqrt(ema * target)
