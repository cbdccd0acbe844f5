"""Admission credits (the actuator of adaptive asynchrony) and the prompt cursor.

The bound under test (docs/concepts.md, "Admission"): a group is admitted only while
started ≤ (v + 1 + L)·B, with the lead L = a·η_max rounded to the nearest whole step.
"""

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flux.control.admission import Admission, PromptCursor

admit = st.tuples(st.just("admit"), st.integers(1, 12))
bump = st.tuples(st.just("bump"), st.just(0))
give_back = st.tuples(st.just("give_back"), st.integers(0, 10**6))
ratio = st.tuples(st.just("ratio"), st.floats(0.0, 1.0))
events = st.lists(st.one_of(admit, admit, bump, give_back, ratio), max_size=120)


def exact_bound(adm: Admission) -> int:
    """(v + 1 + L)·B with L the whole step nearest to a·η_max (checked in exact arithmetic; a float a·η_max
    within 1e-9 of a half step may round either way)."""
    lead = adm.lead()
    assert isinstance(lead, int) and 0 <= lead <= adm.eta_max
    assert abs(Fraction(lead) - Fraction(adm.async_ratio) * adm.eta_max) <= Fraction(1, 2) + Fraction(1, 10**9)
    return (adm.version + 1 + lead) * adm.batch_samples


def replay(adm: Admission, script, on_admit=lambda adm, n, ok: None) -> list[int]:
    """Apply events; give-backs return a still-held admitted group. Returns the sizes still held."""
    held: list[int] = []
    for kind, x in script:
        if kind == "admit":
            before = adm.started
            ok = adm.try_admit(x)
            assert adm.started == before + (x if ok else 0)
            if ok:
                held.append(x)
            on_admit(adm, x, ok)
        elif kind == "bump":
            adm.version += 1
        elif kind == "give_back" and held:
            adm.give_back(held.pop(x % len(held)))
        elif kind == "ratio":
            adm.async_ratio = x
        assert adm.started == sum(held)
    return held


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 64), st.integers(0, 4), st.floats(0.0, 1.0), events)
def test_started_never_exceeds_the_bound(batch, eta_max, a0, script):
    def check(adm, n, ok):
        bound = exact_bound(adm)
        if ok:  # the property: never over the bound at the moment of an admit
            assert adm.started <= bound
        else:   # and no needless refusal: the group really did not fit
            assert adm.started + n > bound

    replay(Admission(batch, eta_max, a0), script, check)


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 64), st.integers(0, 4),
       st.lists(st.one_of(admit, admit, bump, give_back), max_size=120))
def test_sync_never_admits_work_for_the_next_step_early(batch, eta_max, script):
    """a = 0: while the policy is at version v, no sample beyond batch v (samples [v·B, (v+1)·B)) starts."""
    def check(adm, n, ok):
        if ok:
            assert adm.started <= (adm.version + 1) * batch
        else:
            assert adm.started + n > (adm.version + 1) * batch

    replay(Admission(batch, eta_max, 0.0), script, check)


def test_sync_admits_exactly_one_batch_per_version():
    adm = Admission(batch_samples=8, eta_max=2, async_ratio=0.0)
    assert [adm.try_admit(4) for _ in range(3)] == [True, True, False]
    adm.version = 1
    assert [adm.try_admit(4) for _ in range(3)] == [True, True, False]


@pytest.mark.parametrize("a, groups", [(0.0, 2), (0.2, 2), (0.25, 4), (0.5, 4), (0.7, 4), (0.75, 6), (1.0, 6)])
def test_the_lead_is_whole_steps(a, groups):
    # B = 8, eta_max = 2, groups of 4: a·η_max = 0, 0.4, 0.5, 1, 1.4, 1.5, 2 → a lead of 0, 0, 1, 1, 1, 2, 2
    # steps → bound (1 + L)·8 samples = 8, 8, 16, 16, 16, 24, 24: a batch is never split across two leads
    adm = Admission(batch_samples=8, eta_max=2, async_ratio=a)
    admitted = 0
    while adm.try_admit(4):
        admitted += 1
    assert admitted == groups


def test_near_one_ratio_keeps_its_whole_lead():
    adm = Admission(batch_samples=3, eta_max=1, async_ratio=1 - 1e-15)
    assert sum(adm.try_admit(1) for _ in range(10)) == 6


def test_give_back_reopens_admission_and_cannot_go_negative():
    adm = Admission(batch_samples=4, eta_max=0)
    assert adm.try_admit(4) and not adm.try_admit(4)
    adm.give_back(4)
    assert adm.try_admit(4)
    with pytest.raises(AssertionError):
        adm.give_back(8)


def test_cursor_epochs_cover_every_prompt_once():
    cur = PromptCursor(num_prompts=7, seed=3)
    epochs = [[cur.next() for _ in range(7)] for _ in range(3)]
    assert all(sorted(e) == list(range(7)) for e in epochs)
    assert len({tuple(e) for e in epochs}) == 3          # reshuffled every epoch
    assert cur.epoch == 2 and cur.position == 7
    again = PromptCursor(num_prompts=7, seed=3)
    assert [again.next() for _ in range(21)] == [i for e in epochs for i in e]   # seeded
    other = PromptCursor(num_prompts=7, seed=4)
    assert [other.next() for _ in range(7)] != epochs[0]


def test_cursor_serves_requeued_first_without_losing_its_place():
    cur = PromptCursor(num_prompts=5, seed=0)
    first = [cur.next() for _ in range(2)]
    cur.requeue(first[1])
    cur.requeue(first[0])
    assert [cur.next(), cur.next()] == [first[1], first[0]]
    rest = [cur.next() for _ in range(3)]
    assert sorted(first + rest) == list(range(5))
    assert cur.state()["requeued"] == []


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 20), st.integers(0, 1000), st.lists(st.booleans(), max_size=100))
def test_cursor_resumes_from_state_and_covers_epochs_with_requeues(n, seed, requeue_after):
    cur = PromptCursor(n, seed)
    fresh = []   # draws that were not re-queued prompts, in order
    served_requeue = []
    pending = []
    for again in requeue_after:
        idx = cur.next()
        if pending and idx == pending[0]:
            served_requeue.append(pending.pop(0))
        else:
            fresh.append(idx)
        if again:
            cur.requeue(idx)
            pending.append(idx)
    # fresh draws walk whole epochs: each complete epoch is a permutation
    for k in range(len(fresh) // n):
        assert sorted(fresh[k * n:(k + 1) * n]) == list(range(n))
    resumed = PromptCursor(**cur.state())
    assert [resumed.next() for _ in range(2 * n)] == [cur.next() for _ in range(2 * n)]
