"""AdamW with the official parameter groups and the `AnnealingLR` schedule (spec C.10)."""

from __future__ import annotations

import math

import torch
from torch import nn

from openglm.train.settings import OptimSettings


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices (and embeddings) decay; LayerNorm weights and all biases do not.

    Deciding by `p.dim() < 2` covers exactly the official no-decay list (LayerNorm weight/bias and every
    Linear bias) without a list of names that breaks when modules are renamed or wrapped.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, settings: OptimSettings) -> torch.optim.AdamW:
    """AdamW over `param_groups(model)`; the learning rate is set every step by `lr_at`.

    Args:
        model: the (possibly wrapped) model whose parameters to optimise.
        settings: optimizer settings.

    Returns:
        The optimizer.
    """
    return torch.optim.AdamW(
        param_groups(model, settings.weight_decay),
        lr=settings.lr,
        betas=(settings.beta1, settings.beta2),
        eps=settings.eps,
    )


def lr_at(step: int, settings: OptimSettings, max_steps: int) -> float:
    """The learning rate used for update number `step` (0-based), as the official `AnnealingLR` computes it.

    D = lr_decay_iters (or max_steps), W = warmup x D, r = lr_decay_ratio. Warmup is linear from 0 (the
    first update runs at lr 0 when W > 0, as in the official code); cosine decays to r x peak at D and stays;
    linear reaches r x peak at D and keeps falling after it (floored at 0 so that it never turns negative).

    Args:
        step: number of optimizer updates already done.
        settings: optimizer settings.
        max_steps: the run length, used when `lr_decay_iters` is None.

    Returns:
        The learning rate.
    """
    peak = settings.lr
    decay_iters = settings.lr_decay_iters or max_steps
    warmup = settings.warmup * decay_iters
    if warmup > 0 and step <= warmup:
        return peak * step / warmup
    if settings.schedule == "constant":
        return peak
    r = settings.lr_decay_ratio
    span = max(decay_iters - warmup, 1e-12)
    u = (step - warmup) / span
    if settings.schedule == "cosine":
        u = min(1.0, u)
        return peak * (r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * u)))
    return max(0.0, peak * (1.0 - (1.0 - r) * u))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
