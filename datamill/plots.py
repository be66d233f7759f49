"""PNG charts for MLflow artifacts (matplotlib, imported only when a chart is drawn)."""

from __future__ import annotations

import os
from pathlib import Path


def line_plot(path: Path, series: dict[str, tuple[list, list]], *, title: str, xlabel: str, ylabel: str) -> Path:
    """One line per series name -> (xs, ys); written atomically as a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed; also safe inside worker processes
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        for name, (xs, ys) in series.items():
            ax.plot(xs, ys, label=name, marker="o" if len(xs) <= 20 else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
        fig.tight_layout()
        path = Path(path)
        tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
    return path
