"""`ckaflow plan`: the sizes it predicts are the sizes the pipeline produces."""

import subprocess

from ckaflow import config
from ckaflow.activations import open_store
from ckaflow.costs import study_costs
from tests.conftest import BIN, ENV, REPO, tiny_config

PAPER = REPO / "configs" / "paper-cifar10-resnet50.yaml"


def test_predicted_store_bytes_equal_the_stored_arrays(activations, study_config):
    costs = study_costs(study_config)
    for (method, view), path in activations.items():
        store = open_store(path)
        run = next(r.run_id for r in config.run_specs(study_config) if r.method == method)
        stored = sum(store[layer["name"]].array.nbytes for layer in store.layers)
        assert costs.store_bytes[(run, view)] == stored


def test_half_precision_halves_the_bytes_and_examples_scale_them():
    full = study_costs(tiny_config())
    half = study_costs(tiny_config(activations={"dtype": "bfloat16", "examples": 80}))
    key = next(iter(full.store_bytes))
    assert half.store_bytes[key] * 4 == full.store_bytes[key]  # half the bytes, half the rows


def test_paper_config_plan():
    result = subprocess.run(
        [str(BIN / "ckaflow"), "plan", str(PAPER)], capture_output=True, text=True, env=ENV
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "cka_tile" in out and "423" in out  # 51 comparisons, at most 3 x 3 tiles each
    assert "simclr-resnet50-s2/aug2" in out and "GPU-h" in out
    costs = study_costs(config.load(PAPER))
    # ResNet-50 with the CIFAR stem: 2.6 GFLOP per 32 px image, 4,747,392 values per image
    assert 2.5e9 < next(iter(costs.forward_flops.values())) < 2.7e9
    per_image = next(iter(costs.store_bytes.values())) / costs.examples / 2
    assert per_image == 4_747_392  # every SimCLR layer, heads included (README table)
