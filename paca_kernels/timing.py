"""Timing that survives a busy machine: providers in interleaved rounds, ratios taken per round.

On a shared machine the speed drifts from minute to minute (on the 2-core development machine the
same layer varied by ±50 % minutes apart), so timing one provider's repetitions back to back and then
the next provider's lets a busy minute land on whichever provider runs then. :func:`interleave` runs
every provider once per round, starting one further along the list each round, so slow periods are
spread over all providers, and :func:`compare` takes each provider's ratio to the baseline *within*
a round, where both saw the same machine. The spread of those per-round ratios says whether the
median ratio can be trusted; :func:`ratio_warning` words the verdict.

Used by ``python -m paca_kernels`` (the speed table) and ``benchmarks/interleaved.py``. Ground floor:
imports nothing from the package.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "Comparison",
    "Rounds",
    "Spread",
    "compare",
    "cpu_model",
    "interleave",
    "ratio_warning",
    "visible_cpus",
    "warm_up",
]

#: A ratio whose middle half of rounds spans more than this factor (q3 / q1) cannot be read.
MAX_RATIO_SPREAD = 2.0
#: A ratio interval that straddles 1 still reads "the same speed" when it stays within this factor of 1.
SAME_SPEED = 1.1


@dataclass(frozen=True)
class Spread:
    """Median, quartiles and extremes of a sample. The quartiles are interpolated between the samples
    (``statistics.quantiles(method="inclusive")``), so that they never leave [min, max]: the default
    method extrapolates beyond the extremes on the few rounds a busy machine allows."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("Spread.of needs at least one value")
        med = statistics.median(values)
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else (med,) * 3
        return cls(med, q1, q3, min(values), max(values), len(values))

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1


@dataclass
class Rounds:
    """What :func:`interleave` measured: per provider, one time (seconds) per round."""

    samples: dict[str, list[float]]
    #: Seconds spent in the rounds (excluding any warm-up).
    elapsed_s: float
    #: The stopping rule that ended the rounds, in words ("12 rounds asked", "budget 20 s spent", ...).
    stopped_by: str
    #: Seconds each provider's warm-up calls took (the first one compiles a torch.compile'd provider).
    warmup_s: dict[str, float] = field(default_factory=dict)

    @property
    def rounds(self) -> int:
        return min((len(s) for s in self.samples.values()), default=0)


def warm_up(fn: Callable[[], object], calls: int, sync: Callable[[], None] | None = None) -> float:
    """Call ``fn`` ``calls`` times (compilation, allocator, caches) and return the seconds it took."""
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    if sync is not None:
        sync()
    return time.perf_counter() - t


def interleave(
    fns: Mapping[str, Callable[[], object]],
    *,
    rounds: int | None = None,
    budget_s: float | None = None,
    min_rounds: int = 3,
    max_rounds: int = 1000,
    warmup: int = 2,
    sync: Callable[[], None] | None = None,
    on_round: Callable[[int], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> Rounds:
    """Time every function once per round, in a rotating order.

    Args:
        fns: provider name -> a call to time (it runs under the caller's grad mode).
        rounds: exactly this many rounds; else rounds until ``budget_s`` is spent.
        budget_s: seconds for the rounds (warm-up excluded: the caller counts it in its own budget).
            A round is started only if the mean round so far still fits; at least ``min_rounds`` and
            at most ``max_rounds`` are run whatever the budget.
        warmup: calls of each function before the rounds (2: the first compiles a compiled one).
        sync: waits for the device (``torch.cuda.synchronize``) after each call; None on the CPU.
        on_round: called with the number of rounds done after each round (progress).
        clock: what a sample measures: wall time (the default), or e.g. ``time.thread_time`` for
            the CPU time of a single-threaded call, which other processes on a shared machine slow
            down far less (they take turns on the cores, not the call's work).
    """
    if rounds is None and budget_s is None:
        raise ValueError("interleave needs rounds or budget_s")
    names = list(fns)
    warmup_s = {name: warm_up(fns[name], warmup, sync) for name in names} if warmup else {}
    samples: dict[str, list[float]] = {name: [] for name in names}
    start = time.perf_counter()
    done = 0
    while True:
        elapsed = time.perf_counter() - start
        if rounds is not None:
            if done >= rounds:
                stopped_by = f"{rounds} rounds asked"
                break
        elif done >= max_rounds:
            stopped_by = f"at most {max_rounds} rounds"
            break
        elif done >= min_rounds and elapsed + elapsed / done > budget_s:
            # The minimum decided only where it ran past the budget; else the budget did.
            if budget_s <= 0:
                stopped_by = f"minimum of {min_rounds} rounds (no budget left)"
            elif elapsed > budget_s:
                stopped_by = f"minimum of {min_rounds} rounds (past the {budget_s:.3g} s budget)"
            else:
                stopped_by = f"budget {budget_s:.3g} s"
            break
        for i in range(len(names)):
            name = names[(done + i) % len(names)]
            t = clock()
            fns[name]()
            if sync is not None:
                sync()
            samples[name].append(clock() - t)
        done += 1
        if on_round is not None:
            on_round(done)
    return Rounds(samples, time.perf_counter() - start, stopped_by, warmup_s)


@dataclass(frozen=True)
class Comparison:
    """One provider against the baseline over the same rounds."""

    provider: str
    #: The provider's time per round, seconds.
    time: Spread
    #: Speed-up per round: the baseline's time / the provider's time in that round (None: the baseline).
    speedup: Spread | None
    #: Why the speed-up cannot be read (:func:`ratio_warning`), or None.
    warning: str | None


def ratio_warning(speedup: Spread, max_spread: float = MAX_RATIO_SPREAD, same: float = SAME_SPEED) -> str | None:
    """Why a per-round speed-up cannot be read, or None when it can.

    Unreadable: the middle half of the rounds (q1–q3) spans more than ``max_spread`` (q3 / q1), or it
    straddles 1 (faster in some rounds, slower in others) without staying within ``same`` of 1, where
    it would read "the same speed".
    """
    q1, q3 = speedup.q1, speedup.q3
    if q1 <= 0 or q3 / q1 > max_spread:
        return (f"the middle half of the {speedup.n} rounds spans {q1:.3g}x-{q3:.3g}x, "
                f"more than a factor {max_spread:g}")
    if q1 < 1 < q3 and not (q1 >= 1 / same and q3 <= same):
        return (f"the middle half of the {speedup.n} rounds spans {q1:.3g}x-{q3:.3g}x: "
                f"faster than the baseline in some rounds, slower in others")
    return None


def compare(samples: Mapping[str, Sequence[float]], baseline: str) -> dict[str, Comparison]:
    """Each provider's time and per-round speed-up over ``baseline`` (samples: seconds per round,
    round i of every provider taken side by side, as :func:`interleave` gives them)."""
    base = samples[baseline]
    out: dict[str, Comparison] = {}
    for name, times in samples.items():
        if len(times) != len(base):
            raise ValueError(f"{name}: {len(times)} rounds, the baseline {baseline!r} has {len(base)}")
        if name == baseline:
            out[name] = Comparison(name, Spread.of(times), None, None)
            continue
        speedup = Spread.of([b / t for b, t in zip(base, times, strict=True)])
        out[name] = Comparison(name, Spread.of(times), speedup, ratio_warning(speedup))
    return out


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else what :mod:`platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def visible_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
