"""Verdicts against noise: synthetic CKA and probe tables with a known effect, noise and gaps.

A study here has ResNet-18 runs of both methods with seeds 0..4 (initial weights from the
seed, so simclr-s0 and supervised-s0 share theirs). Each table is built from a `World`: the
CKA a cross pair gets at each layer, by what kind of pair it is, plus a per-run offset (the
seed noise: `noise` times 1, −1, 0.5, −0.5, 0 for seeds 0..4) and jackknife replicates that
scatter each value by about `half_width` (the image noise).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pytest

from ckaflow.claims import CLAIMS, VERDICTS, claims_table, shared_init_effect
from ckaflow.inference import Effect, verdict
from ckaflow.layers import layer_registry
from ckaflow.summary import summarize

METHODS = ("simclr", "supervised")
SEED_OFFSETS = (1.0, -1.0, 0.5, -0.5, 0.0)
BLOCKS = 8  # jackknife replicates per value


def run(method: str, seed: int) -> dict:
    return {
        "run": f"{method}-resnet18-s{seed}",
        "method": method,
        "arch": "resnet18",
        "seed": seed,
        "init": f"s{seed}",
        "replicate": f"{method}-resnet18-r",
    }


@dataclass
class World:
    """What the paper reports, with knobs to weaken, reverse or blur each effect."""

    early: float = 0.95  # cross-method CKA at stem and stage 1 (different initial weights)
    seed_pairs: float = 0.95  # same-method seed pairs, every layer but the last stage's
    seed_last: float = 0.95  # same-method seed pairs, last stage
    seed_dip: float = 0.0  # seed pairs' first block of stages 2.. below its neighbours
    early_odd_gap: float = 0.0  # stage <= 1: residual layers this much above early, out below
    last_odd_gap: float = 0.0  # stage 4: residual layers this much above last, out below
    shared_bonus: float = 0.03  # extra CKA of pairs that share initial weights
    even: float = 0.85  # middle stages, post-residual
    odd: float = 0.6  # middle stages, residual branch
    last: float = 0.45  # last stage
    dip: float = 0.15  # first block of stages 2.. below its neighbours
    inv_stem: float = 0.3
    inv_pool: dict = field(default_factory=lambda: {"simclr": 0.9, "supervised": 0.4})
    class_pool: dict = field(default_factory=lambda: {"simclr": 0.4, "supervised": 0.8})
    probe_stem: float = 0.5
    probe_pool: dict = field(default_factory=lambda: {"simclr": 0.8, "supervised": 0.85})
    within_gap: float = 0.0  # how far the supervised within-model matrices are from SimCLR's
    noise: float = 0.0  # per-seed offset: noise × SEED_OFFSETS[seed]
    half_width: float = 0.01  # bootstrap half-width and jackknife scatter of every CKA value
    seeds: tuple = (0, 1, 2, 3, 4)
    nan_layers: tuple = ()  # layers whose CKA is NaN (e.g. not stored)

    def offset(self, seed: int) -> float:
        return self.noise * SEED_OFFSETS[seed]

    def cross(self, a: dict, b: dict, layer) -> float:
        first_block = layer.stage >= 2 and layer.block == 0 and layer.kind in ("out", "residual")
        if a["method"] == b["method"]:
            value = self.seed_last if layer.stage == 4 else self.seed_pairs
            return value - self.seed_dip * first_block
        gap = {"residual": 1, "out": -1}.get(layer.kind, 0)
        if layer.stage <= 1:
            value = self.early + gap * self.early_odd_gap * (layer.stage == 1)
        elif layer.stage == 4:
            value = self.last + gap * self.last_odd_gap
        elif layer.kind == "out":
            value = self.even
        elif layer.kind == "residual":
            value = self.odd
        else:
            value = (self.even + self.odd) / 2
        if first_block:
            value -= self.dip
        if a["init"] == b["init"]:
            value += self.shared_bonus
        # seed noise (moves with the first run's seed) where the claims look: the early layers,
        # the middle stages' even layers, and the last stage the other way
        sign = 1 if layer.stage <= 1 or layer.kind == "out" else 0
        sign = -1 if layer.stage == 4 else sign
        return value + sign * self.offset(a["seed"])


def _row(kind, a, b, view_a, view_b, la, lb, value, hw, tag) -> dict:
    row = {"comparison": tag, "kind": kind}
    for side, info, view, layer in (("a", a, view_a, la), ("b", b, view_b, lb)):
        row |= {f"{k}_{side}": v for k, v in info.items()}
        row |= {
            f"view_{side}": view,
            f"layer_{side}": layer.name,
            f"layer_index_{side}": layer.index,
            f"layer_kind_{side}": layer.kind,
            f"stage_{side}": layer.stage,
            f"block_{side}": layer.block,
        }
    return row | {"value": value, "ci_low": value - hw, "ci_high": value + hw}


LABELS = {
    "run": "labels",
    "method": None,
    "arch": None,
    "seed": None,
    "init": None,
    "replicate": None,
}


def jackknife(values: np.ndarray, layers: np.ndarray, half_width: float) -> list[list[float]]:
    """Deterministic delete-one-block replicates scattered by about half_width around each
    value, with a pattern per layer (the same images move a layer alike in every run)."""
    g = np.arange(BLOCKS)
    rows = np.asarray(layers)[:, None]
    scatter = np.sin(1.3 * g[None, :] + 0.7 * rows) + 0.5 * np.sin(0.9 * g[None, :])
    return (values[:, None] + half_width * scatter / np.sqrt(BLOCKS)).tolist()


def cka_table(w: World) -> pd.DataFrame:
    from ckaflow.layers import label_layer

    runs = [run(m, s) for m in METHODS for s in w.seeds]
    rows = []
    for a in runs:
        layers = layer_registry("resnet18", a["method"])
        body = [la for la in layers if la.kind not in ("head", "fc")]
        bump = w.within_gap if a["method"] == "supervised" else 0.0
        for la, lb in itertools.product(body, body):
            dist = abs(la.index - lb.index) / len(body)
            value = max(0.0, 1 - dist - bump * (la.index != lb.index)) + w.offset(a["seed"]) / 5
            rows.append(_row("within", a, a, "clean", "clean", la, lb, value, w.half_width, "w"))
        for la in layers:
            depth = la.index / (len(body) - 1)  # 0 at the stem, 1 at pool
            inv = w.inv_stem + (w.inv_pool[a["method"]] - w.inv_stem) * depth
            inv += w.offset(a["seed"]) * depth  # seeds differ most at the top
            rows.append(_row("invariance", a, a, "aug1", "aug2", la, la, inv, w.half_width, "i"))
            cls = (w.class_pool[a["method"]] + w.offset(a["seed"])) * depth
            rows.append(
                _row(
                    "class", a, LABELS, "clean", "labels", la, label_layer(), cls, w.half_width, "c"
                )
            )
    for a, b in itertools.combinations(runs, 2):
        tag = f"cross-{a['run']}-vs-{b['run']}"
        shared = [
            la for la in layer_registry("resnet18", a["method"]) if la.kind not in ("head", "fc")
        ]
        for layer in shared:
            value = w.cross(a, b, layer)
            rows.append(
                _row("cross", a, b, "clean", "clean", layer, layer, value, w.half_width, tag)
            )
    table = pd.DataFrame(rows)
    # each run's within/invariance/class comparison is its own comparison id
    table.loc[table["kind"] != "cross", "comparison"] = (
        table["kind"] + "-" + table["run_a"] + "-" + table["view_a"]
    )
    table.loc[table["layer_a"].isin(w.nan_layers), "value"] = np.nan
    table["jackknife"] = jackknife(
        table["value"].to_numpy(), table["layer_index_a"].to_numpy(), w.half_width
    )
    return table.assign(
        estimator="minibatch", n=2000, bootstrap=200, config_hash="x", code_version="t"
    )


def probes_table(w: World) -> pd.DataFrame:
    rows = []
    for method in METHODS:
        for seed in w.seeds:
            for layer in layer_registry("resnet18", method):
                top = w.probe_pool[method]
                acc = w.probe_stem + (top - w.probe_stem) * min(1.0, layer.index / 27)
                rows.append(
                    {
                        "run": run(method, seed)["run"],
                        "method": method,
                        "seed": seed,
                        "encoder": "trained",
                        "layer": layer.name,
                        "layer_index": layer.index,
                        "layer_kind": layer.kind,
                        "stage": layer.stage,
                        "eval_accuracy": acc + w.offset(seed) * min(1.0, layer.index / 27),
                        "n_eval": 2000,
                    }
                )
    return pd.DataFrame(rows)


def verdicts(w: World) -> dict[str, str]:
    table = claims_table(cka_table(w), probes_table(w))
    return dict(zip(table["claim"], table["verdict"], strict=True))


ALL = [c.claim for c in CLAIMS]


def test_every_claim_agrees_when_the_data_follow_the_paper():
    assert verdicts(World()) == dict.fromkeys(ALL, "agrees")


def test_every_claim_has_the_hand_computed_value():
    """The default world, noise-free, by hand (ResNet-18: stem, then per stage two blocks of
    relu1, residual, out; stage 5 = pool). Cross-method pairs: stages 0-1 at 0.95, stages 2-3
    out 0.85 / residual 0.6 / relu1 0.725, stage 4 at 0.45, the first block's out and residual
    0.15 lower from stage 2 on; seed pairs 0.95 everywhere."""
    got = claims_table(cka_table(World()), probes_table(World())).set_index("claim")["value"]
    stage_mid = (0.725 + 0.45 + 0.70 + 0.725 + 0.6 + 0.85) / 6  # stages 2, 3
    stage_last = (0.45 + 0.30 + 0.30 + 0.45 + 0.45 + 0.45) / 6  # stage 4
    dips = [
        (0.95 + 0.85) / 2 - 0.70,  # stage 2 out: layer1.1.out, layer2.1.out vs layer2.0.out
        (0.95 + 0.60) / 2 - 0.45,  # stage 2 residual
        (0.85 + 0.85) / 2 - 0.70,  # stage 3 out
        (0.60 + 0.60) / 2 - 0.45,  # stage 3 residual
        (0.85 + 0.45) / 2 - 0.30,  # stage 4 out: layer3.1.out, layer4.1.out vs layer4.0.out
        (0.60 + 0.45) / 2 - 0.30,  # stage 4 residual
    ]
    expected = {
        "C1": 0.0,  # identical within-model matrices
        "C2": 0.95 - 0.95,
        "C3": (0.70 + 0.85) / 2 - (0.45 + 0.60) / 2,
        "C4": (stage_mid - stage_last) - 0.0,
        "C5a": 0.9 - 0.3,
        "C5b": 0.9 - 0.4,
        "C6": 0.8 - 0.4,
        "C7a": (0.8 - 0.5) * 25 / 27,  # pool is layer 25 of the probe ramp over 27
        "C7b": (0.85 - 0.5) * 25 / 27,
        "C8": float(np.mean(dips)) - 0.0,
    }
    for claim, value in expected.items():
        assert got[claim] == pytest.approx(value, abs=1e-12), claim


def test_c3_reads_the_middle_stages_only():
    """Stage 1 and the last stage with odd far above even: averaged over every stage the gap
    would turn negative; over the middle stages it is +0.25."""
    w = World(early_odd_gap=0.3, last_odd_gap=0.3)
    got = claims_table(cka_table(w), probes_table(w)).set_index("claim").loc["C3"]
    assert got["value"] == pytest.approx(0.25, abs=1e-12)
    assert got["verdict"] == "agrees"


def test_c4_is_measured_against_the_seed_pairs_and_reads_stages_2_and_3():
    """Seed pairs fall in the last stage too: C4 is what the methods fall beyond that. Adding
    stage 1 (cross-method 0.3 here) to the middle stages would flip it."""
    base = claims_table(cka_table(World()), None).set_index("claim").loc["C4", "value"]
    w = World(early=0.3, seed_last=0.75)
    got = claims_table(cka_table(w), None).set_index("claim").loc["C4"]
    assert got["value"] == pytest.approx(base - 0.2, abs=1e-12)
    assert got["verdict"] == "agrees"
    same = World(seed_last=0.95 - base - 0.1)  # seed pairs fall 0.1 more than the methods
    got = claims_table(cka_table(same), None).set_index("claim").loc["C4"]
    assert got["value"] == pytest.approx(-0.1, abs=1e-12)
    assert got["verdict"] == "disagrees"
    assert "opposite to the paper" in got["detail"]


def test_c8_is_measured_against_the_seed_pairs():
    base = claims_table(cka_table(World()), None).set_index("claim").loc["C8", "value"]
    w = World(seed_dip=0.15)  # seed pairs dip as much as the methods' first block does
    got = claims_table(cka_table(w), None).set_index("claim").loc["C8"]
    # every seed-pair dip: (0.95 + 0.95) / 2 − 0.80 = 0.15
    assert got["value"] == pytest.approx(base - 0.15, abs=1e-12)


def test_seed_replicates_differ_only_in_seed():
    """Runs of another width (another replicate set) and runs without a seed are not seed
    replicates: the claims use the largest set and name the others."""
    w = World()
    table, probes = cka_table(w), probes_table(w)
    other = {"supervised-resnet18-s3": "supervised-resnet18-w4-r", "supervised-resnet18-s4": None}
    for side in ("a", "b"):
        for run, key in other.items():
            table.loc[table[f"run_{side}"] == run, f"replicate_{side}"] = key
    got = claims_table(table, probes).set_index("claim")
    assert got.loc["C5b", "runs"] == "simclr 5, supervised 3"
    assert got.loc["C5b", "df"] == 2
    dropped = claims_table(
        table[~table["run_a"].isin(other) & ~table["run_b"].isin(other)],
        probes[~probes["run"].isin(other)],
    ).set_index("claim")
    pd.testing.assert_series_equal(got["value"], dropped["value"])


REVERSED = {
    "C1": World(within_gap=0.3),
    "C2": World(early=0.6),
    "C3": World(even=0.6, odd=0.85),
    "C4": World(last=0.95),
    "C5a": World(inv_stem=0.95),
    "C5b": World(inv_pool={"simclr": 0.4, "supervised": 0.9}),
    "C6": World(class_pool={"simclr": 0.8, "supervised": 0.4}),
    "C7a": World(probe_pool={"simclr": 0.3, "supervised": 0.85}),
    "C7b": World(probe_pool={"simclr": 0.8, "supervised": 0.3}),
    "C8": World(dip=-0.15),
}


@pytest.mark.parametrize("claim", ALL)
def test_a_clear_opposite_effect_disagrees(claim):
    got = verdicts(REVERSED[claim])
    assert got[claim] == "disagrees"


# effects beyond their bootstrap intervals but inside the seed noise (the per-seed offset moves
# each statistic by more than the effect)
WEAK = {
    "C3": World(even=0.65, odd=0.6, noise=0.1),
    "C4": World(last=0.65, even=0.72, odd=0.7, dip=0.0, noise=0.1),
    "C5a": World(inv_stem=0.84, noise=0.1),
    "C5b": World(inv_pool={"simclr": 0.66, "supervised": 0.6}, noise=0.1),
    "C6": World(class_pool={"simclr": 0.6, "supervised": 0.66}, noise=0.1),
    "C7a": World(probe_pool={"simclr": 0.57, "supervised": 0.85}, noise=0.1),
    "C7b": World(probe_pool={"simclr": 0.8, "supervised": 0.57}, noise=0.1),
}


@pytest.mark.parametrize("claim", sorted(WEAK))
def test_an_effect_inside_the_noise_is_within_noise(claim):
    assert verdicts(WEAK[claim])[claim] == "within noise"


@pytest.mark.parametrize("claim", ["C1", "C2"])
def test_sameness_claims_agree_inside_the_noise_and_disagree_beyond_it(claim):
    small = {"C1": World(within_gap=0.01, noise=0.005), "C2": World(early=0.94, noise=0.005)}
    large = {"C1": World(within_gap=0.3, noise=0.01), "C2": World(early=0.8, noise=0.01)}
    assert verdicts(small[claim])[claim] == "agrees"
    assert verdicts(large[claim])[claim] == "disagrees"


def test_a_sameness_claim_whose_interval_crosses_the_margin_is_within_noise():
    got = claims_table(cka_table(World(early=0.94, noise=0.2)), None).set_index("claim").loc["C2"]
    assert got["ci_low"] < -0.05 < got["value"] < got["ci_high"]
    assert got["verdict"] == "within noise"


NAN_LAYERS = {
    "C1": "layer2.0.out",
    "C2": "layer1.0.relu1",
    "C3": "layer2.1.residual",
    "C4": "layer4.1.out",
    "C8": "layer3.0.residual",
}


@pytest.mark.parametrize("claim", sorted(NAN_LAYERS))
def test_a_nan_layer_leaves_out_only_the_values_it_touches(claim):
    """A constant layer (NaN CKA) in one run pair: the claim is measured from every other value,
    as if that pair's rows of the layer were absent."""
    w = World(noise=0.02)
    table = cka_table(w)
    touched = (table["layer_a"] == NAN_LAYERS[claim]) & (table["run_a"] == "simclr-resnet18-s1")
    with_nan = table.assign(value=table["value"].mask(touched))
    with_nan["jackknife"] = [
        [np.nan] * BLOCKS if t else j for t, j in zip(touched, table["jackknife"], strict=True)
    ]
    got = claims_table(with_nan, probes_table(w)).set_index("claim").loc[claim]
    absent = claims_table(table[~touched], probes_table(w)).set_index("claim").loc[claim]
    assert got["verdict"] == "agrees"
    assert got["value"] == pytest.approx(absent["value"], abs=1e-12)
    assert got["ci_low"] == pytest.approx(absent["ci_low"], abs=1e-12)


@pytest.mark.parametrize(("claim", "layer"), [("C5a", "stem"), ("C5b", "pool"), ("C6", "pool")])
def test_a_nan_at_the_one_layer_a_claim_reads_is_not_measured(claim, layer):
    assert verdicts(World(nan_layers=(layer,)))[claim] == "not measured"


def test_missing_layers_comparisons_and_seeds_are_not_measured():
    w = World()
    table = cka_table(w)
    no_pool = table[(table["layer_a"] != "pool")]
    got = claims_table(no_pool, probes_table(w).query("layer != 'pool'"))
    got = dict(zip(got["claim"], got["verdict"], strict=True))
    assert {got[c] for c in ("C5a", "C5b", "C6", "C7a", "C7b")} == {"not measured"}
    # no invariance/class comparisons, no probes table
    got = claims_table(table[table["kind"].isin(["within", "cross"])], None)
    assert set(got.set_index("claim").loc[["C5a", "C5b", "C6", "C7a", "C7b"], "verdict"]) == {
        "not measured"
    }
    # one seed per method: no seed pairs, so no claim of sameness can be formed, and no
    # interval over runs for the others: within noise, saying what is needed
    one = claims_table(cka_table(World(seeds=(0,))), probes_table(World(seeds=(0,))))
    one = one.set_index("claim")
    assert one.loc["C1", "verdict"] == one.loc["C2", "verdict"] == "not measured"
    assert "needs seed pairs" in one.loc["C2", "detail"]
    assert one.loc["C3", "verdict"] == "within noise"
    assert "needs ≥ 2 seeds per method" in one.loc["C3", "detail"]
    assert np.isfinite(one.loc["C3", "value"]) and not np.isfinite(one.loc["C3", "ci_low"])


def test_claims_use_pairs_from_different_initial_weights():
    # a large bonus for pairs that share initial weights must not rescue a disagreeing C2
    w = World(early=0.6, shared_bonus=0.35)
    assert verdicts(w)["C2"] == "disagrees"
    frame = shared_init_effect(cka_table(w))
    assert frame.loc[1, "shared_init"] - frame.loc[1, "different_init"] == pytest.approx(0.35)


def test_the_interval_carries_runs_and_images():
    """C5b by hand: per-run invariance at pool is inv_pool + noise × offset(seed); the
    jackknife over runs of a difference of means is s²_ssl/5 + s²_sup/5 (sample variances)."""
    from scipy import stats

    w = World(noise=0.05)
    table = claims_table(cka_table(w), probes_table(w)).set_index("claim")
    c5b = table.loc["C5b"]
    offsets = 0.05 * np.array(SEED_OFFSETS)
    assert c5b["value"] == pytest.approx(0.5 + offsets.mean() - offsets.mean(), abs=1e-12)
    se_runs = np.sqrt(2 * offsets.var(ddof=1) / 5)
    assert c5b["se_runs"] == pytest.approx(se_runs, rel=1e-9)
    assert c5b["se_images"] > 0
    half = stats.t.ppf(0.975, 4) * np.hypot(c5b["se_runs"], c5b["se_images"])
    assert c5b["ci_high"] - c5b["value"] == pytest.approx(half, rel=1e-9)
    assert c5b["value"] - c5b["ci_low"] == pytest.approx(half, rel=1e-9)
    assert (c5b["df"], c5b["runs"], c5b["units"]) == (4, "simclr 5, supervised 5", 10)
    assert set(table["verdict"]) <= set(VERDICTS)


def test_verdict_rules():
    def e(value, low, high):
        return Effect(value=value, low=low, high=high)

    assert verdict(e(0.1, 0.02, 0.18)) == "agrees"
    assert verdict(e(-0.1, -0.18, -0.02)) == "disagrees"
    assert verdict(e(0.04, -0.01, 0.09)) == "within noise"
    assert verdict(e(np.nan, np.nan, np.nan)) == "not measured"
    assert verdict(Effect(value=0.3)) == "within noise"  # too few runs for an interval
    # equivalence: inside ±margin agrees, wholly outside disagrees, across a bound is open
    assert verdict(e(0.01, -0.03, 0.04), "sameness", 0.05) == "agrees"
    assert verdict(e(-0.1, -0.14, -0.06), "sameness", 0.05) == "disagrees"
    assert verdict(e(0.1, 0.06, 0.14), "sameness", 0.05) == "disagrees"
    assert verdict(e(-0.04, -0.08, 0.0), "sameness", 0.05) == "within noise"
    assert verdict(e(0.01, -0.03, 0.04), "sameness", 0.03) == "within noise"


def test_summary_is_written_from_the_claims_table(tmp_path):
    w = World(even=0.6, odd=0.85)
    cka, probes = tmp_path / "cka.parquet", tmp_path / "probes.parquet"
    table = cka_table(w)
    for col in ("batch_size", "source_a", "source_b"):
        table[col] = 0
    table.to_parquet(cka)
    probes_table(w).assign(block=-1).to_parquet(probes)
    text = summarize(cka, tmp_path / "summary.md", probes, claims_out=tmp_path / "claims.parquet")
    claims = pd.read_parquet(tmp_path / "claims.parquet")
    assert (tmp_path / "claims.csv").exists()
    for row in claims.itertuples():
        line = next(line for line in text.splitlines() if line.startswith(f"| **{row.claim}**"))
        assert line.endswith(f"**{row.verdict}** |")
    assert claims.set_index("claim").loc["C3", "verdict"] == "disagrees"
    assert "How much the starting point explains" in text


def test_a_study_of_one_method_says_what_each_cross_method_claim_needs():
    """Two seeds of one method (e.g. two imported supervised networks): no cross-method pair,
    so the cross-method claims are not measured and say why (C3 once printed "stages : ")."""
    table = cka_table(World(seeds=(0, 1)))
    one_method = table[(table["method_a"] != "simclr") & (table["method_b"] != "simclr")]
    claims = claims_table(one_method, None).set_index("claim")
    for claim in ("C3", "C4", "C8"):
        assert claims.loc[claim, "verdict"] == "not measured"
    needs_ssl = "needs runs of a self-supervised method (any label but supervised)"
    assert claims.loc["C3", "detail"] == claims.loc["C5a", "detail"] == needs_ssl
    # C7b needs the supervised runs only: what it lacks here is the probes table
    assert claims.loc["C7b", "verdict"] == "not measured"
    assert claims.loc["C7b", "detail"] == "no probes table"
    probes = probes_table(World()).query("method == 'supervised'")
    with_probes = claims_table(one_method, probes)
    assert set(with_probes["methods"]) == {"(no self-supervised method) vs supervised"}
    with_probes = with_probes.set_index("claim")
    assert with_probes.loc["C7b", "verdict"] == "agrees"  # one method's own claim is measured
    assert with_probes.loc["C7a", "detail"] == needs_ssl


def test_only_the_compared_runs_methods_make_blocks():
    """A probes table with another method's runs (e.g. a stale file) adds no block; an empty
    probes table is no probes table."""
    w = World()
    extra = relabel(probes_table(w).query("method == 'simclr'"), "simclr", "mocov2")
    got = claims_table(cka_table(w), pd.concat([probes_table(w), extra]))
    assert set(got["methods"]) == {"simclr vs supervised"}
    pd.testing.assert_frame_equal(got, claims_table(cka_table(w), probes_table(w)))
    empty = claims_table(cka_table(w), pd.DataFrame()).set_index("claim")
    assert empty.loc["C7a", "detail"] == "no probes table"


def test_a_study_of_module_runs_only_says_they_take_no_part():
    table = cka_table(World())
    table["layer_kind_a"] = "module"
    table.loc[table["kind"] != "class", "layer_kind_b"] = "module"  # class rows: the labels
    got = claims_table(table, None)
    assert set(got["verdict"]) == {"not measured"}
    assert got.set_index("claim").loc["C3", "detail"] == (
        "needs runs of a self-supervised method (any label but supervised) and runs labelled "
        "supervised ("
        + ", ".join(f"{m}-resnet18-s{k}" for m in METHODS for k in range(5))
        + ": imported as modules, no part)"
    )


def relabel(frame: pd.DataFrame, old: str, new: str, sides=("a", "b")) -> pd.DataFrame:
    """The same rows with method `old` called `new` (method, run and comparison names)."""
    frame = frame.copy()
    columns = [c for s in sides for c in (f"method_{s}", f"run_{s}")] + ["method", "run"]
    for column in [c for c in columns if c in frame] + ["comparison"] * ("comparison" in frame):
        frame[column] = frame[column].map(
            lambda v: v.replace(old, new) if isinstance(v, str) else v
        )
    return frame


def test_claims_compare_whatever_self_supervised_label_the_runs_carry():
    """Imported BYOL runs against supervised ones: the same numbers as for SimCLR, named BYOL."""
    w = World(noise=0.02)
    simclr = claims_table(cka_table(w), probes_table(w))
    byol = claims_table(
        relabel(cka_table(w), "simclr", "byol"), relabel(probes_table(w), "simclr", "byol")
    )
    numbers = ["claim", "value", "ci_low", "ci_high", "se_runs", "se_images", "df", "verdict"]
    pd.testing.assert_frame_equal(simclr[numbers], byol[numbers])
    assert set(byol["methods"]) == {"byol vs supervised"}
    titles = byol.set_index("claim")["title"]
    assert titles["C5a"] == "byol's augmentation invariance rises with depth"
    assert "byol" in titles["C7a"] and "SimCLR" not in " ".join(byol["detail"])
    c5b = simclr.set_index("claim")["title"]["C5b"]
    assert c5b == "Augmentation invariance is higher for SimCLR in the final layers"


def three_methods(w: World) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The world's tables with a copy of the SimCLR runs labelled byol; byol-vs-simclr pairs
    have CKA 0."""
    table, probes = cka_table(w), probes_table(w)
    byol_rows = relabel(table, "simclr", "byol")
    byol_rows = byol_rows[(byol_rows["method_a"] == "byol") | (byol_rows["method_b"] == "byol")]
    across = table[(table["method_a"] == "simclr") & (table["method_b"] == "supervised")]
    across = relabel(across, "supervised", "byol", sides=("b",))
    across = across.assign(value=0.0, ci_low=0.0, ci_high=0.0)
    assert set(zip(across["method_a"], across["method_b"], strict=True)) == {("simclr", "byol")}
    three = pd.concat([table, byol_rows, across], ignore_index=True)
    probes3 = pd.concat([probes, relabel(probes.query("method == 'simclr'"), "simclr", "byol")])
    return three, probes3


def test_each_self_supervised_method_is_measured_against_the_supervised_runs_alone():
    """simclr, byol and supervised: a block of claims per self-supervised method, and pairs
    of two self-supervised methods never count as cross-method (here their CKA is 0, which
    would sink C2, C3 and C4 if they did)."""
    w = World(noise=0.02)
    table, probes = cka_table(w), probes_table(w)
    got = claims_table(*three_methods(w))
    assert list(got["methods"].unique()) == ["byol vs supervised", "simclr vs supervised"]
    names = ["methods", "title", "statistic", "runs"]
    alone = claims_table(table, probes).drop(columns=[*names, "detail"])
    for block in ("byol vs supervised", "simclr vs supervised"):
        part = got[got["methods"] == block].drop(columns=names)
        pd.testing.assert_frame_equal(
            part.drop(columns="detail").reset_index(drop=True), alone.reset_index(drop=True)
        )


def test_without_a_supervised_label_the_cross_method_claims_say_what_they_need():
    w = World()
    table = relabel(relabel(cka_table(w), "supervised", "byol"), "simclr", "dino")
    probes = relabel(relabel(probes_table(w), "supervised", "byol"), "simclr", "dino")
    got = claims_table(table, probes)
    assert list(got["methods"].unique()) == [
        "byol vs (no supervised)",
        "dino vs (no supervised)",
    ]
    dino = got[got["methods"] == "dino vs (no supervised)"].set_index("claim")
    for claim in ("C1", "C2", "C3", "C4", "C5b", "C6", "C7b", "C8"):
        assert dino.loc[claim, "verdict"] == "not measured"
        assert dino.loc[claim, "detail"] == "needs runs labelled supervised"
    assert dino.loc["C5a", "verdict"] == dino.loc["C7a", "verdict"] == "agrees"


def test_runs_imported_as_modules_take_no_part_in_the_claims():
    """The claims read ResNet stages and kinds; a module run's rows (kind "module") are left
    out, so adding one changes no verdict and no number."""
    table = cka_table(World())
    alien = table[table["kind"] == "cross"].head(40).copy()
    alien["run_b"] = "mobilenet"
    alien["layer_kind_b"] = alien["layer_b"] = "module"
    alien["value"] = 0.0
    before = claims_table(table, probes_table(World()))
    after = claims_table(pd.concat([table, alien], ignore_index=True), probes_table(World()))
    pd.testing.assert_frame_equal(before, after)


def test_the_summary_has_a_table_per_self_supervised_method(tmp_path):
    table, probes = three_methods(World(even=0.6, odd=0.85))
    for col in ("batch_size", "source_a", "source_b"):
        table[col] = 0
    table.to_parquet(tmp_path / "cka.parquet")
    probes.assign(block=-1).to_parquet(tmp_path / "probes.parquet")
    text = summarize(tmp_path / "cka.parquet", tmp_path / "summary.md", tmp_path / "probes.parquet")
    assert "Methods compared: byol vs supervised; simclr vs supervised" in text
    lines = text.splitlines()
    for block in ("byol vs supervised", "simclr vs supervised"):
        start = lines.index(f"### {block}")
        rows = lines[start + 4 : start + 4 + len(ALL)]
        assert [row.split("**")[1] for row in rows] == ALL
        assert rows[ALL.index("C3")].endswith("**disagrees** |")
        name = "SimCLR" if block.startswith("simclr") else "byol"
        assert rows[ALL.index("C5a")].startswith(f"| **C5a** {name}'s augmentation invariance")


def test_the_starting_point_table_counts_only_self_supervised_against_supervised_pairs():
    w = World()
    three, _ = three_methods(w)  # simclr-vs-byol pairs at CKA 0
    pd.testing.assert_frame_equal(shared_init_effect(three), shared_init_effect(cka_table(w)))
