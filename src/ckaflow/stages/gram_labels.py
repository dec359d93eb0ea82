"""The `gram_labels` stage: the one-hot eval labels as one more representation (class
structure), with the same blocks, passes and seed as every run's Gram store."""

from __future__ import annotations

from pathlib import Path

from ckaflow.cka.estimators import one_hot
from ckaflow.gram_stores import _stats, check_passes_config, write_gram_store
from ckaflow.layers import label_layer
from ckaflow.study import GramSpec


def label_gram_store(
    data_path: str | Path,
    out: str | Path,
    estimator: str,
    batch_size: int,
    examples: int | None = None,
    passes: int = 1,
    seed: int = 0,
) -> Path:
    """Gram statistics of the one-hot eval labels (class structure as a representation),
    of the first `examples` eval examples (default all), like the activation stores — with the
    same passes and seed, hence the same partitions."""
    from ckaflow.data import open_prepared

    check_passes_config(estimator, passes, seed)
    data = open_prepared(data_path)
    labels = one_hot(data.eval_labels()[:examples], data.attrs["num_classes"])
    where = f"{data_path} labels"
    stats = {"labels": _stats(labels, estimator, batch_size, "cpu", where, passes, seed)}
    attrs = {
        "run": "labels",
        "run_spec": None,
        "view": "labels",
        "layers": [label_layer().as_dict()],
        "example_ids": data.group["eval/ids"][: len(labels)].tolist(),
        "source": str(data_path),
    }
    return write_gram_store(Path(out), stats, attrs)


def run(spec: GramSpec, data: str | Path, out: str | Path) -> Path:
    """The rule's call: the labels' blocks, passes and seed are every run's (`Study.gram_spec`)."""
    return label_gram_store(data, out, **spec.blocks())
