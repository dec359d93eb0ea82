"""The GPU's training path rehearsed on the CPU: autocast (bf16, fp16 with loss scaling) and
the channels-last memory format, named explicitly in the recipe, run on the CPU as on a GPU;
the CPU's default (precision and channels_last auto) stays fp32, NCHW and deterministic."""

import math

import pandas as pd
import pytest
import torch

from ckaflow import config
from ckaflow.train import loop, simclr
from ckaflow.train.loop import train_run
from tests.conftest import tiny_config
from tests.test_train import crash_twice_and_resume

BASE = {
    "simclr": {"epochs": 1, "batch_size": 64, "optimizer": "adamw", "lr": 1e-3},
    "supervised": {"epochs": 1, "batch_size": 64, "lr": 0.05},
}


def _run(method: str, **recipe):
    cfg = tiny_config(methods=[method], recipes={method: {**BASE[method], **recipe}})
    (run,) = config.run_specs(cfg)
    return run, config.augment_spec(cfg)


def _weights(path):
    return torch.load(path, weights_only=False)["model"]


class Forwards:
    """What the training forward passes of the run's own network saw: hooks on a stage-1 conv
    (4 channels in, so channels-last differs from NCHW; the 1-channel input is both)."""

    def __init__(self, monkeypatch):
        self.seen: list[tuple[bool, torch.dtype]] = []  # (input channels-last?, output dtype)
        self.initial: dict[str, torch.Tensor] = {}
        build = loop.initial_network

        def initial_network(run, attrs):
            net = build(run, attrs)
            self.initial = {k: v.clone() for k, v in net.state_dict().items()}
            net.encoder.layer1[0].conv1.register_forward_hook(self._record)
            return net

        monkeypatch.setattr(loop, "initial_network", initial_network)

    def _record(self, conv, args, out):
        if conv.training:  # not the final kNN encoding (eval mode, fp32)
            self.seen.append((args[0].is_contiguous(memory_format=torch.channels_last), out.dtype))


def _check_trained(model_path, forwards, dtype, channels_last):
    steps = 256 // 64
    assert forwards.seen == [(channels_last, dtype)] * steps
    losses = pd.read_parquet(model_path.parent / "metrics.parquet")["loss"]
    assert all(math.isfinite(x) for x in losses) and (losses > 0).all(), losses.tolist()
    final = _weights(model_path)
    for name, before in forwards.initial.items():
        assert final[name].dtype == before.dtype  # master weights stay float32
        if name.endswith("weight"):
            assert torch.isfinite(final[name]).all(), name
            assert not torch.equal(final[name], before), f"{name} did not change"
    scaler = torch.load(model_path.parent / "checkpoint.pt", weights_only=False)["scaler"]
    assert scaler == {}  # loss scaling is for fp16 only


@pytest.mark.parametrize(
    ("precision", "channels_last", "dtype", "expect_channels_last"),
    [
        ("bf16", True, torch.bfloat16, True),  # the GPU's path, named explicitly
        ("auto", "auto", torch.float32, False),  # the CPU's default
    ],
)
def test_supervised_forward_runs_in_the_named_precision_and_memory_format(
    precision, channels_last, dtype, expect_channels_last, prepared, tmp_path, monkeypatch
):
    forwards = Forwards(monkeypatch)
    run, aug = _run("supervised", precision=precision, channels_last=channels_last)
    model = train_run(run, aug, prepared, tmp_path, device="cpu", log=print)
    _check_trained(model, forwards, dtype, expect_channels_last)


def test_simclr_trains_under_bf16_and_channels_last_with_nt_xent_in_float32(
    prepared, tmp_path, monkeypatch
):
    forwards = Forwards(monkeypatch)
    calls = []
    nt_xent = simclr.nt_xent

    def recording_nt_xent(z1, z2, temperature):
        loss = nt_xent(z1, z2, temperature)
        calls.append((z1.dtype, loss.dtype, math.isfinite(loss.item())))
        return loss

    monkeypatch.setattr(simclr, "nt_xent", recording_nt_xent)
    run, aug = _run("simclr", precision="bf16", channels_last=True)
    model = train_run(run, aug, prepared, tmp_path, device="cpu", log=print)
    _check_trained(model, forwards, torch.bfloat16, True)
    # the projections come out of the autocast forward in bf16; the loss is float32 and finite
    assert calls == [(torch.bfloat16, torch.float32, True)] * 4


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_mixed_precision_run_interrupted_mid_epoch_resumes_bit_for_bit(
    precision, prepared, tmp_path
):
    """SimCLR with LARS, channels-last, 4 steps an epoch, checkpoints every 3 steps: crashes
    after steps 3 and 6 and resumes end with the weights of a straight run. Under fp16 the
    grad scaler (scale, growth tracker) is part of the checkpoint; under bf16 it is off.
    (fp16's first steps overflow at the initial scale and are skipped: hence the warning.)"""
    run, aug = _run(
        "simclr", epochs=2, optimizer="lars", lr=0.5, precision=precision, channels_last=True
    )
    straight, resumed = crash_twice_and_resume(run, aug, prepared, tmp_path)
    m1 = pd.read_parquet(straight.parent / "metrics.parquet")["loss"].tolist()
    m2 = pd.read_parquet(resumed.parent / "metrics.parquet")["loss"].tolist()
    assert m1 == m2 and all(math.isfinite(x) for x in m1)
    scaler = torch.load(resumed.parent / "checkpoint.pt", weights_only=False)["scaler"]
    if precision == "fp16":
        assert scaler["scale"] < 65536.0  # it ran, and backed off from overflowing steps
    else:
        assert scaler == {}
