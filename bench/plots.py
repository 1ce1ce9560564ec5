"""Small plotting helpers shared by the benchmarks: one PNG per call, matplotlib optional.

Every helper draws on a fresh ``Figure`` rendered by the Agg canvas (no pyplot, no global
backend switch, no display needed). Where matplotlib is not importable, a helper prints
one line saying so and returns None; the benchmark still writes its JSON and table.
"""
from __future__ import annotations

from pathlib import Path

_NOTICE = "matplotlib is not installed: no plot written (pip install matplotlib for PNG plots)"


def _new_axes(title: str, xlabel: str, ylabel: str):
    """A (figure, axes) pair on the Agg canvas, or None when matplotlib is missing."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print(_NOTICE)
        return None
    fig = Figure(figsize=(7.0, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize="medium")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _wrap(labels: list[str]) -> list[str]:
    """Break "system[model-name]" labels before the bracket so neighbours do not overlap."""
    return [label.replace("[", "\n[") for label in labels]


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def save_line_plot(path, series: dict[str, tuple[list[float], list[float]]], *, title: str,
                   xlabel: str, ylabel: str, logx: bool = False) -> Path | None:
    """One line with markers per series name -> (xs, ys); returns the PNG's path or None."""
    made = _new_axes(title, xlabel, ylabel)
    if made is None:
        return None
    fig, ax = made
    for name, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=name)
    if logx:
        ax.set_xscale("log")
        ticks = sorted({x for xs, _ in series.values() for x in xs if x > 0})
        if 0 < len(ticks) <= 16:  # few points: label exactly those, in plain numbers
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
    if len(series) > 1:
        ax.legend()
    return _save(fig, path)


def save_bar_plot(path, labels: list[str], values: list[float], *, title: str, ylabel: str) -> Path | None:
    """One bar per label, its value written above it."""
    made = _new_axes(title, "", ylabel)
    if made is None:
        return None
    fig, ax = made
    bars = ax.bar(range(len(labels)), values)
    ax.set_xticks(range(len(labels)), _wrap(labels), fontsize="small")
    ax.bar_label(bars, fmt="%.3g")
    ax.grid(False, axis="x")
    return _save(fig, path)


def save_histogram(path, samples: dict[str, list[int]], *, title: str, xlabel: str) -> Path | None:
    """Integer samples (e.g. tokens accepted per round): one bin per integer, series side by side."""
    made = _new_axes(title, xlabel, "count")
    if made is None:
        return None
    fig, ax = made
    names = [n for n, s in samples.items() if len(s)]
    if names:
        lo = min(min(samples[n]) for n in names)
        hi = max(max(samples[n]) for n in names)
        bins = [b - 0.5 for b in range(int(lo), int(hi) + 2)]
        ax.hist([list(samples[n]) for n in names], bins=bins, label=names)
        if hi - lo <= 32:
            ax.set_xticks(range(int(lo), int(hi) + 1))
        if len(names) > 1:
            ax.legend()
    return _save(fig, path)


def save_stacked_bars(path, labels: list[str], parts: dict[str, list[float]], *, title: str,
                      ylabel: str) -> Path | None:
    """One bar per label, split into named parts (each part: one value per label), bottom up."""
    made = _new_axes(title, "", ylabel)
    if made is None:
        return None
    fig, ax = made
    bottom = [0.0] * len(labels)
    for name, values in parts.items():
        if len(values) != len(labels):
            raise ValueError(f"part {name!r} has {len(values)} values for {len(labels)} labels")
        ax.bar(range(len(labels)), values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_xticks(range(len(labels)), _wrap(labels), fontsize="small")
    ax.grid(False, axis="x")
    if parts:
        ax.legend()
    return _save(fig, path)
