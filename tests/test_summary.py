import pandas as pd

from ckaflow.summary import claims


def _row(kind, method_a, method_b, layer, layer_kind, stage, value, view_a="clean", view_b="clean"):
    return {
        "kind": kind,
        "method_a": method_a,
        "method_b": method_b,
        "layer_a": layer,
        "layer_b": layer if kind != "class" else "labels",
        "layer_kind_a": layer_kind,
        "stage_a": stage,
        "value": value,
        "view_a": view_a,
        "view_b": view_b,
    }


def _table(early, late, simclr_pool_inv, sup_pool_inv):
    rows = []
    for stage, value in ((1, early), (2, 0.9), (3, 0.85), (4, late)):
        rows.append(
            _row("cross", "simclr", "supervised", f"layer{stage}.0.out", "out", stage, value)
        )
        rows.append(
            _row(
                "cross",
                "simclr",
                "supervised",
                f"layer{stage}.0.residual",
                "residual",
                stage,
                value - 0.2,
            )
        )
    rows.append(
        _row("invariance", "simclr", "simclr", "pool", "pool", 5, simclr_pool_inv, "aug1", "aug2")
    )
    rows.append(
        _row(
            "invariance",
            "supervised",
            "supervised",
            "pool",
            "pool",
            5,
            sup_pool_inv,
            "aug1",
            "aug2",
        )
    )
    return pd.DataFrame(rows)


def test_claims_agree_when_the_numbers_follow_the_paper():
    text = "\n".join(claims(_table(early=0.95, late=0.6, simclr_pool_inv=0.8, sup_pool_inv=0.3)))
    assert "disagrees" not in text
    assert "Stage 4: 0.50 ± 0.10" in text or "stage 4" in text.lower()
    assert "SimCLR 0.80, supervised 0.30" in text


def test_claims_disagree_when_they_do_not():
    text = "\n".join(claims(_table(early=0.5, late=0.9, simclr_pool_inv=0.2, sup_pool_inv=0.7)))
    assert "The last stage diverges" in text
    assert text.count("**disagrees**") >= 3
