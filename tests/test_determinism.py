"""The same config on the same machine gives bit-identical tables: a tiny study run twice, each
from nothing in its own folder, yields the very same CKA, probe and claims tables."""

import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.conftest import ENV, REPO, snakemake_cmd

# tests/configs/tiny.yaml made smaller: every seeded step is still there (subsets and augmented
# views, initial weights, data order, a seeded second CKA pass, bootstrap, probes), each tiny.
CONFIG = REPO / "tests" / "configs" / "tiny-determinism.yaml"
TABLES = ("cka", "probes", "claims")

# Columns that may legitimately differ between two runs of one config, with the reason. None
# does: the sources (`source_a`, `source_b`) are paths relative to the work folder, the
# provenance (`code_version`, `merged_by`, `config_hash`, `model_spec_hash`) names the checkout
# and the config, and no table of the three carries a time. (Timings live in training.parquet
# and runs.parquet, which this test does not compare.) A column added here needs its reason.
MAY_DIFFER: dict[str, dict[str, str]] = {"cka": {}, "probes": {}, "claims": {}}


def run_study(workdir: Path, hash_seed: str) -> Path:
    """The study of CONFIG from nothing in `workdir`, up to the three tables; its tables folder."""
    targets = [f"results/tables/{name}.parquet" for name in TABLES]
    # PYTHONHASHSEED differs between the runs (as it does between two shells' runs by default):
    # an order taken from a set or a hash must not reach the tables.
    env = {**ENV, "PYTHONHASHSEED": hash_seed}
    # Both runs get snakemake_cmd's --cores 2, so every job the same thread count: the numbers
    # are bit-identical for one thread count only (--cores 1 changes CKA values by up to 1e-4).
    result = subprocess.run(
        snakemake_cmd(workdir, CONFIG, *targets),
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return workdir / "results" / "tables"


def bits(column: pd.Series) -> list[bytes]:
    """Each value's exact bytes: floats by their bit pattern (so -0.0 differs from 0.0, and one
    NaN from another NaN), arrays (the CKA table's jackknife values) by their dtype and bytes."""
    if pd.api.types.is_float_dtype(column.dtype):
        return [v.tobytes() for v in column.to_numpy(dtype=np.float64, na_value=np.nan)]

    def one(value) -> bytes:
        if isinstance(value, np.ndarray):
            return str(value.dtype).encode() + value.tobytes()
        return repr(value).encode()

    return [one(value) for value in column]


def assert_bit_identical(
    name: str, first: pd.DataFrame, second: pd.DataFrame, drop: dict[str, str]
) -> None:
    first, second = first.drop(columns=list(drop)), second.drop(columns=list(drop))
    assert list(first.columns) == list(second.columns), name
    assert (first.dtypes == second.dtypes).all(), (name, first.dtypes, second.dtypes)
    differ = [c for c in first.columns if bits(first[c]) != bits(second[c])]
    assert not differ, f"{name}.parquet: columns {differ} differ between two runs of one config"
    pd.testing.assert_frame_equal(first, second, check_exact=True)


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, fashion_root) -> tuple[Path, Path]:
    first = run_study(tmp_path_factory.mktemp("first"), hash_seed="1")
    second = run_study(tmp_path_factory.mktemp("second"), hash_seed="2")
    return first, second


@pytest.mark.e2e
@pytest.mark.parametrize("name", TABLES)
def test_two_runs_from_nothing_give_bit_identical_tables(two_runs, name):
    first, second = (pd.read_parquet(tables / f"{name}.parquet") for tables in two_runs)
    # not a vacuous comparison: the tables hold numbers
    numbers = first["eval_accuracy" if name == "probes" else "value"]
    assert len(first) > 0 and np.isfinite(numbers).any()
    assert_bit_identical(name, first, second, MAY_DIFFER[name])


def test_the_comparison_sees_one_ulp_and_the_sign_of_zero():
    """The check itself: one unit in the last place, or 0.0 against -0.0, is a difference."""
    value = [0.5, 0.0]
    jackknife = [np.array([0.1, 0.2]), np.array([0.3])]
    table = pd.DataFrame({"value": value, "jackknife": jackknife})
    assert_bit_identical("unit", table, pd.DataFrame({"value": value, "jackknife": jackknife}), {})
    for column, changed in (
        ("value", [np.nextafter(0.5, 1.0), 0.0]),
        ("value", [0.5, -0.0]),
        ("jackknife", [np.array([0.1, np.nextafter(0.2, 1.0)]), np.array([0.3])]),
        ("jackknife", [np.array([0.1, 0.2], dtype=np.float32), np.array([0.3])]),
    ):
        other = table.assign(**{column: changed})
        with pytest.raises(AssertionError, match=column):
            assert_bit_identical("unit", table, other, {})
