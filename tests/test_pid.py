"""The staleness PID (flux/control/pid.py) on a simulated plant, plus clamping, anti-windup and derivative kick."""

import math
import random

import pytest

from flux.control.pid import PID, rms_input

TARGET = 0.1


def plant_run(pid: PID, gains, lag=0.5, noise=0.01, seed=0):
    """Closed loop on a first-order plant: x_k = x_{k-1} + lag·(g_k·a_{k-1} − x_{k-1}), S_k = x_k + noise.

    g is the staleness one unit of async ratio produces at steady state: a step in g is a step change in
    generation speed (faster generators run further ahead for the same ratio). Returns rows (g, S, EMA, a).
    """
    rng = random.Random(seed)
    a, x, rows = pid.bias, 0.0, []
    for g in gains:
        x += lag * (g * a - x)
        s = max(0.0, x + rng.gauss(0.0, noise))
        a = pid.update(s)
        assert pid.out_min <= a <= pid.out_max
        rows.append((g, s, pid.ema, a))
    return rows


def test_settles_at_target_through_a_step_change_in_generation_speed():
    gains = [0.3] * 150 + [0.15] * 150      # generation slows down halfway: the same a gives half the lag
    rows = plant_run(PID(TARGET), gains)
    settled = rows[75:150] + rows[225:]
    assert max(abs(ema - TARGET) for _, _, ema, _ in settled) <= 0.03
    # the integral found each new operating point a* = target / g (no steady-state error)
    def mean_a(part):
        return sum(a for *_, a in part) / len(part)

    assert mean_a(rows[100:150]) == pytest.approx(TARGET / 0.3, abs=0.05)
    assert mean_a(rows[250:]) == pytest.approx(TARGET / 0.15, abs=0.05)
    # right after the step the loop is visibly off target, so the check above is not vacuous
    assert max(abs(ema - TARGET) for _, _, ema, _ in rows[150:170]) > 0.02


def test_without_integral_a_step_leaves_an_offset():
    """Sanity check of the plant: the pure P controller cannot hold the target, the PID above can."""
    rows = plant_run(PID(TARGET, ki=0.0), [0.15] * 200, noise=0.0)
    assert abs(rows[-1][2] - TARGET) > 0.015   # x = g·(bias + target − x) → 0.078, not 0.1


def test_output_is_clamped():
    pid = PID(TARGET, out_min=0.2, out_max=0.8, bias=0.5)
    assert [pid.update(0.0) for _ in range(50)][-1] == 0.8   # never stale: as async as allowed
    assert [pid.update(1.0) for _ in range(50)][-1] == 0.2   # very stale: as synchronous as allowed
    pid = PID(TARGET, kp=100.0)
    assert pid.update(0.0) == 1.0 and pid.update(1.0) == 0.0


def test_anti_windup_at_the_top_leaves_the_clamp_within_a_few_steps():
    pid = PID(TARGET, kp=1.0, ki=0.2)
    for _ in range(500):                       # a long saturation: never stale, the error stays positive
        pid.update(0.0)
    # at the clamp (up to one integral step: see test_output_reaches_the_clamp_under_persistent_error)
    assert pid.output == pytest.approx(1.0, abs=pid.ki * TARGET + 1e-9)
    # a naive integrator would hold 500 steps' worth (0.2·0.1·500 = 10): dozens of steps on the clamp
    assert abs(pid.integral) <= 1.0
    outputs = [pid.update(0.5) for _ in range(3)]   # the error changes sign on the first of these
    assert abs(outputs[-1] - 1.0) > 0.1
    assert all(0.0 <= o <= 1.0 for o in outputs)


@pytest.mark.parametrize("saturated_steps", [50, 500])
def test_below_the_bottom_clamp_the_integral_keeps_one_range_of_debt(saturated_steps):
    """Staleness above target while the ratio is already at a_min is a debt, paid back before the lead
    opens again; it is bounded (one range, a_max − a_min), so a long saturation costs no more than a short one."""
    pid = PID(TARGET, kp=1.0, ki=0.2)
    for _ in range(saturated_steps):           # S = 1: error −0.9, P part 0.5 − 0.9 = −0.4
        pid.update(1.0)
    assert pid.output == 0.0
    assert pid.integral == pytest.approx(0.0 - 1.0 + 0.4)   # a_min − range − P part: the debt is full
    held = 0
    while pid.update(0.0) == 0.0:               # fresh batches again
        held += 1
    # the EMA needs ~6 steps to fall below the target, then the debt is paid at ki·target = 0.02 a step:
    # the same 20 steps at a = 0 after 50 or 500 steps of saturation
    assert held == 20


def test_rms_input_holds_the_root_mean_square_of_the_staleness():
    assert rms_input(TARGET, TARGET) == pytest.approx(TARGET)          # a steady S at target reads the same
    assert rms_input(1.0, TARGET) == pytest.approx(10.0)               # ten times the target counts 100×
    assert rms_input(0.05, TARGET) == pytest.approx(0.025)
    assert rms_input(0.3, 0.0) == 0.3                                  # target 0: S itself
    # docs/concepts.md's example: nine batches at 0.05 and one at 0.3 average 0.075, below a 0.1 target,
    # but what the PID sees averages 0.1125 (an RMS of 0.106): above it
    batches = [0.05] * 9 + [0.3]
    assert sum(batches) / 10 == pytest.approx(0.075)
    assert sum(rms_input(s, TARGET) for s in batches) / 10 == pytest.approx(0.1125)


def test_output_reaches_the_clamp_under_persistent_error():
    pid = PID(TARGET, kp=1.0, ki=0.2)
    for _ in range(100):
        pid.update(0.0)
    assert pid.output == 1.0


def test_derivative_is_on_the_measurement_not_the_error():
    def make():
        return PID(0.2, kp=0.5, ki=0.1, kd=5.0, bias=0.5)

    steady, moved = make(), make()
    for _ in range(30):
        steady.update(0.2)
        moved.update(0.2)
    assert steady.output == pytest.approx(0.5)
    moved.target = 0.25                                   # a change of target ...
    a_steady, a_moved = steady.update(0.2), moved.update(0.2)
    # ... moves the output by the P and I terms only: no kd·Δtarget kick (that would be 0.25 here)
    assert a_moved - a_steady == pytest.approx((0.5 + 0.1) * 0.05)
    # while a change of the measurement does go through the derivative term
    before = make()
    for _ in range(30):
        before.update(0.2)
    no_d = PID(0.2, kp=0.5, ki=0.1, kd=0.0, bias=0.5)
    for _ in range(30):
        no_d.update(0.2)
    jump_d, jump_no_d = before.update(0.3), no_d.update(0.3)
    ema_step = before.ema - 0.2
    assert jump_no_d - jump_d == pytest.approx(5.0 * ema_step)


def test_first_measurement_seeds_the_ema():
    pid = PID(TARGET, ema_horizon=5.0)
    pid.update(0.4)
    assert pid.ema == 0.4
    pid.update(0.1)
    assert pid.ema == pytest.approx(0.4 + (2 / 6) * (0.1 - 0.4))


def test_state_round_trip_continues_identically():
    pid = PID(TARGET, kd=0.3)
    for s in (0.0, 0.3, 0.05, 0.2):
        pid.update(s)
    clone = PID.from_state(pid.state())
    assert [clone.update(s) for s in (0.1, 0.4, 0.0)] == [pid.update(s) for s in (0.1, 0.4, 0.0)]


def whole_step_plant(pid: PID, per_step: float, rms: bool, steps: int = 600) -> list[tuple[int, float]]:
    """The controller's loop on a plant that sees whole-step leads: (lead, S) per step."""
    from flux.control.admission import Admission

    adm, rng, x, rows = Admission(8, eta_max=4), random.Random(0), 0.0, []
    for _ in range(steps):
        adm.async_ratio = pid.output if pid.output is not None else pid.bias
        x += 0.5 * (per_step * adm.lead() - x)
        s = min(1.0, max(0.0, x + rng.gauss(0.0, 0.01)))
        pid.update(rms_input(s, pid.target) if rms else s)
        rows.append((adm.lead(), s))
    return rows


@pytest.mark.parametrize("per_step", [0.15, 0.3, 0.06])
def test_the_controllers_input_holds_the_rms_of_s_at_the_target(per_step):
    settled = whole_step_plant(PID(TARGET, kp=0.3, ki=0.2, bias=0.0), per_step, rms=True)[100:]
    assert math.sqrt(sum(s * s for _, s in settled) / len(settled)) == pytest.approx(TARGET, abs=0.01)
    assert len({lead for lead, _ in settled}) >= 2


def test_a_lead_that_saturates_s_is_tried_rarely():
    """One step of lead already gives S = 1 (the sensitive workload early on): holding the mean of S at
    0.1 would return to that lead on 1 step in 20; the RMS with its debt, on fewer than 1 in 50."""
    share = {}
    for rms in (False, True):
        settled = whole_step_plant(PID(TARGET, kp=0.3, ki=0.2, bias=0.0), 2.0, rms=rms)[100:]
        share[rms] = sum(lead > 0 for lead, _ in settled) / len(settled)
    assert share[False] >= 0.04 and share[True] <= 0.02, share


@pytest.mark.parametrize("per_step", [0.15, 0.3, 0.06])
def test_a_whole_step_lead_holds_the_mean_target_by_alternating_neighbouring_leads(per_step):
    """Admission rounds a·η_max to whole steps (flux/control/admission.py): the plant sees only leads
    0, 1, 2, ... The integral still finds the share of steps at each lead that puts the mean of S on
    the target, alternating between the two leads around it (per_step: the staleness of one step of lead)."""
    rows = whole_step_plant(PID(TARGET, kp=0.3, ki=0.2), per_step, rms=False)
    assert max(s for _, s in rows) < 1.0                     # the plant's clip at 1 never binds here
    settled = rows[100:]
    assert sum(s for _, s in settled) / len(settled) == pytest.approx(TARGET, abs=0.02)
    between = TARGET / per_step                               # the fractional lead that would hold it
    leads = {lead for lead, _ in settled}
    assert leads <= {math.floor(between) - 1, math.floor(between), math.ceil(between), math.ceil(between) + 1}
    assert len(leads) >= 2                                    # it really alternates (no single lead holds it)
