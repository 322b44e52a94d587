"""PNG figures for the evaluation suite: line plots, overlaid histograms, reliability diagrams, ROC curves.

These draw the paper's evaluation figures for our own runs: reliability diagrams as in Fig. 6 / Fig. 12
(Sec. 5.2.1, App. C.5), accuracy against the PGD budget as in Fig. 7 (Sec. 5.2.3, Table 12), and ROC curves and
score histograms for the OOD detection of Table 3 / Table 11 (Sec. 5.2.2, App. C.3).

matplotlib is imported only inside these functions, and they draw on a Figure with the Agg canvas directly (no
pyplot, so no global backend is changed and no window ever opens). Every function writes one PNG atomically
(a temporary file renamed over `path`) and returns the path.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..checkpoint import atomic_write
from ..errors import HybvitError


def _figure(nrows: int = 1, height_ratios: Sequence[float] | None = None, size=(6.0, 4.5)):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise HybvitError("plots need matplotlib, which is not installed; pip install matplotlib") from None
    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    if nrows == 1:
        return fig, fig.add_subplot(1, 1, 1)
    axes = fig.subplots(nrows, 1, sharex=True, gridspec_kw={"height_ratios": height_ratios or [1] * nrows})
    return fig, axes


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    return path


def _array(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # torch tensor
        v = v.detach().float().cpu().numpy()
    return np.asarray(v, dtype=np.float64).reshape(-1)


def line_plot(path: str | Path, x: Sequence[float], series: Mapping[str, Sequence[float]], xlabel: str = "",
              ylabel: str = "", title: str = "") -> Path:
    """One line (with markers) per entry of `series`, all against the same `x`. Returns the path written."""
    fig, ax = _figure()
    xs = _array(x)
    for name, ys in series.items():
        ys = _array(ys)
        if len(ys) != len(xs):
            raise HybvitError(f"series '{name}' has {len(ys)} values for {len(xs)} x values; they must match")
        ax.plot(xs, ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend()
    return _save(fig, path)


def histograms(path: str | Path, values: Mapping[str, Any], xlabel: str = "", title: str = "",
               bins: int = 50) -> Path:
    """Overlaid, semi-transparent density histograms of several sets of values on shared bin edges."""
    fig, ax = _figure()
    arrays = {k: _array(v) for k, v in values.items()}
    finite = [a[np.isfinite(a)] for a in arrays.values()]
    finite = [a for a in finite if len(a)]
    if finite:
        lo = min(float(a.min()) for a in finite)
        hi = max(float(a.max()) for a in finite)
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = np.linspace(lo, hi, bins + 1)
        for name, a in arrays.items():
            a = a[np.isfinite(a)]
            if len(a):
                ax.hist(a, bins=edges, density=True, alpha=0.45, label=f"{name} (n={len(a)})")
        ax.legend()
    ax.set_xlabel(xlabel)
    ax.set_ylabel("density")
    ax.set_title(title)
    return _save(fig, path)


def reliability_diagram(path: str | Path, bins: Sequence[Mapping[str, Any]], title: str = "") -> Path:
    """Reliability diagram (Guo et al. 2017; the paper's Fig. 6 and Fig. 12): for each confidence bin a bar of the
    accuracy of its predictions, drawn against the diagonal of perfect calibration, with the gap to the bin's
    mean confidence shaded; a lower panel shows how many predictions fall into each bin (also written on the bars).

    bins: dicts with lower, upper, count, accuracy, confidence (as `calibration()` returns; empty bins may have
    accuracy/confidence None)."""
    fig, (ax, ax_n) = _figure(2, height_ratios=[3, 1], size=(6.0, 6.0))
    lowers = np.array([b["lower"] for b in bins], dtype=float)
    widths = np.array([b["upper"] - b["lower"] for b in bins], dtype=float)
    counts = np.array([b["count"] for b in bins], dtype=float)
    filled = counts > 0
    acc = np.array([b["accuracy"] if b["count"] else 0.0 for b in bins], dtype=float)
    conf = np.array([b["confidence"] if b["count"] else 0.0 for b in bins], dtype=float)

    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.bar(lowers[filled], acc[filled], width=widths[filled], align="edge", edgecolor="black",
           color="tab:blue", label="accuracy")
    gap_lo = np.minimum(acc, conf)[filled]
    ax.bar(lowers[filled], np.abs(conf - acc)[filled], bottom=gap_lo, width=widths[filled], align="edge",
           color="tab:red", alpha=0.3, hatch="//", edgecolor="tab:red", label="gap to confidence")
    for lo, w, a, n in zip(lowers[filled], widths[filled], acc[filled], counts[filled]):
        ax.text(lo + w / 2, min(a, 0.97) + 0.01, f"{int(n)}", ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)

    ax_n.bar(lowers, counts, width=widths, align="edge", edgecolor="black", color="gray")
    ax_n.set_xlabel("confidence (max softmax probability)")
    ax_n.set_ylabel("count")
    return _save(fig, path)


def roc_curves(path: str | Path, curves: Mapping[str, tuple[Any, Any]], title: str = "") -> Path:
    """ROC curves (true-positive rate against false-positive rate), one per entry `name: (fpr, tpr)`, with the
    chance diagonal. The OOD evaluation (Table 3 / Table 11) treats in-distribution images as positives."""
    fig, ax = _figure(size=(5.0, 5.0))
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="chance")
    for name, (fpr, tpr) in curves.items():
        ax.plot(_array(fpr), _array(tpr), label=name)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false-positive rate (OOD accepted)")
    ax.set_ylabel("true-positive rate (in-distribution accepted)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


__all__ = ["line_plot", "histograms", "reliability_diagram", "roc_curves"]
