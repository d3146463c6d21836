"""`openglm plan`: will this GLM fit on these GPUs? Memory per GPU for DDP vs FSDP2, with and without
activation checkpointing, for the way `fit` trains (fp32 weights and AdamW state, bf16/fp16 autocast).

The estimates are first-order (weights, gradients, optimizer, activations after Korthikanti et al. 2022 with a
memory-efficient attention kernel, logits where the loss is, a fixed CUDA overhead); treat a margin under
~10% as "try it".
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from openglm.config import PRESETS, GLMConfig

GIB = 1024**3
CUDA_OVERHEAD = 1.5 * GIB  # context, kernels, allocator slack


@dataclass
class MemoryEstimate:
    """Bytes per GPU for one configuration."""

    strategy: str
    activation_checkpointing: bool
    weights: float
    gradients: float
    optimizer: float
    activations: float
    overhead: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead


def parse_memory(text: str | float) -> float:
    """'80GB' / '80GiB' / '24G' / 80 -> bytes. GPU memory is sold in binary units (an 80GB A100 has 80 GiB)."""
    if isinstance(text, int | float) and not isinstance(text, bool):
        if not text > 0:
            raise ValueError(f"gpu_memory={text!r} must be positive")
        return float(text) * GIB
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(t|tb|tib|g|gb|gib|m|mb|mib)?\s*", str(text).lower())
    if not match:
        raise ValueError(f"gpu_memory={text!r}: expected a size such as 80GB, 40GiB or 24")
    value, unit = float(match.group(1)), match.group(2) or "gb"
    scale = {"t": 1024**4, "m": 1024**2}.get(unit[0], GIB)
    if not value > 0:
        raise ValueError(f"gpu_memory={text!r} must be positive")
    return value * scale


def activation_bytes(
    config: GLMConfig,
    micro_batch_size: int,
    seq_length: int,
    precision: str,
    checkpointing: bool,
    loss_fraction: float,
) -> float:
    """Activation memory of one micro-batch in the forward pass that backward needs.

    Per layer 34·s·b·h bytes at 16 bits (Korthikanti et al.; the s x s attention matrix is not stored by the
    memory-efficient SDPA kernel), doubled in fp32. With checkpointing only each block's fp32 input stays,
    plus one block recomputed at a time. The loss adds the logits (16-bit, fp32 copy, fp32 gradient) at
    `loss_fraction` of the positions, and the attention mask adds b·s·s bytes.
    """
    s, b, h, L, V = seq_length, micro_batch_size, config.hidden_size, config.num_layers, config.vocab_size
    width = 2 if precision in ("bf16", "fp16") else 4
    per_layer = 34 * s * b * h * (width / 2)
    layers = L * 4 * s * b * h + per_layer if checkpointing else L * per_layer
    logits = loss_fraction * s * b * V * (width + 4 + 4)
    embeddings = 3 * s * b * h * 4
    return layers + logits + embeddings + b * s * s


def estimate(
    config: GLMConfig,
    strategy: str,
    gpus: int,
    micro_batch_size: int,
    seq_length: int,
    precision: str = "bf16",
    checkpointing: bool = False,
    loss_fraction: float = 0.5,
) -> MemoryEstimate:
    """Per-GPU memory of training `config` with `fit`.

    Args:
        config: the architecture.
        strategy: `ddp` (everything replicated) or `fsdp` (FSDP2: weights, gradients and AdamW state sharded
            over `gpus`; one block, plus the next one prefetched, and the root's embeddings unsharded).
        gpus: data-parallel GPUs.
        micro_batch_size: rows per micro-batch per GPU.
        seq_length: tokens per row (Part A + Part B).
        precision: `fp32`, `bf16` or `fp16` (autocast keeps a 16-bit copy of the weights in use).
        checkpointing: activation checkpointing per block.
        loss_fraction: share of positions that carry the loss (logits are computed only there).

    Returns:
        The estimate.
    """
    if strategy not in ("ddp", "fsdp"):
        raise ValueError(f"strategy={strategy!r}; expected ddp or fsdp")
    if gpus < 1 or micro_batch_size < 1 or seq_length < 1:
        raise ValueError(
            f"gpus={gpus}, micro_batch_size={micro_batch_size}, seq_length={seq_length} must be >= 1"
        )
    P = float(config.num_parameters())
    h, L = config.hidden_size, config.num_layers
    block = 12 * h * h + 13 * h
    root = P - L * block  # embeddings, position tables, final LayerNorm
    cast = 2 if precision in ("bf16", "fp16") else 0  # autocast's 16-bit copies of the weights in use
    if strategy == "ddp":
        weights = 4 * P + cast * P
        gradients = 4 * P
        optimizer = 8 * P
    else:
        unsharded = (
            root + 2 * block
        )  # the root stays gathered through forward and backward; 2 blocks in flight
        weights = 4 * P / gpus + (4 + cast) * unsharded
        gradients = 4 * P / gpus + 4 * unsharded
        optimizer = 8 * P / gpus
    acts = activation_bytes(config, micro_batch_size, seq_length, precision, checkpointing, loss_fraction)
    return MemoryEstimate(strategy, checkpointing, weights, gradients, optimizer, acts, CUDA_OVERHEAD)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _largest_batch(
    config: GLMConfig, strategy: str, gpus: int, seq: int, precision: str, ckpt: bool, budget: float
) -> int:
    best, b = 0, 1
    while b <= 4096 and estimate(config, strategy, gpus, b, seq, precision, ckpt).total <= budget:
        best, b = b, b * 2
    if best:
        lo, hi = best, min(best * 2, 4097)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if estimate(config, strategy, gpus, mid, seq, precision, ckpt).total <= budget:
                lo = mid
            else:
                hi = mid
        best = lo
    return best


def plan(
    preset: str = "glm-10b",
    gpus: int = 8,
    gpu_memory: str = "80GB",
    micro_batch_size: int = 1,
    seq_length: int | None = None,
    precision: str = "bf16",
) -> str:
    """Estimate per-GPU memory for training a GLM with DDP vs FSDP2, with and without activation checkpointing.

    Args:
        preset: a preset name (`glm-base`, `glm-large`, `glm-10b`, ...; or `all`) or a config.json path.
        gpus: data-parallel GPUs.
        gpu_memory: memory per GPU, e.g. 80GB, 40GB, 24GB (binary units, as GPUs are sold).
        micro_batch_size: rows per micro-batch per GPU.
        seq_length: tokens per row, at most the model's max_sequence_length (the default).
        precision: `bf16`, `fp16` or `fp32`.

    Returns:
        A table per configuration and a verdict.
    """
    if precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"precision={precision!r}; expected fp32, bf16 or fp16")
    for name, value in (("gpus", gpus), ("micro_batch_size", micro_batch_size), ("seq_length", seq_length)):
        if value is not None and value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    budget = parse_memory(gpu_memory)
    if preset == "all":
        # One answer per preset; a sequence length beyond a preset's positions is said on its line.
        return "\n\n".join(
            _plan_one(name, gpus, budget, micro_batch_size, seq_length, precision, strict=False)
            for name in PRESETS
        )
    return _plan_one(preset, gpus, budget, micro_batch_size, seq_length, precision)


def _plan_one(
    preset: str,
    gpus: int,
    budget: float,
    b: int,
    seq_length: int | None,
    precision: str,
    strict: bool = True,
) -> str:
    config = GLMConfig.resolve(preset)
    seq = config.max_sequence_length if seq_length is None else seq_length
    if seq > config.max_sequence_length:
        message = f"seq_length={seq} exceeds {preset}'s max_sequence_length={config.max_sequence_length}"
        if strict:
            raise ValueError(message)
        return f"{preset}: skipped: {message}"
    lines = [
        f"{preset}: {_count(config.num_parameters())} parameters, {gpus} GPU(s) x {budget / GIB:.0f} GiB, "
        f"micro-batch {b} x {seq} tokens, {precision}",
        f"{'strategy':<10}{'act. ckpt':<11}{'weights':>9}{'grads':>9}{'AdamW':>9}{'activ.':>9}{'total':>9}"
        f"  {'fits':<5}{'max micro-batch':>16}",
    ]
    fitting = []
    for strategy in ("ddp", "fsdp"):
        for ckpt in (False, True):
            e = estimate(config, strategy, gpus, b, seq, precision, ckpt)
            ok = e.total <= budget
            most = _largest_batch(config, strategy, gpus, seq, precision, ckpt, budget)
            lines.append(
                f"{strategy:<10}{'on' if ckpt else 'off':<11}"
                + "".join(
                    f"{x / GIB:>8.1f}G" for x in (e.weights, e.gradients, e.optimizer, e.activations, e.total)
                )
                + f"  {'yes' if ok else 'no':<5}{most:>16}"
            )
            if ok:
                fitting.append((strategy, ckpt, most))
    if not fitting:
        lines.append(
            "verdict: does not fit at this micro-batch; add GPUs (FSDP2 shards weights, gradients and AdamW "
            "state over them) or lower the micro-batch / sequence length."
        )
    else:
        strategy, ckpt, most = fitting[0]
        flags = f"--train.strategy {strategy}" + (" --train.activation_checkpointing true" if ckpt else "")
        lines.append(
            f"verdict: fits with {strategy.upper()}{' + activation checkpointing' if ckpt else ''} "
            f"(up to micro-batch {most}): {flags}"
        )
    return "\n".join(lines)
