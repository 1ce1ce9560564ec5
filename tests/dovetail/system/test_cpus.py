"""CPU lists (--target-cpus) and per-process thread settings, dovetail/system/cpus.py."""
from __future__ import annotations

import subprocess
import sys

import os

import pytest

from dovetail.system.cpus import format_cpus, parse_cpus


def test_cpu_lists():
    assert format_cpus([7, 0, 1, 2, 5, 8]) == "0-2,5,7-8"
    first = min(os.sched_getaffinity(0))
    assert parse_cpus(f"{first}") == parse_cpus([first]) == [first]
    assert parse_cpus(f" {first}-{first},{first}") == [first]  # spaces and repeats
    assert parse_cpus(None) is None
    for bad, msg in [("a-b", "use a form like"), ("3-1", "end is before the start"), (",", "empty CPU list"),
                     ("100000", "not available")]:
        with pytest.raises(ValueError, match=msg):
            parse_cpus(bad)



@pytest.mark.timeout(60)
def test_a_gpu_worker_keeps_one_cpu_thread_and_no_cudnn_attention():
    # In a child: the settings are process-wide.
    code = ("import torch; torch.set_num_threads(2); from dovetail.system.cpus import tune_gpu_worker; tune_gpu_worker(); "
            "print(torch.get_num_threads(), torch.backends.cuda.cudnn_sdp_enabled())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50, check=True)
    assert out.stdout.split() == ["1", "False"]
