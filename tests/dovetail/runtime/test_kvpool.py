"""KV-cell reservations: requests wait their turn for room in a shared pool; what can never
fit is refused at once; a wait can be cancelled and times out as capacity (CoordinatorBusy)."""
from __future__ import annotations

import threading
import time

import pytest

from dovetail.runtime.kvpool import ContextTooLong, KVPool
from dovetail.runtime.requests import CoordinatorBusy

pytestmark = pytest.mark.timeout(30)


def hold(pool: KVPool, need: int, log: list, release: threading.Event, name: str, cancel=None):
    with pool.reserve(need, cancel) as granted:
        log.append((name, granted))
        if granted:
            release.wait(10)


def start(*args) -> threading.Thread:
    t = threading.Thread(target=hold, args=args, daemon=True)
    t.start()
    return t


def test_requests_that_do_not_fit_together_wait_in_turn():
    pool, log, release = KVPool(100, 10), [], threading.Event()
    a = start(pool, 60, log, release, "a")
    time.sleep(0.1)
    b = start(pool, 50, log, release, "b")   # does not fit beside a: waits
    time.sleep(0.1)
    c = start(pool, 30, log, release, "c")   # would fit, but b is first in line
    time.sleep(0.2)
    assert log == [("a", True)] and pool.reserved == 60
    release.set()
    for t in (a, b, c):
        t.join(5)
    assert [name for name, _ in log] == ["a", "b", "c"] and pool.reserved == 0


def test_a_request_larger_than_the_pool_is_refused_at_once():
    with pytest.raises(ContextTooLong, match="101 KV cells"):
        with KVPool(100, 10).reserve(101):
            pass


def test_a_waiting_request_can_be_cancelled_and_holds_nothing():
    pool, log, release, cancel = KVPool(100, 10), [], threading.Event(), threading.Event()
    a = start(pool, 80, log, release, "a")
    time.sleep(0.1)
    b = start(pool, 50, log, release, "b", cancel)
    time.sleep(0.1)
    cancel.set()
    b.join(2)
    assert not b.is_alive() and ("b", False) in log and pool.reserved == 80
    release.set()
    a.join(5)
    assert pool.reserved == 0


def test_a_pool_full_past_the_queue_timeout_is_capacity_not_a_fault():
    pool, release = KVPool(100, 0.3), threading.Event()
    a = start(pool, 80, [], release, "a")
    time.sleep(0.1)
    with pytest.raises(CoordinatorBusy, match="KV cells"):
        with pool.reserve(50):
            pass
    release.set()
    a.join(5)


def test_without_a_shared_pool_nothing_waits():
    pool = KVPool(0, 0.1)
    with pool.reserve(10 ** 9) as granted:
        assert granted
