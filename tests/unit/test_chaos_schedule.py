"""The chaos schedule's draw: overlapping faults, never two on one target, every kind, repeatable by seed.

The faults here only note when they held their targets (the chaos run itself strikes real processes); the
draw, the targets each kind holds and the bookkeeping are the real ones.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import random
import time
from collections import defaultdict
from typing import Any, cast

import pytest

from tests.reliability.schedule import KINDS, Kind, Schedule, Targets

pytestmark = pytest.mark.unit


class _Up:
    """A replica that stays up (the draw only asks whether it runs)."""

    def running(self) -> bool:
        return True


class _Recording(Schedule):
    """The real draw; each fault holds its targets for a few milliseconds and notes when."""

    held: dict[str, list[tuple[float, float]]]
    order: list[str]
    hold_s: tuple[float, float]

    @property
    def kinds(self) -> list[Kind]:
        async def hold(name: str, targets: list[str], rng: random.Random) -> str:
            self.order.append(name)
            start = time.monotonic()
            await asyncio.sleep(rng.uniform(*self.hold_s))
            for target in targets:
                self.held[target].append((start, time.monotonic()))
            return ""

        return [Kind(kind.name, kind.resources, functools.partial(hold, kind.name)) for kind in super().kinds]


def _schedule(seed: int, hold_s: tuple[float, float] = (0.005, 0.04)) -> _Recording:
    nothing = cast(Any, None)
    targets = Targets(cluster=nothing, redis=nothing, intake=nothing, replicas=[cast(Any, _Up())] * 3,
                      intake_links=[nothing] * 3, kafka_links=[nothing] * 3, topics=[], intake_timeout_s=2.0)
    schedule = _Recording(targets, random.Random(seed), gap_s=(0.001, 0.005))
    schedule.held, schedule.order, schedule.hold_s = defaultdict(list), [], hold_s
    return schedule


async def test_faults_overlap_but_never_on_one_target_and_every_kind_strikes() -> None:
    schedule = _schedule(7)
    await schedule.run(0.6)
    assert set(schedule.tally) == set(KINDS), f"kinds that never struck: {set(KINDS) - set(schedule.tally)}"
    assert schedule.max_overlap >= 3
    for target, spans in schedule.held.items():
        spans.sort()
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start >= end, f"two faults at once on {target}"
    assert not schedule.unplanned_exits


async def test_the_draw_repeats_with_the_seed() -> None:
    """While no fault has ended, what is drawn depends on the seed alone (later, also on how long faults took)."""
    first, second = _schedule(11, hold_s=(1.0, 1.2)), _schedule(11, hold_s=(1.0, 1.2))
    for schedule in (first, second):
        await schedule.run(0.2)
    drawn = min(len(first.order), len(second.order))  # how many fit in the time depends on the machine
    assert drawn >= 5
    assert first.order[:drawn] == second.order[:drawn]
