"""What a study will cost before anything runs (`ckaflow plan`): jobs per stage; per run and
view the bytes of its Gram store, of the activations it stores for inspection, and of what
storing every compared layer would take; the fused Gram stage's forward and Gram FLOPs (both
scale with `cka.passes`); what the CKA job reads and holds in memory; and the compute and
GPU-hours its training recipes imply.

Sizes come from the layer registry's arithmetic (ckaflow.layers.layer_features) and FLOPs from
one forward pass of the real network on PyTorch's meta device (no memory, no data), so a
paper-scale study is planned in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ckaflow import config as cfg
from ckaflow.cka.estimators import row_blocks
from ckaflow.cka.grams import gram_products
from ckaflow.cka.pairs import FULL_DATA_GROUPS
from ckaflow.gram_stores import packed_length
from ckaflow.layers import layer_features
from ckaflow.stage_costs import (
    DEFAULT_CPU_GFLOPS,
    DEFAULT_DISK_GBPS,
    Rates,
    render_stages,
    stage_costs,
)
from ckaflow.stages.gram import MEMORY_BYTES, _layer_groups
from ckaflow.study import LABELS, Side, Study

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# forward + backward ≈ 3 forward passes (the backward pass costs about twice the forward)
TRAIN_FLOPS_PER_FORWARD = 3
DEFAULT_GPU_TFLOPS = 40.0  # assumed sustained mixed-precision throughput of one GPU
U_CENTRING_FLOPS = 6  # per value of a block's Gram: unpack, U-centre, scale
TABLE_ROW_BYTES = 30  # a tidy-table row's columns but the jackknife, compressed (estimate)
WORK_BLOCKS = 4  # a streamed CKA job's working space, in blocks: see cka_job_memory


@dataclass(frozen=True)
class CkaJobCost:
    comparisons: int
    layer_pairs: int
    read_bytes: int
    memory_bytes: int
    flops: float = 0.0  # float64: every pair's per-block products, every block's U-centring
    table_bytes: int = 0  # an estimate: parquet compresses


@dataclass
class StudyCosts:
    jobs: dict[str, int]
    # per (run, view): bytes of every compared layer's activations (what storing them all would
    # take) and of those the study stores for inspection (activations.store)
    all_activation_bytes: dict[tuple[str, str], int]
    stored_bytes: dict[tuple[str, str], int]
    examples: int
    stored_examples: int
    gram_flops: float
    train_flops: dict[str, float]
    forward_flops: dict[str, float]
    gpu_tflops: float
    # the fused Gram stage: blocks per layer (all passes), forward FLOPs of all its passes,
    # Gram store bytes per (run, view) and for the labels ("labels", "labels"); the CKA job's
    # comparisons, layer pairs, bytes read and peak memory
    gram_blocks: int = 0
    gram_forward_flops: float = 0.0
    gram_store_bytes: dict[tuple[str, str], int] = field(default_factory=dict)
    cka_job: CkaJobCost = CkaJobCost(0, 0, 0, 0)
    gram_flops_by_view: dict[tuple[str, str], float] = field(default_factory=dict)  # all passes

    def gpu_hours(self, flops: float) -> float:
        return flops / (self.gpu_tflops * 1e12) / 3600

    @property
    def intermediate_bytes(self) -> int:
        """What the study keeps between the forward passes and CKA: Gram stores plus stored
        activations."""
        return sum(self.gram_store_bytes.values()) + sum(self.stored_bytes.values())


def gram_layer_cost(
    estimator: str, n: int, batch_size: int, passes: int, features: int
) -> tuple[int, float, int]:
    """(blocks, FLOPs, stored bytes) of one layer's Gram statistics, as the Gram stage
    (`ckaflow.stages.gram`, `ckaflow.cka.grams.gram_stats`) computes them.

    minibatch: 2·d·`gram_products`(m) FLOPs per block of m rows (about 1.5·m²·d: each block's
    symmetric Gram is formed as its upper triangle), in every pass. Full-data estimators: the
    n × n Gram from pairs of `batch_size`-row chunks, each pair below the diagonal once and
    each diagonal chunk as a block (about n²·d). Stored: each block's upper triangle, float32
    but for the RBF kernel (`ckaflow.gram_stores`).
    """
    itemsize = 8 if estimator == "rbf" else 4
    if estimator == "minibatch":
        rows = [r.stop - r.start for r in row_blocks(n, batch_size)]
        flops = 2.0 * features * passes * sum(gram_products(m) for m in rows)
        size = rows[0] if rows else 0
        return passes * len(rows), flops, passes * len(rows) * packed_length(size) * itemsize
    chunks = [min(batch_size, n - s) for s in range(0, n, batch_size)]
    below = (n * n - sum(c * c for c in chunks)) // 2  # the chunk pairs under the diagonal
    products = below + sum(gram_products(c) for c in chunks)
    return 1, 2.0 * features * products, packed_length(n) * itemsize


def cka_job_memory(
    estimator: str,
    layers: int,
    pairs: list[tuple[int, int]],
    blocks: int,
    size: int,
    bootstrap: int,
    tile_layers: int,
) -> int:
    """Peak bytes of one CKA job (`ckaflow.stages.cka.compute_comparisons`) over comparisons
    of `pairs` (La, Lb) layers, `layers` distinct layers in all, whose statistics are `blocks`
    Grams of size × size.

    minibatch, streamed block by block: one U-centred block of every layer, plus working space
    for the block being read (the chunk, its unpacked and U-centred copies: WORK_BLOCKS blocks),
    (layers + WORK_BLOCKS) · size² · 8; every comparison's per-block HSIC terms,
    blocks · (La · Lb + La + Lb) · 8; and, one comparison at a time, its bootstrap replicates
    and jackknife, (bootstrap + blocks) · La · Lb · 8. Full-data estimators (one n × n block)
    load tile_layers layers per side whole: their Grams, HSIC vectors and the stacked copy,
    3 · 2 · tile_layers · n² · 8.
    """
    block = size * size * 8
    if estimator != "minibatch":
        side = min(tile_layers, max(max(p) for p in pairs))
        return 3 * 2 * side * blocks * block
    terms = sum(blocks * (la * lb + la + lb) * 8 for la, lb in pairs)
    widest = max(la * lb for la, lb in pairs)
    return (layers + WORK_BLOCKS) * block + terms + (bootstrap + blocks) * widest * 8


def cka_job_reads(
    estimator: str, pairs: list[tuple[int, int]], layers: int, layer_bytes: int, tile_layers: int
) -> int:
    """Bytes of Gram statistics one CKA job reads (`ckaflow.stages.cka`): streamed
    (minibatch), each of its `layers` distinct layers once; full data, per comparison of
    La × Lb layers, each row tile's layers once and the column layers once per row tile."""
    if estimator == "minibatch":
        return layers * layer_bytes
    return sum((la + -(-la // tile_layers) * lb) * layer_bytes for la, lb in pairs)


def forward_flops(run: cfg.RunSpec, image_shape: tuple[int, int, int], classes: int) -> float:
    """FLOPs of one image through the run's network, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ckaflow.models import build_network

    channels, size, _ = run.fed_shape(image_shape)
    attrs = {"image_shape": image_shape, "num_classes": classes}
    with torch.device("meta"):
        net = build_network(run, attrs).eval()
        with FlopCounterMode(display=False) as counter:
            net(torch.empty(1, channels, size, size))
    return float(counter.get_total_flops())


def module_features(run: cfg.RunSpec, image_shape: tuple[int, int, int]) -> dict[str, int]:
    """Values per example of each layer of an imported module, from a forward pass on torch's
    meta device (no memory, no arithmetic)."""
    import torch

    from ckaflow.models import build_network, record_layers

    channels, size, _ = run.fed_shape(image_shape)
    with torch.device("meta"):
        net = build_network(run, {"image_shape": image_shape, "num_classes": 0}).eval()
        with record_layers(net) as got:
            net(torch.empty(1, channels, size, size))
    return {name: int(tensor.shape[1]) for name, tensor in got.items()}


def study_costs(config: dict[str, Any], gpu_tflops: float = DEFAULT_GPU_TFLOPS) -> StudyCosts:
    study = Study(config)
    image_shape, classes = cfg.dataset_shape(study.data)
    eval_size = study.data.eval_size
    n = eval_size if study.examples is None else min(study.examples, eval_size)
    kept = n if study.stored_examples is None else min(study.stored_examples, n)
    run_views = study.run_views()
    has_class = any(c.kind == "class" for c in study.comparisons.values())
    stores = study.activation_stores()
    jobs = _stage_jobs(study, len(run_views), len(stores), has_class)
    cka, dtype_bytes = study.cka, DTYPE_BYTES[config["activations"]["dtype"]]
    blocks, _, layer_store = gram_layer_cost(cka.estimator, n, cka.batch_size, cka.passes, 1)
    forward, train = _run_flops(study, image_shape, classes)
    all_bytes, stored, gram_store, by_view = {}, {}, {}, {}
    gram_flops, gram_forward = 0.0, 0.0
    for run_id, view in run_views:
        side = Side(run_id, view)
        sizes = _layer_sizes(study.runs[run_id], image_shape, classes)
        chosen = {layer.name: sizes[layer.name] for layer in study.layers(side)}
        all_bytes[(run_id, view)] = sum(chosen.values()) * n * dtype_bytes
        if stores:
            kept_values = sum(sizes[layer.name] for layer in study.stored_layers(side))
            stored[(run_id, view)] = kept_values * kept * dtype_bytes
        view_gram, view_forward = _view_gram_flops(cka, chosen, n, forward[run_id])
        gram_flops += view_gram
        gram_forward += view_forward
        by_view[(run_id, view)] = view_gram + view_forward
        gram_store[(run_id, view)] = len(chosen) * layer_store
    if has_class:
        gram_store[(LABELS, LABELS)] = layer_store
    size = row_blocks(n, cka.batch_size)[0].stop if cka.estimator == "minibatch" else n
    return StudyCosts(
        jobs,
        all_bytes,
        stored,
        n,
        kept,
        gram_flops,
        train,
        forward,
        gpu_tflops,
        gram_blocks=blocks,
        gram_forward_flops=gram_forward,
        gram_store_bytes=gram_store,
        cka_job=_cka_job(study, blocks, size, layer_store),
        gram_flops_by_view=by_view,
    )


def _stage_jobs(study: Study, views: int, stores: int, has_class: bool) -> dict[str, int]:
    """Jobs per stage of the workflow, for a study of `views` (run, view) pairs."""
    return {
        "prepare_data": 1,
        "train": sum(run.imported is None for run in study.runs.values()),
        "import_run": sum(run.imported is not None for run in study.runs.values()),
        "evaluate": len(study.runs),
        "gram (fused forward pass)": views + (1 if has_class else 0),
        "extract (stored activations)": stores,
        "cka (every comparison, one job)": 1,
        "merge, tables, figures, summary": 4,
    }


def _run_flops(
    study: Study, image_shape: tuple[int, int, int], classes: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Per run: FLOPs of one image's forward pass, and of its training here (none for an
    import, trained elsewhere)."""
    forward, train = {}, {}
    for run_id, run in study.runs.items():
        forward[run_id] = forward_flops(run, image_shape, classes)
        if run.imported is not None:  # trained elsewhere: no training here
            train[run_id] = 0.0
            continue
        views = 2 if run.method == "simclr" else 1
        images = study.data.train_size * run.recipe.epochs * views
        train[run_id] = TRAIN_FLOPS_PER_FORWARD * forward[run_id] * images
    return forward, train


def _layer_sizes(
    run: cfg.RunSpec, image_shape: tuple[int, int, int], classes: int
) -> dict[str, int]:
    """Values per example of each of the run's layers: an imported module's from its forward
    pass on the meta device, any other network's from the layer registry's arithmetic."""
    if run.imported is not None and run.imported.format == "module":
        return module_features(run, image_shape)
    model = run.model
    return layer_features(
        model.arch,
        model.width,
        run.fed_shape(image_shape)[1],
        run.head,
        run.head_outputs(classes),
        model.stem,
        model.stem_padding,
    )


def _view_gram_flops(
    cka: cfg.CkaSpec, chosen: dict[str, int], n: int, forward: float
) -> tuple[float, float]:
    """(Gram FLOPs, forward FLOPs) of one run and view in the fused Gram stage, all passes:
    `chosen` its compared layers' values per example, `forward` one image's forward pass."""
    products = sum(
        gram_layer_cost(cka.estimator, n, cka.batch_size, cka.passes, width)[1]
        for width in chosen.values()
    )
    # minibatch: every pass forwards every example; full data: one pass per layer group
    forwards = (
        cka.passes if cka.estimator == "minibatch" else len(_layer_groups(chosen, n, MEMORY_BYTES))
    )
    return products, forwards * n * forward


def _cka_job(study: Study, blocks: int, size: int, layer_bytes: int) -> CkaJobCost:
    cka, comparisons = study.cka, list(study.comparisons.values())
    pairs = [(len(study.layers(c.a)), len(study.layers(c.b))) for c in comparisons]
    layers = sum(len(study.layers(side)) for side in study.sides())
    rows = sum(la * lb for la, lb in pairs)
    replicates = blocks // cka.passes if cka.estimator == "minibatch" else FULL_DATA_GROUPS
    return CkaJobCost(
        len(comparisons),
        rows,
        cka_job_reads(cka.estimator, pairs, layers, layer_bytes, cka.tile_layers),
        cka_job_memory(cka.estimator, layers, pairs, blocks, size, cka.bootstrap, cka.tile_layers),
        flops=blocks * size * size * (2.0 * rows + U_CENTRING_FLOPS * layers),
        table_bytes=rows * (replicates * 8 + TABLE_ROW_BYTES),
    )


def _si(value: float, unit: str) -> str:
    """1234567 B -> '1.2 MB'; 2.6e9 FLOP -> '2.6 GFLOP'."""
    for prefix in ("", "k", "M", "G", "T", "P"):
        if abs(value) < 1000 or prefix == "P":
            return f"{value:.1f} {prefix}{unit}"
        value /= 1000
    raise AssertionError("unreachable")


def render(config: dict[str, Any], costs: StudyCosts) -> str:
    runs = list(costs.train_flops)
    lines = [f"study {config['study']}: {len(runs)} runs, backend {config['backend']}", ""]
    lines.append("jobs per stage:")
    lines += [f"  {stage:<34} {count:>7}" for stage, count in costs.jobs.items()]
    lines.append(f"  {'total':<34} {sum(costs.jobs.values()):>7}")
    names = [f"{run}/{view}" for run, view in sorted(costs.all_activation_bytes)]
    pad = max(len(name) for name in [*names, *runs, LABELS]) + 2
    lines += ["", *_render_gram(config, costs, pad), ""]
    lines += [*_render_cka(config, costs, pad), ""]
    lines += [*_render_bytes(config, costs, pad), ""]
    lines.append(f"training (GPU-hours at an assumed {costs.gpu_tflops:g} TFLOP/s sustained):")
    imported = {run_id for run_id, run in Study(config).runs.items() if run.imported}
    for run in runs:
        flops = costs.train_flops[run]
        cost = (
            f"{'imported: no training':>23}"
            if run in imported
            else f"{_si(flops, 'FLOP'):>12} {costs.gpu_hours(flops):10.2f} GPU-h"
        )
        lines.append(f"  {run:<{pad}} {_si(costs.forward_flops[run], 'FLOP'):>12}/image {cost}")
    total = sum(costs.train_flops.values())
    lines.append(
        f"  {'total':<{pad}} {'':>18} {_si(total, 'FLOP'):>12} {costs.gpu_hours(total):10.2f} GPU-h"
    )
    return "\n".join(lines)


def _render_gram(config: dict[str, Any], costs: StudyCosts, pad: int) -> list[str]:
    cka = config["cka"]
    if cka["estimator"] == "minibatch":
        how = (
            f"minibatch, batch {cka['batch_size']}, {cka['passes']} "
            f"pass{'es' if cka['passes'] > 1 else ''}: {costs.gram_blocks} blocks per layer"
        )
    else:
        how = f"{cka['estimator']}: one {costs.examples} x {costs.examples} Gram per layer"
    forward, gram = costs.gram_forward_flops, costs.gram_flops
    return [
        f"Gram statistics during the forward pass ({how}), {costs.examples} examples:",
        f"  {'forward passes':<{pad}} {_si(forward, 'FLOP'):>12}"
        f"  {costs.gpu_hours(forward):8.2f} GPU-h",
        f"  {'Gram products':<{pad}} {_si(gram, 'FLOP'):>12}  {costs.gpu_hours(gram):8.2f} GPU-h",
    ]


def _render_cka(config: dict[str, Any], costs: StudyCosts, pad: int) -> list[str]:
    job = costs.cka_job
    how = (
        "streamed: each Gram store read once"
        if config["cka"]["estimator"] == "minibatch"
        else f"full data: {config['cka']['tile_layers']} layers per side in memory at once"
    )
    stores = sum(costs.gram_store_bytes.values())
    share = job.read_bytes / stores if stores else 0.0
    return [
        f"CKA, one job ({how}):",
        f"  {'comparisons':<{pad}} {job.comparisons:>12,}",
        f"  {'layer pairs':<{pad}} {job.layer_pairs:>12,}",
        f"  {'bytes read':<{pad}} {_si(job.read_bytes, 'B'):>12}  = {share:.2f}x the Gram stores",
        f"  {'peak memory':<{pad}} {_si(job.memory_bytes, 'B'):>12}",
    ]


def _render_bytes(config: dict[str, Any], costs: StudyCosts, pad: int) -> list[str]:
    dtype = config["activations"]["dtype"]
    lines = [
        f"bytes per run and view: Gram store | activations stored ({dtype}, "
        f"{costs.stored_examples if costs.stored_bytes else 0} examples) | every layer's "
        f"activations, were they stored ({costs.examples} examples, before compression):"
    ]
    for key in sorted(costs.all_activation_bytes):
        gram = _si(costs.gram_store_bytes[key], "B")
        kept = _si(costs.stored_bytes.get(key, 0), "B")
        lines.append(
            f"  {key[0] + '/' + key[1]:<{pad}} {gram:>12} {kept:>12} "
            f"{_si(costs.all_activation_bytes[key], 'B'):>12}"
        )
    if (LABELS, LABELS) in costs.gram_store_bytes:
        lines.append(f"  {LABELS:<{pad}} {_si(costs.gram_store_bytes[(LABELS, LABELS)], 'B'):>12}")
    grams, kept = sum(costs.gram_store_bytes.values()), sum(costs.stored_bytes.values())
    everything = sum(costs.all_activation_bytes.values())
    lines.append(
        f"  {'total':<{pad}} {_si(grams, 'B'):>12} {_si(kept, 'B'):>12} {_si(everything, 'B'):>12}"
    )
    share = costs.intermediate_bytes / everything if everything else 0.0
    lines.append(
        f"  intermediate bytes (Gram stores + stored activations): "
        f"{_si(costs.intermediate_bytes, 'B')} = {share:.2f} of storing every layer's activations"
    )
    return lines


def plan(
    config_path: str,
    gpu_tflops: float = DEFAULT_GPU_TFLOPS,
    gpus: int = 1,
    cpu_gflops: float = DEFAULT_CPU_GFLOPS,
    disk_gbps: float = DEFAULT_DISK_GBPS,
) -> str:
    config = cfg.load(config_path)
    costs = study_costs(config, gpu_tflops)
    stages = stage_costs(config, costs)
    rates = Rates(gpus, gpu_tflops, cpu_gflops, disk_gbps)
    return "\n".join([render(config, costs), "", *render_stages(stages, rates, _si)])
