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
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ckaflow import checkpoint, evaluate
from ckaflow.augment import hash_seed, take_rows
from ckaflow.config import AugmentSpec, RunSpec, stable_hash, to_jsonable
from ckaflow.data import open_prepared
from ckaflow.devices import resolve_device
from ckaflow.errors import CheckpointError, UnsafeFileError
from ckaflow.feed import feed_for
from ckaflow.models import forward_settings, initial_network
from ckaflow.provenance import atomic_path, provenance
from ckaflow.train import distributed
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
    trainer = Trainer(run, aug, data_path, out_dir, device, log)
    progress = trainer.resume()
    while progress.epoch < run.recipe.epochs:
        trainer.epoch(progress, policy, on_step)
    return trainer.finish(progress.rows)


@dataclass
class Progress:
    """Where training stands: the next epoch and step in it, the finished epochs' metrics, and,
    inside an interrupted epoch, its running sums and its generator's state."""

    epoch: int = 0
    step: int = 0
    rows: list[dict] = field(default_factory=list)
    sums: dict | None = None
    generator: torch.Tensor | None = None


@dataclass
class _EpochSums:
    """An epoch's running sums: loss·images, correct, images, and its start on the perf clock.
    Loss and correct stay on the device until a log line needs them, so the loop never waits on
    the GPU."""

    loss_sum: torch.Tensor
    correct: torch.Tensor
    seen: int
    t0: float

    @classmethod
    def from_saved(cls, saved: dict | None, dev: torch.device) -> _EpochSums:
        """Fresh sums, or those a mid-epoch checkpoint saved (`saved`, as from `saved()`)."""
        loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
        correct = torch.zeros((), dtype=torch.int64, device=dev)
        seen, seconds = 0, 0.0
        if saved is not None:
            loss_sum += saved["loss_sum"]
            correct += saved["correct"]
            seen, seconds = saved["seen"], saved["seconds"]
        return cls(loss_sum, correct, seen, time.perf_counter() - seconds)

    def add(self, loss: torch.Tensor, stats: dict, images: int) -> None:
        """One step's share: its mean loss over `images` images, and its correct count if any."""
        self.loss_sum += loss.detach().double() * images
        if "correct" in stats:
            self.correct += stats["correct"]
        self.seen += images

    def saved(self) -> dict:
        """The sums as plain numbers, for a checkpoint (waits on the device)."""
        return {
            "loss_sum": self.loss_sum.item(),
            "correct": int(self.correct.item()),
            "seen": self.seen,
            "seconds": time.perf_counter() - self.t0,
        }


class Trainer:
    """One process's training of one run: the network, its optimiser and data, and the steps
    `train_run` strings together (resume, epoch after epoch, finish). The order of every seeded
    call is fixed, so an interrupted and resumed run ends with the uninterrupted run's weights."""

    def __init__(
        self, run: RunSpec, aug: AugmentSpec, data_path, out_dir, device: str, log
    ) -> None:
        self.run, self.aug, self.log = run, aug, log
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.dev = dev = resolve_device(device)
        if dev.type == "cpu":
            torch.use_deterministic_algorithms(True)
        distributed.init_from_env(dev)
        self.main = distributed.is_main()
        self.data = open_prepared(data_path)
        self.spec_hash = train_spec_hash(run, aug, self.data.attrs["spec_hash"])
        recipe = run.recipe
        self.method = METHODS[run.method](recipe, aug)

        self.net = initial_network(run, self.data.attrs).to(dev)
        # the GPU's forward (autocast, channels-last) can be rehearsed on the CPU by naming it
        amp_dtype, self.channels_last = forward_settings(
            recipe.precision, recipe.channels_last, dev
        )
        if self.channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        # loss scaling only for fp16 (bf16 has float32's exponent range); "cpu" scaler exists too
        self.scaler = torch.amp.GradScaler(dev.type, enabled=amp_dtype is torch.float16)
        self.autocast = (
            torch.autocast(dev.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
        )
        self.model = self.net
        if distributed.active():
            if dev.type == "cuda":  # SimCLR's global BatchNorm; gloo has no SyncBatchNorm
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            self.model = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[dev.index] if dev.type == "cuda" else None
            )

        self.feed = feed_for(run, self.data.attrs)  # the run's resize and normalisation
        images, labels = self.data.train()
        self.images, self.labels = torch.from_numpy(images), torch.from_numpy(labels)
        self.batch = min(recipe.batch_size, len(self.images))
        self.rows_here = distributed.local_slice(self.batch)
        # drop the ragged last batch: NT-Xent wants full ones
        self.steps_per_epoch = len(self.images) // self.batch
        self.opt = make_optimizer(self.net, recipe)
        self.sched = make_schedule(self.opt, recipe, self.steps_per_epoch)
        self.ckpt_path = self.out_dir / "checkpoint.pt"
        now = time.monotonic()
        self.last_save_t, self.last_save_step, self.last_log_t = now, 0, now

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        x = self.feed(x)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    # -- resume ----------------------------------------------------------------------------
    def resume(self) -> Progress:
        """The state of a matching checkpoint loaded into the trainer, or a fresh start."""
        if not self.ckpt_path.exists():
            return Progress()
        try:
            state = checkpoint.load(
                self.ckpt_path,
                expect_spec_hash=self.spec_hash,
                expect_keys=checkpoint.TRAINING_KEYS,
            )
        except UnsafeFileError:
            raise  # not damage: a file that is not ours sits where our checkpoint belongs
        except CheckpointError as err:
            self.log(f"ignoring checkpoint: {err}")
            return Progress()
        self.net.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"], self.dev)
        progress = Progress(
            state["epoch"],
            state["step_in_epoch"],
            state["metrics"],
            state["epoch_sums"],
            state["generator"],
        )
        self.log(
            f"resumed {self.run.run_id} from epoch {progress.epoch} step {progress.step}/"
            f"{self.steps_per_epoch}"
        )
        return progress

    def save(self, progress: Progress) -> None:
        """A checkpoint of everything the next step depends on (rank 0 writes it)."""
        if not self.main:
            return
        checkpoint.save(
            self.ckpt_path,
            {
                "model": self.net.state_dict(),
                "optimizer": self.opt.state_dict(),
                "schedule": self.sched.state_dict(),
                "scaler": self.scaler.state_dict(),
                "rng": _rng_state(self.dev),
                "generator": progress.generator,
                "epoch": progress.epoch,
                "step_in_epoch": progress.step,
                "epoch_sums": progress.sums,
                "metrics": progress.rows,
                "spec_hash": self.spec_hash,
                "run": self.run.run_id,
            },
        )

    # -- one epoch -------------------------------------------------------------------------
    def epoch(self, progress: Progress, policy: CheckpointPolicy, on_step=None) -> None:
        """Train from `progress` to the end of its epoch; `progress` then points at the next."""
        recipe, epoch, steps = self.run.recipe, progress.epoch, self.steps_per_epoch
        self.model.train()
        gen = torch.Generator().manual_seed(hash_seed(self.run.seed, epoch, 0xDA7A))
        order = torch.randperm(len(self.images), generator=gen)
        if progress.generator is not None:  # resuming inside this epoch: the generator as it was
            gen.set_state(progress.generator)
        sums = _EpochSums.from_saved(progress.sums, self.dev)
        global_step = epoch * steps + progress.step
        for step in range(progress.step, steps):
            loss, stats, images = self._step(order, step, gen)
            sums.add(loss, stats, images)
            global_step += 1
            now = time.monotonic()
            if step + 1 < steps and policy.due(
                global_step - self.last_save_step, now - self.last_save_t
            ):
                self.save(Progress(epoch, step + 1, progress.rows, sums.saved(), gen.get_state()))
                self.last_save_t, self.last_save_step = now, global_step
            if now - self.last_log_t >= PROGRESS_EVERY_S and self.main:
                self._log_step(epoch, step, global_step, loss, sums)
                self.last_log_t = now
            if on_step is not None:
                on_step(global_step)
        row = self._epoch_row(epoch, sums)
        progress.rows.append(row)
        progress.epoch, progress.step, progress.sums, progress.generator = epoch + 1, 0, None, None
        self.save(progress)
        self.last_save_t, self.last_save_step = time.monotonic(), global_step
        if self.main:
            left = (recipe.epochs - epoch - 1) * row["seconds"]
            self.log(
                f"{self.run.run_id} epoch {epoch + 1}/{recipe.epochs} loss {row['loss']:.4f} "
                f"lr {row['lr']:.4g} {row['images_per_s']:.0f} img/s eta {_duration(left)}"
            )

    def _step(self, order: torch.Tensor, step: int, gen: torch.Generator):
        """One optimiser step on batch `step` of the epoch's `order`: its loss, the method's
        stats and this process's number of images."""
        batch, dev = self.batch, self.dev
        idx = order[step * batch : (step + 1) * batch]
        params = self.method.sample(batch, self.images.shape[-1], gen)  # the whole batch's
        idx, params = idx[self.rows_here], take_rows(params, self.rows_here)
        pixels = self.images[idx].to(dev, non_blocking=True).float() / 255
        with self.autocast:
            loss, stats = self.method.loss(
                self.model, pixels, self.labels[idx].to(dev), params, self.to_input
            )
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        return loss, stats, len(idx)

    def _log_step(
        self, epoch: int, step: int, global_step: int, loss: torch.Tensor, sums: _EpochSums
    ) -> None:
        """A progress line inside the epoch: the step's loss, the throughput, the time left."""
        recipe, steps = self.run.recipe, self.steps_per_epoch
        rate = sums.seen / (time.perf_counter() - sums.t0)
        left = (recipe.epochs * steps - global_step) * self.batch / rate
        self.log(
            f"{self.run.run_id} epoch {epoch + 1}/{recipe.epochs} step {step + 1}/{steps} "
            f"loss {loss.item():.4f} {rate:.0f} img/s eta {_duration(left)}"
        )

    def _epoch_row(self, epoch: int, sums: _EpochSums) -> dict:
        """The finished epoch's metrics row, its sums added up over all processes."""
        seconds = time.perf_counter() - sums.t0
        loss_total, correct_total, seen_total = distributed.sum_all(
            [sums.loss_sum.item(), float(sums.correct.item()), float(sums.seen)], self.dev
        )
        row = {
            "run": self.run.run_id,
            "epoch": epoch + 1,
            "loss": loss_total / seen_total,
            "lr": self.sched.get_last_lr()[0],
            "seconds": seconds,
            "images_per_s": seen_total / seconds,
        }
        if self.run.method == "supervised":
            row["train_accuracy"] = correct_total / seen_total
        return row

    # -- finish ----------------------------------------------------------------------------
    def finish(self, rows: list[dict]) -> Path:
        """The final quality (weighted kNN of pooled features, the training subset as the
        memory bank), then `metrics.parquet` and `model.pt`, each written whole or not at all."""
        model_path = self.out_dir / "model.pt"
        if not self.main:
            distributed.barrier()
            return model_path
        run, attrs, net, dev = self.run, self.data.attrs, self.net, self.dev
        net.eval()
        bank = evaluate.encode(net, self.images, self.feed, dev)
        clean = torch.from_numpy(self.data.view("clean"))
        queries = evaluate.encode(net, clean, self.feed, dev)
        eval_labels = torch.from_numpy(self.data.eval_labels())
        knn = evaluate.knn_accuracy(bank, self.labels, queries, eval_labels, attrs["num_classes"])
        self.log(f"{run.run_id} kNN accuracy on the eval subset: {knn:.4f}")
        meta = provenance(
            kind="ckaflow.model",
            run=run.run_id,
            run_spec=to_jsonable(run),
            augment=to_jsonable(self.aug),
            spec_hash=self.spec_hash,
            data_spec_hash=attrs["spec_hash"],
            data_attrs={
                k: attrs[k] for k in ("dataset", "image_shape", "num_classes", "mean", "std")
            },
            head_outputs=run.head_outputs(attrs["num_classes"]),
            epochs=run.recipe.epochs,
            knn_accuracy=knn,
            device=str(dev),
            processes=distributed.world_size(),
            train_seconds=sum(r["seconds"] for r in rows),  # across resumes
        )
        metrics = pd.DataFrame(rows).assign(knn_accuracy=pd.NA)
        metrics.loc[metrics.index[-1], "knn_accuracy"] = knn
        with atomic_path(self.out_dir / "metrics.parquet") as scratch:
            metrics.astype({"knn_accuracy": "Float64"}).to_parquet(scratch, index=False)
        state = {"model": {k: v.cpu() for k, v in net.state_dict().items()}, "meta": meta}
        with atomic_path(model_path) as scratch:
            torch.save(state, scratch)
        distributed.barrier()
        return model_path
