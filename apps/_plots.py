"""Training and loss curves of the apps (``loss.png``): one or more panels of curves against the step, with
optional moving means and horizontal reference lines; matplotlib when installed, else a Pillow drawing of the
first panel."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#000000"]


@dataclass
class Panel:
    """Curves sharing a y axis. ``smooth``: window of a moving mean drawn over every curve (0: none; the raw
    curve is then drawn thin and grey); ``lines``: horizontal reference lines by label."""

    curves: dict[str, Sequence[float]]
    ylabel: str
    title: str = ""
    log_y: bool = False
    smooth: int = 0
    lines: dict[str, float] = field(default_factory=dict)


def moving_mean(values: Sequence[float], window: int) -> list[float]:
    """Mean of the last ``window`` values (fewer at the start) at every position."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_panels(path: Path, panels: Sequence[Panel], *, xlabel: str = "step") -> None:
    """Draw ``panels`` stacked (shared x axis) into the PNG ``path``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _pillow(path, panels[0], xlabel)
        return
    fig, axes = plt.subplots(len(panels), 1, figsize=(6.4, 3.2 * len(panels)), sharex=True, squeeze=False)
    for ax, panel in zip(axes[:, 0], panels):
        for i, (label, values) in enumerate(panel.curves.items()):
            steps = range(1, len(values) + 1)
            colour = COLOURS[i % len(COLOURS)]
            if panel.smooth:
                ax.plot(steps, values, lw=0.5, color="0.7")
                ax.plot(steps, moving_mean(values, panel.smooth), color=colour,
                        label=f"{label} (moving mean, {panel.smooth} steps)")
            else:
                ax.plot(steps, values, color=colour, label=label, lw=2 if label == "total" else 1)
        for j, (label, value) in enumerate(panel.lines.items()):
            ax.axhline(value, ls="--", color=COLOURS[(j + len(panel.curves)) % len(COLOURS)], label=label)
        if panel.log_y:
            ax.set_yscale("log")
        ax.set_ylabel(panel.ylabel)
        ax.set_title(panel.title)
        ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pillow(path: Path, panel: Panel, xlabel: str) -> None:
    """A plain line plot of one panel with Pillow (no matplotlib installed); log scale if the panel's is."""
    from PIL import Image, ImageDraw

    width, height, margin = 600, 400, 40
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    scale = (lambda v: math.log10(max(v, 1e-300))) if panel.log_y else (lambda v: v)
    values = [scale(v) for vs in panel.curves.values() for v in vs if v > 0 or not panel.log_y]
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1
    n = max(len(vs) for vs in panel.curves.values())
    draw.rectangle([margin, margin, width - margin, height - margin], outline="black")
    for i, (name, vs) in enumerate(panel.curves.items()):
        colour = COLOURS[i % len(COLOURS)]
        pts = [(margin + (width - 2 * margin) * j / max(1, n - 1),
                height - margin - (height - 2 * margin) * (min(max(scale(v), lo), hi) - lo) / (hi - lo))
               for j, v in enumerate(vs)]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2 if name == "total" else 1)
        draw.text((margin + 5, margin + 5 + 12 * i), name, fill=colour)
    axis = f"{'log10 ' if panel.log_y else ''}{panel.ylabel} {lo:.3g}..{hi:.3g}"
    draw.text((margin, height - margin + 5), f"{xlabel} 1..{n}; {axis}", fill="black")
    draw.text((margin, 10), panel.title, fill="black")
    img.save(path)
