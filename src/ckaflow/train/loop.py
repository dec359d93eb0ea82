"""The training loop shared by every method: seeded batches, schedule, full-state checkpoints.

A checkpoint holds everything the next step depends on (weights, optimiser, schedule, grad
scaler, the epoch's generator state, the position inside the epoch, the RNGs, the epoch's
running sums), so a run interrupted mid-epoch and resumed ends with the same weights, bit for
bit on the CPU, as a run that was never interrupted.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from ckaflow import evaluate
from ckaflow.augment import hash_seed, take_rows
from ckaflow.config import AugmentSpec, ModelSpec, RunSpec, stable_hash, to_jsonable
from ckaflow.data import open_prepared
from ckaflow.errors import CheckpointError, UnsafeFileError
from ckaflow.models import Network, forward_settings, resolve_device
from ckaflow.provenance import atomic_path, provenance
from ckaflow.train import checkpoint, distributed
from ckaflow.train.optim import make_optimizer, make_schedule
from ckaflow.train.simclr import SimCLR
from ckaflow.train.supervised import Supervised

METHODS = {"simclr": SimCLR, "supervised": Supervised}
PROGRESS_EVERY_S = 30.0


@dataclass(frozen=True)
class CheckpointPolicy:
    """When to write a mid-epoch checkpoint (one is always written at the end of each epoch).
    Not part of a run's identity: changing it never retrains."""

    every_min: float = 10.0
    every_steps: int | None = None

    def due(self, steps_since: int, seconds_since: float) -> bool:
        if self.every_steps is not None and steps_since >= self.every_steps:
            return True
        return seconds_since >= 60 * self.every_min


def build_network(method: str, spec: ModelSpec, data_attrs: dict, head_outputs: int) -> Network:
    channels, size, _ = data_attrs["image_shape"]
    return Network(method, spec, channels, size, head_outputs)


def initial_network(run: RunSpec, data_attrs: dict) -> Network:
    """The run's network as training starts (seeded): also the untrained probe baseline."""
    method = METHODS[run.method](run.recipe, None)
    torch.manual_seed(init_seed(run))
    return build_network(
        run.method, run.model, data_attrs, method.head_outputs(data_attrs["num_classes"])
    )


def init_seed(run: RunSpec) -> int:
    """The torch seed of the run's initial weights (`model.init` in the config)."""
    if run.model.init == "shared":
        return hash_seed(0, 0xC0FFEE)
    if run.model.init == "seed-and-method":
        method = sum(ord(c) << (8 * i) for i, c in enumerate(run.method[:7]))
        return hash_seed(run.seed, method, 0xC0FFEE)
    return hash_seed(run.seed, 0xC0FFEE)


def train_spec_hash(run: RunSpec, aug: AugmentSpec, data_hash: str) -> str:
    return stable_hash([to_jsonable(run), to_jsonable(aug), data_hash])


def _rng_state(dev: torch.device) -> dict:
    state = {"torch": torch.get_rng_state()}
    if dev.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(dev)
    return state


def _set_rng_state(state: dict, dev: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if dev.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], dev)


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    return f"{h}h{rem // 60:02d}m" if h else f"{rem // 60}m{rem % 60:02d}s"


def train_run(
    run: RunSpec,
    aug: AugmentSpec,
    data_path: str | Path,
    out_dir: str | Path,
    device: str = "auto",
    log=print,
    policy: CheckpointPolicy = CheckpointPolicy(),
    on_step: Callable[[int], None] | None = None,
) -> Path:
    """Train one run; resume from `out_dir/checkpoint.pt` if a matching one exists.

    Writes `model.pt` (weights + metadata) and `metrics.parquet` (one row per epoch).
    `on_step(global_step)` is called after every optimiser step (tests use it to interrupt).
    Under torchrun (WORLD_SIZE > 1) the processes split each batch; rank 0 writes.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    if dev.type == "cpu":
        torch.use_deterministic_algorithms(True)
    distributed.init_from_env(dev)
    main = distributed.is_main()
    data = open_prepared(data_path)
    attrs = data.attrs
    spec_hash = train_spec_hash(run, aug, attrs["spec_hash"])
    recipe = run.recipe
    method = METHODS[run.method](recipe, aug)

    net = initial_network(run, attrs).to(dev)
    # the GPU's forward (autocast, channels-last) can be rehearsed on the CPU by naming it
    amp_dtype, channels_last = forward_settings(recipe.precision, recipe.channels_last, dev)
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    # loss scaling only for fp16 (bf16 has float32's exponent range); "cpu" scaler exists too
    scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype is torch.float16)
    model = net
    if distributed.active():
        if dev.type == "cuda":  # SimCLR's global BatchNorm; gloo has no SyncBatchNorm
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[dev.index] if dev.type == "cuda" else None
        )

    images_np, labels_np = data.train()
    images = torch.from_numpy(images_np)
    labels = torch.from_numpy(labels_np)
    image_size = images.shape[-1]
    batch = min(recipe.batch_size, len(images))
    rows_here = distributed.local_slice(batch)
    steps_per_epoch = len(images) // batch  # drop the ragged last batch: NT-Xent wants full ones
    opt = make_optimizer(net, recipe)
    sched = make_schedule(opt, recipe, steps_per_epoch)

    def to_input(x: torch.Tensor) -> torch.Tensor:
        x = data.normalise(x)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    ckpt_path = out_dir / "checkpoint.pt"
    rows: list[dict] = []
    start_epoch, step0, sums, gen_state = 0, 0, None, None
    if ckpt_path.exists():
        try:
            state = checkpoint.load(
                ckpt_path, expect_spec_hash=spec_hash, expect_keys=checkpoint.TRAINING_KEYS
            )
        except UnsafeFileError:
            raise  # not damage: a file that is not ours sits where our checkpoint belongs
        except CheckpointError as err:
            log(f"ignoring checkpoint: {err}")
        else:
            net.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["schedule"])
            scaler.load_state_dict(state["scaler"])
            _set_rng_state(state["rng"], dev)
            start_epoch, step0 = state["epoch"], state["step_in_epoch"]
            rows, sums, gen_state = state["metrics"], state["epoch_sums"], state["generator"]
            log(f"resumed {run.run_id} from epoch {start_epoch} step {step0}/{steps_per_epoch}")

    def save(epoch: int, step_in_epoch: int, sums, gen: torch.Generator | None) -> None:
        if not main:
            return
        checkpoint.save(
            ckpt_path,
            {
                "model": net.state_dict(),
                "optimizer": opt.state_dict(),
                "schedule": sched.state_dict(),
                "scaler": scaler.state_dict(),
                "rng": _rng_state(dev),
                "generator": gen.get_state() if gen is not None else None,
                "epoch": epoch,
                "step_in_epoch": step_in_epoch,
                "epoch_sums": sums,
                "metrics": rows,
                "spec_hash": spec_hash,
                "run": run.run_id,
            },
        )

    autocast = torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
    last_save_t, last_save_step, last_log_t = time.monotonic(), 0, time.monotonic()
    global_step = start_epoch * steps_per_epoch + step0
    for epoch in range(start_epoch, recipe.epochs):
        model.train()
        gen = torch.Generator().manual_seed(hash_seed(run.seed, epoch, 0xDA7A))
        order = torch.randperm(len(images), generator=gen)
        if gen_state is not None:  # resuming inside this epoch: the generator as it was
            gen.set_state(gen_state)
            gen_state = None
        # running sums of the epoch: loss·images, correct, images, seconds (kept on the device
        # until a log line needs them, so the loop never waits on the GPU)
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        correct = torch.zeros((), dtype=torch.int64, device=dev)
        seen, seconds = 0, 0.0
        if sums is not None:
            loss_sum += sums["loss_sum"]
            correct += sums["correct"]
            seen, seconds = sums["seen"], sums["seconds"]
            sums = None
        t0 = time.perf_counter() - seconds
        for step in range(step0, steps_per_epoch):
            idx = order[step * batch : (step + 1) * batch]
            params = method.sample(batch, image_size, gen)  # the whole batch's, on every rank
            idx, params = idx[rows_here], take_rows(params, rows_here)
            pixels = images[idx].to(dev, non_blocking=True).float() / 255
            with autocast:
                loss, stats = method.loss(model, pixels, labels[idx].to(dev), params, to_input)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            loss_sum += loss.detach().double() * len(idx)
            if "correct" in stats:
                correct += stats["correct"]
            seen += len(idx)
            global_step += 1
            now = time.monotonic()
            if step + 1 < steps_per_epoch and policy.due(
                global_step - last_save_step, now - last_save_t
            ):
                epoch_sums = {
                    "loss_sum": loss_sum.item(),
                    "correct": int(correct.item()),
                    "seen": seen,
                    "seconds": time.perf_counter() - t0,
                }
                save(epoch, step + 1, epoch_sums, gen)
                last_save_t, last_save_step = now, global_step
            if now - last_log_t >= PROGRESS_EVERY_S and main:
                rate = seen / (time.perf_counter() - t0)
                left = (recipe.epochs * steps_per_epoch - global_step) * batch / rate
                log(
                    f"{run.run_id} epoch {epoch + 1}/{recipe.epochs} step {step + 1}/"
                    f"{steps_per_epoch} loss {loss.item():.4f} {rate:.0f} img/s "
                    f"eta {_duration(left)}"
                )
                last_log_t = now
            if on_step is not None:
                on_step(global_step)
        step0 = 0
        seconds = time.perf_counter() - t0
        loss_total, correct_total, seen_total = distributed.sum_all(
            [loss_sum.item(), float(correct.item()), float(seen)], dev
        )
        row = {
            "run": run.run_id,
            "epoch": epoch + 1,
            "loss": loss_total / seen_total,
            "lr": sched.get_last_lr()[0],
            "seconds": seconds,
            "images_per_s": seen_total / seconds,
        }
        if run.method == "supervised":
            row["train_accuracy"] = correct_total / seen_total
        rows.append(row)
        save(epoch + 1, 0, None, None)
        last_save_t, last_save_step = time.monotonic(), global_step
        if main:
            left = (recipe.epochs - epoch - 1) * seconds
            log(
                f"{run.run_id} epoch {epoch + 1}/{recipe.epochs} loss {row['loss']:.4f} "
                f"lr {row['lr']:.4g} {row['images_per_s']:.0f} img/s eta {_duration(left)}"
            )

    if not main:
        distributed.barrier()
        return out_dir / "model.pt"
    # final quality: weighted kNN of pooled features, train subset as the memory bank
    net.eval()
    bank = evaluate.encode(net, images, data.normalise, dev)
    queries = evaluate.encode(net, torch.from_numpy(data.view("clean")), data.normalise, dev)
    knn = evaluate.knn_accuracy(
        bank, labels, queries, torch.from_numpy(data.eval_labels()), attrs["num_classes"]
    )
    log(f"{run.run_id} kNN accuracy on the eval subset: {knn:.4f}")
    meta = provenance(
        kind="ckaflow.model",
        run=run.run_id,
        run_spec=to_jsonable(run),
        augment=to_jsonable(aug),
        spec_hash=spec_hash,
        data_spec_hash=attrs["spec_hash"],
        data_attrs={k: attrs[k] for k in ("dataset", "image_shape", "num_classes", "mean", "std")},
        head_outputs=method.head_outputs(attrs["num_classes"]),
        epochs=recipe.epochs,
        knn_accuracy=knn,
        device=str(dev),
        processes=distributed.world_size(),
        train_seconds=sum(r["seconds"] for r in rows),  # across resumes
    )
    metrics = pd.DataFrame(rows).assign(knn_accuracy=pd.NA)
    metrics.loc[metrics.index[-1], "knn_accuracy"] = knn
    with atomic_path(out_dir / "metrics.parquet") as scratch:
        metrics.astype({"knn_accuracy": "Float64"}).to_parquet(scratch, index=False)
    state = {"model": {k: v.cpu() for k, v in net.state_dict().items()}, "meta": meta}
    with atomic_path(out_dir / "model.pt") as scratch:
        torch.save(state, scratch)
    distributed.barrier()
    return out_dir / "model.pt"


def load_network(model_path: str | Path) -> tuple[Network, dict]:
    """Rebuild a trained network from `model.pt`, in eval mode."""
    state = checkpoint.load(Path(model_path))
    meta = state.get("meta")
    if not meta or "run_spec" not in meta:
        raise CheckpointError(
            f"{model_path}: a training checkpoint or foreign file, not a finished model.pt "
            "(it has no run metadata); rerun the train stage"
        )
    run = meta["run_spec"]
    net = build_network(
        run["method"], ModelSpec(**run["model"]), meta["data_attrs"], meta["head_outputs"]
    )
    net.load_state_dict(state["model"])
    return net.eval(), meta
