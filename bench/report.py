"""Turn the raw records of `python -m bench` into summaries, a Markdown table and plots."""
from __future__ import annotations

import os
from pathlib import Path

from dovetail.system.cpus import cpu_model

BASELINE = "target-only"


def machine(cpus: list[int] | None) -> str:
    n = len(cpus) if cpus else len(os.sched_getaffinity(0))
    return f"{cpu_model()}, {n} CPU threads for the target"


def backend_tag(backend: str) -> str:
    """Suffix of our systems' names for a target backend ("" for the default, transformers)."""
    return "" if backend == "transformers" else f" @{backend}"


def baseline_of(name: str) -> str:
    """The target-only run on the same backend: the reference for identical output."""
    return BASELINE + (name[name.index(" @"):] if " @" in name else "")


def _is_peer(name: str) -> bool:
    return name.startswith("hf-assisted") or name == "llama.cpp"


def prefix_match(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def summarize(by_system: dict[str, list[dict]]) -> dict[str, dict]:
    out = {}
    for name, recs in by_system.items():
        tokens = sum(r["new_tokens"] for r in recs)
        seconds = sum(r["seconds"] for r in recs)
        s = {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds if seconds else 0.0}
        rounds = sum(r["rounds"] or 0 for r in recs)
        if rounds:
            s["rounds"] = rounds
            s["mean_accepted"] = sum(sum(r["accept_lengths"]) for r in recs) / rounds
            for part in ("draft_s", "verify_s", "wire_s"):
                s[part] = sum(r[part] for r in recs)
        out[name] = s
    for name, s in out.items():
        if baseline_of(name) in out:  # the same backend's target-only run
            s["speedup_vs_target_only"] = s["tokens_per_s"] / out[baseline_of(name)]["tokens_per_s"]
        s["speedup_vs"] = {peer: s["tokens_per_s"] / p["tokens_per_s"] for peer, p in out.items()
                           if _is_peer(peer) and peer != name and p["tokens_per_s"]}
        base = by_system.get(baseline_of(name))
        if base is not None and name != baseline_of(name):
            recs = by_system[name]
            same = [a["token_ids"] == b["token_ids"] for a, b in zip(base, recs)]
            s["identical_to_target_only"] = f"{sum(same)}/{len(same)}"
            s["prefix_match_tokens"] = sum(prefix_match(a["token_ids"], b["token_ids"]) for a, b in zip(base, recs))
    return out


def markdown(results: dict) -> str:
    buffers = results.get("llama_extra_buffers")
    lines = [f"Machine: {results['machine']}; {results['date']}; prompts: {len(results['prompt_lengths'])}, "
             f"{results['args']['max_new_tokens']} new tokens each; draft device: {results['draft_device']}"
             + (f"; llama.cpp extra buffers: {'on' if buffers['extra_buffers'] else 'off'} "
                f"(--llama-extra-buffers {buffers['setting']})" if buffers else ""), ""]
    for mode, summary in results["summary"].items():
        peers = [n for n in summary if _is_peer(n)]
        lines += [f"### {mode}", "",
                  "| system | tok/s | × target-only (same backend) | " + "".join(f"× {p} | " for p in peers)
                  + "accepted / round | identical to target-only |",
                  "|---|---|---|" + "---|" * len(peers) + "---|---|"]
        for name, s in summary.items():
            vs = "".join(f"{s['speedup_vs'][p]:.2f} | " if p in s["speedup_vs"] else "— | " for p in peers)
            acc = f"{s['mean_accepted']:.2f}" if "mean_accepted" in s else "—"
            same = s.get("identical_to_target_only", "—") if mode == "greedy" else "n/a (sampled)"
            base = f"{s['speedup_vs_target_only']:.2f}" if "speedup_vs_target_only" in s else "—"
            lines.append(f"| {name} | {s['tokens_per_s']:.2f} | {base} | {vs}{acc} | {same} |")
        lines.append("")
    return "\n".join(lines)


def plots(results: dict, out: Path) -> None:
    from bench.plots import save_bar_plot, save_histogram, save_stacked_bars
    for mode, summary in results["summary"].items():
        names = list(summary)
        save_bar_plot(out / f"tokens_per_s-{mode}.png", names, [summary[n]["tokens_per_s"] for n in names],
                      title=f"tokens/s ({mode})", ylabel="tokens/s")
        recs = results["modes"][mode]
        ours = [n for n in names if recs[n][0]["rounds"]]
        save_histogram(out / f"accepted_length-{mode}.png",
                       {n: [a for r in recs[n] for a in r["accept_lengths"]] for n in ours
                        if not n.startswith(BASELINE)},
                       title=f"tokens committed per round ({mode})", xlabel="tokens per round")
        parts = {"draft": [], "verify": [], "wire": [], "other": []}
        for n in ours:
            rounds = sum(r["rounds"] for r in recs[n])
            total = {k: sum(r[k] for r in recs[n]) / rounds for k in ("draft_s", "verify_s", "wire_s", "seconds", "prefill_s")}
            # Draft time overlapped with verification is not on the critical path, so
            # "other" is what the round's wall time leaves after verify and wire.
            other = total["seconds"] - total["prefill_s"] - total["verify_s"] - total["wire_s"]
            parts["draft"].append(1000 * total["draft_s"])
            parts["verify"].append(1000 * total["verify_s"])
            parts["wire"].append(1000 * total["wire_s"])
            parts["other"].append(1000 * max(0.0, other - total["draft_s"]))
        save_stacked_bars(out / f"round_breakdown-{mode}.png", ours, parts,
                          title=f"time per round ({mode})", ylabel="ms per round")
