"""`ckaflow.compare` on live networks: the workflow's numbers (fused Gram stores, then the CKA
job) on the same networks and images, from a loader whose batches do not line up with the
estimator's blocks; any `nn.Module` by its module names; memory of one block."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import ckaflow
from ckaflow.tables import COLUMNS


def _images(prepared, n=None) -> torch.Tensor:
    """The clean view's images as the fused stage feeds them (ViewPass: /255, normalised)."""
    from ckaflow.data import open_prepared

    data = open_prepared(prepared)
    pixels = torch.from_numpy(data.view("clean")[:n])
    return data.normalise(pixels.float() / 255)


def _loader(images: torch.Tensor, batch: int):
    labels = torch.zeros(len(images), dtype=torch.long)
    dataset = torch.utils.data.TensorDataset(images, labels)
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False)


def test_compare_gives_the_workflows_numbers(trained, prepared, tmp_path):
    from ckaflow.models import load_network
    from ckaflow.stages.cka import Pair, compute_comparisons
    from ckaflow.stages.gram import fused_gram_store

    stores = {
        method: fused_gram_store(
            trained[method], prepared, "clean", tmp_path / f"{method}.zarr", batch_size=64,
            device="cpu", precision="fp32", channels_last=False,
        )
        for method in ("simclr", "supervised")
    }  # fmt: skip
    pair = Pair("cross", "cross", str(stores["simclr"]), str(stores["supervised"]))
    workflow = pd.read_parquet(
        compute_comparisons([pair], str(tmp_path / "pairs.parquet"), "minibatch", 500, 0)
    )
    nets = {m: load_network(trained[m])[0] for m in ("simclr", "supervised")}
    live = ckaflow.compare(
        nets, _loader(_images(prepared), batch=50), batch_size=64, bootstrap=500, seed=0
    )
    assert list(live.columns) == list(COLUMNS)
    key = ["layer_a", "layer_b"]
    ours = live.sort_values(key, ignore_index=True)
    theirs = workflow.sort_values(key, ignore_index=True)
    assert ours[key].equals(theirs[key]) and len(ours) == 28 * 27  # 28 layers by 27
    for column in ("value", "ci_low", "ci_high"):
        np.testing.assert_array_equal(ours[column], theirs[column], err_msg=column)
    np.testing.assert_array_equal(np.stack(ours["jackknife"]), np.stack(theirs["jackknife"]))
    assert (ours["n"] == theirs["n"]).all() and set(ours["comparison"]) == {"simclr-vs-supervised"}


def test_compare_takes_any_module_by_its_module_names(prepared):
    """A plain torchvision ResNet-18 against itself by module names (glob patterns): the
    within comparison is 1 on the diagonal, symmetric, and one block's memory is enough."""
    import torchvision

    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)  # Fashion-MNIST is grey
    images = _images(prepared, n=160)
    table = ckaflow.compare(
        {"tv": net}, _loader(images, batch=32), layers=["layer?.1", "avgpool"], batch_size=64
    )
    assert list(table["layer_a"].unique()) == ["layer1.1", "layer2.1", "layer3.1", "layer4.1",
                                               "avgpool"]  # fmt: skip
    matrix = table.pivot(index="layer_a", columns="layer_b", values="value")
    np.testing.assert_allclose(np.diag(matrix.to_numpy()), 1.0, atol=1e-12)
    np.testing.assert_allclose(matrix.to_numpy(), matrix.to_numpy().T, atol=1e-12)
    assert table["n"].iloc[0] == 160  # blocks of 64, 64 and 32 rows, whatever the batches
    assert net.training  # left in the mode it was in (train, as built)


def test_compare_refuses_what_it_cannot_use(prepared):
    import torchvision

    net = torchvision.models.resnet18()
    with pytest.raises(ValueError, match="layers is required"):
        ckaflow.compare({"tv": net}, [])
    images = _images(prepared, n=3)
    net.conv1 = torch.nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    with pytest.raises(ValueError, match="fewer than 4 images"):
        ckaflow.compare({"tv": net}, [images], layers=["layer1"])
