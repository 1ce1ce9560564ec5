"""Batched verification end to end: one target worker verifies the waiting rounds of many
requests in one forward (the transformers backend's padded forward, tiny float64 models),
from two coordinators at once, one drafting trees and one decoding target-only, greedy and
sampled requests mixed; each request's output is exactly what it is alone.
"""
import os
import socket
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(300)

TREE = {"depth": 3, "top_k": 2, "max_nodes": 6}  # a fixed shape: proposals never depend on timing
BATCHED = "verifications"  # the target's debug line for every batch: "N verifications, R rows, in one forward"


@pytest.fixture(scope="module")
def target(tiny_target, pids, tmp_path_factory):
    """A target worker serving coordinator sessions on tcp://, its log in a file."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("batched") / "target.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen([sys.executable, "-m", "dovetail.workers.target", "--bind", address,
                                   "--model", str(tiny_target), "--dtype", "float64", "--sessions",
                                   "--no-calibrate", "--log-level", "debug"],
                                  stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                  env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    pids.track(worker.pid)
    try:
        yield address, log
    finally:
        worker.terminate()
        worker.wait(10)


@pytest.fixture(scope="module")
def coords(target, launch_tracked, tiny_draft_near):
    address, _ = target
    tree = launch_tracked(None, tiny_draft_near, target_address=address, max_active=16, **TREE)
    try:
        plain = launch_tracked(None, None, target_address=address, max_active=16)
        try:
            yield tree, plain
        finally:
            plain.close()
    finally:
        tree.close()


def batches(log) -> int:
    return log.read_text(errors="replace").count(BATCHED)


def load(n: int) -> list[tuple[int, list[int], dict]]:
    """n requests: (coordinator 0 tree / 1 plain, prompt, options), greedy and sampled mixed,
    of different lengths so that they finish at different rounds."""
    out = []
    for i in range(n):
        prompt = [2 + (7 * i + 3 * j) % 60 for j in range(3 + i % 5)]
        opts = {"max_new_tokens": 8 + 5 * (i % 4)}
        if i % 3 == 2:
            opts.update(temperature=0.8, top_p=0.9, seed=100 + i)
        out.append((i % 2, prompt, opts))
    return out


@pytest.mark.parametrize("n", [1, 4, 16])
def test_concurrent_mixed_requests_each_match_running_alone(coords, target, n):
    requests = load(n)
    reference = [coords[c].generate(p, **o).token_ids for c, p, o in requests]
    before = batches(target[1])
    handles = [coords[c].submit(p, **o) for c, p, o in requests]
    assert [h.result(timeout=120).token_ids for h in handles] == reference
    if n > 1:
        assert batches(target[1]) > before  # the rounds did share forwards


def test_cancelled_requests_leave_the_batch_and_the_rest_go_on(coords, target):
    requests = load(12)
    reference = [coords[c].generate(p, **o).token_ids for c, p, o in requests]
    handles = []
    for i, (c, p, o) in enumerate(requests):
        handles.append(coords[c].submit(p, **{**o, "max_new_tokens": 40} if i % 4 == 1 else o))
    for i, h in enumerate(handles):
        if i % 4 == 1:
            next(iter(h))  # its first chunk, then cancel while the others are mid-batch
            h.cancel()
    for i, (h, ref) in enumerate(zip(handles, reference)):
        got = h.result(timeout=120).token_ids
        if i % 4 == 1:
            longer = coords[requests[i][0]].generate(requests[i][1], **{**requests[i][2], "max_new_tokens": 40})
            assert got == longer.token_ids[:len(got)] and len(got) < 40  # a prefix, never retracted
        else:
            assert got == ref
    for c in coords:
        assert c.in_flight == 0
