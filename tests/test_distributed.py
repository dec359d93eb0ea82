"""Data-parallel SimCLR on the CPU with two real gloo processes."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ckaflow.train import distributed
from ckaflow.train.losses import nt_xent

BATCH, DIM, WORLD = 8, 6, 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _inputs():
    gen = torch.Generator().manual_seed(7)
    x1, x2 = torch.randn(BATCH, DIM, generator=gen), torch.randn(BATCH, DIM, generator=gen)
    weight = torch.randn(DIM, 5, generator=gen)
    return x1, x2, weight


def _loss_and_grad(x1, x2, weight):
    w = weight.clone().requires_grad_(True)
    loss = nt_xent(x1 @ w, x2 @ w, temperature=0.5)
    loss.backward()
    return loss.detach(), w.grad


def _worker(rank: int, port: int, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank)
    )
    assert distributed.init_from_env(torch.device("cpu"))
    x1, x2, weight = _inputs()
    rows = distributed.local_slice(BATCH)
    loss, grad = _loss_and_grad(x1[rows], x2[rows], weight)
    # what DDP does with the gradients: average them over the processes
    dist.all_reduce(grad)
    dist.all_reduce(loss)
    torch.save({"loss": loss / WORLD, "grad": grad / WORLD}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_processes_give_the_loss_and_gradient_of_one_process_on_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    whole_loss, whole_grad = _loss_and_grad(*_inputs())
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert torch.allclose(got["loss"], whole_loss, atol=1e-6)
        assert torch.allclose(got["grad"], whole_grad, atol=1e-6)
    # without the gathered negatives the two would differ: the test can fail
    x1, x2, weight = _inputs()
    half_loss, _ = _loss_and_grad(x1[: BATCH // 2], x2[: BATCH // 2], weight)
    assert not torch.allclose(half_loss, whole_loss, atol=1e-3)


def test_a_batch_that_does_not_split_evenly_is_refused(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    try:
        distributed.local_slice(8)
    except ValueError as err:
        assert "split evenly" in str(err)
    else:
        raise AssertionError("expected a ValueError")


def _train_worker(rank: int, port: int, prepared: str, out: str) -> None:
    """One rank of a real two-process run of `train_run`; saves what its own network holds at
    the start, after the first optimiser step and at the end, to compare across ranks."""
    from ckaflow import config
    from ckaflow.train.loop import train_run
    from tests.conftest import tiny_config

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank)
    )
    torch.set_num_threads(1)
    seen: dict = {}

    def snapshot() -> dict:
        net = seen["net"]
        return {k: v.detach().clone() for k, v in [*net.named_parameters(), *net.named_buffers()]}

    class Recording(torch.nn.parallel.DistributedDataParallel):
        """DDP that keeps the network it wraps: the one this rank trains (this process only)."""

        def __init__(self, module, *args, **kwargs):
            super().__init__(module, *args, **kwargs)
            seen["net"] = module
            seen["start"] = snapshot()

    def on_step(step: int) -> None:
        if step == 1:
            seen["step1"] = snapshot()

    torch.nn.parallel.DistributedDataParallel = Recording
    cfg = tiny_config(recipes={"simclr": {"epochs": 1, "batch_size": 64, "optimizer": "lars"}})
    run = next(r for r in config.run_specs(cfg) if r.method == "simclr")
    aug = config.augment_spec(cfg)
    train_run(run, aug, prepared, f"{out}/run", device="cpu", log=print, on_step=on_step)
    assert "net" in seen, "train_run did not wrap its network in DistributedDataParallel"
    states = {"start": seen["start"], "step1": seen["step1"], "final": snapshot()}
    states["parameters"] = [k for k, _ in seen["net"].named_parameters()]
    torch.save(states, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_simclr_trains_data_parallel_with_two_processes(prepared, tmp_path):
    import pandas as pd

    from ckaflow.models import load_network

    mp.spawn(
        _train_worker, args=(_free_port(), str(prepared), str(tmp_path)), nprocs=WORLD, join=True
    )
    net, meta = load_network(tmp_path / "run" / "model.pt")
    assert meta["processes"] == WORLD
    metrics = pd.read_parquet(tmp_path / "run" / "metrics.parquet")
    assert len(metrics) == 1 and metrics["loss"].between(0, 10).all()
    assert all(torch.isfinite(p).all() for p in net.state_dict().values())
    # the ranks train on different halves of each batch, yet their weights are one: equal at
    # the start, after the first step and at the end. (BatchNorm's running statistics are each
    # rank's own on the CPU, where gloo has no SyncBatchNorm; model.pt holds rank 0's.)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    names = ranks[0]["parameters"]
    assert names and names == ranks[1]["parameters"]
    for when in ("start", "step1", "final"):
        for name in names:
            assert torch.equal(ranks[0][when][name], ranks[1][when][name]), (when, name)
    saved = torch.load(tmp_path / "run" / "model.pt", weights_only=True)["model"]
    assert sorted(saved) == sorted(ranks[0]["final"])
    for name, value in ranks[0]["final"].items():
        assert torch.equal(value, saved[name]), name
    # the steps changed the weights (equal because untouched would prove nothing)
    for before, after in (("start", "step1"), ("step1", "final")):
        assert any(not torch.equal(ranks[0][before][k], ranks[0][after][k]) for k in names)
