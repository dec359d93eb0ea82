import pandas as pd
import pytest

from ckaflow.study import LABELS, Side, Study
from ckaflow.tables import merge_cka
from tests.conftest import tiny_config


def test_comparisons_cover_the_study():
    study = Study(tiny_config(seeds=[0, 1]))
    kinds = pd.Series([c.kind for c in study.comparisons.values()]).value_counts().to_dict()
    # within: 4 runs x 3 views; invariance: aug1-aug2 and clean-aug1 per run
    assert kinds == {"within": 12, "invariance": 8, "class": 4, "cross": 6}
    assert ("simclr-resnet18-w4-s0", "aug2") in study.run_views()


def test_the_cka_job_computes_every_comparison_from_each_store_once():
    study = Study(tiny_config(seeds=[0, 1]))
    spec = study.cka_spec()
    assert [c["id"] for c in spec.comparisons] == list(study.comparisons)
    sides = {side for c in study.comparisons.values() for side in (c.a, c.b)}
    assert study.gram_stores() == sorted({study.gram(side) for side in sides})
    assert len(study.gram_stores()) == 4 * 3 + 1  # 4 runs x 3 views, and the labels
    assert study.gram(Side(LABELS, LABELS)) in study.gram_stores()
    assert spec.cache == study.cka_cache() and spec.cache.startswith("results/")


def test_only_requested_comparisons_and_their_views():
    study = Study(tiny_config(cka={"comparisons": ["within"]}))
    assert {c.kind for c in study.comparisons.values()} == {"within"}
    assert {view for _, view in study.run_views()} == {"clean", "aug1", "aug2"}
    study = Study(tiny_config(cka={"comparisons": ["class"]}))
    assert {view for _, view in study.run_views()} == {"clean"}


def test_merge_refuses_duplicate_pairs_and_missing_columns(tmp_path):
    from ckaflow.tables import COLUMNS

    row = {c: 0 for c in COLUMNS} | {"comparison": "c", "layer_a": "x", "layer_b": "y"}
    tile = tmp_path / "t.parquet"
    pd.DataFrame([row]).to_parquet(tile)
    with pytest.raises(ValueError, match="more than one table"):
        merge_cka([tile, tile], tmp_path / "out.parquet", "h")
    old = tmp_path / "old.parquet"
    pd.DataFrame([{"comparison": "c", "value": 1.0}]).to_parquet(old)
    with pytest.raises(ValueError, match="lack columns"):
        merge_cka([old], tmp_path / "out.parquet", "h")
    assert not (tmp_path / "out.parquet").exists()


def test_cut_short_cka_table_is_named(tmp_path):
    from ckaflow.errors import TableError

    tile = tmp_path / "r0c0.parquet"
    tile.write_bytes(b"PAR1 cut short")
    with pytest.raises(TableError, match=r"r0c0\.parquet: not a readable CKA table"):
        merge_cka([tile], tmp_path / "out.parquet", "h")


def test_a_table_from_an_older_schema_is_refused_by_its_readers(tmp_path):
    from ckaflow.errors import TableError
    from ckaflow.plots import plot_all
    from ckaflow.summary import summarize

    old = tmp_path / "cka.parquet"
    pd.DataFrame({"comparison": ["c"], "layer_a": ["x"], "value": [0.5]}).to_parquet(old)
    with pytest.raises(TableError, match=r"cka.parquet: a cka table without columns \['kind'"):
        plot_all(old, tmp_path / "figures")
    with pytest.raises(TableError, match="older ckaflow"):
        summarize(old, tmp_path / "summary.md")
    assert not (tmp_path / "summary.md").exists()
