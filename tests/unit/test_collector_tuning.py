"""The garbage collector while the consume loop runs: the start's objects frozen, the young threshold raised,
and both as they were once the loop ends, however it ends."""

from __future__ import annotations

import gc

import pytest

from consumer.service import GC_OLDER_THRESHOLDS, GC_YOUNG_THRESHOLD, _collector_tuned

pytestmark = pytest.mark.unit


def test_tuned_while_the_loop_runs_and_restored_after() -> None:
    before = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    with _collector_tuned():
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, *GC_OLDER_THRESHOLDS)
        assert gc.get_freeze_count() > 0  # this test's own objects, among what was there at the start
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_restored_when_the_loop_fails() -> None:
    before = gc.get_threshold()
    with pytest.raises(RuntimeError, match="stage failed"), _collector_tuned():
        raise RuntimeError("stage failed")
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_cycles_are_still_collected_while_tuned() -> None:
    class Node:
        def __init__(self) -> None:
            self.me = self

    with _collector_tuned():
        collected_before = sum(stat["collected"] for stat in gc.get_stats())
        for _ in range(3 * GC_YOUNG_THRESHOLD):
            Node()  # each one a cycle that only the collector frees
        assert sum(stat["collected"] for stat in gc.get_stats()) > collected_before
