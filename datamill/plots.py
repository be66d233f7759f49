"""PNG charts for MLflow artifacts (matplotlib, imported only when a chart is drawn)."""

from __future__ import annotations

from pathlib import Path

from datamill.atomic import write_atomic


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed; also safe inside worker processes
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    write_atomic(path, fig.savefig)
    return path


def histogram(path: Path, groups: dict[str, list[float]], *, title: str, xlabel: str, bins: int = 40) -> Path:
    """Overlaid histograms of each group's values on shared bins; written atomically as a PNG."""
    plt = _pyplot()
    values = [v for vs in groups.values() for v in vs]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    try:
        if values:
            lo, hi = min(values), max(values)
            edges = [lo + (hi - lo) * i / bins for i in range(bins + 1)] if hi > lo else bins
            for name, vs in groups.items():
                if vs:
                    ax.hist(vs, bins=edges, alpha=0.6, label=f"{name} ({len(vs)})")
            ax.legend()
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("rows")
        ax.grid(alpha=0.3)
        return _save(fig, path)
    finally:
        plt.close(fig)


def line_plot(path: Path, series: dict[str, tuple[list, list]], *, title: str, xlabel: str, ylabel: str) -> Path:
    """One line per series name -> (xs, ys); written atomically as a PNG."""
    plt = _pyplot()
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
        return _save(fig, path)
    finally:
        plt.close(fig)


def heatmap(path: Path, rows: list[str], columns: list[str], values: list[list[float | None]], *, title: str) -> Path:
    """A rows x columns grid of numbers, each cell written in it (missing cells blank). Colours
    are relative within each column (metrics have different scales): best-to-worst per metric."""
    import math

    plt = _pyplot()
    grid = [[math.nan if v is None else float(v) for v in row] for row in values]
    shade = [[math.nan] * len(columns) for _ in rows]
    for j in range(len(columns)):
        column = [grid[i][j] for i in range(len(rows)) if not math.isnan(grid[i][j])]
        low, high = (min(column), max(column)) if column else (0.0, 0.0)
        for i in range(len(rows)):
            if not math.isnan(grid[i][j]):
                shade[i][j] = 0.5 if high == low else (grid[i][j] - low) / (high - low)
    fig, ax = plt.subplots(figsize=(3 + 1.1 * len(columns), 2.8 + 0.45 * len(rows)))
    ax.imshow(shade, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(len(columns)), labels=columns, rotation=35, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)), labels=rows, fontsize=8)
    for i, row in enumerate(grid):
        for j, value in enumerate(row):
            if not math.isnan(value):
                ax.text(j, i, f"{value:.3g}", ha="center", va="center", fontsize=8,
                        color="black" if shade[i][j] > 0.6 else "white")
    ax.set_title(f"{title} (colour: within each column, low to high)", fontsize=10)
    return _save(fig, path)


def bars(path: Path, rows: list[str], columns: list[str], values: list[list[float | None]], *, title: str,
         muted: set[str] = frozenset(), intervals: list[list[tuple[float, float] | None]] | None = None,
         marks: list[list[str]] | None = None) -> Path:
    """One small bar chart per column (metrics have different scales), a bar per row; rows in
    `muted` (a reference such as the base model) are drawn grey. `intervals` (shaped like
    `values`, None where unknown): each value's 95% interval, drawn as an error bar. `marks`:
    text after each value (significance stars)."""
    import math

    plt = _pyplot()
    width = min(4, len(columns))
    height = math.ceil(len(columns) / width)
    # metric names are long and have no spaces: broken into lines so a title stays over its chart
    # (about 0.06 inch a character at 8 points: 34 fit over the 2.2-inch charts); each chart as
    # wide again as its longest row label, so the labels do not squeeze it below its title
    titles = [_wrap(column, 34) for column in columns]
    title_lines = [max(t.count("\n") + 1 for t in titles[r * width:(r + 1) * width]) for r in range(height)]
    labels = {row: _wrap(row, 30) for row in rows}
    label_width = 0.06 * max((len(line) for label in labels.values() for line in label.split("\n")), default=0) + 0.3
    intervals = intervals or [[None] * len(columns) for _ in rows]
    marks = marks or [[""] * len(columns) for _ in rows]
    drawn_errors = any(e is not None for row in intervals for e in row)
    fig, axes = plt.subplots(height, width, squeeze=False, figsize=(
        (2.4 + label_width) * width + 0.4,
        sum(0.35 * len(rows) + 1.2 + 0.15 * lines for lines in title_lines) + 0.4 * drawn_errors))
    try:
        for j, column in enumerate(columns):
            ax = axes[j // width][j % width]
            shown = [(row, float(values[i][j]), intervals[i][j], marks[i][j])
                     for i, row in enumerate(rows) if values[i][j] is not None]
            ys = list(range(len(shown)))
            ax.barh(ys, [v for _, v, _, _ in shown],
                    color=["#9e9e9e" if row in muted else "#3b75af" for row, _, _, _ in shown])
            spans = [(y, v, band) for y, (_, v, band, _) in zip(ys, shown) if band is not None]
            if spans:
                ax.errorbar([v for _, v, _ in spans], [y for y, _, _ in spans],
                            xerr=[[max(0.0, v - b[0]) for _, v, b in spans], [max(0.0, b[1] - v) for _, v, b in spans]],
                            fmt="none", ecolor="black", elinewidth=1, capsize=3)
            ax.set_yticks(ys, labels=[labels[row] for row, _, _, _ in shown], fontsize=8)
            ax.invert_yaxis()  # first row on top, as in the table
            ends = []
            for y, (_, v, band, mark) in zip(ys, shown):  # each value written past its bar (and error bar)
                low, high = band if band is not None else (v, v)
                ends += [min(v, low), max(v, high)]
                ax.text(max(v, high) if v >= 0 else min(v, low), y, f" {v:.3g}{mark} ", va="center", fontsize=7,
                        ha="left" if v >= 0 else "right")
            if ends:  # room for those numbers inside the chart, on the side(s) the bars go
                low, high = min(0.0, *ends), max(0.0, *ends)
                room = 0.3 * ((high - low) or 1.0)
                ax.set_xlim(low - room if low < 0 else 0.0, high + room if high > 0 or low == 0 else 0.0)
            ax.set_title(titles[j], fontsize=8)
            ax.tick_params(axis="x", labelsize=7)
            ax.grid(axis="x", alpha=0.3)
        for j in range(len(columns), width * height):
            axes[j // width][j % width].axis("off")
        note = "\nerror bars: 95% intervals" if drawn_errors else ""
        fig.suptitle(title + note, fontsize=10)
        return _save(fig, path)
    finally:
        plt.close(fig)


def _wrap(text: str, width: int) -> str:
    """`text` in lines of at most `width` characters: broken after ".", ",", "/" or a space where
    possible (metric names are dotted words, point labels comma-separated), inside a part longer
    than a line after "_", and anywhere only in a word still longer."""
    return "\n".join(_lines(text, width, ".,/ ", "_"))


def _lines(text: str, width: int, *separators: str) -> list[str]:
    import re

    if len(text) <= width:
        return [text]
    if not separators:
        return [text[i:i + width] for i in range(0, len(text), width)]
    seps = re.escape(separators[0])
    lines, line = [], ""
    for piece in re.findall(rf"[^{seps}]+[{seps}]*|[{seps}]+", text):  # each part with the separators after it
        if line and len(line) + len(piece.rstrip()) > width:
            lines.append(line)
            line = ""
        if len(piece) > width:  # too long for a line: broken at the next kind of separator
            *full, line = _lines(piece, width, *separators[1:])
            lines += full
        else:
            line += piece
    lines.append(line)
    return [part.strip() for part in lines if part.strip()]
