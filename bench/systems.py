"""The systems `python -m bench` compares, each run on the same prompts the same way.

Every system is a generator of one record per prompt, all with the same fields, so the
report can put them side by side: it loads its models at the first ``next()``, does one
warm-up prompt it leaves out, then decodes a prompt per ``next()``. Driven one after the
other (``collect``) or in turn, prompt by prompt (``python -m bench --interleave``).
"""
from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Iterator

RECORD_FIELDS = ("new_tokens", "seconds", "prefill_s", "rounds", "accept_lengths", "draft_s", "verify_s",
                 "wire_s", "target_idle_s", "draft_idle_s", "token_ids")


def _record(**fields) -> dict:
    rec = {k: None for k in RECORD_FIELDS}
    rec.update(fields)
    return rec


def collect(records: Iterator[dict], progress: Callable) -> list[dict]:
    """Every record of one system, calling ``progress()`` after each prompt."""
    out = []
    for rec in records:
        out.append(rec)
        progress()
    return out


def dovetail_records(prompts: list[list[int]], max_new: int, temperature: float, seed: int,
                     **launch_kwargs) -> Iterator[dict]:
    """Target-only (draft=None) or Dovetail through our workers."""
    import dovetail
    with dovetail.launch(**launch_kwargs) as coord:
        coord.generate(prompts[0], max_new_tokens=8, temperature=temperature, seed=seed)  # warm-up
        for i, prompt in enumerate(prompts):
            r = coord.generate(prompt, max_new_tokens=max_new, temperature=temperature, seed=seed + i)
            st = asdict(r.stats)
            yield _record(**{k: st[k] for k in RECORD_FIELDS if k in st}, token_ids=r.token_ids)


def hf_assisted_records(prompts: list[list[int]], max_new: int, temperature: float, seed: int,
                        *, target, draft, dtype, cpus) -> Iterator[dict]:
    """Hugging Face assisted generation, in this process, with the same models and threads."""
    import torch

    from dovetail.system.cpus import pin_process
    from dovetail.models.fetch import resolve_model
    from dovetail.models.loading import choose_dtype
    from dovetail.workers.hf import CausalLM

    before = sorted(os.sched_getaffinity(0))
    pin_process(cpus)
    try:
        dt = choose_dtype(dtype, "cpu")
        tgt = CausalLM.load(resolve_model(str(target)), dtype=dt).model
        dft = CausalLM.load(resolve_model(str(draft)), dtype=dt).model if draft else None

        def generate(prompt, n, s):
            torch.manual_seed(s)
            ids = torch.tensor([prompt])
            kw = dict(max_new_tokens=n, min_new_tokens=n,  # exactly n tokens, as the others
                      do_sample=temperature > 0, attention_mask=torch.ones_like(ids))
            if temperature > 0:
                kw.update(temperature=temperature, top_k=0, top_p=1.0)
            if dft is not None:
                kw["assistant_model"] = dft
            t0 = time.perf_counter()
            with torch.inference_mode():
                res = tgt.generate(ids, **kw)
            return res[0, len(prompt):].tolist(), time.perf_counter() - t0

        generate(prompts[0], 8, seed)  # warm-up
        for i, prompt in enumerate(prompts):
            ids, seconds = generate(prompt, max_new, seed + i)
            yield _record(new_tokens=len(ids), seconds=seconds, token_ids=ids)
    finally:
        pin_process(before)


def llama_skip_reason(target) -> str | None:
    """Why llama.cpp cannot run ``target`` here (missing library, not a GGUF), or None."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError as e:
        return f"llama-cpp-python is not installed ({e}); pip install -e '.[llama]' to compare"
    if Path(target).suffix != ".gguf":
        return f"the target {target} is not a .gguf file"
    return None


def llama_cpp_records(prompts: list[list[int]], max_new: int, temperature: float, seed: int,
                      *, gguf, cpus, extra_buffers: bool = True) -> Iterator[dict]:
    """llama.cpp's own CPU decoding of the same GGUF file, same thread count, and the same
    extra-buffer setting as our llama.cpp backend (``python -m bench`` resolves it)."""
    from dovetail.system.cpus import pin_process
    from dovetail.workers.llama_buffers import open_llama
    before = sorted(os.sched_getaffinity(0))
    n_threads = len(pin_process(cpus))
    try:
        longest = max(len(p) for p in prompts) + max_new + 16
        llm = open_llama(extra_buffers, model_path=str(gguf), n_ctx=longest, n_threads=n_threads,
                         n_threads_batch=n_threads, seed=seed, verbose=False)

        def generate(prompt, n):
            llm.reset()
            sampler = dict(temp=temperature, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0)
            ids = []
            t0 = time.perf_counter()
            for tok in llm.generate(prompt, reset=True, **sampler):
                ids.append(int(tok))
                if len(ids) >= n:
                    break
            return ids, time.perf_counter() - t0

        generate(prompts[0], 8)  # warm-up
        for prompt in prompts:
            ids, seconds = generate(prompt, max_new)
            yield _record(new_tokens=len(ids), seconds=seconds, token_ids=ids)
    finally:
        pin_process(before)
