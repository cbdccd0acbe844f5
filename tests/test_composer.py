"""The batch composer: whole groups, freshest first (expiring ones before), stale ones dropped and counted,
balanced splits."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from flux.run import protocol as P
from flux.control.composer import Composer, balance


def group(gid, versions, rewards=(0.0, 1.0), response_len=2):
    """A TrajectoryGroup whose samples (len(rewards) of them) all carry the given per-token versions."""
    n = len(rewards)
    versions = np.resize(np.asarray(versions, np.int32), n * response_len)
    return P.TrajectoryGroup(
        group_id=gid, prompt_index=gid, generator="gen0", sample_count=n,
        prompt_ids=np.array([5, 6], np.int32), response_ids=np.full(n * response_len, 7, np.int32),
        response_lens=np.full(n, response_len, np.int32),
        logprobs=np.full(n * response_len, -1.0, np.float32),
        versions=versions, rewards=np.asarray(rewards, np.float32), finish=np.ones(n, np.uint8),
        gen_seconds=0.0, meta={})


def ids(groups):
    return [g.group_id for g in groups]


def test_whole_groups_only():
    c = Composer(eta_max=2)
    c.add(group(1, [0], rewards=(0, 1, 1, 0)))
    assert c.take(2, version=0) is None       # one group held: no partial batch
    assert c.depth == 1                        # and nothing was consumed
    c.add(group(2, [0], rewards=(1, 0, 0, 0)))
    out = c.take(2, version=0)
    assert sorted(ids(out)) == [1, 2]
    assert all(g.sample_count == 4 and len(g.rewards) == 4 for g in out)
    assert c.depth == 0


def test_freshest_first_then_arrival_order():
    c = Composer(eta_max=5)
    for gid, v in [(1, [1]), (2, [3]), (3, [2]), (4, [3]), (5, [2, 3])]:  # group 5 spans versions: mean 2.5
        c.add(group(gid, v))
    assert ids(c.take(3, version=3)) == [2, 4, 5]
    assert ids(c.take(2, version=3)) == [3, 1]
    assert c.take(1, version=3) is None


def test_groups_about_to_expire_go_before_fresher_ones():
    c = Composer(eta_max=2)
    c.add(group(1, [1]))       # lag 1 at version 2; lag 2 at 3: still fine next step
    c.add(group(2, [0]))       # lag 2 now (usable), lag 3 at the next version: its last chance
    c.add(group(3, [2]))       # the freshest
    c.add(group(4, [0, 2]))    # its oldest token expires too; mean version 1, fresher than group 2
    assert ids(c.take(2, version=2)) == [4, 2]   # both expiring ones, the fresher (by mean version) first
    assert ids(c.take(2, version=2)) == [3, 1]   # then freshest first as usual
    assert c.dropped_stale == 0


def test_stale_groups_dropped_counted_and_reported_once():
    c = Composer(eta_max=2)
    c.add(group(1, [0]))       # lag 3 at version 3: dropped
    c.add(group(2, [1]))       # lag exactly eta_max: kept
    c.add(group(3, [1, 3]))    # kept
    c.add(group(4, [0, 3]))    # its newest token decides: kept, the learner masks the lag-3 tokens
    c.add(group(5, [0, 0]))    # no token within the bound: dropped
    assert c.take(4, version=3) is None   # only 3 usable groups, but the stale ones are gone already
    assert c.dropped_stale == 2
    assert c.pop_dropped() == {"stale": [1, 5]}
    assert c.pop_dropped() == {}           # each drop reported exactly once
    # all three hold tokens that pass the bound at the next version (expiring): freshest first
    assert ids(c.take(3, version=3)) == [3, 4, 2]
    # the dropped samples' completion lengths are counted (two groups of two 2-token samples)
    assert c.stats() == {"depth": 0, "dropped_stale": 2, "dropped_zero_variance": 0, "dropped_lengths": {"2-3": 4}}


def test_stale_drop_happens_at_take_time_version():
    c = Composer(eta_max=1)
    c.add(group(1, [0]))
    assert ids(c.take(1, version=1)) == [1]
    c.add(group(2, [0]))
    assert c.take(1, version=2) is None
    assert c.pop_dropped() == {"stale": [2]} and c.dropped_stale == 1


def test_eta_max_zero_keeps_only_current_version():
    c = Composer(eta_max=0)
    c.add(group(1, [4]))
    c.add(group(2, [5]))
    assert ids(c.take(1, version=5)) == [2]
    assert c.pop_dropped() == {"stale": [1]}


def test_zero_variance_groups_skipped_only_when_asked():
    c = Composer(eta_max=2, skip_zero_variance=True)
    c.add(group(1, [0], rewards=(1, 1, 1, 1)))
    c.add(group(2, [0], rewards=(0, 0, 0, 0)))
    c.add(group(3, [0], rewards=(0, 1, 0, 0)))
    c.add(group(4, [0], rewards=(0.5,)))       # one sample: no variance to speak of, kept
    assert c.depth == 2 and c.dropped_zero_variance == 2 and c.dropped_stale == 0
    assert c.pop_dropped() == {"zero_variance": [1, 2]}
    assert sorted(ids(c.take(2, version=0))) == [3, 4]

    keep = Composer(eta_max=2)
    keep.add(group(1, [0], rewards=(1, 1, 1, 1)))
    assert keep.depth == 1 and keep.pop_dropped() == {}


def test_a_group_from_a_future_version_is_dropped_not_read_as_fresh():
    """A token sampled by a version newer than the learner's cannot be real; clamping its negative lag to 0
    would make it the freshest group of all."""
    c = Composer(eta_max=2)
    c.add(group(1, [3, 9]))
    c.add(group(2, [3]))
    assert ids(c.take(1, version=3)) == [2]
    assert c.pop_dropped() == {"future_version": [1]} and c.dropped_stale == 0


def test_the_gate_lets_in_admitted_groups_once_with_tokens_inside_the_vocabulary():
    from flux.control.admission import admission_token
    from flux.control.composer import Gate

    gate = Gate("secret", vocab_size=8)

    def admitted(g, generator="gen0"):
        g.token = admission_token("secret", g.group_id, generator, g.prompt_index, g.sample_count)
        return g

    assert gate.check(group(1, [0])) == "not_admitted"                       # no token
    assert gate.check(admitted(group(2, [0]), generator="gen1")) == "not_admitted"   # another's credit
    forged = admitted(group(3, [0]))
    forged.prompt_index = 4                                                   # not the admitted prompt
    assert gate.check(forged) == "not_admitted"
    assert gate.check(admitted(group(4, [0]))) == ""
    assert gate.check(admitted(group(4, [0]))) == "duplicate_group"
    wide = admitted(group(5, [0]))
    wide.response_ids[-1] = 8                                                 # one id past the vocabulary
    assert gate.check(wide) == "bad_tokens"


def test_the_gate_remembers_a_bounded_window_of_ids():
    from flux.control.admission import admission_token
    from flux.control.composer import Gate

    gate = Gate("s", vocab_size=0, window=100)

    def admitted(gid):
        g = group(gid, [0])
        g.token = admission_token("s", gid, "gen0", gid, g.sample_count)
        return g

    assert gate.check(admitted(10**9)) == ""                                  # one huge id moves nothing
    for gid in range(1000):
        assert gate.check(admitted(gid)) == ""
    assert len(gate.seen) <= 100 and gate.check(admitted(999)) == "duplicate_group"
    assert gate.check(admitted(3)) == "duplicate_group"                      # long forgotten: refused, not let in
    assert gate.check(admitted(1000)) == ""                                  # the next one still gets in


def test_balance_concrete():
    assert balance([10, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1], 2) == [[0], list(range(1, 11))]
    assert balance([3, 3, 3, 3], 2) == [[0, 2], [1, 3]]
    assert balance([4, 2], 5) == [[0], [1]]          # no empty parts
    assert balance([4, 2], 0) == [[0, 1]]
    assert balance([], 3) == []


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 512), max_size=64), st.integers(1, 8))
def test_balance_partitions_with_near_equal_loads(lengths, parts):
    bins = balance(np.array(lengths, np.int64), parts)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))            # every sample exactly once
    assert all(b == sorted(b) and b for b in bins)
    assert len(bins) == min(parts, len(lengths))
    if len(bins) > 1:
        loads = [sum(lengths[i] for i in b) for b in bins]
        # Greedy least-loaded assignment: the heaviest part was the lightest when it got its last item.
        assert max(loads) - min(loads) <= max(lengths)


def test_a_group_is_kept_while_its_newest_token_is_within_the_bound():
    """A long completion spans versions (continuous batching, in-flight updates): it is dropped only once
    no token is left within eta_max; the learner masks the older ones (tests/test_learner_actor.py)."""
    c = Composer(eta_max=1)
    c.add(group(1, [0, 0, 2, 3]))   # oldest token 3 versions behind at version 3, newest 0
    c.add(group(2, [0, 1]))         # newest token 2 behind: nothing usable
    assert [g.group_id for g in c.take(1, version=3)] == [1]
    assert c.pop_dropped() == {"stale": [2]}
