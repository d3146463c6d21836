"""Low-rank adaptation (LoRA, Hu et al. 2021) for fine-tuning: the pretrained GLM stays frozen and each chosen
linear layer learns a low-rank update, W x + (alpha / r) B A x with A [r, in] and B [out, r] (B starts at zero,
so the adapted model starts out as the pretrained one).

Adapted layers keep the parameter names `weight` / `bias`, so resumable training checkpoints hold the frozen
weights and the adapters side by side; saved model directories hold the merged weights W + (alpha / r) B A
(`merged_state_dict`), so every loader and command reads them as a plain GLM.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from openglm.model import GLMModel, linear

# Every linear layer of a GLM block: the fused QKV projection, the attention output and both MLP layers.
ALL_TARGETS = ("query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h")


@dataclass(frozen=True)
class LoRASettings:
    """Which layers get adapters and how large they are.

    Attributes:
        rank: r, the rank of each update.
        alpha: the update is scaled by alpha / r.
        dropout: dropout on the adapter's input during training.
        targets: names of the linear layers to adapt (the last part of the module name, e.g. `query_key_value`
            matches the QKV projection of every layer).
        train_also: modules of the GLM that keep training in full (last part of the module name), e.g. the
            position tables after they were grown for longer inputs (their new rows start random).
    """

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ALL_TARGETS
    train_also: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1; got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1); got {self.dropout}")
        unknown = sorted(set(self.targets) - set(ALL_TARGETS))
        if not self.targets or unknown:
            raise ValueError(
                f"LoRA targets must be a non-empty subset of {ALL_TARGETS}; got {list(self.targets)}"
            )
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "train_also", tuple(self.train_also))


class LoRALinear(nn.Module):
    """A frozen linear layer (its original `weight` / `bias` parameters) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **factory))
        # The initialisation of nn.Linear for A: with B = 0 the first step moves only B, in a random subspace.
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank
        self.lora_dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        update = linear(linear(self.lora_dropout(x), self.lora_A), self.lora_B)
        return linear(x, self.weight, self.bias) + self.scale * update

    def merged_weight(self) -> Tensor:
        """W + (alpha / r) B A, the weight of the equivalent plain linear layer."""
        return self.weight + self.scale * (self.lora_B @ self.lora_A)

    def extra_repr(self) -> str:
        rank = self.lora_A.size(0)
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={rank}, scale={self.scale:g}"


def add_lora(model: nn.Module, settings: LoRASettings) -> int:
    """Freeze every GLM inside `model` and give its target linear layers adapters, in place.

    Parameters outside the GLMs (e.g. a classifier head) stay trainable, since nothing pretrained them, and so
    do the GLM modules named in `settings.train_also`.

    Args:
        model: a `GLMModel` or a module containing one.
        settings: rank, scale, dropout and target layers.

    Returns:
        The number of adapted layers.
    """
    glms = [m for m in model.modules() if isinstance(m, GLMModel)]
    if not glms:
        raise ValueError(f"LoRA: {type(model).__name__} contains no GLMModel to adapt")
    adapted = 0
    for glm in glms:
        glm.requires_grad_(False)
        for name, module in list(glm.named_modules()):
            parent_name, _, leaf = name.rpartition(".")
            if leaf in settings.targets and isinstance(module, nn.Linear):
                adapter = LoRALinear(module, settings.rank, settings.alpha, settings.dropout)
                setattr(glm.get_submodule(parent_name), leaf, adapter)
                adapted += 1
        for name, module in glm.named_modules():
            if name.rpartition(".")[2] in settings.train_also:
                module.requires_grad_(True)
    if not adapted:
        raise ValueError(f"LoRA: no linear layer named {list(settings.targets)} in the model")
    return adapted


def merged_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """`model.state_dict()` with every adapter folded into its layer's weight and the adapter entries removed:
    the state dict of the equivalent model without LoRA."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            prefix = f"{name}." if name else ""
            state[f"{prefix}weight"] = module.merged_weight().detach()
            del state[f"{prefix}lora_A"], state[f"{prefix}lora_B"]
    return state


def trainable_summary(model: nn.Module) -> str:
    """`"N of M parameters trainable (P %)"`, for the run log."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{trainable:,} of {total:,} parameters trainable ({100 * trainable / max(total, 1):.2f} %)"
