"""Intervals and verdicts with the run as the unit of inference (used by `ckaflow.claims`).

An effect is mean(hi) − mean(lo) (or mean(hi)) over `Units`: runs or pairs of runs, each with a
value and the value's delete-one-block jackknife replicates over the eval images.
- V_runs: delete-one-run jackknife stratified by method, Σ_m (n_m − 1)/n_m Σ_{r∈m} (T₍₋ᵣ₎ −
  mean_m)²; leaving a run out leaves out every unit it is in, so units that share a run are
  not counted as independent.
- V_images: jackknife over the left-out image blocks, (G − 1)/G Σ_g (T_g − mean)², the same
  block out of every value at once; units without replicates carry standard errors, summed as
  if perfectly correlated.
- 95% interval: T ± t(0.975; d) √(V_runs + V_images), d = fewest runs of a method − 1.
The error rates these give are simulated in tests/test_claims_calibration.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from ckaflow.config import method_name

LEVEL = 0.95
DEFAULT_MARGIN = 0.05  # the schema's claims.margin (README: "Verdicts")
MIN_RUNS = 2  # per method, for the delete-one-run jackknife


@dataclass(frozen=True)
class Units:
    """One quantity over its units: each unit's runs, value and image-noise replicates."""

    runs: tuple[tuple[str, ...], ...]
    value: np.ndarray  # (units,)
    image: np.ndarray  # (units, G): delete-one-block replicates of each value (G may be 0)
    image_sd: np.ndarray | None = None  # (units,): standard errors where there are no replicates

    def __len__(self) -> int:
        return len(self.runs)

    def keep(self, mask: np.ndarray) -> Units:
        sd = None if self.image_sd is None else self.image_sd[mask]
        runs = tuple(r for r, k in zip(self.runs, mask, strict=True) if k)
        return Units(runs, self.value[mask], self.image[mask], sd)


@dataclass
class Effect:
    """One claim's effect, its interval and how it was formed."""

    value: float = np.nan
    low: float = np.nan
    high: float = np.nan
    se_runs: float = np.nan
    se_images: float = np.nan
    df: int = 0
    runs: dict = field(default_factory=dict)  # runs per method taking part
    units: int = 0
    too_few: str = ""  # why the jackknife over runs is not possible


def _difference(hi: Units, lo: Units | None, column=None) -> float:
    """mean(hi) − mean(lo) of the values (column None) or of replicate `column`."""
    pick = (lambda u: u.value) if column is None else (lambda u: u.image[:, column])
    value = float(np.mean(pick(hi)))
    return value - float(np.mean(pick(lo))) if lo is not None else value


def _runs_by_method(hi: Units, lo: Units | None, method_of: dict) -> dict[str, list[str]]:
    """The runs taking part in the effect, by method (sorted)."""
    runs = sorted({r for u in (hi, lo) if u is not None for unit in u.runs for r in unit})
    by_method: dict[str, list[str]] = {}
    for run in runs:
        by_method.setdefault(method_of[run], []).append(run)
    return dict(sorted(by_method.items()))


def _run_variance(by_method: dict, hi: Units, lo: Units | None) -> tuple[float, str]:
    """The stratified delete-one-run jackknife variance of the effect; (NaN, why) when a
    method has too few runs."""
    lacking = {m: len(rs) for m, rs in by_method.items() if len(rs) < MIN_RUNS}
    if lacking:
        have = ", ".join(f"{m} {n}" for m, n in sorted(lacking.items()))
        return np.nan, f"needs ≥ {MIN_RUNS} seeds per method for an interval over runs ({have})"
    total = 0.0
    for method, members in by_method.items():
        left = []
        for run in members:
            parts = [
                None if u is None else u.keep(np.array([run not in unit for unit in u.runs]))
                for u in (hi, lo)
            ]
            if not len(parts[0]) or (lo is not None and not len(parts[1])):
                return np.nan, (
                    f"needs more seeds of {method_name(method)}: without {run} no "
                    "unit of the effect is left"
                )
            left.append(_difference(parts[0], parts[1]))
        n = len(left)
        total += (n - 1) / n * float(np.sum((np.array(left) - np.mean(left)) ** 2))
    return total, ""


def _image_variance(hi: Units, lo: Units | None) -> float:
    """The jackknife variance over left-out image blocks (0 without replicates)."""
    sides = [u for u in (hi, lo) if u is not None]
    if all(u.image_sd is not None for u in sides):  # no replicates: correlated bound
        return float(sum(np.sum(u.image_sd) / len(u) for u in sides) ** 2)
    g = hi.image.shape[1]
    if g < 2:
        return 0.0
    reps = np.array([_difference(hi, lo, column) for column in range(g)])
    reps = reps[np.isfinite(reps)]
    if len(reps) < 2:
        return 0.0
    return (len(reps) - 1) / len(reps) * float(np.sum((reps - reps.mean()) ** 2))


def _finite(units: Units | None) -> Units | None:
    return None if units is None else units.keep(np.isfinite(units.value))


def infer(hi: Units, lo: Units | None, method_of: dict, level: float = LEVEL) -> Effect:
    """The effect mean(hi) − mean(lo) (or mean(hi)) with its interval over runs and images.
    Units with a non-finite value are left out."""
    hi, lo = _finite(hi), _finite(lo)
    if not len(hi) or (lo is not None and not len(lo)):
        return Effect()
    by_method = _runs_by_method(hi, lo, method_of)
    effect = Effect(
        value=_difference(hi, lo),
        runs={m: len(rs) for m, rs in by_method.items()},
        units=len(hi) + (len(lo) if lo is not None else 0),
    )
    v_runs, effect.too_few = _run_variance(by_method, hi, lo)
    v_images = _image_variance(hi, lo)
    effect.se_images = float(np.sqrt(v_images))
    if effect.too_few:
        return effect
    effect.se_runs = float(np.sqrt(v_runs))
    effect.df = min(effect.runs.values()) - 1
    half = stats.t.ppf(0.5 + level / 2, effect.df) * np.sqrt(v_runs + v_images)
    effect.low, effect.high = effect.value - half, effect.value + half
    return effect


def verdict(effect: Effect, rule: str = "directional", margin: float = DEFAULT_MARGIN) -> str:
    if not np.isfinite(effect.value):
        return "not measured"
    if not (np.isfinite(effect.low) and np.isfinite(effect.high)):
        return "within noise"
    if rule == "sameness":
        if -margin < effect.low and effect.high < margin:
            return "agrees"
        return "disagrees" if effect.low > margin or effect.high < -margin else "within noise"
    if effect.low > 0:
        return "agrees"
    return "disagrees" if effect.high < 0 else "within noise"
