"""The coordinator's heartbeat thread, dovetail/runtime/liveness.py (end to end: test_processes.py)."""
from __future__ import annotations

import time

import pytest
import zmq

from dovetail.runtime.liveness import Liveness


@pytest.mark.timeout(30)
def test_the_thread_sleeps_until_a_worker_joins():
    # Workers join only after their handshake: the thread waits through their whole start-up
    # (model loading, the target's calibration) and must leave the cores to them meanwhile.
    ctx = zmq.Context()
    live = Liveness(ctx, interval_s=1.0, liveness=3).start()
    try:
        cpu0, t0 = time.process_time(), time.monotonic()
        time.sleep(1.0)
        used = time.process_time() - cpu0
        assert used < 0.1, f"the heartbeat thread used {used:.2f} s of CPU in 1 s with nobody to watch"
    finally:
        t_stop = time.monotonic()
        live.stop()
        ctx.term()
    assert time.monotonic() - t_stop < 1.0 and time.monotonic() - t0 < 5
