"""Optimisers and the learning-rate schedule (linear warm-up, then cosine decay to zero)."""

from __future__ import annotations

import math

import torch

from ckaflow.config import RecipeSpec


def make_optimizer(params, recipe: RecipeSpec) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay
        )
    if recipe.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    raise ValueError(f"unknown optimizer {recipe.optimizer!r}; expected 'sgd' or 'adamw'")


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
