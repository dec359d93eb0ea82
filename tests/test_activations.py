import numpy as np
import pytest
import torch
import zarr

from ckaflow.activations import open_store
from ckaflow.data import open_prepared
from ckaflow.errors import StoreError
from ckaflow.layers import layer_registry
from ckaflow.models import record_layers
from ckaflow.train.loop import load_network


def test_store_has_one_row_chunked_array_per_layer(activations, study_config):
    store = open_store(activations[("simclr", "clean")])
    names = [layer.name for layer in layer_registry("resnet18", "simclr")]
    assert [layer["name"] for layer in store.layers] == names
    n = study_config["data"]["eval_size"]
    for name in names:
        arr = store[name]
        assert arr.shape[0] == n
        assert arr.chunks == (64, arr.shape[1])  # chunked along rows only, CKA batch high
        assert arr.dtype == np.float32
    assert store["stem"].shape[1] == 4 * 28 * 28
    attrs = store.attrs
    assert attrs["view"] == "clean" and attrs["run"].startswith("simclr-")
    assert attrs["complete"] and attrs["code_version"] and attrs["model_spec_hash"]
    assert len(attrs["example_ids"]) == n


def test_stored_values_equal_a_direct_forward_pass(activations, trained, prepared):
    store = open_store(activations[("supervised", "aug1")])
    net, _ = load_network(trained["supervised"])
    data = open_prepared(prepared)
    pixels = torch.from_numpy(data.view("aug1")[:7])
    with torch.no_grad(), record_layers(net) as cap:
        net(data.normalise(pixels.float() / 255))
    for name in ("stem", "layer2.1.residual", "layer4.1.out", "fc"):
        np.testing.assert_allclose(store[name][:7], cap[name].numpy(), rtol=1e-5, atol=1e-5)


def test_store_without_completion_flag_is_refused(tmp_path):
    path = tmp_path / "half.zarr"
    zarr.open_group(path, mode="w").attrs.update({"kind": "ckaflow.activations"})
    with pytest.raises(StoreError, match="incomplete"):
        open_store(path)


def test_missing_or_foreign_store_is_refused(tmp_path, prepared):
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "nothing.zarr")
    with pytest.raises(StoreError, match="expected 'ckaflow.activations'"):
        open_store(prepared)
