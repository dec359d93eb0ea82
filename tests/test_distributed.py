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
    from ckaflow import config
    from ckaflow.train import train_run
    from tests.conftest import tiny_config

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(WORLD), RANK=str(rank)
    )
    torch.set_num_threads(1)
    cfg = tiny_config(recipes={"simclr": {"epochs": 1, "batch_size": 64, "optimizer": "lars"}})
    run = next(r for r in config.run_specs(cfg) if r.method == "simclr")
    train_run(run, config.augment_spec(cfg), prepared, out, device="cpu", log=print)
    dist.destroy_process_group()


def test_simclr_trains_data_parallel_with_two_processes(prepared, tmp_path):
    import pandas as pd

    from ckaflow.train.loop import load_network

    mp.spawn(
        _train_worker, args=(_free_port(), str(prepared), str(tmp_path)), nprocs=WORLD, join=True
    )
    net, meta = load_network(tmp_path / "model.pt")
    assert meta["processes"] == WORLD
    metrics = pd.read_parquet(tmp_path / "metrics.parquet")
    assert len(metrics) == 1 and metrics["loss"].between(0, 10).all()
    assert all(torch.isfinite(p).all() for p in net.state_dict().values())
