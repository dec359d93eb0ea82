"""What a study will cost before anything runs (`ckaflow plan`): jobs per stage, activation
bytes per run and view, the Gram stage's FLOPs, reads and store bytes (all scale with
`cka.passes`), the memory of one CKA tile, and the compute and GPU-hours its training recipes
imply.

Sizes come from the layer registry's arithmetic (ckaflow.layers.layer_features) and FLOPs from
one forward pass of the real network on PyTorch's meta device (no memory, no data), so a
paper-scale study is planned in seconds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ckaflow import config as cfg
from ckaflow.cka.estimators import row_blocks
from ckaflow.cka.stats import PANEL_BYTES
from ckaflow.layers import layer_features
from ckaflow.plan import LABELS, Side, Study

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# forward + backward ≈ 3 forward passes (the backward pass costs about twice the forward)
TRAIN_FLOPS_PER_FORWARD = 3
DEFAULT_GPU_TFLOPS = 40.0  # assumed sustained mixed-precision throughput of one GPU
WORK_BLOCKS = 4  # a streamed tile's working space, in blocks: see tile_memory


@dataclass
class StudyCosts:
    jobs: dict[str, int]
    store_bytes: dict[tuple[str, str], int]
    examples: int
    gram_flops: float
    train_flops: dict[str, float]
    forward_flops: dict[str, float]
    gpu_tflops: float
    notes: list[str] = field(default_factory=list)
    # the Gram stage: blocks per layer (all passes), bytes read from the activation stores,
    # Gram store bytes per (run, view) and for the labels ("labels", "labels"), peak memory of
    # one CKA tile (`tile_memory`)
    gram_blocks: int = 0
    gram_read_bytes: float = 0.0
    gram_store_bytes: dict[tuple[str, str], int] = field(default_factory=dict)
    tile_bytes: int = 0

    def gpu_hours(self, flops: float) -> float:
        return flops / (self.gpu_tflops * 1e12) / 3600


def gram_layer_cost(
    estimator: str, n: int, batch_size: int, passes: int, features: int, value_bytes: int
) -> tuple[int, float, float, int]:
    """(blocks, FLOPs, bytes read, stored bytes) of one layer's Gram statistics, as
    `ckaflow.cka.stats.gram_stats` computes them.

    minibatch: 2·m²·d FLOPs per block of m rows, in every pass; one pass reads the layer once, more
    passes read it once per column panel (`PANEL_BYTES` of float32, see `_partitioned_grams`).
    Full-data estimators: the n × n Gram from pairs of row chunks, 2·n²·d FLOPs; the layer is
    read once for the mean and each chunk again for every chunk pair it is in.
    """
    layer_bytes = n * features * value_bytes
    if estimator == "minibatch":
        rows = [r.stop - r.start for r in row_blocks(n, batch_size)]
        flops = 2.0 * features * passes * sum(m * m for m in rows)
        panels = 1 if passes == 1 else -(-n * features * 4 // PANEL_BYTES)
        size = rows[0] if rows else 0
        return passes * len(rows), flops, panels * layer_bytes, passes * len(rows) * size * size * 8
    chunks = -(-n // batch_size)
    return 1, 2.0 * n * n * features, (1 + (chunks + 1) / 2) * layer_bytes, n * n * 8


def tile_memory(
    estimator: str, layers_a: int, layers_b: int, blocks: int, size: int, bootstrap: int
) -> int:
    """Peak bytes of one CKA tile (`ckaflow.cka.tiles.compute_tile`) of layers_a × layers_b
    layers whose statistics are `blocks` Grams of size × size.

    minibatch, streamed block by block: one block of every layer, U-centred and stacked, plus
    working space for the block being read (the chunk, its U-centred copy: WORK_BLOCKS blocks),
    (layers_a + layers_b + WORK_BLOCKS) · size² · 8; the per-block HSIC terms,
    blocks · (layers_a · layers_b + layers_a + layers_b) · 8; the bootstrap replicates,
    bootstrap · layers_a · layers_b · 8. Full-data estimators (one n × n block) load every layer
    whole: its Grams, their HSIC vector and the stacked copy, 3 · (layers_a + layers_b) · n² · 8.
    """
    block = size * size * 8
    if estimator != "minibatch":
        return 3 * (layers_a + layers_b) * blocks * block
    pairs = layers_a * layers_b
    return (
        (layers_a + layers_b + WORK_BLOCKS) * block
        + blocks * (pairs + layers_a + layers_b) * 8
        + bootstrap * pairs * 8
    )


def forward_flops(run: cfg.RunSpec, image_shape: tuple[int, int, int], classes: int) -> float:
    """FLOPs of one image through the run's network, counted on the meta device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from ckaflow.models import Network

    channels, size, _ = image_shape
    out = run.recipe.proj_dim if run.method == "simclr" else classes
    with torch.device("meta"):
        net = Network(run.method, run.model, channels, size, out).eval()
        with FlopCounterMode(display=False) as counter:
            net(torch.empty(1, channels, size, size))
    return float(counter.get_total_flops())


def study_costs(config: dict[str, Any], gpu_tflops: float = DEFAULT_GPU_TFLOPS) -> StudyCosts:
    study = Study(config)
    image_shape, classes = cfg.DATASET_SHAPES[study.data.name]
    act = config["activations"]
    n = (
        study.data.eval_size
        if act["examples"] is None
        else min(act["examples"], study.data.eval_size)
    )
    run_views = study.run_views()
    has_class = any(c.kind == "class" for c in study.comparisons.values())
    jobs = {
        "prepare_data": 1,
        "train": len(study.runs),
        "evaluate": len(study.runs),
        "extract": len(run_views),
        "gram": len(run_views) + (1 if has_class else 0),
        "cka_tile": len(study.all_tiles()),
        "merge, tables, figures, summary": 4,
    }
    store_bytes, gram_flops, gram_read, gram_store = {}, 0.0, 0.0, {}
    cka, dtype_bytes = study.cka, DTYPE_BYTES[act["dtype"]]

    def gram_cost(features: int) -> tuple[int, float, float, int]:
        return gram_layer_cost(cka.estimator, n, cka.batch_size, cka.passes, features, dtype_bytes)

    blocks, _, _, layer_store = gram_cost(1)
    widest = 1
    for run_id, view in run_views:
        run = study.runs[run_id]
        head = run.recipe.proj_dim if run.method == "simclr" else classes
        sizes = layer_features(run.model.arch, run.model.width, image_shape[1], run.method, head)
        chosen = [layer.name for layer in study.layers(Side(run_id, view))]
        values = sum(sizes[name] for name in chosen)
        store_bytes[(run_id, view)] = values * n * dtype_bytes
        for name in chosen:
            _, flops, read, _ = gram_cost(sizes[name])
            gram_flops += flops
            gram_read += read
        gram_store[(run_id, view)] = len(chosen) * layer_store
        widest = max(widest, len(chosen))
    if has_class:
        gram_store[(LABELS, LABELS)] = layer_store
    side = min(cka.tile_layers, widest)  # a tile has up to tile_layers layers per side
    size = row_blocks(n, cka.batch_size)[0].stop if cka.estimator == "minibatch" else n
    tile_bytes = tile_memory(cka.estimator, side, side, blocks, size, cka.bootstrap)
    forward, train = {}, {}
    for run_id, run in study.runs.items():
        forward[run_id] = forward_flops(run, image_shape, classes)
        views = 2 if run.method == "simclr" else 1
        images = study.data.train_size * run.recipe.epochs * views
        train[run_id] = TRAIN_FLOPS_PER_FORWARD * forward[run_id] * images
    return StudyCosts(
        jobs,
        store_bytes,
        n,
        gram_flops,
        train,
        forward,
        gpu_tflops,
        gram_blocks=blocks,
        gram_read_bytes=gram_read,
        gram_store_bytes=gram_store,
        tile_bytes=tile_bytes,
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
    dtype = config["activations"]["dtype"]
    lines += ["", f"activations ({costs.examples} examples each, {dtype}, before compression):"]
    stores = {f"{run}/{view}": size for (run, view), size in sorted(costs.store_bytes.items())}
    pad = max(len(name) for name in [*stores, *runs]) + 2
    lines += [f"  {name:<{pad}} {_si(size, 'B'):>12}" for name, size in stores.items()]
    lines.append(f"  {'total':<{pad}} {_si(sum(stores.values()), 'B'):>12}")
    lines += ["", *_render_gram(config, costs, pad), ""]
    lines.append(f"training (GPU-hours at an assumed {costs.gpu_tflops:g} TFLOP/s sustained):")
    for run in runs:
        flops = costs.train_flops[run]
        lines.append(
            f"  {run:<{pad}} {_si(costs.forward_flops[run], 'FLOP'):>12}/image "
            f"{_si(flops, 'FLOP'):>12} {costs.gpu_hours(flops):10.2f} GPU-h"
        )
    total = sum(costs.train_flops.values())
    lines.append(
        f"  {'total':<{pad}} {'':>18} {_si(total, 'FLOP'):>12} {costs.gpu_hours(total):10.2f} GPU-h"
    )
    return "\n".join(lines)


def _render_gram(config: dict[str, Any], costs: StudyCosts, pad: int) -> list[str]:
    cka = config["cka"]
    activations = sum(costs.store_bytes.values())
    if cka["estimator"] == "minibatch":
        how = (
            f"minibatch, batch {cka['batch_size']}, {cka['passes']} "
            f"pass{'es' if cka['passes'] > 1 else ''}: {costs.gram_blocks} blocks per layer"
        )
    else:
        how = f"{cka['estimator']}: one {costs.examples} x {costs.examples} Gram per layer"
    lines = [f"Gram statistics ({how}):"]
    lines.append(f"  {'compute':<{pad}} {_si(costs.gram_flops, 'FLOP'):>12}")
    ratio = costs.gram_read_bytes / activations if activations else 0.0
    lines.append(
        f"  {'activations read':<{pad}} {_si(costs.gram_read_bytes, 'B'):>12}"
        f"  ({ratio:.2f} x the stores)"
    )
    stores = {
        (LABELS if run == LABELS else f"{run}/{view}"): size
        for (run, view), size in sorted(costs.gram_store_bytes.items())
    }
    lines.append("  stores (float64):")
    lines += [f"    {name:<{pad - 2}} {_si(size, 'B'):>12}" for name, size in stores.items()]
    lines.append(f"    {'total':<{pad - 2}} {_si(sum(stores.values()), 'B'):>12}")
    lines.append(f"  {'one CKA tile in memory':<{pad}} {_si(costs.tile_bytes, 'B'):>12}")
    return lines


def plan(config_path: str, gpu_tflops: float = DEFAULT_GPU_TFLOPS) -> str:
    config = cfg.load(config_path)
    return render(config, study_costs(config, gpu_tflops))
