import math

import pytest
import torch
from torch import nn

from ckaflow import config
from ckaflow.train.optim import LARS, lr_factor, make_optimizer, split_decay
from tests.conftest import tiny_config
from tests.tolerances import U32, dot_rtol, gamma


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))


def test_lars_step_matches_the_formula_and_excludes_biases_and_batchnorm():
    net = _model()
    before = {name: p.detach().clone() for name, p in net.named_parameters()}
    net(torch.randn(8, 5)).square().mean().backward()
    grads = {name: p.grad.detach().clone() for name, p in net.named_parameters()}
    recipe = config.run_specs(
        tiny_config(recipes={"simclr": {"optimizer": "lars", "lr": 0.5, "weight_decay": 0.1}})
    )[0].recipe
    opt = make_optimizer(net, recipe)
    assert isinstance(opt, LARS)
    opt.step()
    for name, p in net.named_parameters():
        w, g = before[name].double(), grads[name].double()
        # the float32 step against the formula in float64 on the same w and g: p − lr·v rounds
        # twice (u·|p| and u·|lr·v|); for weights the update's own factors round too: the decay
        # (γ₂ of |g| + 0.1|w|), two norms of numel squares, their ratio and the products
        scale = 0.5 * g.abs()
        if p.ndim > 1:  # weights: decay, then the trust ratio eta * |w| / |g|
            decayed = g + 0.1 * w
            trust = recipe.lars_eta * w.norm() / decayed.norm()
            rel = dot_rtol(p.numel()) + gamma(6)
            rel += 2 * gamma(2) * (g.abs() + 0.1 * w.abs()).norm() / decayed.norm()
            scale = 0.5 * trust * (decayed.abs() * rel + gamma(2) * (g.abs() + 0.1 * w.abs()))
            g = decayed * trust
        # first step: the momentum buffer is the (scaled) gradient itself
        expected = w - 0.5 * g
        bound = U32 * (expected.abs() + 0.5 * g.abs()) + (scale if p.ndim > 1 else 0)
        assert ((p.double() - expected).abs() <= bound).all(), name


def test_split_decay_puts_every_one_dimensional_tensor_aside():
    weights, others = split_decay(_model())
    assert [p.ndim for p in weights] == [2, 2]
    assert len(others) == 4 and all(p.ndim == 1 for p in others)  # 2 biases + BN weight, bias


def test_lars_momentum_accumulates_across_steps():
    p = nn.Parameter(torch.tensor([3.0, 4.0]).view(1, 2))
    opt = LARS([p], lr=1.0, momentum=0.5, weight_decay=0.0, eta=1.0)
    for _ in range(2):
        p.grad = torch.tensor([[0.0, 2.0]])
        opt.step()
    # step 1: trust = |w|/|g| = 5/2, update (0, 5) -> w = (3, -1); step 2: trust = sqrt(10)/2
    second = torch.tensor([0.0, 2.0]) * math.sqrt(10) / 2
    expected = torch.tensor([3.0, -1.0]) - (0.5 * torch.tensor([0.0, 5.0]) + second)
    # both in float32, every step exact but three (√10, 2.5 + √10, −1 − that: magnitudes ≤ 6.7)
    bound = 2 * gamma(3) * (1 + 2.5 + math.sqrt(10))
    assert (p.detach().view(2) - expected).abs().max() <= bound


@pytest.mark.parametrize("step,expected", [(0, 0.25), (3, 1.0), (4, 1.0), (14, 0.0)])
def test_warmup_then_cosine(step, expected):
    # 4 warm-up steps then cosine over 10: step 4 starts the decay at the full rate
    assert lr_factor(step, total_steps=14, warmup_steps=4) == pytest.approx(expected, abs=1e-12)
