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


NUMA_MAPS = """\
7f00 default file=/m.gguf mapped=100 N0=60 N1=40 kernelpagesize_kB=4
7f80 default anon=2 dirty=2 N1=2 kernelpagesize_kB=2048
7f90 default
"""


def test_memory_per_numa_node_from_numa_maps():
    from dovetail.system.cpus import describe_memory, memory_nodes
    nodes = memory_nodes(NUMA_MAPS)
    assert nodes == {0: 60 * 4096, 1: 40 * 4096 + 2 * 2048 * 1024}
    assert describe_memory(nodes) == "memory on NUMA nodes 0 (5%), 1 (95%)"
    assert describe_memory({0: 10}) == "memory on NUMA node 0"
    assert describe_memory({}) == "memory on NUMA node(s) unknown"


def test_this_process_has_memory_on_a_node_where_the_kernel_tells():
    from pathlib import Path

    from dovetail.system.cpus import memory_nodes
    if not Path("/proc/self/numa_maps").exists():
        pytest.skip("no /proc/self/numa_maps here")
    nodes = memory_nodes()
    assert nodes and sum(nodes.values()) > 10 * 1024 * 1024  # the interpreter alone maps more
