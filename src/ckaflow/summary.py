"""`results/summary.md`, written from `results/tables/claims.parquet`: each of the paper's claims
with its effect, uncertainty, seed noise floor and verdict (rules in `ckaflow.claims`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ckaflow.claims import claims_table, shared_init_effect
from ckaflow.config import SUPERVISED
from ckaflow.provenance import atomic_path
from ckaflow.tables import read_table, representation_probes, write_both

PAPER = "Grigg et al. 2021 (arXiv 2110.00528)"


def _num(x: float, fmt: str = "+.3f") -> str:
    return format(x, fmt) if np.isfinite(x) else "n/a"


def claim_lines(claims: pd.DataFrame) -> list[str]:
    """The claims as tables, one per self-supervised method compared with the supervised runs
    (a heading each when there are several)."""
    blocks = list(claims.groupby("methods", sort=False))
    lines = []
    for methods, block in blocks:
        if len(blocks) > 1:
            lines += [f"### {methods}", ""]
        lines += _claim_table(block)
    return lines


def _claim_table(claims: pd.DataFrame) -> list[str]:
    lines = [
        "| claim | statistic | effect [95% interval] | seed floor | verdict |",
        "|---|---|---|---|---|",
    ]
    for row in claims.itertuples():
        interval = (
            f"[{_num(row.ci_low)}, {_num(row.ci_high)}]" if np.isfinite(row.ci_low) else "[n/a]"
        )
        floor = (
            f"±{row.noise_floor:.3f} ({row.replicates})"
            if np.isfinite(row.noise_floor)
            else f"n/a ({row.replicates})"
        )
        title, statistic = (text.replace("|", "\\|") for text in (row.title, row.statistic))
        lines.append(
            f"| **{row.claim}** {title} | {statistic} | {_num(row.value)} {interval} | "
            f"{floor} | **{row.verdict}** |"
        )
    lines.append("")
    lines += [f"- {row.claim}: {row.detail}" for row in claims.itertuples() if row.detail]
    return [*lines, ""]


def shared_init_lines(table: pd.DataFrame) -> list[str]:
    frame = shared_init_effect(table)
    if "shared_init" not in frame or "different_init" not in frame:
        return []
    names = {
        "shared_init": "cross-method, same initial weights",
        "different_init": "cross-method, different initial weights",
        "seed_pairs": "same method, different seeds",
    }
    cols = [c for c in names if c in frame]
    lines = [
        "## How much the starting point explains",
        "",
        "Mean CKA of each layer with the same layer of the other run, per stage (0 = stem, "
        "5 = pool and heads). Runs that start from the same initial weights inherit part of "
        "their similarity; the claims above use pairs from different initial weights.",
        "",
        "| stage | " + " | ".join(names[c] for c in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    for stage, row in frame.iterrows():
        lines.append(f"| {stage} | " + " | ".join(_num(row[c], ".2f") for c in cols) + " |")
    return [*lines, ""]


def probe_lines(probes: pd.DataFrame) -> list[str]:
    """Per run: the linear probe of the encoder output, trained against untrained, and where
    along the depth the probe accuracy peaks."""
    lines = []
    for run, group in probes.groupby("run"):
        at = representation_probes(group)
        pool = at.set_index("encoder")["eval_accuracy"]
        where = "the pooled features" if at["layer_kind"].iloc[0] == "pool" else at["layer"].iloc[0]
        trained = group[group["encoder"] == "trained"]
        best = trained.loc[trained["eval_accuracy"].idxmax()]
        line = f"- {run}: linear probe at {where} {pool['trained']:.1%}"
        if "untrained" in pool:
            gain = 100 * (pool["trained"] - pool["untrained"])
            line += f" against {pool['untrained']:.1%} untrained ({gain:+.1f} points)"
        lines.append(f"{line}; best layer {best['layer']} ({best['eval_accuracy']:.1%}).")
    return lines


def compared(claims: pd.DataFrame) -> str:
    """Which methods the claims compare, in words."""
    blocks = list(dict.fromkeys(claims["methods"]))
    if len(blocks) == 1:
        return f"Methods compared: {blocks[0]}."
    return (
        f"Methods compared: {'; '.join(blocks)} (each self-supervised method against the "
        f"{SUPERVISED} runs, on the runs of those two methods only)."
    )


RULES = (
    "Each effect is oriented so that a positive value is what the paper reports. Its interval "
    "adds the half-widths of the bootstrap intervals of the CKA values it is built from "
    "(binomial intervals for probe accuracies); the seed floor is the largest change of the "
    "statistic between seeds (in brackets: the runs or run pairs it averages). With u the larger "
    "of the two: *agrees* if the effect > u, *disagrees* if < −u, *within noise* otherwise; C1 "
    "and C2 claim sameness (the methods as alike as two seeds of one method) and agree when the "
    "effect ≥ −u; *not measured* when a layer, comparison or seed pair is missing."
)


def summarize(
    table_path: str | Path,
    out: str | Path,
    probes: str | Path | None = None,
    claims_out: str | Path | None = None,
) -> str:
    table = read_table(table_path)
    probe_table = read_table(probes, "probes") if probes is not None else None
    claims = claims_table(table, probe_table)
    if claims_out is not None:
        write_both(claims, Path(claims_out))
    probe_text = []
    if probe_table is not None:
        probe_text = [
            "## Linear probes (eval subset, spatially pooled features of each layer)",
            "",
            *probe_lines(probe_table),
            "",
            "The untrained baseline is each run's exact initial network with BatchNorm statistics "
            "from one pass over the training images.",
            "",
        ]
    runs = sorted(set(table["run_a"]) - {"labels"})
    estimator = table["estimator"].iloc[0]
    n = int(table["n"].iloc[0])
    boot = int(table["bootstrap"].iloc[0])
    text = "\n".join(
        [
            "# ckaflow summary",
            "",
            f"Runs: {', '.join(runs)}. CKA estimator: {estimator}, {n} eval examples, "
            f"{boot} bootstrap replicates. Config hash {table['config_hash'].iloc[0]}, "
            f"code {table['code_version'].iloc[0]}.",
            "",
            "## The paper's claims, measured in this run",
            "",
            f"Claims of {PAPER}; rules below the table. {compared(claims)}",
            "",
            *claim_lines(claims),
            RULES,
            "",
            *shared_init_lines(table),
            *probe_text,
            f"Non-finite CKA values: {int((~np.isfinite(table['value'])).sum())}.",
            "",
        ]
    )
    with atomic_path(out) as scratch:
        Path(scratch).write_text(text)
    return text
