"""`results/summary.md`: each of the paper's claims as a sentence with this run's numbers, and
whether this run agrees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ckaflow.provenance import atomic_path
from ckaflow.tables import read_table

PAPER = "Grigg et al. 2021 (arXiv 2110.00528)"


def _mean_sd(values: pd.Series) -> str:
    values = values.dropna()
    if len(values) == 0:
        return "n/a"
    return f"{values.mean():.2f} ± {values.std(ddof=0):.2f}"


def _verdict(ok: bool) -> str:
    return "**agrees** with the paper" if ok else "**disagrees** with the paper"


def cross_method_diagonal(table: pd.DataFrame) -> pd.DataFrame:
    cross = table[(table["kind"] == "cross") & (table["method_a"] != table["method_b"])]
    return cross[cross["layer_a"] == cross["layer_b"]]


def claims(table: pd.DataFrame) -> list[str]:
    lines: list[str] = []
    diagonal = cross_method_diagonal(table)
    if len(diagonal):
        stages = sorted(s for s in diagonal["stage_a"].unique() if 1 <= s <= 4)
        early = diagonal[diagonal["stage_a"] <= 1]["value"]
        last = diagonal[diagonal["stage_a"] == max(stages)]["value"]
        lines.append(
            f"- **Early layers match.** Cross-method CKA of the stem and stage 1 layers with the "
            f"same layer of the other method: {_mean_sd(early)}; last stage: {_mean_sd(last)}. "
            f"This {_verdict(early.mean() > last.mean() and early.mean() > 0.8)} "
            "(high early similarity that falls with depth)."
        )
        for stage in stages:
            part = diagonal[diagonal["stage_a"] == stage]
            even = part[part["layer_kind_a"] == "out"]["value"]
            odd = part[part["layer_kind_a"] == "residual"]["value"]
            lines.append(
                f"  - In stage {stage} the mean even-layer (post-residual) cross-method CKA is "
                f"{_mean_sd(even)}, the odd-layer (residual-branch) one {_mean_sd(odd)}."
            )
        middle = diagonal[diagonal["stage_a"].isin(stages[1:-1] or stages)]
        even = middle[middle["layer_kind_a"] == "out"]["value"].mean()
        odd = middle[middle["layer_kind_a"] == "residual"]["value"].mean()
        gap = even - odd
        verdict = _verdict(gap > 0)
        if 0 < gap < 0.05:
            verdict = f"agrees only weakly with the paper (a gap of {gap:.2f})"
        lines.append(
            f"- **Post-residual layers stay similar through the middle, residual branches do "
            f"not.** Middle stages: even {even:.2f} vs odd {odd:.2f}; this {verdict} "
            "(the paper finds even layers clearly above odd ones)."
        )
        lines.append(
            f"- **The last stage diverges.** Stage {max(stages)}: {_mean_sd(last)} against "
            f"{_mean_sd(early)} early; this {_verdict(last.mean() < early.mean())}."
        )
    invariance = table[(table["kind"] == "invariance") & (table["view_a"] == "aug1")]
    invariance = invariance[invariance["layer_a"] == invariance["layer_b"]]
    final = _final_layer_values(invariance)
    if {"simclr", "supervised"} <= set(final):
        lines.append(
            f"- **SimCLR fits augmentation invariance.** CKA(aug1, aug2) at the pooled features: "
            f"SimCLR {final['simclr']:.2f}, supervised {final['supervised']:.2f}; this "
            f"{_verdict(final['simclr'] > final['supervised'])}."
        )
    classes = _final_layer_values(table[table["kind"] == "class"])
    if {"simclr", "supervised"} <= set(classes):
        lines.append(
            f"- **Supervised learning fits the classes.** CKA with the one-hot labels at the "
            f"pooled features: supervised {classes['supervised']:.2f}, SimCLR "
            f"{classes['simclr']:.2f}; this {_verdict(classes['supervised'] > classes['simclr'])}."
        )
    return lines


def _final_layer_values(frame: pd.DataFrame) -> dict[str, float]:
    """Mean over runs of each method of the value at `pool`."""
    pooled = frame[frame["layer_a"] == "pool"]
    return {m: float(g["value"].mean()) for m, g in pooled.groupby("method_a")}


def probe_lines(probes: pd.DataFrame) -> list[str]:
    """Per run: the linear probe of the encoder output, trained against untrained, and where
    along the depth the probe accuracy peaks."""
    lines = []
    for run, group in probes.groupby("run"):
        pool = group[group["layer_kind"] == "pool"].set_index("encoder")["eval_accuracy"]
        trained = group[group["encoder"] == "trained"]
        best = trained.loc[trained["eval_accuracy"].idxmax()]
        line = f"- {run}: linear probe at the pooled features {pool['trained']:.1%}"
        if "untrained" in pool:
            gain = 100 * (pool["trained"] - pool["untrained"])
            line += f" against {pool['untrained']:.1%} untrained ({gain:+.1f} points)"
        lines.append(f"{line}; best layer {best['layer']} ({best['eval_accuracy']:.1%}).")
    return lines


def summarize(table_path: str | Path, out: str | Path, probes: str | Path | None = None) -> str:
    table = read_table(table_path)
    probe_text = []
    if probes is not None:
        probe_text = [
            "## Linear probes (eval subset, spatially pooled features of each layer)",
            "",
            *probe_lines(read_table(probes, "probes")),
            "",
        ]
    runs = sorted(set(table["run_a"]) - {"labels"})
    estimator = table["estimator"].iloc[0]
    n = int(table["n"].iloc[0])
    text = "\n".join(
        [
            "# ckaflow summary",
            "",
            f"Runs: {', '.join(runs)}. CKA estimator: {estimator}, {n} eval examples. "
            f"Config hash {table['config_hash'].iloc[0]}, code {table['code_version'].iloc[0]}.",
            "",
            f"## The paper's claims ({PAPER}), measured in this run",
            "",
            *(claims(table) or ["(this study has no cross-method comparison to check)"]),
            "",
            *probe_text,
            f"Non-finite CKA values: {int((~np.isfinite(table['value'])).sum())}.",
            "",
        ]
    )
    with atomic_path(out) as scratch:
        Path(scratch).write_text(text)
    return text
