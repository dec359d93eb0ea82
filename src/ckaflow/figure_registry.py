"""The figures a study makes, one entry per family: the one place a figure is added.

A family is a kind of figure (the within-model heatmaps, the invariance curves...). Its entry
says which figures a study will make of it, from the config alone (`planned`, which `Study`
reads to give Snakemake the figures rule's outputs), which drawing generator in `ckaflow.plots`
makes them from the tidy tables (`draw`, which `plots.draw_all` runs), its category in the
report, and (by its name) its caption `workflow/report/<family>.rst`. Adding a figure: a drawing
generator in `plots.py`, its entry here, its caption. Both sides name figures with
`figure_name`, so the planned and the drawn set are the same (`tests/test_plot_values.py`).

No matplotlib and no torch here: Snakemake reads it while it parses the workflow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FIGURE_FORMATS = ("png", "pdf")
# the odd and even parts of a cross-model heatmap: (name part, layer kind of both sides, title)
CROSS_PARTS = (("odd", "residual", "Residual-branch"), ("even", "out", "Post-residual"))


def figure_name(kind: str, *parts: str) -> str:
    """within-<run>.<view>; cross[-odd|-even]-<a>-vs-<b>; or the family's own name
    (cross-diagonal, invariance, class, probes)."""
    if kind == "within":
        run, view = parts
        return f"within-{run}.{view}"
    if kind == "cross":
        run_a, run_b, part = parts
        return f"cross{'-' + part if part else ''}-{run_a}-vs-{run_b}"
    return kind


@dataclass(frozen=True)
class Family:
    name: str  # its caption in the report: workflow/report/<name>.rst
    category: str  # its section of the report
    planned: Callable[[Any], list[str]]  # a Study -> the names of the figures it makes
    draw: str  # ckaflow.plots.<draw>(cka, probes) yields (name, Figure) per figure


def _of_kind(study, kind: str) -> list:
    return [c for c in study.comparisons.values() if c.kind == kind]


def _cross_parts(study) -> list[str]:
    """Odd and even parts where both sides have such layers (an imported module has neither)."""
    names = []
    for c in _of_kind(study, "cross"):
        shared = {la.kind for la in study.layers(c.a)} & {la.kind for la in study.layers(c.b)}
        names += [
            figure_name("cross", c.a.run, c.b.run, part)
            for part, kind, _ in CROSS_PARTS
            if kind in shared
        ]
    return names


def _once_if(kind: str, name: str, *, resnets_only: bool = False) -> Callable[[Any], list[str]]:
    """One figure when the study has a comparison of `kind` (between ResNets, when the figure
    pairs each layer with its namesake)."""

    def planned(study) -> list[str]:
        found = [c for c in _of_kind(study, kind) if not (resnets_only and study.any_module(c))]
        return [figure_name(name)] if found else []

    return planned


FAMILIES = (
    Family(
        "within",
        "Within-model CKA",
        lambda study: [figure_name("within", c.a.run, c.a.view) for c in _of_kind(study, "within")],
        "within_figures",
    ),
    Family(
        "cross",
        "Cross-model CKA",
        lambda study: [
            figure_name("cross", c.a.run, c.b.run, "") for c in _of_kind(study, "cross")
        ],
        "cross_figures",
    ),
    Family("cross-odd-even", "Cross-model CKA", _cross_parts, "cross_part_figures"),
    Family(
        "cross-diagonal",
        "Cross-model CKA",
        _once_if("cross", "cross-diagonal", resnets_only=True),
        "cross_diagonal_figures",
    ),
    Family(
        "invariance",
        "Invariance and class structure",
        _once_if("invariance", "invariance"),
        "invariance_figures",
    ),
    Family("class", "Invariance and class structure", _once_if("class", "class"), "class_figures"),
    Family("probes", "Linear probes", lambda study: [figure_name("probes")], "probe_figures"),
)
FAMILY = {family.name: family for family in FAMILIES}
