"""The paper's claims, each measured as an effect against its uncertainty and the seed noise floor.

Every claim reduces the tidy CKA table (and the probes table) to one number, the *effect*, oriented
so that a positive value is what the paper reports. Next to it:

- *uncertainty*: the half-width of a 95% interval of the effect. CKA values carry bootstrap
  intervals (`cka.bootstrap`); an effect built from several values gets the sum of their
  half-widths, weighted as in the effect — exact if the values' errors were perfectly correlated,
  wider otherwise, so never too narrow. Probe accuracies get binomial intervals
  (1.96 · sqrt(p(1 − p)/n)).
- *noise floor*: how much the same statistic changes from seed to seed — the largest range
  (max − min) of the statistic over the replicates it averages (runs of one method, or run pairs
  of one kind). It needs two or more seeds per method; with one it is unknown.

Verdicts, with u = the larger of uncertainty and noise floor:
- directional claims: *agrees* if effect > u, *disagrees* if effect < −u, *within noise* otherwise;
- claims of sameness (C1, C2: the methods are as alike as two seeds of one method):
  *agrees* if effect ≥ −u, *disagrees* otherwise; they need the seed pairs, so one seed per method
  gives *not measured*;
- *not measured* whenever the effect is not finite (layers not stored, NaN CKA, a comparison
  missing) or neither an uncertainty nor a noise floor is known.

Like is compared with like: cross-method run pairs that started from different initial weights
stand against same-method seed pairs (which always differ in initial weights); cross-method pairs
that share their initial weights are reported apart (`shared_init`), since part of their
similarity is inherited from the starting point. Where a study has no cross-method pair with
different initial weights, the claims fall back to the shared ones and say so.

The methods compared are the ones the study has: runs labelled `supervised` are the supervised
side, every other label (simclr, or an imported run's byol, dino, ...) a self-supervised side.
Each self-supervised method gets its own block of claims against the supervised runs, measured
on the runs of those two methods only (so simclr-vs-byol pairs never count as cross-method).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ckaflow.config import SUPERVISED, method_name

VERDICTS = ("agrees", "disagrees", "within noise", "not measured")
CLAIM_COLUMNS = (
    "methods",
    "claim",
    "title",
    "statistic",
    "value",
    "ci_low",
    "ci_high",
    "noise_floor",
    "replicates",
    "rule",
    "verdict",
    "detail",
)
FINAL_LAYER = "pool"  # the encoder output: the last layer both methods have
PROBE_Z = 1.96


@dataclass
class Effect:
    """One claim's number: the effect, its interval half-width, the seed floor, the replicates."""

    value: float = np.nan
    half_width: float = np.nan
    noise: float = np.nan
    replicates: int = 0
    detail: str = ""
    parts: dict = field(default_factory=dict)


def verdict(effect: Effect, rule: str = "directional") -> str:
    if not np.isfinite(effect.value):
        return "not measured"
    bounds = [b for b in (effect.half_width, effect.noise) if np.isfinite(b)]
    if not bounds:
        return "not measured"
    u = max(bounds)
    if rule == "sameness":
        return "agrees" if effect.value >= -u else "disagrees"
    if effect.value > u:
        return "agrees"
    if effect.value < -u:
        return "disagrees"
    return "within noise"


# ---------------------------------------------------------------------------------------------
# Reading the table


def _half_width(frame: pd.DataFrame) -> pd.Series:
    return (frame["ci_high"] - frame["ci_low"]) / 2


def _spread(values) -> float:
    """Range of a statistic over replicates; unknown (NaN) with fewer than two."""
    values = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    return float(values.max() - values.min()) if len(values) >= 2 else np.nan


def _mean(values) -> float:
    values = np.asarray(list(values), dtype=float)
    return float(values.mean()) if len(values) and np.isfinite(values).all() else np.nan


def pair_kinds(table: pd.DataFrame) -> pd.DataFrame:
    """The cross comparisons on the clean view, each marked same-method or cross-method and
    whether the two runs share their initial weights."""
    cross = table[(table["kind"] == "cross") & (table["view_a"] == "clean")].copy()
    cross["cross_method"] = cross["method_a"] != cross["method_b"]
    cross["shared_init"] = (cross["init_a"] == cross["init_b"]) & (
        cross["arch_a"] == cross["arch_b"]
    )
    return cross


def _diagonal(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["layer_a"] == frame["layer_b"]]


def _cross_method(table: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """Cross-method pairs from different initial weights (or, lacking them, shared ones)."""
    cross = pair_kinds(table)
    methods = cross[cross["cross_method"]]
    independent = methods[~methods["shared_init"]]
    if len(independent):
        return independent, "cross-method pairs from different initial weights"
    if len(methods):
        return methods, "cross-method pairs (all share their initial weights)"
    return methods, "no cross-method pair"


def _seed_pairs(table: pd.DataFrame) -> pd.DataFrame:
    cross = pair_kinds(table)
    return cross[~cross["cross_method"]]


def _per_pair(
    frame: pd.DataFrame, statistic: Callable[[pd.DataFrame], tuple[float, float]]
) -> list[tuple[float, float]]:
    """(value, half-width) of a statistic for each comparison (run pair) of a frame."""
    return [statistic(group) for _, group in frame.groupby("comparison")]


def _mean_of(frame: pd.DataFrame, mask) -> tuple[float, float]:
    part = frame[mask]
    if not len(part):
        return np.nan, np.nan
    return _mean(part["value"]), float(_half_width(part).mean())


def _over_replicates(pairs: list[tuple[float, float]]) -> Effect:
    if not pairs:
        return Effect()
    values = [v for v, _ in pairs]
    return Effect(
        value=_mean(values),
        half_width=_mean([h for _, h in pairs]),
        noise=_spread(values),
        replicates=len(pairs),
    )


def _stages(frame: pd.DataFrame) -> list[int]:
    stages = frame[frame["layer_kind_a"].isin(["relu1", "relu2", "residual", "out"])]
    return sorted(int(s) for s in stages["stage_a"].unique())


# ---------------------------------------------------------------------------------------------
# The claims


def c1_block_structure(table: pd.DataFrame) -> Effect:
    """Mean |within-model CKA matrix of a seed pair − of a cross-method pair|, as
    (seed-pair distance) − (cross-method distance): ≥ −u when the methods' block structures
    differ no more than two seeds'."""
    within = table[(table["kind"] == "within") & (table["view_a"] == "clean")]
    grids = {
        run: group.pivot(index="layer_a", columns="layer_b", values="value")
        for run, group in within.groupby("run_a")
    }
    widths = {
        run: group.assign(hw=_half_width(group)).pivot(
            index="layer_a", columns="layer_b", values="hw"
        )
        for run, group in within.groupby("run_a")
    }
    cross, _ = _cross_method(table)
    seeds = _seed_pairs(table)

    def distances(pairs: pd.DataFrame) -> list[tuple[float, float]]:
        out = []
        for (a, b), _ in pairs.groupby(["run_a", "run_b"]):
            if a not in grids or b not in grids:
                out.append((np.nan, np.nan))
                continue
            common = grids[a].index.intersection(grids[b].index)  # the heads differ
            ga, gb = (grids[r].loc[common, common].to_numpy() for r in (a, b))
            wa, wb = (widths[r].loc[common, common].to_numpy() for r in (a, b))
            off = ~np.eye(len(common), dtype=bool)
            diff, hw = np.abs(ga - gb)[off], (wa + wb)[off]
            out.append((_mean(diff), float(np.mean(hw))))
        return out

    method_d, seed_d = distances(cross), distances(seeds)
    if not method_d or not seed_d:
        return Effect(detail="needs within-model matrices, a cross-method pair and seed pairs")
    methods, same = _over_replicates(method_d), _over_replicates(seed_d)
    return Effect(
        value=same.value - methods.value,
        half_width=same.half_width + methods.half_width,
        noise=_max_finite(same.noise, methods.noise),
        replicates=methods.replicates + same.replicates,
        detail=f"mean |ΔCKA| between within-model matrices: cross-method {methods.value:.3f}, "
        f"seed pairs {same.value:.3f}",
    )


def c2_early_match(table: pd.DataFrame) -> Effect:
    """Cross-method CKA of the early layers (stem and stage 1) minus the same for seed pairs:
    ≥ −u when the methods match there as closely as two seeds of one method."""
    cross, _ = _cross_method(table)
    seeds = _seed_pairs(table)

    def early(group):
        return _mean_of(_diagonal(group), _diagonal(group)["stage_a"] <= 1)

    methods = _over_replicates(_per_pair(cross, early))
    same = _over_replicates(_per_pair(seeds, early))
    if not methods.replicates or not same.replicates:
        return Effect(detail="needs a cross-method pair and seed pairs (two seeds per method)")
    return Effect(
        value=methods.value - same.value,
        half_width=methods.half_width + same.half_width,
        noise=_max_finite(methods.noise, same.noise),
        replicates=methods.replicates + same.replicates,
        detail=f"early-layer CKA: cross-method {methods.value:.2f}, seed pairs {same.value:.2f}",
    )


def _max_finite(*values: float) -> float:
    finite = [v for v in values if np.isfinite(v)]
    return max(finite) if finite else np.nan


def c3_even_above_odd(table: pd.DataFrame) -> Effect:
    """Middle stages: cross-method CKA of post-residual (even) minus residual-branch (odd)
    layers."""
    cross, _ = _cross_method(table)
    stages = _stages(cross)
    if not stages:
        return Effect(detail="needs a cross-method pair")
    middle = stages[1:-1] or stages

    def gap(group):
        diag = _diagonal(group)
        diag = diag[diag["stage_a"].isin(middle)]
        even = _mean_of(diag, diag["layer_kind_a"] == "out")
        odd = _mean_of(diag, diag["layer_kind_a"] == "residual")
        return even[0] - odd[0], even[1] + odd[1]

    effect = _over_replicates(_per_pair(cross, gap))
    effect.detail = f"stages {', '.join(map(str, middle))}: " + _even_odd_by_stage(cross)
    return effect


def _even_odd_by_stage(cross: pd.DataFrame) -> str:
    diag = _diagonal(cross)
    parts = []
    for stage in _stages(cross):
        at = diag[diag["stage_a"] == stage]
        even = _mean(at[at["layer_kind_a"] == "out"]["value"])
        odd = _mean(at[at["layer_kind_a"] == "residual"]["value"])
        parts.append(f"stage {stage} even {even:.2f} / odd {odd:.2f}")
    return "; ".join(parts)


def c4_last_stage_diverges(table: pd.DataFrame) -> Effect:
    """Cross-method CKA of the middle stages' layers minus that of the last stage's layers."""
    cross, _ = _cross_method(table)
    stages = _stages(cross)
    if len(stages) < 2:
        return Effect(detail="needs at least two residual stages")
    middle, last = stages[1:-1] or stages[:1], stages[-1]

    def drop(group):
        diag = _diagonal(group)
        mid = _mean_of(diag, diag["stage_a"].isin(middle))
        end = _mean_of(diag, diag["stage_a"] == last)
        return mid[0] - end[0], mid[1] + end[1]

    effect = _over_replicates(_per_pair(cross, drop))
    pooled = _diagonal(cross)
    mid = _mean(pooled[pooled["stage_a"].isin(middle)]["value"])
    end = _mean(pooled[pooled["stage_a"] == last]["value"])
    effect.detail = f"middle stages {mid:.2f}, stage {last} {end:.2f}"
    return effect


def _per_run(frame: pd.DataFrame, method: str, layer: str) -> list[tuple[float, float]]:
    rows = frame[(frame["method_a"] == method) & (frame["layer_a"] == layer)]
    return [_mean_of(group, slice(None)) for _, group in rows.groupby("run_a")]


def _method_gap(
    frame: pd.DataFrame, high: str | None, low: str | None, layer: str, what: str
) -> Effect:
    """Mean over runs of method `high` minus method `low` at one layer; noise = the larger
    seed-to-seed range within either method."""
    a = _over_replicates(_per_run(frame, high, layer))
    b = _over_replicates(_per_run(frame, low, layer))
    if not a.replicates or not b.replicates:
        return Effect(detail=f"needs {what} for both {high} and {low}")
    return Effect(
        value=a.value - b.value,
        half_width=a.half_width + b.half_width,
        noise=_max_finite(a.noise, b.noise),
        replicates=a.replicates + b.replicates,
        detail=f"{what} at {layer}: {method_name(high)} {a.value:.2f}, "
        f"{method_name(low)} {b.value:.2f}",
    )


def _invariance(table: pd.DataFrame) -> pd.DataFrame:
    inv = table[(table["kind"] == "invariance") & (table["view_a"] == "aug1")]
    return inv[inv["view_b"] == "aug2"].pipe(_diagonal)


def c5_invariance_rises(table: pd.DataFrame, method: str | None) -> Effect:
    """A method's invariance CKA(aug1, aug2) at the encoder output minus at the stem."""
    inv = _invariance(table)

    def rise(group):
        top = _mean_of(group, group["layer_a"] == FINAL_LAYER)
        stem = _mean_of(group, group["layer_a"] == "stem")
        return top[0] - stem[0], top[1] + stem[1]

    runs = inv[inv["method_a"] == method]
    effect = _over_replicates(_per_pair(runs, rise))
    if not effect.replicates:
        effect.detail = f"needs invariance comparisons (aug1, aug2) of {method_name(method)}"
    else:
        stem, top = _stem_and_top(runs, "layer_a", "value")
        name = method_name(method)
        effect.detail = f"{name} invariance: stem {stem:.2f}, {FINAL_LAYER} {top:.2f}"
    return effect


def _stem_and_top(frame: pd.DataFrame, layer: str, value: str) -> tuple[float, float]:
    """Mean of a column at the stem and at the final layer, over every run in the frame."""
    return tuple(_mean(frame[frame[layer] == name][value]) for name in ("stem", FINAL_LAYER))


def c5_invariance_self_supervised(table: pd.DataFrame, sides: Sides) -> Effect:
    inv = _invariance(table)
    return _method_gap(inv, sides.ssl, sides.sup, FINAL_LAYER, "CKA(aug1, aug2)")


def c6_class_supervised(table: pd.DataFrame, sides: Sides) -> Effect:
    classes = table[table["kind"] == "class"]
    return _method_gap(classes, sides.sup, sides.ssl, FINAL_LAYER, "CKA with one-hot labels")


def c7_probes_rise(probes: pd.DataFrame | None, method: str | None) -> Effect:
    """Linear-probe accuracy (trained encoder) at the encoder output minus at the stem."""
    if probes is None or not len(probes):
        return Effect(detail="no probes table")
    trained = probes[(probes["encoder"] == "trained") & (probes["method"] == method)]
    n_eval = trained["n_eval"] if "n_eval" in trained else pd.Series(np.nan, trained.index)

    def rise(group):
        at = group.set_index("layer")
        if not {"stem", FINAL_LAYER} <= set(at.index):
            return np.nan, np.nan
        p = at["eval_accuracy"]
        n = n_eval.loc[group.index].set_axis(group["layer"])
        hw = PROBE_Z * np.sqrt(p * (1 - p) / n)
        return float(p[FINAL_LAYER] - p["stem"]), float(hw[FINAL_LAYER] + hw["stem"])

    effect = _over_replicates([rise(g) for _, g in trained.groupby("run")])
    if not effect.replicates:
        effect.detail = f"no probes of {method_name(method)}"
    else:
        stem, top = _stem_and_top(trained, "layer", "eval_accuracy")
        effect.detail = f"{method_name(method)}: stem {stem:.1%}, {FINAL_LAYER} {top:.1%}"
    return effect


def c8_first_block_dip(table: pd.DataFrame) -> Effect:
    """Cross-method CKA at the first block of stages 2.. (where the resolution halves) below the
    mean of its neighbours (the previous stage's last block and the stage's second block), for
    the even and odd layers."""
    cross, _ = _cross_method(table)

    def dip(group):
        diag = _diagonal(group).set_index("layer_a")
        values, widths = [], []
        hw = (diag["ci_high"] - diag["ci_low"]) / 2
        for stage in _stages(group)[1:]:
            last_prev = diag[diag["stage_a"] == stage - 1]["block_a"].max()
            for kind in ("out", "residual"):
                names = (
                    f"layer{stage}.0.{kind}",
                    f"layer{stage - 1}.{last_prev}.{kind}",
                    f"layer{stage}.1.{kind}",
                )
                if not all(n in diag.index for n in names):
                    continue
                first, before, after = (float(diag.at[n, "value"]) for n in names)
                values.append((before + after) / 2 - first)
                widths.append(float(hw[names[0]] + (hw[names[1]] + hw[names[2]]) / 2))
        if not values:
            return np.nan, np.nan
        return _mean(values), _mean(widths)

    effect = _over_replicates(_per_pair(cross, dip))
    if not effect.replicates:
        effect.detail = "needs a cross-method pair"
    return effect


@dataclass(frozen=True)
class Sides:
    """The two methods one block of claims compares: a self-supervised label and the
    supervised one (either may be missing from a study)."""

    ssl: str | None
    sup: str | None

    @property
    def ssl_name(self) -> str:
        return method_name(self.ssl) if self.ssl else "the self-supervised method"

    @property
    def label(self) -> str:
        return f"{self.ssl or '(no self-supervised method)'} vs {self.sup or '(no supervised)'}"

    def missing(self, needs: str) -> str:
        """What the study lacks for a claim that needs `needs` (ssl, sup or both); '' if
        nothing."""
        lacking = []
        if needs in ("ssl", "both") and self.ssl is None:
            lacking.append(f"runs of a self-supervised method (any label but {SUPERVISED})")
        if needs in ("sup", "both") and self.sup is None:
            lacking.append(f"runs labelled {SUPERVISED}")
        return f"needs {' and '.join(lacking)}" if lacking else ""


def method_sides(methods) -> list[Sides]:
    """One block of claims per self-supervised method, each against the supervised runs
    (one block with a side missing when the study has no self-supervised or no supervised
    runs)."""
    labels = {m for m in methods if isinstance(m, str)}
    sup = SUPERVISED if SUPERVISED in labels else None
    return [Sides(ssl, sup) for ssl in sorted(labels - {SUPERVISED})] or [Sides(None, sup)]


@dataclass(frozen=True)
class Claim:
    claim: str
    title: str  # `{ssl}`: the self-supervised method's name
    statistic: str
    measure: Callable[[pd.DataFrame, pd.DataFrame | None, Sides], Effect]
    rule: str = "directional"
    needs: str = "both"  # the sides it reads: both, ssl or sup


CLAIMS = (
    Claim(
        "C1",
        "Within-model CKA matrices have similar block structure in both methods",
        "seed-pair minus cross-method mean |ΔCKA| of within-model matrices",
        lambda t, p, s: c1_block_structure(t),
        "sameness",
    ),
    Claim(
        "C2",
        "Early layers (stem, stage 1) match across methods",
        "cross-method minus seed-pair CKA, early layers",
        lambda t, p, s: c2_early_match(t),
        "sameness",
    ),
    Claim(
        "C3",
        "In the middle stages post-residual (even) layers are more similar across methods "
        "than residual-branch (odd) layers",
        "cross-method CKA, even minus odd layers, middle stages",
        lambda t, p, s: c3_even_above_odd(t),
    ),
    Claim(
        "C4",
        "The last stage diverges: cross-method CKA falls below the middle stages'",
        "cross-method CKA, middle stages minus last stage",
        lambda t, p, s: c4_last_stage_diverges(t),
    ),
    Claim(
        "C5a",
        "{ssl}'s augmentation invariance rises with depth",
        f"{{ssl}} CKA(aug1, aug2), {FINAL_LAYER} minus stem",
        lambda t, p, s: c5_invariance_rises(t, s.ssl),
        needs="ssl",
    ),
    Claim(
        "C5b",
        "Augmentation invariance is higher for {ssl} in the final layers",
        f"CKA(aug1, aug2) at {FINAL_LAYER}, {{ssl}} minus supervised",
        lambda t, p, s: c5_invariance_self_supervised(t, s),
    ),
    Claim(
        "C6",
        "Class structure is higher for supervised learning in the final layers",
        f"CKA with one-hot labels at {FINAL_LAYER}, supervised minus {{ssl}}",
        lambda t, p, s: c6_class_supervised(t, s),
    ),
    Claim(
        "C7a",
        "Linear-probe accuracy rises with depth ({ssl})",
        f"probe accuracy, {FINAL_LAYER} minus stem",
        lambda t, p, s: c7_probes_rise(p, s.ssl),
        needs="ssl",
    ),
    Claim(
        "C7b",
        "Linear-probe accuracy rises with depth (supervised)",
        f"probe accuracy, {FINAL_LAYER} minus stem",
        lambda t, p, s: c7_probes_rise(p, s.sup),
        needs="sup",
    ),
    Claim(
        "C8",
        "Cross-method similarity dips at the first block of each stage",
        "cross-method CKA, neighbours' mean minus first block of stages 2..",
        lambda t, p, s: c8_first_block_dip(t),
    ),
)


def _without_module_runs(
    table: pd.DataFrame, probes: pd.DataFrame | None
) -> tuple[pd.DataFrame, pd.DataFrame | None, set]:
    """The claims read ResNet stages and layer kinds: runs imported as any module (layer kind
    "module") take no part. Also returns their names."""
    modules = set(table.loc[table["layer_kind_a"] == "module", "run_a"])
    modules |= set(table.loc[table["layer_kind_b"] == "module", "run_b"])
    if modules:
        table = table[~table["run_a"].isin(modules) & ~table["run_b"].isin(modules)]
        if probes is not None:
            probes = probes[~probes["run"].isin(modules)]
    return table, probes, modules


def _of_methods(
    table: pd.DataFrame, probes: pd.DataFrame | None, sides: Sides
) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """The rows of the two sides' runs only (class rows: the run against the labels)."""
    keep = {sides.ssl, sides.sup} - {None}
    rows = table["method_a"].isin(keep) & (
        table["method_b"].isin(keep) | (table["kind"] == "class")
    )
    if probes is not None:
        probes = probes[probes["method"].isin(keep)]
    return table[rows], probes


def claims_table(table: pd.DataFrame, probes: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per claim and block (a self-supervised method against the supervised runs):
    the effect, its interval, the seed noise floor and the verdict. Claims of the supervised
    runs alone (C7b) repeat in every block."""
    table, probes, modules = _without_module_runs(table, probes)
    left_out = f" ({', '.join(sorted(modules))}: imported as modules, no part)" if modules else ""
    if probes is not None and not len(probes):
        probes = None
    # the methods of the compared runs (a probes table's other runs make no block)
    methods = set(table["method_a"]) | set(table["method_b"])
    rows = []
    for sides in method_sides(methods):
        part, part_probes = _of_methods(table, probes, sides)
        for claim in CLAIMS:
            effect = claim.measure(part, part_probes, sides)
            hw = effect.half_width
            detail = effect.detail
            if not np.isfinite(effect.value) and sides.missing(claim.needs):
                detail = sides.missing(claim.needs) + left_out
            rows.append(
                {
                    "methods": sides.label,
                    "claim": claim.claim,
                    "title": claim.title.format(ssl=sides.ssl_name),
                    "statistic": claim.statistic.format(ssl=sides.ssl_name),
                    "value": effect.value,
                    "ci_low": effect.value - hw,
                    "ci_high": effect.value + hw,
                    "noise_floor": effect.noise,
                    "replicates": effect.replicates,
                    "rule": claim.rule,
                    "verdict": verdict(effect, claim.rule),
                    "detail": detail,
                }
            )
    return pd.DataFrame(rows, columns=list(CLAIM_COLUMNS))


def shared_init_effect(table: pd.DataFrame) -> pd.DataFrame:
    """Per stage: mean diagonal CKA of cross-method pairs that share initial weights, of those
    that do not, and of same-method seed pairs — how much of the similarity the start explains.
    Cross-method as in the claims: a self-supervised run against a supervised one (any two
    methods where no run is labelled supervised); module runs take no part."""
    table, _, _ = _without_module_runs(table, None)
    cross = _diagonal(pair_kinds(table))
    if (cross["method_a"] == SUPERVISED).any() or (cross["method_b"] == SUPERVISED).any():
        one_supervised = (cross["method_a"] == SUPERVISED) != (cross["method_b"] == SUPERVISED)
        cross = cross[one_supervised | ~cross["cross_method"]]
    groups = {
        "shared_init": cross[cross["cross_method"] & cross["shared_init"]],
        "different_init": cross[cross["cross_method"] & ~cross["shared_init"]],
        "seed_pairs": cross[~cross["cross_method"]],
    }
    frame = pd.DataFrame(
        {name: g.groupby("stage_a")["value"].mean() for name, g in groups.items() if len(g)}
    )
    frame.index.name = "stage"
    return frame
