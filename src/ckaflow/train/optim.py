"""Optimisers (SGD, AdamW, LARS) and the learning-rate schedule (linear warm-up, cosine decay)."""

from __future__ import annotations

import math

import torch
from torch import nn

from ckaflow.config import RecipeSpec


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling (You et al. 2017), as SimCLR trains with it.

    For each tensor of a group with `adapt=True`: g ← g + wd·w, then g ← g · η‖w‖/‖g‖ (1 when
    either norm is 0), then heavy-ball momentum and w ← w − lr·v. Groups with `adapt=False`
    (biases and BatchNorm parameters, as in SimCLR) take plain momentum SGD without weight decay.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001):  # fmt: skip
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "eta": eta,
            "adapt": True,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if group["adapt"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                    w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(grad)
                    one = torch.ones_like(w_norm)
                    trust = torch.where(
                        (w_norm > 0) & (g_norm > 0), group["eta"] * w_norm / g_norm, one
                    )
                    grad = grad.mul(trust)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(group["momentum"]).add_(grad)
                p.add_(buf, alpha=-group["lr"])
        return loss


def split_decay(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(weights, biases and normalisation parameters): the second group is excluded from
    weight decay and from LARS's adaptation. One-dimensional tensors are exactly those."""
    weights, others = [], []
    for p in model.parameters():
        if p.requires_grad:
            (others if p.ndim <= 1 else weights).append(p)
    return weights, others


def make_optimizer(model: nn.Module, recipe: RecipeSpec) -> torch.optim.Optimizer:
    if recipe.optimizer == "lars":
        weights, others = split_decay(model)
        groups = [
            {"params": weights},
            {"params": others, "weight_decay": 0.0, "adapt": False},
        ]
        return LARS(
            groups,
            lr=recipe.lr,
            momentum=recipe.momentum,
            weight_decay=recipe.weight_decay,
            eta=recipe.lars_eta,
        )
    params = model.parameters()
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
        )
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}; expected sgd, adamw or lars")


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def make_schedule(
    opt: torch.optim.Optimizer, recipe: RecipeSpec, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    total = recipe.epochs * steps_per_epoch
    warmup = recipe.warmup_epochs * steps_per_epoch
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, total, warmup))
