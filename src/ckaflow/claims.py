"""The paper's claims, each a statistical test with a stated error rate.

Every claim reduces the tidy CKA table (and the probes table) to one number, the *effect*,
oriented so that a positive value is what the paper reports. An effect is the mean of a
quantity over *units*, or the difference of two such means: a unit is a run (for example its
augmentation invariance at `pool`) or a pair of runs (for example the CKA of the early layers
between a SimCLR run and a supervised run). The unit kinds are `UNIT_KINDS`.

Inference: the run is the unit of inference, and the eval images are a second source of noise.
- Runs: a delete-one-run jackknife, stratified by method. With T₍₋ᵣ₎ the effect recomputed
  without run r (and so without every pair it takes part in: pairs that share a run are not
  counted as independent), V_runs = Σ_m (n_m − 1)/n_m · Σ_{r ∈ m} (T₍₋ᵣ₎ − mean_m)².
- Images: every CKA value carries its delete-one-block jackknife replicates (block g of the eval
  images left out of every layer, run and view alike; `ckaflow.stages.cka`). The effect is
  recomputed on each replicate, so correlations between the values it is built from are kept:
  V_images = (G − 1)/G · Σ_g (T_g − mean)². Probe accuracies carry binomial standard errors,
  added as if perfectly correlated (never too small).
- Interval: T ± t(0.975; d) · √(V_runs + V_images), d = (fewest runs of a method taking
  part) − 1. A run's own image noise is in both terms, which errs on the wide side.

Verdicts (`verdict`):
- directional claims: *agrees* when the 95% interval lies above zero, *disagrees* below,
  *within noise* otherwise;
- sameness claims (C1, C2): an equivalence test against `claims.margin`, fixed before the
  study: *agrees* when the interval lies inside (−margin, margin), *disagrees* when it lies
  wholly outside, *within noise* otherwise;
- too few runs for the jackknife (a method with one run): *within noise*, saying so;
- *not measured*: the effect cannot be formed (a side, a comparison or a layer is missing).
`tests/test_claims_calibration.py` simulates thousands of studies and checks that a true null
gives *agrees* at most 5% of the time for every claim with 2, 3 and 5 seeds per method.

Which runs: runs labelled `supervised` are the supervised side; every other label a
self-supervised side, each with its own block of claims against the supervised runs, measured
on those two methods' runs only. Within a side, the claims use one set of seed replicates (runs
that differ only in seed: `RunSpec.replicate_of`), the largest; other runs of the label, and
runs without a seed, are named and left out. Cross-method pairs that share their initial
weights are left out while pairs from different initial weights exist (part of their
similarity is inherited); seed pairs are pairs of replicates of one method.

NaN values (a constant layer has no CKA) leave out only the values they touch: every mean over
layers skips them.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ckaflow.config import SUPERVISED, method_name
from ckaflow.errors import TableError
from ckaflow.inference import DEFAULT_MARGIN, Effect, Units, infer, verdict
from ckaflow.tables import SIDE_COLUMNS

VERDICTS = ("agrees", "disagrees", "within noise", "not measured")
CLAIM_COLUMNS = (
    "methods",
    "claim",
    "title",
    "statistic",
    "value",
    "ci_low",
    "ci_high",
    "se_runs",
    "se_images",
    "df",
    "runs",
    "units",
    "rule",
    "margin",
    "verdict",
    "detail",
)
FINAL_LAYER = "pool"  # the encoder output: the last layer both methods have
UNIT_KINDS = ("ssl runs", "sup runs", "cross pairs", "seed pairs")
# what the claims read: a row's kind and value, and every column of its two sides (subsetting
# the wide table, the jackknife lists included, is what makes reading slow)
READ_COLUMNS = ("kind", "value", *(f"{c}_{s}" for s in "ab" for c in SIDE_COLUMNS))
BLOCK_KINDS = ("relu1", "relu2", "residual", "out")  # the layers of a residual block


# ---------------------------------------------------------------------------------------------
# Which runs and pairs


def unit_runs(kind: str, ssl: list[str], sup: list[str], init_of: dict) -> list[tuple[str, ...]]:
    """The units of one kind (`UNIT_KINDS`), given each side's replicate runs. Cross-method
    pairs from different initial weights; all of them when every pair shares its start."""
    if kind == "ssl runs":
        return [(r,) for r in ssl]
    if kind == "sup runs":
        return [(r,) for r in sup]
    if kind == "seed pairs":
        return [p for runs in (ssl, sup) for p in itertools.combinations(runs, 2)]
    pairs = list(itertools.product(ssl, sup))
    independent = [(a, b) for a, b in pairs if init_of[a] != init_of[b]]
    return independent or pairs


def run_facts(table: pd.DataFrame) -> pd.DataFrame:
    """One row per run of the table: method, replicate set, initial weights, architecture."""
    sides = []
    for s in ("a", "b"):
        cols = {f"{c}_{s}": c for c in ("run", "method", "replicate", "init", "arch")}
        present = [c for c in cols if c in table]
        sides.append(table[present].rename(columns=cols))
    runs = pd.concat(sides).drop_duplicates("run")
    return runs[runs["run"] != "labels"].set_index("run")


def replicate_runs(facts: pd.DataFrame, method: str | None) -> tuple[list[str], list[str]]:
    """(the label's largest set of seed replicates, its other runs)."""
    if method is None:
        return [], []
    mine = facts[facts["method"] == method]
    if not len(mine):
        return [], []
    keys = mine["replicate"].where(mine["replicate"].notna(), "run:" + mine.index.to_series())
    sizes = keys.value_counts()
    best = sorted(sizes.index, key=lambda k: (-sizes[k], str(k)))[0]
    return sorted(mine.index[keys == best]), sorted(mine.index[keys != best])


# ---------------------------------------------------------------------------------------------
# Reading the table: each row's value and its jackknife replicates


def replicate_matrix(table: pd.DataFrame) -> np.ndarray:
    """(rows, 1 + G): each row's value, then its G jackknife replicates (G = 0 without)."""
    value = table["value"].to_numpy(dtype=float)[:, None]
    if "jackknife" not in table or not len(table):
        return value
    lengths = {len(j) for j in table["jackknife"]}
    if len(lengths) != 1:
        raise TableError(
            f"CKA rows carry jackknife replicates of different lengths {sorted(lengths)}: "
            "they come from different eval sets; rerun the study's CKA jobs"
        )
    return np.hstack([value, np.vstack(table["jackknife"].to_numpy()).astype(float)])


def _nanmean(block: np.ndarray) -> np.ndarray:
    """Mean over axis 0 skipping NaN (a constant layer), NaN where nothing is left."""
    finite = np.isfinite(block)
    count = finite.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, np.where(finite, block, 0).sum(0) / count, np.nan)


@dataclass
class Context:
    """What the claims of one block read: its table rows (with `_row` into `matrix`), the
    probes, the two sides' replicate runs and each run's initial weights."""

    table: pd.DataFrame
    matrix: np.ndarray
    probes: pd.DataFrame | None
    ssl: list[str]
    sup: list[str]
    init_of: dict
    method_of: dict

    def mean(self, rows: pd.DataFrame) -> np.ndarray:
        """Mean of the rows' values and of each replicate (NaN-skipping)."""
        if not len(rows):
            return np.full(self.matrix.shape[1], np.nan)
        return _nanmean(self.matrix[rows["_row"].to_numpy()])

    def at(self, rows: pd.DataFrame, layer: str) -> np.ndarray:
        return self.mean(rows[rows["layer_a"] == layer])

    def __post_init__(self) -> None:
        t = self.table
        diagonal = t[t["layer_a"] == t["layer_b"]]
        clean = (diagonal["view_a"] == "clean") & (diagonal["view_b"] == "clean")
        cross = diagonal[(diagonal["kind"] == "cross") & clean]
        self._pairs = {
            frozenset(key): rows for key, rows in cross.groupby(["run_a", "run_b"], sort=False)
        }
        invariance = diagonal[(diagonal["view_a"] == "aug1") & (diagonal["view_b"] == "aug2")]
        clean = t[t["view_a"] == "clean"]
        self._runs = {
            (kind, run): rows
            for source, kinds in ((invariance, ("invariance",)), (clean, ("within", "class")))
            for (kind, run), rows in source[source["kind"].isin(kinds)].groupby(
                ["kind", "run_a"], sort=False
            )
        }
        self._empty = t.iloc[:0]
        blocks = t[t["layer_kind_a"].isin(BLOCK_KINDS)]
        self.last_block = blocks.groupby("stage_a")["block_a"].max().astype(int).to_dict()
        self.stages = sorted(int(s) for s in self.last_block)
        self._grids: dict[str, pd.DataFrame] = {}

    def grid(self, run: str) -> pd.DataFrame:
        """A run's within-model comparison as a layer × layer frame of row numbers."""
        if run not in self._grids:
            rows = self.of_run("within", run)
            self._grids[run] = rows.pivot(index="layer_a", columns="layer_b", values="_row")
        return self._grids[run]

    def pair(self, a: str, b: str) -> pd.DataFrame:
        """The diagonal (a layer with itself) of the clean-view comparison of runs a and b."""
        return self._pairs.get(frozenset((a, b)), self._empty)

    def of_run(self, kind: str, run: str) -> pd.DataFrame:
        """A run's rows of one comparison kind (invariance: aug1 against aug2, a layer with
        itself; within and class: the clean view)."""
        return self._runs.get((kind, run), self._empty)


@dataclass(frozen=True)
class UnitValue:
    value: float
    image: np.ndarray  # (G,)
    sd: float = np.nan  # standard error where there are no replicates (probes)


def _vector(v: np.ndarray) -> UnitValue:
    return UnitValue(float(v[0]), np.asarray(v[1:], dtype=float))


# ---------------------------------------------------------------------------------------------
# Each claim's quantity per unit


def early(ctx: Context, a: str, b: str) -> UnitValue:
    """C2: CKA of the stem and stage 1 (each layer with itself)."""
    rows = ctx.pair(a, b)
    return _vector(ctx.mean(rows[rows["stage_a"] <= 1]))


def _middle(ctx: Context) -> list[int]:
    stages = ctx.stages
    return stages[1:-1] or stages


def even_minus_odd(ctx: Context, a: str, b: str) -> UnitValue:
    """C3: middle stages, post-residual (`.out`) minus residual-branch (`.residual`) layers."""
    rows = ctx.pair(a, b)
    rows = rows[rows["stage_a"].isin(_middle(ctx))]
    even = ctx.mean(rows[rows["layer_kind_a"] == "out"])
    odd = ctx.mean(rows[rows["layer_kind_a"] == "residual"])
    return _vector(even - odd)


def middle_minus_last(ctx: Context, a: str, b: str) -> UnitValue:
    """C4: the middle stages' CKA minus the last stage's (every block layer)."""
    stages = ctx.stages
    if len(stages) < 2:
        return _vector(np.full(ctx.matrix.shape[1], np.nan))
    rows = ctx.pair(a, b)
    middle = stages[1:-1] or stages[:1]
    blocks = rows[rows["layer_kind_a"].isin(BLOCK_KINDS)]
    return _vector(
        ctx.mean(blocks[blocks["stage_a"].isin(middle)])
        - ctx.mean(blocks[blocks["stage_a"] == stages[-1]])
    )


def first_block_dip(ctx: Context, a: str, b: str) -> UnitValue:
    """C8: at each stage from the second on, the mean of the first block's neighbours (the
    previous stage's last block, the stage's second block) minus the first block, averaged over
    the stages and the even and odd layers."""
    rows = ctx.pair(a, b)
    row_of = dict(zip(rows["layer_a"], rows["_row"], strict=True))
    dips = []
    for stage in ctx.stages[1:]:
        last_prev = ctx.last_block.get(stage - 1)
        for kind in ("out", "residual"):
            names = (
                f"layer{stage}.0.{kind}",
                f"layer{stage - 1}.{last_prev}.{kind}",
                f"layer{stage}.1.{kind}",
            )
            if all(n in row_of for n in names):
                first, before, after = (ctx.matrix[int(row_of[n])] for n in names)
                dips.append((before + after) / 2 - first)
    if not dips:
        return _vector(np.full(ctx.matrix.shape[1], np.nan))
    return _vector(_nanmean(np.array(dips)))


def within_distance(ctx: Context, a: str, b: str) -> UnitValue:
    """C1: mean |CKA difference| between the two runs' within-model matrices, over the layer
    pairs both have (the heads differ), a layer with itself left out."""
    grids = [ctx.grid(a), ctx.grid(b)]
    common = grids[0].index.intersection(grids[1].index)
    common = common.intersection(grids[0].columns).intersection(grids[1].columns)
    if len(common) < 2:
        return _vector(np.full(ctx.matrix.shape[1], np.nan))
    ia, ib = (g.loc[common, common].to_numpy() for g in grids)
    off = ~np.eye(len(common), dtype=bool)
    if pd.isna(ia[off]).any() or pd.isna(ib[off]).any():
        return _vector(np.full(ctx.matrix.shape[1], np.nan))
    diff = np.abs(ctx.matrix[ia[off].astype(int)] - ctx.matrix[ib[off].astype(int)])
    return _vector(_nanmean(diff))


def invariance_rise(ctx: Context, run: str) -> UnitValue:
    """C5a: CKA(aug1, aug2) at the encoder output minus at the stem."""
    rows = ctx.of_run("invariance", run)
    return _vector(ctx.at(rows, FINAL_LAYER) - ctx.at(rows, "stem"))


def invariance_final(ctx: Context, run: str) -> UnitValue:
    """C5b: CKA(aug1, aug2) at the encoder output."""
    return _vector(ctx.at(ctx.of_run("invariance", run), FINAL_LAYER))


def class_final(ctx: Context, run: str) -> UnitValue:
    """C6: CKA with the one-hot labels at the encoder output."""
    return _vector(ctx.at(ctx.of_run("class", run), FINAL_LAYER))


def probe_rise(ctx: Context, run: str) -> UnitValue:
    """C7: linear-probe accuracy (trained encoder) at the encoder output minus at the stem,
    with the binomial standard errors of the two accuracies added."""
    if ctx.probes is None:
        return UnitValue(np.nan, np.empty(0))
    p = ctx.probes
    at = p[(p["run"] == run) & (p["encoder"] == "trained")].set_index("layer")
    if not {"stem", FINAL_LAYER} <= set(at.index):
        return UnitValue(np.nan, np.empty(0))
    acc = at["eval_accuracy"].astype(float)
    n = at["n_eval"].astype(float) if "n_eval" in at else pd.Series(np.nan, at.index)
    sd = np.sqrt((acc * (1 - acc)).clip(lower=0) / n)
    return UnitValue(
        float(acc[FINAL_LAYER] - acc["stem"]), np.empty(0), float(sd[FINAL_LAYER] + sd["stem"])
    )


# ---------------------------------------------------------------------------------------------
# The claims


@dataclass(frozen=True)
class Claim:
    claim: str
    title: str  # `{ssl}`: the self-supervised method's name
    statistic: str
    quantity: Callable[..., UnitValue]  # per unit: (ctx, *runs of the unit)
    hi: str  # unit kind whose mean is the effect (or its first term)
    lo: str | None = None  # unit kind whose mean is subtracted
    rule: str = "directional"
    needs: str = "both"  # the sides it reads: both, ssl or sup
    describe: str = ""  # what the quantity is, for the detail line


CLAIMS = (
    Claim(
        "C1",
        "Within-model CKA matrices have similar block structure in both methods",
        "seed-pair minus cross-method mean |ΔCKA| of within-model matrices",
        within_distance,
        "seed pairs",
        "cross pairs",
        "sameness",
        describe="mean |ΔCKA| between within-model matrices",
    ),
    Claim(
        "C2",
        "Early layers (stem, stage 1) match across methods as closely as two seeds",
        "cross-method minus seed-pair CKA, early layers",
        early,
        "cross pairs",
        "seed pairs",
        "sameness",
        describe="early-layer CKA",
    ),
    Claim(
        "C3",
        "In the middle stages post-residual (even) layers are more similar across methods "
        "than residual-branch (odd) layers",
        "cross-method CKA, even minus odd layers, middle stages",
        even_minus_odd,
        "cross pairs",
        describe="even minus odd CKA",
    ),
    Claim(
        "C4",
        "The last stage diverges: cross-method CKA falls from the middle stages more than "
        "seed pairs' does",
        "middle-minus-last-stage CKA, cross-method minus seed pairs",
        middle_minus_last,
        "cross pairs",
        "seed pairs",
        describe="middle stages minus last stage CKA",
    ),
    Claim(
        "C5a",
        "{ssl}'s augmentation invariance rises with depth",
        f"{{ssl}} CKA(aug1, aug2), {FINAL_LAYER} minus stem",
        invariance_rise,
        "ssl runs",
        needs="ssl",
        describe=f"CKA(aug1, aug2), {FINAL_LAYER} minus stem",
    ),
    Claim(
        "C5b",
        "Augmentation invariance is higher for {ssl} in the final layers",
        f"CKA(aug1, aug2) at {FINAL_LAYER}, {{ssl}} minus supervised",
        invariance_final,
        "ssl runs",
        "sup runs",
        describe=f"CKA(aug1, aug2) at {FINAL_LAYER}",
    ),
    Claim(
        "C6",
        "Class structure is higher for supervised learning in the final layers",
        f"CKA with one-hot labels at {FINAL_LAYER}, supervised minus {{ssl}}",
        class_final,
        "sup runs",
        "ssl runs",
        describe=f"CKA with one-hot labels at {FINAL_LAYER}",
    ),
    Claim(
        "C7a",
        "Linear-probe accuracy rises with depth ({ssl})",
        f"probe accuracy, {FINAL_LAYER} minus stem",
        probe_rise,
        "ssl runs",
        needs="ssl",
        describe=f"probe accuracy, {FINAL_LAYER} minus stem",
    ),
    Claim(
        "C7b",
        "Linear-probe accuracy rises with depth (supervised)",
        f"probe accuracy, {FINAL_LAYER} minus stem",
        probe_rise,
        "sup runs",
        needs="sup",
        describe=f"probe accuracy, {FINAL_LAYER} minus stem",
    ),
    Claim(
        "C8",
        "Cross-method similarity dips at the first block of each stage more than seed pairs' does",
        "neighbours' mean minus first block's CKA, stages 2.., cross-method minus seed pairs",
        first_block_dip,
        "cross pairs",
        "seed pairs",
        describe="first-block dip",
    ),
)
UNIT_NAMES = {
    "ssl runs": "{ssl} runs",
    "sup runs": "supervised runs",
    "cross pairs": "cross-method pairs",
    "seed pairs": "seed pairs",
}


def measure_units(claim: Claim, ctx: Context, kind: str) -> Units:
    """The claim's quantity for every unit of one kind."""
    runs = unit_runs(kind, ctx.ssl, ctx.sup, ctx.init_of)
    values = [claim.quantity(ctx, *unit) for unit in runs]
    g = max((len(v.image) for v in values), default=0)
    image = np.full((len(values), g), np.nan)
    for i, v in enumerate(values):
        image[i, : len(v.image)] = v.image
    sds = np.array([v.sd for v in values])
    return Units(
        tuple(runs),
        np.array([v.value for v in values]),
        image,
        sds if len(values) and np.isfinite(sds).all() else None,
    )


NO_UNITS = {
    "ssl runs": "needs runs of {ssl}",
    "sup runs": f"needs runs labelled {SUPERVISED}",
    "cross pairs": "needs runs of both methods",
    "seed pairs": "needs seed pairs (two or more seed replicates of one method)",
}


# ---------------------------------------------------------------------------------------------
# Blocks of claims


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


def _context(
    table: pd.DataFrame, matrix: np.ndarray, probes, sides: Sides, facts: pd.DataFrame
) -> tuple[Context, list[str]]:
    """The block's context (rows of its replicate runs only) and the runs it leaves out."""
    ssl, ssl_out = replicate_runs(facts, sides.ssl)
    sup, sup_out = replicate_runs(facts, sides.sup)
    keep = set(ssl) | set(sup)
    rows = table["run_a"].isin(keep) & (table["run_b"].isin(keep) | (table["kind"] == "class"))
    if probes is not None:
        probes = probes[probes["run"].isin(keep)]
    ctx = Context(
        table[rows],
        matrix,
        probes,
        ssl,
        sup,
        {r: (facts.at[r, "init"], facts.at[r, "arch"]) for r in keep},
        {r: facts.at[r, "method"] for r in keep},
    )
    return ctx, ssl_out + sup_out


def _detail(claim: Claim, ctx: Context, hi: Units, lo: Units | None, sides: Sides) -> str:
    parts = []
    for kind, units in ((claim.hi, hi), (claim.lo, lo)):
        if units is None:
            continue
        finite = units.value[np.isfinite(units.value)]
        name = UNIT_NAMES[kind].format(ssl=sides.ssl_name)
        mean = f"{finite.mean():.3f}" if len(finite) else "n/a"
        parts.append(f"{name} {mean} ({len(finite)})")
    dropped = sum(int((~np.isfinite(u.value)).sum()) for u in (hi, lo) if u is not None)
    text = f"{claim.describe}: " + ", ".join(parts)
    if dropped:
        text += f"; {dropped} unit(s) without a finite value left out"
    return text


def _row(claim: Claim, sides: Sides, effect: Effect, margin: float, detail: str) -> dict:
    return {
        "methods": sides.label,
        "claim": claim.claim,
        "title": claim.title.format(ssl=sides.ssl_name),
        "statistic": claim.statistic.format(ssl=sides.ssl_name),
        "value": effect.value,
        "ci_low": effect.low,
        "ci_high": effect.high,
        "se_runs": effect.se_runs,
        "se_images": effect.se_images,
        "df": effect.df,
        "runs": ", ".join(f"{m} {n}" for m, n in effect.runs.items()),
        "units": effect.units,
        "rule": claim.rule,
        "margin": margin if claim.rule == "sameness" else np.nan,
        "verdict": verdict(effect, claim.rule, margin),
        "detail": detail,
    }


def measure(claim: Claim, ctx: Context, sides: Sides) -> tuple[Effect, str]:
    """One claim's effect in one block, and its detail line."""
    if sides.missing(claim.needs):
        return Effect(), sides.missing(claim.needs)
    if claim.quantity is probe_rise and ctx.probes is None:
        return Effect(), "no probes table"
    hi = measure_units(claim, ctx, claim.hi)
    lo = measure_units(claim, ctx, claim.lo) if claim.lo else None
    for kind, units in ((claim.hi, hi), (claim.lo, lo)):
        if units is not None and not len(units):
            return Effect(), NO_UNITS[kind].format(ssl=sides.ssl_name)
    effect = infer(hi, lo, ctx.method_of)
    detail = _detail(claim, ctx, hi, lo, sides)
    if effect.too_few:
        detail += f"; {effect.too_few}"
    elif claim.rule == "directional" and effect.value < 0:
        detail += "; the point estimate points opposite to the paper"
    return effect, detail


def claims_table(
    table: pd.DataFrame, probes: pd.DataFrame | None = None, margin: float = DEFAULT_MARGIN
) -> pd.DataFrame:
    """One row per claim and block (a self-supervised method against the supervised runs):
    the effect, its interval, its standard errors over runs and images and the verdict.
    Claims of the supervised runs alone (C7b) repeat in every block."""
    table, probes, modules = _without_module_runs(table, probes)
    table = table.reset_index(drop=True)
    matrix = replicate_matrix(table)
    needed = [c for c in table if c in READ_COLUMNS]
    table = table[needed].assign(_row=np.arange(len(table)))
    facts = run_facts(table)
    if probes is not None and not len(probes):
        probes = None
    methods = set(table["method_a"]) | set(table["method_b"])
    rows = []
    for sides in method_sides(methods):
        ctx, left_out = _context(table, matrix, probes, sides, facts)
        notes = []
        if modules:
            notes.append(f"{', '.join(sorted(modules))}: imported as modules, no part")
        if left_out:
            notes.append(f"{', '.join(left_out)}: not seed replicates of the compared runs")
        for claim in CLAIMS:
            effect, detail = measure(claim, ctx, sides)
            if notes and not np.isfinite(effect.value):
                detail += f" ({'; '.join(notes)})"
            rows.append(_row(claim, sides, effect, margin, detail))
    return pd.DataFrame(rows, columns=list(CLAIM_COLUMNS))


# ---------------------------------------------------------------------------------------------
# Around the claims


def pair_kinds(table: pd.DataFrame) -> pd.DataFrame:
    """The cross comparisons on the clean view, each marked same-method or cross-method and
    whether the two runs share their initial weights."""
    cross = table[(table["kind"] == "cross") & (table["view_a"] == "clean")].copy()
    cross["cross_method"] = cross["method_a"] != cross["method_b"]
    cross["shared_init"] = (cross["init_a"] == cross["init_b"]) & (
        cross["arch_a"] == cross["arch_b"]
    )
    return cross


def shared_init_effect(table: pd.DataFrame) -> pd.DataFrame:
    """Per stage: mean diagonal CKA of cross-method pairs that share initial weights, of those
    that do not, and of same-method seed pairs — how much of the similarity the start explains.
    Cross-method as in the claims: a self-supervised run against a supervised one (any two
    methods where no run is labelled supervised); module runs take no part. Every group averages
    the same layers: those that cross-method pairs have in common (so no head)."""
    table, _, _ = _without_module_runs(table, None)
    cross = pair_kinds(table)
    cross = cross[cross["layer_a"] == cross["layer_b"]]
    if (cross["method_a"] == SUPERVISED).any() or (cross["method_b"] == SUPERVISED).any():
        one_supervised = (cross["method_a"] == SUPERVISED) != (cross["method_b"] == SUPERVISED)
        cross = cross[one_supervised | ~cross["cross_method"]]
    shared_layers = set(cross.loc[cross["cross_method"], "layer_a"])
    cross = cross[cross["layer_a"].isin(shared_layers)]
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


def constant_layers(table: pd.DataFrame) -> dict[str, list[str]]:
    """Per run, the layers whose CKA with themselves is not finite: a constant representation
    (zero self-HSIC) on the eval images."""
    within = table[(table["kind"] == "within") & (table["layer_a"] == table["layer_b"])]
    bad = within[~np.isfinite(within["value"].astype(float))]
    out: dict[str, list[str]] = {}
    for run, group in bad.groupby("run_a"):
        out[str(run)] = list(dict.fromkeys(group.sort_values("layer_index_a")["layer_a"]))
    return out


def likely_cause(layers: list[str]) -> str:
    """A guess at why layers are constant, from their kinds."""
    if layers and all(name.endswith(".residual") for name in layers):
        return (
            "residual branches only: a zero-initialised last BatchNorm of each block "
            "(zero_init_residual, timm's default) that training never moved, or an untrained "
            "network"
        )
    return "dead units (every ReLU output zero on these images) or a layer never trained"
