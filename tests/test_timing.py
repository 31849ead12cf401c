"""paca_kernels.timing: interleaved rounds, their stopping rules, per-round ratios and their verdicts.
No test here depends on how fast the machine is: the timed functions only record or sleep briefly."""

from __future__ import annotations

import time

import pytest

from paca_kernels import timing


def test_rounds_rotate_the_order():
    calls: list[str] = []
    fns = {n: (lambda n=n: calls.append(n)) for n in "abc"}
    result = timing.interleave(fns, rounds=3, warmup=1)
    assert calls == list("abc") + list("abc" "bca" "cab")  # one warm-up call each, then rotating rounds
    assert result.rounds == 3 and result.stopped_by == "3 rounds asked"
    assert set(result.warmup_s) == set("abc")


def test_samples_read_the_given_clock():
    """clock= decides what a sample measures (benchmarks/interleaved.py --cpu-time: thread CPU time)."""
    ticks = iter(range(100))
    r = timing.interleave({"a": lambda: None, "b": lambda: None}, rounds=3, warmup=0,
                          clock=lambda: float(next(ticks)))
    assert r.samples == {"a": [1.0] * 3, "b": [1.0] * 3}


def test_budget_stops_the_rounds_after_the_minimum():
    fns = {"a": lambda: time.sleep(0.002), "b": lambda: time.sleep(0.002)}
    none_left = timing.interleave(fns, budget_s=0.0, min_rounds=4, warmup=0)
    assert none_left.rounds == 4 and none_left.stopped_by == "minimum of 4 rounds (no budget left)"
    over = timing.interleave(fns, budget_s=0.001, min_rounds=3, warmup=0)
    assert over.rounds == 3 and over.stopped_by == "minimum of 3 rounds (past the 0.001 s budget)"
    some = timing.interleave(fns, budget_s=0.3, min_rounds=2, warmup=0)
    # About 4 ms a round: well over the minimum, and a round is only started when the mean round
    # still fits (the margin is for a loaded machine's stalls).
    assert 2 < some.rounds < 80 and some.elapsed_s < 0.3 + 0.25
    assert some.stopped_by == "budget 0.3 s"
    capped = timing.interleave(fns, budget_s=10.0, min_rounds=2, max_rounds=5, warmup=0)
    assert capped.rounds == 5 and capped.stopped_by == "at most 5 rounds"
    with pytest.raises(ValueError, match="rounds or budget_s"):
        timing.interleave(fns)


def test_spread_quartiles_stay_within_the_samples():
    s = timing.Spread.of([3.0, 1.0, 2.0])
    assert (s.median, s.min, s.max, s.n) == (2.0, 1.0, 3.0, 3)
    assert 1.0 <= s.q1 <= s.median <= s.q3 <= 3.0
    one = timing.Spread.of([5.0])
    assert one.q1 == one.q3 == one.median == 5.0


def test_speedup_is_taken_per_round():
    """A busy spell slowing both providers in round 2 leaves the per-round ratio at 4."""
    samples = {"ref": [1.0, 8.0, 1.0, 1.0], "fast": [0.25, 2.0, 0.25, 0.25]}
    c = timing.compare(samples, "ref")
    assert c["ref"].speedup is None
    assert c["fast"].speedup.median == c["fast"].speedup.q1 == c["fast"].speedup.q3 == 4.0
    assert c["fast"].warning is None


@pytest.mark.parametrize(
    ("ratios", "unreadable"),
    [
        ([0.86, 1.5, 2.8, 9.0, 14.3], "more than a factor 2"),  # like the successive runs
        ([0.8, 1.2, 0.9, 1.3, 1.0], "slower in others"),  # straddles 1, beyond ±10 %
        ([0.97, 1.02, 1.0, 1.04, 0.99], None),  # straddles 1 within 10 %: the same speed
        ([12.0, 13.0, 12.5, 14.0, 12.2], None),
    ],
)
def test_ratio_warning(ratios, unreadable):
    warning = timing.ratio_warning(timing.Spread.of(ratios))
    if unreadable is None:
        assert warning is None
    else:
        assert warning is not None and unreadable in warning and "5 rounds" in warning


def test_compare_refuses_unequal_rounds():
    with pytest.raises(ValueError, match="rounds"):
        timing.compare({"ref": [1.0, 1.0], "x": [1.0]}, "ref")


def test_cpu_model_and_visible_cpus():
    assert timing.cpu_model()
    assert timing.visible_cpus() >= 1
