"""Children for the extra-buffer probe's tests (test_llama_buffers.py): they die by SIGSEGV,
are killed by SIGKILL, exit non-zero, pass or hang in the probe's child process. The probe loads this file on its
own, so it imports the standard library only (importing dovetail would cost seconds)."""
import os
import signal
import sys
import time


def segfault_probe(model: str, threads: int) -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def killed_probe(model: str, threads: int) -> None:
    os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer ends a process


def exit_probe(model: str, threads: int) -> None:
    sys.exit(3)


def clean_probe(model: str, threads: int) -> None:
    pass


def hang_probe(model: str, threads: int) -> None:
    with open(model + ".pid", "w") as f:
        f.write(str(os.getpid()))
    time.sleep(600)


def raising_probe(model: str, threads: int) -> None:
    raise AttributeError("llama_model_params has no attribute 'use_extra_bufts'")  # a probe/API bug
