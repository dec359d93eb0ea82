"""`ckaflow plan`: the sizes it predicts are the sizes the pipeline produces."""

import subprocess

from ckaflow import config
from ckaflow.activations import open_store
from ckaflow.costs import study_costs
from ckaflow.plan import Side, Study
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


def _section(out: str, title: str) -> list[str]:
    """The lines of the output's paragraph that starts with `title`."""
    (found,) = [p for p in out.split("\n\n") if p.startswith(title)]
    return found.splitlines()


def _fields(lines: list[str], label: str) -> list[str]:
    """The fields after `label` on the one line that starts with it."""
    (found,) = [line.strip() for line in lines if line.strip().split()[0] == label]
    return found.split()[1:]


def test_paper_config_plan():
    result = subprocess.run(
        [str(BIN / "ckaflow"), "plan", str(PAPER)], capture_output=True, text=True, env=ENV
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    jobs = _section(out, "jobs per stage:")
    assert _fields(jobs, "cka_tile") == ["423"]  # 51 comparisons, at most 3 x 3 tiles each
    assert _fields(jobs, "gram") == ["19"]  # 18 run x view stores and the labels
    assert _fields(jobs, "total") == ["477"]
    acts = _section(out, "activations (")
    assert acts[0] == "activations (10000 examples each, bfloat16, before compression):"
    assert _fields(acts, "simclr-resnet50-s2/aug2") == ["94.9", "GB"]
    assert _fields(acts, "total") == ["1.7", "TB"]
    gram = _section(out, "Gram statistics")
    assert gram[0] == "Gram statistics (minibatch, batch 256, 10 passes: 400 blocks per layer):"
    costs = study_costs(config.load(PAPER))
    assert _fields(gram, "compute") == [f"{costs.gram_flops / 1e15:.1f}", "PFLOP"]
    # a Gram store: 400 blocks x 256² x 8 bytes = 209.7 MB per layer; the labels are one layer
    assert _fields(gram, "labels") == ["209.7", "MB"]
    layers = costs.gram_store_bytes[("simclr-resnet50-s0", "clean")] / 209_715_200
    assert layers == len(Study(config.load(PAPER)).layers(Side("simclr-resnet50-s0", "clean")))
    assert _fields(gram, "simclr-resnet50-s0/clean") == [f"{layers * 0.2097152:.1f}", "GB"]
    # a tile streams over the blocks: one U-centred 256² block of each of 32 + 32 layers (and 4
    # blocks of working space), 400 blocks of per-block HSIC terms, 200 bootstrap replicates
    # (the tile loaded whole was 2 x 32 layers x 3 x 209.7 MB = 40.3 GB)
    assert _fields(gram, "one") == ["CKA", "tile", "in", "memory", "40.8", "MB"]
    pairs = 32 * 32
    assert costs.tile_bytes == (64 + 4) * 256**2 * 8 + 400 * (pairs + 64) * 8 + 200 * pairs * 8
    training = _section(out, "training (GPU-hours")
    assert _fields(training, "total")[-1] == "GPU-h"
    # ResNet-50 with the CIFAR stem: 2.6 GFLOP per 32 px image, 4,747,392 values per image
    assert 2.5e9 < next(iter(costs.forward_flops.values())) < 2.7e9
    per_image = next(iter(costs.store_bytes.values())) / costs.examples / 2
    assert per_image == 4_747_392  # every SimCLR layer, heads included (README table)
    # 10 passes of 39 blocks of 256 rows and one of 16: 2 (39 · 256² + 16²) · 10 FLOPs a value
    assert costs.gram_blocks == 400 and costs.examples == 10_000
    values = sum(costs.store_bytes.values()) / 2 / 10_000
    assert costs.gram_flops == 2 * (39 * 256**2 + 16**2) * 10 * values


def test_gram_costs_scale_with_passes():
    one = study_costs(tiny_config())
    four = study_costs(tiny_config(cka={"passes": 4}))
    assert four.gram_flops == 4 * one.gram_flops
    assert four.gram_blocks == 4 * one.gram_blocks == 4 * 3  # 160 rows: 64 + 64 + 32
    for key, size in one.gram_store_bytes.items():
        assert four.gram_store_bytes[key] == 4 * size
    assert ("labels", "labels") in one.gram_store_bytes  # the class comparison's labels store
    # a streamed tile holds one block per layer whatever the passes; only its per-block HSIC
    # terms (8 x 8 pairs and 8 + 8 self terms) grow with the blocks
    assert four.tile_bytes - one.tile_bytes == (12 - 3) * (8 * 8 + 16) * 8
    # tiny layers fit one column panel: the Gram stage reads each store once either way
    assert one.gram_read_bytes == four.gram_read_bytes == sum(one.store_bytes.values())


def test_tile_memory_of_the_full_data_estimators_is_their_loaded_layers():
    """linear/debiased/rbf: one n × n Gram per layer, loaded whole as before streaming."""
    from ckaflow.costs import tile_memory

    linear = study_costs(tiny_config(cka={"estimator": "linear"}))
    assert linear.tile_bytes == 3 * (8 + 8) * 160 * 160 * 8
    assert tile_memory("rbf", 32, 32, 1, 10_000, 200) == 3 * 64 * 10_000**2 * 8  # 153.6 GB


def test_wide_layers_are_read_once_per_panel():
    from ckaflow import costs

    one = costs.gram_layer_cost("minibatch", 10_000, 256, 1, 262_144, 2)
    ten = costs.gram_layer_cost("minibatch", 10_000, 256, 10, 262_144, 2)
    assert one[2] == 10_000 * 262_144 * 2  # one pass: read once
    assert ten[2] == 3 * one[2]  # 10.5 GB of float32 in 4 GiB panels: three reads
    assert ten[1] == 10 * one[1] and ten[3] == 10 * one[3]


def test_predicted_gram_bytes_and_flops_are_what_the_gram_stage_does(activations, tmp_path):
    """Store bytes against a real Gram store with passes; FLOPs against torch's counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ckaflow.cka.gram import gram_store, open_gram
    from ckaflow.cka.stats import gram_stats
    from ckaflow.costs import gram_layer_cost

    cfg = tiny_config(cka={"passes": 3})
    costs = study_costs(cfg)
    source = open_store(activations[("simclr", "clean")])
    run = next(r.run_id for r in config.run_specs(cfg) if r.method == "simclr")
    path = gram_store(source.path, tmp_path / "g.zarr", "minibatch", 64, "cpu", passes=3, seed=0)
    store = open_gram(path)
    stored = sum(store[layer["name"]].nbytes for layer in store.layers)
    assert costs.gram_store_bytes[(run, "clean")] == stored
    layer = source.layers[3]["name"]
    values = source[layer][...]
    for passes in (1, 3):
        with FlopCounterMode(display=False) as counter:
            gram_stats(torch.from_numpy(values), batch_size=64, passes=passes, device="cpu")
        predicted = gram_layer_cost("minibatch", len(values), 64, passes, values.shape[1], 4)[1]
        assert counter.get_total_flops() == predicted
