"""`results/summary.md`, written from `results/tables/claims.parquet`: each of the paper's claims
with its effect, 95% interval over runs and images, and verdict (rules in `ckaflow.claims`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from ckaflow.claims import (
    DEFAULT_MARGIN,
    claims_table,
    constant_layers,
    likely_cause,
    replicate_runs,
    run_facts,
    shared_init_effect,
)
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
        "| claim | statistic | effect [95% interval] | runs (t df) | verdict |",
        "|---|---|---|---|---|",
    ]
    for row in claims.itertuples():
        interval = (
            f"[{_num(row.ci_low)}, {_num(row.ci_high)}]" if np.isfinite(row.ci_low) else "[n/a]"
        )
        runs = f"{row.runs} ({row.df})" if row.df else (row.runs or "n/a")
        title, statistic = (text.replace("|", "\\|") for text in (row.title, row.statistic))
        rule = f"; equivalence margin ±{row.margin:g}" if row.rule == "sameness" else ""
        lines.append(
            f"| **{row.claim}** {title} | {statistic}{rule} | {_num(row.value)} {interval} | "
            f"{runs} | **{row.verdict}** |"
        )
    lines.append("")
    lines += [f"- {row.claim}: {row.detail}" for row in claims.itertuples() if row.detail]
    return [*lines, ""]


def resolution_lines(claims: pd.DataFrame) -> list[str]:
    """What this study's seed count can resolve: the interval's half-width per claim."""
    measured = claims[np.isfinite(claims["ci_low"])]
    if not len(measured):
        return [
            "No claim has an interval over runs: that needs at least two seed replicates of "
            "each method compared (five give useful power: `configs/reference.yaml`).",
            "",
        ]
    df = int(measured["df"].min())
    half = (measured["ci_high"] - measured["ci_low"]) / 2
    return [
        f"With {df + 1} seeds of the sparsest method the intervals use Student's t with "
        f"{df} degree(s) of freedom (t = {stats.t.ppf(0.975, df):.2f}); an effect must exceed "
        f"its half-width ({half.min():.3f} to {half.max():.3f} here) to be decided."
        + (
            " Five seeds per method (t = 2.78, and more runs in the spread) narrow them "
            "several-fold: `configs/reference.yaml`."
            if df + 1 < 5
            else ""
        ),
        "",
    ]


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
    "How the verdicts are made: each effect is oriented so that a positive value is what the "
    "paper reports, and built from per-run or per-run-pair quantities. Its 95% interval is "
    "t(0.975; d) · √(V_runs + V_images): V_runs a delete-one-run jackknife stratified by "
    "method (a run is left out with every pair it is in), V_images the jackknife over left-out "
    "blocks of eval images (the same block out of every value at once; binomial for probe "
    "accuracies), d = the sparsest method's runs − 1. Directional claims *agree* when the "
    "interval lies above 0 and *disagree* below it; C1 and C2 are equivalence tests and "
    "*agree* when the interval lies inside ±margin, *disagree* when wholly outside; "
    "otherwise, or with one run of a method, *within noise*. A simulation of null studies "
    "keeps *agrees* at or under 5% for every claim (tests/test_claims_calibration.py)."
)


def constant_lines(table: pd.DataFrame) -> list[str]:
    """Runs with constant layers (no CKA): named with a likely cause."""
    found = constant_layers(table)
    if not found:
        return []
    lines = [
        "## Constant layers",
        "",
        "These layers gave the same output for every eval image, so their CKA is undefined "
        "(NaN): they are left out of every mean, and the figures mark them.",
        "",
    ]
    for run, layers in found.items():
        shown = ", ".join(layers[:8]) + (f" and {len(layers) - 8} more" if len(layers) > 8 else "")
        lines.append(
            f"- {run}: {len(layers)} layer(s) ({shown}); likely cause: {likely_cause(layers)}."
        )
    return [*lines, ""]


def left_out_lines(table: pd.DataFrame, claims: pd.DataFrame) -> list[str]:
    """Runs of a compared method that are not among its seed replicates."""
    facts = run_facts(table)
    out = []
    for method in sorted(set(facts["method"].dropna())):
        used, left = replicate_runs(facts, method)
        if left:
            out.append(
                f"- {method}: the claims use {', '.join(used)} (seed replicates of one "
                f"recipe); {', '.join(left)} differ in more than the seed (or carry no seed) "
                "and take no part."
            )
    return ["Runs left out of the claims:", "", *out, ""] if out else []


def summarize(
    table_path: str | Path,
    out: str | Path,
    probes: str | Path | None = None,
    claims_out: str | Path | None = None,
    margin: float = DEFAULT_MARGIN,
) -> str:
    table = read_table(table_path)
    probe_table = read_table(probes, "probes") if probes is not None else None
    claims = claims_table(table, probe_table, margin=margin)
    if claims_out is not None:
        write_both(claims, Path(claims_out))
    probe_text = []
    if probe_table is not None:
        probe_text = [
            "## Linear probes (eval subset, spatially pooled features of each layer)",
            "",
            *probe_lines(probe_table),
            "",
            "The untrained baseline is each trained run's exact initial network, and for an "
            "imported run a freshly initialised network of its architecture (seeded from its "
            "name), with BatchNorm statistics from one pass over the training images.",
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
            *resolution_lines(claims),
            *left_out_lines(table, claims),
            RULES,
            "",
            *constant_lines(table),
            *shared_init_lines(table),
            *probe_text,
            f"Non-finite CKA values: {int((~np.isfinite(table['value'])).sum())}.",
            "",
        ]
    )
    with atomic_path(out) as scratch:
        Path(scratch).write_text(text)
    return text
