"""CPU sets: parse the CLI's "0-31" / "0,2,4" form, pin a process, name its NUMA nodes and
where its memory lives."""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path


def parse_cpus(spec: str | list[int] | tuple[int, ...] | None) -> list[int] | None:
    """"0-3,8" -> [0, 1, 2, 3, 8]; a list passes through (checked); None means "all"."""
    if spec is None:
        return None
    if isinstance(spec, (list, tuple)):
        cpus = [int(c) for c in spec]
    else:
        cpus = []
        for part in str(spec).replace(" ", "").split(","):
            if not part:
                continue
            lo, sep, hi = part.partition("-")
            try:
                first, last = int(lo), int(hi) if sep else int(lo)
            except ValueError:
                raise ValueError(f"bad CPU list {spec!r}: use a form like '0-31' or '0,2,4'") from None
            if last < first:
                raise ValueError(f"bad CPU range {part!r} in {spec!r}: the end is before the start")
            cpus.extend(range(first, last + 1))
    if not cpus:
        raise ValueError(f"empty CPU list {spec!r}")
    available = sorted(os.sched_getaffinity(0))
    missing = sorted(set(cpus) - set(available))
    if missing:
        raise ValueError(f"CPUs {missing} are not available to this process (available: {format_cpus(available)})")
    return sorted(set(cpus))


def format_cpus(cpus: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5": the inverse of parse_cpus, for logs and command lines."""
    out, run = [], []
    for c in sorted(cpus):
        if run and c == run[-1] + 1:
            run.append(c)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [c]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ",".join(out)


def numa_nodes(cpus: list[int]) -> list[int]:
    """NUMA nodes that own these CPUs (empty where the kernel does not say)."""
    nodes = []
    for node_dir in sorted(Path("/sys/devices/system/node").glob("node[0-9]*")):
        try:
            owned = parse_range_list((node_dir / "cpulist").read_text().strip())
        except OSError:
            continue
        if owned & set(cpus):
            nodes.append(int(node_dir.name[4:]))
    return nodes


def memory_nodes(numa_maps: str | None = None) -> dict[int, int]:
    """Bytes of this process's memory on each NUMA node, from /proc/self/numa_maps (or the
    text given); empty where the kernel does not say."""
    if numa_maps is None:
        try:
            numa_maps = Path("/proc/self/numa_maps").read_text()
        except OSError:
            return {}
    out: dict[int, int] = {}
    for line in numa_maps.splitlines():
        page = re.search(r"\bkernelpagesize_kB=(\d+)", line)
        page_bytes = 1024 * int(page.group(1)) if page else 4096
        for node, pages in re.findall(r"\bN(\d+)=(\d+)", line):
            out[int(node)] = out.get(int(node), 0) + int(pages) * page_bytes
    return out


def describe_memory(nodes: dict[int, int]) -> str:
    """"memory on NUMA node 0" or "memory on NUMA nodes 0 (71%), 1 (29%)"."""
    total = sum(nodes.values())
    if not total:
        return "memory on NUMA node(s) unknown"
    if len(nodes) == 1:
        return f"memory on NUMA node {next(iter(nodes))}"
    return "memory on NUMA nodes " + ", ".join(f"{n} ({100 * b / total:.0f}%)" for n, b in sorted(nodes.items()))


def parse_range_list(text: str) -> set[int]:
    out: set[int] = set()
    for part in text.split(","):
        if part:
            lo, _, hi = part.partition("-")
            out.update(range(int(lo), int(hi or lo) + 1))
    return out


def pin_process(cpus: list[int] | None) -> list[int]:
    """Pin this process to ``cpus`` and size torch's intra-op pool to match; returns the set."""
    import psutil
    import torch
    proc = psutil.Process()
    if cpus is not None:
        proc.cpu_affinity(cpus)
    pinned = sorted(proc.cpu_affinity())
    torch.set_num_threads(len(pinned))
    return pinned


def tune_gpu_worker() -> None:
    """For a worker whose model is on a GPU. Its CPU work is bookkeeping on tiny tensors, and
    a pool of threads only wakes up for it (and spins on cores a CPU target needs): one thread.
    cuDNN attention builds a plan per new sequence length, and a draft's context grows every
    round: use the other SDPA kernels. Measured on an H200 host with 16 cores, a 16-node
    feature-draft round: 205-219 ms before, 10.6 ms after (bench/results/draft_time-h200-1.5b.json)."""
    import torch
    torch.set_num_threads(1)
    torch.backends.cuda.enable_cudnn_sdp(False)


def cpu_model() -> str:
    """The CPU's model name, for reports (the architecture where the kernel does not say)."""
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()
