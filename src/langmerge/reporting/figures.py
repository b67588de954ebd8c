"""The report's figures as PNG bytes (matplotlib, no screen needed): quality bars, cost bars,
similarity heat map, per-layer similarity, interference, the sweep's density curves."""

from __future__ import annotations

import io
from collections.abc import Sequence


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    _plt().close(fig)
    return buf.getvalue()


def grouped_bars(
    languages: Sequence[str],
    rows: dict[str, Sequence[float | None]],
    ylabel: str,
    intervals: dict[str, Sequence[tuple[float, float] | None]] | None = None,
    stale: dict[str, Sequence[bool]] | None = None,
) -> bytes:
    """One group of bars per language, one bar per model (row); None leaves a gap. With
    `intervals`, each bar gets its 95% interval as an error bar; a `stale` bar (scored on
    earlier data) is drawn hatched and pale."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(languages) + 2), 3.6))
    width = 0.8 / max(1, len(rows))
    from matplotlib.patches import Patch

    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    any_stale = False
    legend: dict[str, Patch] = {}
    for i, (row, values) in enumerate(rows.items()):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(languages))]
        bounds = (intervals or {}).get(row) or [None] * len(values)
        old = (stale or {}).get(row) or [False] * len(values)
        colour = colours[i % len(colours)]
        for x, v, ci, s in zip(xs, values, bounds, old):
            if v is None:
                continue
            any_stale = any_stale or s
            ax.bar(x, v, width, color=colour, alpha=0.45 if s else 1.0,
                   hatch="//" if s else None, edgecolor="white" if s else None)  # fmt: skip
            if ci is not None:
                ax.errorbar(x, v, yerr=[[v - ci[0]], [ci[1] - v]], color="black", lw=0.8,
                            capsize=2)  # fmt: skip
        legend[row] = Patch(facecolor=colour)  # one entry per model, even with gaps
    ax.set_xticks(range(len(languages)), languages)
    ax.set_ylabel(ylabel + (" (bars: 95% interval)" if intervals else ""))
    known = [v for vs in rows.values() for v in vs if v is not None]
    ax.set_ylim(0, 1.05 if all(0 <= v <= 1 for v in known) else None)
    if any_stale:
        pale = Patch(facecolor="grey", alpha=0.45, hatch="//", edgecolor="white")
        legend["hatched: scored on earlier data"] = pale
    ax.legend(legend.values(), legend.keys(), fontsize=7, ncol=min(3, len(legend)),
              loc="upper center", bbox_to_anchor=(0.5, -0.1))  # fmt: skip
    ax.grid(axis="y", alpha=0.3)
    return _png(fig)


def cost_bars(items: Sequence[tuple[str, float, bool]], xlabel: str = "wall seconds") -> bytes:
    """Horizontal bars (label, seconds, measured); projected figures are hatched."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(items) + 1))
    labels = [label for label, _, _ in items][::-1]
    values = [v for _, v, _ in items][::-1]
    measured = [m for _, _, m in items][::-1]
    bars = ax.barh(labels, values, color=["#4c72b0" if m else "#dd8452" for m in measured])
    for bar, m in zip(bars, measured):
        if not m:
            bar.set_hatch("//")
    for bar, v in zip(bars, values):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {v:.1f}", va="center",
                fontsize=8)  # fmt: skip
    ax.set_xlabel(xlabel + " (hatched: projected)")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def heatmap(languages: Sequence[str], matrix: Sequence[Sequence[float]], title: str) -> bytes:
    """A language × language matrix with its values written in the cells."""
    plt = _plt()
    n = len(languages)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * n, 0.8 + 0.7 * n))
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(n), languages)
    ax.set_yticks(range(n), languages)
    for i in range(n):
        for j in range(n):
            value = matrix[i][j]
            color = "white" if abs(value) > 0.6 else "black"
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color=color)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, shrink=0.8)
    return _png(fig)


MARKERS = "osD^v<>PX*hp"


def layer_lines(series: dict[str, dict], ylabel: str) -> bytes:
    """One line per pair of languages over the layers (x: layer index), each pair with its own
    colour, marker and dash pattern, so that ten or more pairs stay apart."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.4))
    colours = plt.get_cmap("tab20").colors
    dashes = ["-", "--", ":", "-."]
    for i, (label, by_layer) in enumerate(series.items()):
        layers = sorted(k for k in by_layer if isinstance(k, int))
        ax.plot(layers, [by_layer[k] for k in layers], label=label,
                color=colours[(2 * i) % 20 if i < 10 else (2 * i + 1) % 20],
                marker=MARKERS[i % len(MARKERS)], linestyle=dashes[(i // len(MARKERS)) % 4],
                markersize=4)  # fmt: skip
    ax.set_xlabel("layer")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=4, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    return _png(fig)


def scatter(points: dict[str, tuple[float, float]], xlabel: str, ylabel: str) -> bytes:
    """Points named in a legend (each its own colour and marker), e.g. a language's mean
    similarity against its merge-minus-expert score: labels written beside close points would
    overlap."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    colours = plt.get_cmap("tab10").colors
    for i, (label, (x, y)) in enumerate(points.items()):
        ax.scatter([x], [y], color=colours[i % 10], marker=MARKERS[i % len(MARKERS)], s=40,
                   label=label)  # fmt: skip
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.02, 0.5))
    return _png(fig)


def density_curves(curves: dict[str, dict[float, float]], ylabel: str) -> bytes:
    """Score against density, one line per method (a method tried at one density is a dot)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for method, by_density in curves.items():
        xs = sorted(by_density)
        ax.plot(xs, [by_density[x] for x in xs], marker="o", label=method)
    ax.set_xlabel("density")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)
