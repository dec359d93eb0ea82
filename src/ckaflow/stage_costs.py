"""Per stage of a study: the bytes it will write and read, and how long it will take on the
machine that runs Snakemake and on N GPUs; and the wall-clock critical path (`ckaflow plan`).

Bytes are predicted as `ckaflow.bytecount` counts them (Zarr arrays at their logical size,
files at their size), so that a run's logs can be held against the plan (`tests/test_plan.py`
runs a study of the paper's shape and checks every figure not marked ≈). Tables are compressed
(parquet) or text (CSV): their sizes are estimates, marked ≈. Training is predicted to write one
checkpoint per epoch: a run whose epochs outlast `checkpoint.every_min` writes more.

Times are estimates from stated rates, not measurements: GPU stages at the plan's sustained
TFLOP/s, the CKA job's float64 products and the machine running Snakemake at `cpu_gflops`, every
byte at `disk_gbps`. The critical path runs the stages in their order, each GPU stage's jobs
packed onto N GPUs (longest first), so it is what the DAG allows, not a promise of the queue.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ckaflow import config as cfg
from ckaflow.study import Side, Study

LABEL_BYTES = 8  # labels and example ids are int64 in the data store
TENSOR_OVERHEAD = 300  # bytes torch.save adds per tensor (zip entry, alignment, pickle)
PROBE_ROW_BYTES = 100  # a probes table's row, compressed (estimate)
CSV_ROW_BYTES = 550  # the tidy table's row as CSV text, without the jackknife (estimate)
RNG_BYTES = 2 * 5056  # the torch generator states a checkpoint keeps (CPU)
# optimiser tensors per parameter tensor, each of its size (momentum; AdamW's two moments)
OPTIMIZER_STATES = {"sgd": 1, "lars": 1, "adamw": 2}
DEFAULT_CPU_GFLOPS = 50.0
DEFAULT_DISK_GBPS = 1.0
GPU_STAGES = ("train", "evaluate", "gram", "extract")


@dataclass
class StageCost:
    stage: str
    written: int = 0
    read: int = 0
    # "read", "written": figures that are estimates (compressed tables), not exact predictions
    estimated: frozenset[str] = frozenset()
    flops: list[float] = field(default_factory=list)  # per job
    job_bytes: list[int] = field(default_factory=list)  # per job, read + written

    @property
    def jobs(self) -> int:
        return len(self.flops)

    def add_job(self, flops: float, read: int, written: int) -> None:
        self.flops.append(flops)
        self.job_bytes.append(read + written)
        self.read += read
        self.written += written

    def job_seconds(self, tflops: float, disk_gbps: float) -> list[float]:
        return [
            f / (tflops * 1e12) + b / (disk_gbps * 1e9)
            for f, b in zip(self.flops, self.job_bytes, strict=True)
        ]


@dataclass(frozen=True)
class NetworkBytes:
    """What a network's state dict holds: its tensors and their bytes (on the meta device)."""

    tensors: int
    state: int
    params: int  # trainable parameter tensors
    param_bytes: int

    @property
    def model_file(self) -> int:
        """model.pt: the state dict and a little metadata."""
        return self.state + self.tensors * TENSOR_OVERHEAD

    def checkpoint_file(self, optimizer: str) -> int:
        """checkpoint.pt: the state dict, the optimiser's tensors, the RNG states."""
        states = OPTIMIZER_STATES[optimizer]
        tensors = self.tensors + states * self.params
        return self.state + states * self.param_bytes + tensors * TENSOR_OVERHEAD + RNG_BYTES


def network_bytes(run: cfg.RunSpec, image_shape, classes: int) -> NetworkBytes:
    import torch

    from ckaflow.models import build_network

    with torch.device("meta"):
        net = build_network(run, {"image_shape": image_shape, "num_classes": classes})
    state = net.state_dict()
    params = [p for p in net.parameters() if p.requires_grad]
    return NetworkBytes(
        len(state),
        sum(t.numel() * t.element_size() for t in state.values()),
        len(params),
        sum(p.numel() * p.element_size() for p in params),
    )


def stage_costs(config: dict[str, Any], costs) -> list[StageCost]:
    """Every stage's bytes and per-job FLOPs for a study whose `ckaflow.plan.StudyCosts` are
    `costs`."""
    study = Study(config)
    image_shape, classes = cfg.dataset_shape(study.data)
    image = math.prod(image_shape)
    train_n, eval_n = study.data.train_size, study.data.eval_size
    train_data = train_n * (image + LABEL_BYTES)
    clean = eval_n * image + eval_n * LABEL_BYTES  # the clean view and the eval labels
    prepare = StageCost("prepare_data")
    prepare.add_job(
        0.0, 0, train_n * (image + 2 * LABEL_BYTES) + eval_n * (3 * image + 2 * LABEL_BYTES)
    )
    stages = {s: StageCost(s) for s in ("train", "import_run", "evaluate", "gram", "extract")}
    stages["evaluate"].estimated = frozenset({"written"})  # the probes table
    nets = {r: network_bytes(run, image_shape, classes) for r, run in study.runs.items()}
    for run_id, run in study.runs.items():
        net = nets[run_id]
        if run.imported is None:
            saves = run.recipe.epochs * net.checkpoint_file(run.recipe.optimizer)
            stages["train"].add_job(
                costs.train_flops[run_id], train_data + clean, saves + net.model_file
            )
        else:
            stages["import_run"].add_job(0.0, 0, net.model_file)
        forwards = 2 * (train_n + eval_n) * costs.forward_flops[run_id]  # trained and untrained
        probes = 2 * len(study.layers(Side(run_id, "clean"))) * PROBE_ROW_BYTES
        stages["evaluate"].add_job(forwards, net.model_file + train_data + clean, probes)
    n = costs.examples
    for run_id, view in study.run_views():
        model = nets[run_id].model_file
        written = costs.gram_store_bytes[(run_id, view)]
        flops = costs.gram_flops_by_view[(run_id, view)]
        stages["gram"].add_job(flops, model + n * image, written)
        if costs.stored_bytes:  # the stored examples, and one for the layers' widths
            kept = costs.stored_examples
            stored = costs.stored_bytes[(run_id, view)]
            flops = kept * costs.forward_flops[run_id]
            stages["extract"].add_job(flops, model + (kept + 1) * image, stored)
    labels = StageCost("gram_labels")
    if ("labels", "labels") in costs.gram_store_bytes:
        labels.add_job(0.0, eval_n * LABEL_BYTES, costs.gram_store_bytes[("labels", "labels")])
    cka = StageCost("cka", estimated=frozenset({"written"}))  # a compressed table
    cka.add_job(costs.cka_job.flops, costs.cka_job.read_bytes, 2 * costs.cka_job.table_bytes)
    merge = StageCost("merge_tables", estimated=frozenset({"read", "written"}))
    csv = costs.cka_job.layer_pairs * CSV_ROW_BYTES
    merge.add_job(0.0, costs.cka_job.table_bytes, costs.cka_job.table_bytes + csv)
    out = [prepare, *stages.values(), labels, cka, merge]
    return [s for s in out if s.jobs]


def lpt_makespan(seconds: list[float], workers: int) -> float:
    """The finishing time of jobs packed longest first onto `workers` identical workers."""
    loads = [0.0] * max(1, workers)
    for t in sorted(seconds, reverse=True):
        loads[loads.index(min(loads))] += t
    return max(loads)


@dataclass(frozen=True)
class Rates:
    gpus: int
    gpu_tflops: float
    cpu_gflops: float
    disk_gbps: float

    def here(self, stage: StageCost) -> float:
        """Seconds of the stage's jobs one after another on the machine running Snakemake."""
        return sum(stage.job_seconds(self.cpu_gflops / 1000, self.disk_gbps))

    def on_gpus(self, stages: list[StageCost]) -> float:
        """Seconds of GPU stages' jobs packed onto the GPUs; other stages run as `here`."""
        seconds = [
            t
            for s in stages
            if s.stage in GPU_STAGES
            for t in s.job_seconds(self.gpu_tflops, self.disk_gbps)
        ]
        light = sum(self.here(s) for s in stages if s.stage not in GPU_STAGES)
        return light + (lpt_makespan(seconds, self.gpus) if seconds else 0.0)


def critical_path(stages: list[StageCost], rates: Rates) -> tuple[float, float]:
    """Seconds from nothing to the tables, (here, on the GPUs): on the GPUs, training (and
    imports), then the forward-pass stages sharing the GPUs, with the light stages (data, CKA,
    merge) in between; here, every job one after another."""
    by = {s.stage: s for s in stages}
    waves = [["prepare_data", "train", "import_run"], ["evaluate", "gram", "extract"]]
    waves.append(["gram_labels", "cka", "merge_tables"])
    on_gpus = sum(rates.on_gpus([by[n] for n in wave if n in by]) for wave in waves)
    return sum(rates.here(s) for s in stages), on_gpus


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def render_stages(stages: list[StageCost], rates: Rates, si) -> list[str]:
    gpus = f"{rates.gpus} GPU{'s' if rates.gpus > 1 else ''}"
    lines = [
        f"per stage: bytes written and read (≈: compressed tables, an estimate), and time on "
        f"the machine running Snakemake (CPU at {rates.cpu_gflops:g} GFLOP/s) and on {gpus} "
        f"({rates.gpu_tflops:g} TFLOP/s each); disk at {rates.disk_gbps:g} GB/s:",
        f"  {'stage':<16} {'jobs':>4} {'written':>11} {'read':>11} {'here':>10} {gpus:>10}",
    ]
    for s in stages:
        written, read = (
            ("≈" if what in s.estimated else "") + si(getattr(s, what), "B")
            for what in ("written", "read")
        )
        lines.append(
            f"  {s.stage:<16} {s.jobs:>4} {written:>11} {read:>11}"
            f" {_duration(rates.here(s)):>10} {_duration(rates.on_gpus([s])):>10}"
        )
    here, on_gpus = critical_path(stages, rates)
    lines.append(
        f"  critical path: {_duration(here)} here (one job at a time), {_duration(on_gpus)} "
        f"on {gpus}"
    )
    return lines
