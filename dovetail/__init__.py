"""Dovetail: lossless speculative decoding, target on the CPU, draft on the GPU.

    import dovetail
    with dovetail.launch("qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct",
                         target_cpus="0-31", draft_device=0) as coord:
        print(coord.generate("def fib(n):", max_new_tokens=64).text)
"""
from dovetail.runtime.config import CoordinatorConfig
from dovetail.runtime.coordinator import Coordinator
from dovetail.runtime.results import Chunk, GenerationResult, Stats
from dovetail.runtime.client import WorkerDied, WorkerError, WorkerTimeout, WorkerUnresponsive
from dovetail.runtime.launch import launch
from dovetail.runtime.requests import CoordinatorBusy, Request

__all__ = ["launch", "Coordinator", "CoordinatorConfig", "GenerationResult", "Stats", "Chunk",
           "WorkerError", "WorkerDied", "WorkerTimeout", "WorkerUnresponsive", "CoordinatorBusy", "Request"]
__version__ = "0.1.0"
