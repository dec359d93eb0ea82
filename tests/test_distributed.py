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


def _rounding_bounds(x1, x2, weight, temperature=0.5) -> tuple[float, torch.Tensor]:
    """First-order bounds on one float32 evaluation's distance from the exact loss and weight
    gradient of `_loss_and_grad`, whatever the kernels and however the rows are split over
    processes (the split only reorders sums, all of them covered by `dot_rtol`). In float64:

    z = xW (length-6 dot products); a = z/‖z‖ is off by ηᵢ = ‖δzᵢ‖/‖zᵢ‖ + γ₇; the logits
    vᵢⱼ = aᵢ·aⱼ/T by (ηᵢ + ηⱼ + dot_rtol(5))/T + u|vᵢⱼ|; a row's cross entropy ℓᵢ = lseⱼ vᵢⱼ − v_pos
    by twice its largest logit error plus the softmax's own roundings (a sum of 2n − 1 positive
    terms, exp, log, three subtractions); the loss, their mean, adds `mean_rtol`(2n)·mean|ℓ|.
    Backward: G = (softmax − onehot)/2n inherits softmax's relative error; ∂a = (G + Gᵀ)a/T
    (sums of 2n terms, unit vectors off by η); ∂z = (I − aaᵀ)∂a/‖z‖ (a projection: its error
    is 2η‖∂a‖, plus γ₈ of rounding, and ‖z‖'s); ∂W = xᵀ∂z, sums of 2n terms."""
    from tests.tolerances import U32 as u
    from tests.tolerances import dot_rtol, gamma, mean_rtol

    n, t = len(x1), temperature
    x, w = torch.cat([x1, x2]).double(), weight.double()
    z = x @ w
    dz = dot_rtol(x.shape[1]) * (x.abs() @ w.abs())
    norm = z.norm(dim=1)
    a = z / norm[:, None]
    eta = dz.norm(dim=1) / norm + gamma(7)
    own = torch.eye(2 * n, dtype=torch.bool)
    positive = torch.cat([torch.arange(n) + n, torch.arange(n)])
    rows = torch.arange(2 * n)
    v = (a @ a.T / t).masked_fill(own, float("-inf"))
    dv = ((eta[:, None] + eta[None, :] + dot_rtol(a.shape[1])) / t + u * v.abs()).masked_fill(
        own, 0
    )
    lse = torch.logsumexp(v, dim=1)
    ell = lse - v[rows, positive]
    spread = (v - v.max(dim=1, keepdim=True).values).masked_fill(own, 0).abs().amax(dim=1)
    dell = 2 * dv.amax(dim=1) + gamma(2 * n) + 4 * u * (1 + spread + lse.abs() + ell.abs())
    dloss = dell.mean() + mean_rtol(2 * n) * ell.abs().mean()
    p = torch.softmax(v, dim=1)
    g = (p - torch.nn.functional.one_hot(positive, 2 * n)) / (2 * n)
    dg = p * (dell[:, None] + 3 * u) / (2 * n) + u * g.abs()
    c, dc = g + g.T, dg + dg.T
    grad_a = c @ a / t
    dgrad_a = (dc.sum(dim=1) + c.abs() @ eta + (dot_rtol(2 * n) + 2 * u) * c.abs().sum(dim=1)) / t
    grad_z = (grad_a - a * (a * grad_a).sum(dim=1, keepdim=True)) / norm[:, None]
    projected = dgrad_a + grad_a.norm(dim=1) * (2 * eta + gamma(8))
    dgrad_z = projected / norm + grad_z.norm(dim=1) * (dz.norm(dim=1) / norm + gamma(7))
    dgrad = x.abs().T @ dgrad_z[:, None].expand_as(grad_z)
    dgrad += (dot_rtol(2 * n) + u) * (x.abs().T @ grad_z.abs())
    return float(dloss), dgrad


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
    dloss, dgrad = _rounding_bounds(*_inputs())  # per evaluation: two of them are compared
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert (got["loss"] - whole_loss).abs() <= 2 * dloss
        assert ((got["grad"] - whole_grad).abs() <= 2 * dgrad).all()
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
