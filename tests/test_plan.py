"""`ckaflow plan`: the sizes it predicts are the sizes the pipeline produces."""

import subprocess

import pytest

from ckaflow import config
from ckaflow.plan import study_costs
from ckaflow.store import open_store
from ckaflow.study import Side, Study
from tests.conftest import BIN, ENV, REPO, snakemake_cmd, tiny_config

PAPER = REPO / "configs" / "paper-cifar10-resnet50.yaml"


def test_predicted_store_bytes_equal_the_stored_arrays(activations, study_config):
    """Every layer stored (the fixture's stores): what `all_activation_bytes` predicts."""
    costs = study_costs(study_config)
    for (method, view), path in activations.items():
        store = open_store(path)
        run = next(r.run_id for r in config.run_specs(study_config) if r.method == method)
        stored = sum(store[layer["name"]].array.nbytes for layer in store.layers)
        assert costs.all_activation_bytes[(run, view)] == stored


def test_predicted_selection_bytes_equal_a_real_selection_store(trained, prepared, tmp_path):
    """The study's stored selection (activations.store), written as the workflow writes it."""
    from dataclasses import asdict

    from ckaflow.activations import extract

    cfg = tiny_config(activations={"store": {"layers": {"kinds": ["pool", "out"]}, "examples": 40}})
    study, costs = Study(cfg), study_costs(cfg)
    run = next(r.run_id for r in config.run_specs(cfg) if r.method == "supervised")
    spec = {**asdict(study.extract_spec(Side(run, "aug1"))), "chunk_rows": 16}
    assert spec["examples"] == 40 and all(
        name.endswith((".out", "pool")) for name in spec["layers"]
    )
    path = extract(trained["supervised"], prepared, "aug1", tmp_path / "s.zarr", **spec)
    store = open_store(path)
    stored = sum(store[layer["name"]].array.nbytes for layer in store.layers)
    assert costs.stored_bytes[(run, "aug1")] == stored
    assert stored < costs.all_activation_bytes[(run, "aug1")] / 10
    none = study_costs(tiny_config(activations={"store": "none"}))
    assert none.stored_bytes == {} and none.jobs["extract (stored activations)"] == 0


def test_half_precision_halves_the_bytes_and_examples_scale_them():
    full = study_costs(tiny_config())
    half = study_costs(tiny_config(activations={"dtype": "bfloat16", "examples": 80}))
    key = next(iter(full.all_activation_bytes))
    assert half.all_activation_bytes[key] * 4 == full.all_activation_bytes[key]


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
    assert _fields(jobs, "cka") == ["(every", "comparison,", "one", "job)", "1"]
    assert _fields(jobs, "gram") == ["(fused", "forward", "pass)", "19"]  # 18 runs x views, labels
    assert _fields(jobs, "extract") == ["(stored", "activations)", "18"]
    assert _fields(jobs, "total") == ["55"]
    costs = study_costs(config.load(PAPER))
    gram = _section(out, "Gram statistics")
    assert gram[0] == (
        "Gram statistics during the forward pass (minibatch, batch 256, 10 passes: "
        "400 blocks per layer), 10000 examples:"
    )
    assert _fields(gram[1:], "Gram")[:3] == ["products", f"{costs.gram_flops / 1e15:.1f}", "PFLOP"]
    # every pass forwards every example: 10 x 10,000 x 18 run-views x 2.6 GFLOP
    assert costs.gram_forward_flops == 10 * 10_000 * 3 * sum(costs.forward_flops.values())
    assert _fields(gram, "forward")[:3] == ["passes", "4.7", "PFLOP"]
    # one CKA job: every comparison, each Gram store read once (the tiles of 32 x 32 layers it
    # replaces read 3.91 TB, 15.3 times the stores)
    job = _section(out, "CKA, one job")
    assert _fields(job, "comparisons") == ["51"]
    assert costs.cka_job.read_bytes == sum(costs.gram_store_bytes.values())
    assert _fields(job, "bytes")[1:] == ["64.0", "GB", "=", "1.00x", "the", "Gram", "stores"]
    # streamed: one U-centred 256² block of each of the 19 stores' layers (and 4 blocks of
    # working space), 400 blocks of per-block HSIC terms of every comparison, and one
    # comparison's 200 bootstrap replicates and 400 jackknife blocks at a time
    study = Study(config.load(PAPER))
    pairs = [(len(study.layers(c.a)), len(study.layers(c.b))) for c in study.comparisons.values()]
    layers = sum(len(study.layers(side)) for side in study.sides())
    terms = sum(la * lb + la + lb for la, lb in pairs)
    widest = max(la * lb for la, lb in pairs)
    assert costs.cka_job.memory_bytes == (
        (layers + 4) * 256**2 * 8 + 400 * terms * 8 + (200 + 400) * widest * 8
    )
    assert _fields(job, "peak") == ["memory", "1.3", "GB"]
    size = _section(out, "bytes per run and view")
    # a Gram store: 400 blocks x the upper triangle of 256² (32,896 values) x 4 bytes = 52.6 MB
    # per layer, a quarter of the full float64 matrices (209.7 MB); the labels are one layer
    layer_bytes = 400 * (256 * 257 // 2) * 4
    assert _fields(size, "labels") == ["52.6", "MB"]
    layers = costs.gram_store_bytes[("simclr-resnet50-s0", "clean")] / layer_bytes
    assert layers == len(Study(config.load(PAPER)).layers(Side("simclr-resnet50-s0", "clean")))
    row = _fields(size, "simclr-resnet50-s2/aug2")
    assert row == [f"{layers * layer_bytes / 1e9:.1f}", "GB", "3.6", "GB", "94.9", "GB"]
    # 64.0 GB: at most 0.3 of the 255.0 GB of full float64 matrices
    assert _fields(size, "total") == ["64.0", "GB", "65.0", "GB", "1.7", "TB"]
    # intermediate bytes <= 1/5 of storing every layer's activations
    everything = sum(costs.all_activation_bytes.values())
    assert costs.intermediate_bytes / everything == pytest.approx(0.076, abs=0.001)
    assert size[-1].strip().endswith("= 0.08 of storing every layer's activations")
    training = _section(out, "training (GPU-hours")
    assert _fields(training, "total")[-1] == "GPU-h"
    # ResNet-50 with the CIFAR stem: 2.6 GFLOP per 32 px image, 4,747,392 values per image
    assert 2.5e9 < next(iter(costs.forward_flops.values())) < 2.7e9
    per_image = next(iter(costs.all_activation_bytes.values())) / costs.examples / 2
    assert per_image == 4_747_392  # every SimCLR layer, heads included (README table)
    # 10 passes of 39 blocks of 256 rows and one of 16; a 256-row block's Gram is formed as its
    # upper triangle (128 rows against 256, 128 against 128), a 16-row one whole:
    # 2 (39 · (128 · 256 + 128²) + 16²) · 10 FLOPs a value
    assert costs.gram_blocks == 400 and costs.examples == 10_000
    values = sum(costs.all_activation_bytes.values()) / 2 / 10_000
    assert costs.gram_flops == 2 * (39 * (128 * 256 + 128**2) + 16**2) * 10 * values


def test_plan_gives_each_stage_its_bytes_and_times_and_the_critical_path():
    result = subprocess.run(
        [str(BIN / "ckaflow"), "plan", str(PAPER), "--gpus", "8"],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert result.returncode == 0, result.stderr
    stages = _section(result.stdout, "per stage:")
    assert stages[1].split() == ["stage", "jobs", "written", "read", "here", "8", "GPUs"]
    # the CKA job reads every Gram store once; its table's size is an estimate
    assert _fields(stages, "cka")[:4] == ["1", "≈143.8", "MB", "64.0"]
    assert _fields(stages, "gram")[:5] == ["18", "63.9", "GB", "2.4", "GB"]
    path = [line for line in stages if "critical path" in line]
    assert len(path) == 1 and path[0].strip().endswith("on 8 GPUs")


def test_jobs_are_packed_longest_first_onto_the_gpus():
    from ckaflow.stage_costs import lpt_makespan

    # longest first: 5 | 4, then 3 to the lighter each time: 5+3 | 4+3+3 = 10 (the best
    # packing, 5+4 | 3+3+3, takes 9: LPT is within 4/3 of it)
    assert lpt_makespan([5, 4, 3, 3, 3], 2) == 10
    assert lpt_makespan([5, 4, 3, 3, 3], 1) == 18
    assert lpt_makespan([5, 4, 3, 3, 3], 8) == 5


def test_gram_costs_scale_with_passes():
    one = study_costs(tiny_config())
    four = study_costs(tiny_config(cka={"passes": 4}))
    assert four.gram_flops == 4 * one.gram_flops
    assert four.gram_blocks == 4 * one.gram_blocks == 4 * 3  # 160 rows: 64 + 64 + 32
    for key, size in one.gram_store_bytes.items():
        assert four.gram_store_bytes[key] == 4 * size
    assert ("labels", "labels") in one.gram_store_bytes  # the class comparison's labels store
    # the streamed CKA job holds one block per layer whatever the passes; only its per-block
    # HSIC terms of every comparison and one comparison's jackknife grow with the blocks
    study = Study(tiny_config())
    pairs = [(len(study.layers(c.a)), len(study.layers(c.b))) for c in study.comparisons.values()]
    terms = sum(la * lb + la + lb for la, lb in pairs)
    widest = max(la * lb for la, lb in pairs)
    growth = four.cka_job.memory_bytes - one.cka_job.memory_bytes
    assert growth == (12 - 3) * (terms + widest) * 8
    # the fused stage forwards every example once per pass
    assert four.gram_forward_flops == 4 * one.gram_forward_flops > 0


def test_cka_memory_of_the_full_data_estimators_is_their_loaded_layers():
    """linear/debiased/rbf: one n × n Gram per layer, tile_layers per side loaded whole."""
    from ckaflow.plan import cka_job_memory

    linear = study_costs(tiny_config(cka={"estimator": "linear"}))
    assert linear.cka_job.memory_bytes == 3 * (8 + 8) * 160 * 160 * 8  # tile_layers 8
    rbf = cka_job_memory("rbf", 68, [(68, 68)], 1, 10_000, 200, 32)
    assert rbf == 3 * 64 * 10_000**2 * 8  # 153.6 GB


def test_full_data_estimators_forward_once_per_layer_group():
    """linear: the rows of a group of layers are held at once; one forward pass per group."""
    from ckaflow.stages.gram import _layer_groups

    assert _layer_groups({"a": 10, "b": 10, "c": 30}, 100, 100 * 20 * 4) == [["a", "b"], ["c"]]
    assert _layer_groups({"a": 10, "b": 10}, 100, 1) == [["a"], ["b"]]
    cfg = tiny_config(cka={"estimator": "linear"})
    costs = study_costs(cfg)
    one_pass = sum(costs.forward_flops.values()) * 160 * 3  # 3 views, all layers in one group
    assert costs.gram_forward_flops == one_pass


def test_predicted_gram_bytes_and_flops_are_what_the_gram_stage_does(activations, tmp_path):
    """Store bytes against a real Gram store with passes; FLOPs against torch's counter."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ckaflow.cka.grams import gram_stats
    from ckaflow.gram_stores import open_gram
    from ckaflow.plan import gram_layer_cost
    from ckaflow.stages.gram import gram_store

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
    for estimator, passes in (("minibatch", 1), ("minibatch", 3), ("debiased", 1)):
        with FlopCounterMode(display=False) as counter:
            gram_stats(
                torch.from_numpy(values), estimator=estimator, batch_size=64, passes=passes,
                device="cpu",
            )  # fmt: skip
        predicted = gram_layer_cost(estimator, len(values), 64, passes, values.shape[1])[1]
        assert counter.get_total_flops() == predicted


def test_imported_runs_cost_no_training():
    from ckaflow.plan import render

    imports = [
        {"name": "tv", "checkpoint": "tv.pth", "format": "torchvision", "method": "supervised"},
        {"name": "solo", "checkpoint": "s.ckpt", "format": "solo-learn", "method": "simclr"}
        | {"stem": "cifar", "head": "projector"},
    ]
    cfg = tiny_config(methods=["simclr"], imports=imports)
    costs = study_costs(cfg)
    assert costs.jobs["train"] == 1 and costs.jobs["import_run"] == 2
    assert costs.jobs["evaluate"] == 3
    assert costs.train_flops["tv"] == costs.train_flops["solo"] == 0
    assert costs.train_flops["simclr-resnet18-w4-s0"] > 0
    # the ImageNet stem quarters the 28 px images; solo-learn's CIFAR stem (padding 2) grows them
    assert costs.forward_flops["solo"] > 10 * costs.forward_flops["tv"]
    lines = render(cfg, costs).splitlines()
    assert any(line.split()[:1] == ["tv"] and line.endswith("no training") for line in lines)


REHEARSAL = REPO / "configs" / "rehearsal.yaml"


@pytest.mark.e2e
def test_a_rehearsal_of_the_paper_study_moves_the_bytes_the_plan_predicts(tmp_path):
    """The paper's shape (ResNet-50, 68 layers per run, 3 views, 10 passes, every comparison
    kind) on a few hundred images with one seed per method (the byte accounting is per job;
    `make rehearsal` runs all three seeds), end to end: the bytes every stage read and wrote,
    as its log reports them (counted by the stores' and files' readers and writers,
    `ckaflow.bytecount`), are the plan's within 5 %, for every figure the plan calls exact."""
    import yaml

    from ckaflow.bytecount import parse
    from ckaflow.stage_costs import stage_costs

    study = tmp_path / "rehearsal.yaml"
    study.write_text(yaml.safe_dump(yaml.safe_load(REHEARSAL.read_text()) | {"seeds": [0]}))
    result = subprocess.run(
        snakemake_cmd(tmp_path, study), capture_output=True, text=True, env=ENV, timeout=2400
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    cfg = config.load(study)
    predicted = {s.stage: s for s in stage_costs(cfg, study_costs(cfg))}
    logs = tmp_path / "results" / "logs"
    assert set(predicted) <= {p.name for p in logs.iterdir()}
    for stage, cost in predicted.items():
        counts = [parse(p.read_text()) for p in (logs / stage).glob("*.log")]
        read, written = (sum(c[i] for c in counts) for i in (0, 1))
        for what, measured in (("read", read), ("written", written)):
            if what not in cost.estimated:  # compressed tables are estimates (≈ in the plan)
                want = getattr(cost, what)
                assert measured == pytest.approx(want, rel=0.05), (stage, what, measured, want)
    assert predicted["gram"].jobs == 6 and predicted["cka"].read == sum(
        study_costs(cfg).gram_store_bytes.values()
    )
