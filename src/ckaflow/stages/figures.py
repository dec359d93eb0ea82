"""The `figures` stage: heatmaps, curves against depth and probe accuracy, as PNG and PDF
(`ckaflow.plots.plot_all`)."""

from __future__ import annotations

from pathlib import Path


def run(spec: dict, cka: str | Path, out: str | Path, probes: str | Path | None = None):
    """`spec`: the config's `plots` section {dpi, cmap}; `out`: the figures' folder."""
    from ckaflow.plots import plot_all

    return plot_all(cka, out, probes=probes, style=spec)
