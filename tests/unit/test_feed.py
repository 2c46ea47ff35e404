"""The feeds' hand-off: the consumer gets items in order, the worker's error, a deadline error, or
STOP once a stop is requested (what rank 0's scorer then shares instead of a batch)."""

from __future__ import annotations

import threading
import time

import pytest

from scope_ds.pipeline import collectives
from scope_ds.pipeline.collectives import PipelineError
from scope_ds.pipeline.feed import STOP, _Worker, take_or_stop
from scope_ds.records import Batch


class _Feed(_Worker):
    what = "test feed"

    def __init__(self, items: int, fail: bool = False, stall: bool = False) -> None:
        super().__init__("test", timeout_s=5.0)
        self.items, self.fail, self.stall = items, fail, stall
        self._thread.start()

    def _work(self) -> None:
        for step in range(self.items):
            self._put(Batch(step=step, records=[]))
        if self.fail:
            raise OSError("disk gone")
        if self.stall:
            self._wait(lambda: False)  # until closed


def test_items_in_order_then_none_once_closed():
    feed = _Feed(2, stall=True)
    assert [feed._take(5.0).step for _ in range(2)] == [0, 1]
    feed.close()
    assert feed._take(5.0) is None


def test_the_workers_error_reaches_the_consumer_named():
    feed = _Feed(1, fail=True)
    assert feed._take(5.0).step == 0
    with pytest.raises(PipelineError, match="test feed failed: disk gone"):
        feed._take(5.0)


def test_a_stalled_worker_ends_in_an_error_at_the_deadline():
    feed = _Feed(0, stall=True)
    t0 = time.monotonic()
    with pytest.raises(PipelineError, match=r"test feed: nothing came for 0.3 s \(pipeline.wait_timeout_s\)"):
        take_or_stop(feed._take, 0.3, feed.what)
    assert 0.25 < time.monotonic() - t0 < 3
    feed.close()


def test_a_stop_request_ends_the_wait_with_none():
    feed = _Feed(0, stall=True)
    threading.Timer(0.3, collectives.request_stop).start()
    t0 = time.monotonic()
    try:
        assert take_or_stop(feed._take, 60.0, feed.what) == STOP
    finally:
        collectives._stop.clear()
        feed.close()
    assert time.monotonic() - t0 < 3


def test_an_item_already_there_is_taken_at_once():
    feed = _Feed(1, stall=True)
    assert take_or_stop(feed._take, 60.0, feed.what).step == 0
    feed.close()
