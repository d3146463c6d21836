"""Run settings of the training loop (spec C.10): dataclasses kept apart from the architecture (`GLMConfig`).

They are the `--train.*` and `--optim.*` flags of `openglm pretrain` and of the fine-tuning commands.
"""

from __future__ import annotations

from dataclasses import dataclass

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "linear", "constant")
STRATEGIES = ("auto", "none", "ddp", "fsdp")


@dataclass
class OptimSettings:
    """AdamW and the official `AnnealingLR` schedule (spec C.10).

    Attributes:
        lr: peak learning rate.
        weight_decay: decoupled weight decay; never applied to LayerNorm weights or biases (tensors with < 2 dims).
        beta1: Adam beta1.
        beta2: Adam beta2 (0.98 for Base/Large, 0.95 for 10B).
        eps: Adam epsilon (1e-6 for Base/Large, 1e-8 for 10B).
        schedule: `cosine`, `linear` (towards `lr_decay_ratio` x peak at `lr_decay_iters`, unclamped after it,
            floored at 0) or `constant`.
        warmup: warmup length as a fraction of the decay iterations (the official convention, not of max_steps).
        lr_decay_iters: D, the decay length in optimizer steps; None means `max_steps`.
        lr_decay_ratio: r, the final learning rate as a fraction of the peak.
        clip_grad: clip the global gradient norm to this value; 0 disables clipping.
    """

    lr: float = 4e-4
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    schedule: str = "cosine"
    warmup: float = 0.01
    lr_decay_iters: int | None = None
    lr_decay_ratio: float = 0.1
    clip_grad: float = 1.0

    def __post_init__(self) -> None:
        if not self.lr >= 0:  # 0 is allowed: the weights stay at their initialisation (baselines, timing)
            raise ValueError(f"optim.lr={self.lr!r} must be >= 0")
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay={self.weight_decay!r} must be >= 0")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"optim.{name}={getattr(self, name)!r} must be in [0, 1)")
        if not self.eps > 0:
            raise ValueError(f"optim.eps={self.eps!r} must be positive")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r}; expected one of {SCHEDULES}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"optim.warmup={self.warmup!r} must be a fraction in [0, 1)")
        if self.lr_decay_iters is not None and self.lr_decay_iters <= 0:
            raise ValueError(f"optim.lr_decay_iters={self.lr_decay_iters!r} must be positive or null")
        if not 0.0 <= self.lr_decay_ratio <= 1.0:
            raise ValueError(f"optim.lr_decay_ratio={self.lr_decay_ratio!r} must be in [0, 1]")
        if self.clip_grad < 0:
            raise ValueError(f"optim.clip_grad={self.clip_grad!r} must be >= 0 (0 disables clipping)")


@dataclass
class TrainSettings:
    """How long and how to train; shared by pretraining and fine-tuning.

    Attributes:
        max_steps: optimizer steps to run (a resumed run continues up to the same total).
        micro_batch_size: rows per micro-batch on each rank (read by the batch source, not by the loop).
        grad_accum: micro-batches per optimizer step on each rank. Global batch =
            micro_batch_size x grad_accum x world size.
        precision: `fp32`, `bf16` (autocast, CPU or GPU) or `fp16` (autocast + grad scaler, GPU only).
            Weights and optimizer state stay fp32; the loss is always computed in fp32.
        compile: wrap each block with `torch.compile`.
        activation_checkpointing: recompute each block in the backward pass to save activation memory.
        strategy: `auto` (DDP when launched with torchrun on several ranks, else none), `none`, `ddp` or
            `fsdp` (FSDP2: `fully_shard` per block, then the root).
        device: `auto` (this rank's GPU when there is one, else CPU), `cpu`, `cuda`, `cuda:N`.
        seed: seeds torch, numpy and python RNGs (the model init and dropout); data has its own seed.
        log_every: write a metrics line every this many steps.
        eval_every: also run the validation function every this many steps; it always runs once at the end
            (fine-tuning keeps its best model by it, pretraining reports it), so 0 means only at the end. To
            skip validation in pretraining, set `data.valid_batches 0`.
        save_every: write a checkpoint every this many steps (and always at the end); 0 only at the end.
        keep_last: how many checkpoints to keep (the oldest are deleted after a successful save).
        progress: show a tqdm progress bar (rank 0 only).
        tensorboard: also write TensorBoard events when the `tensorboard` package is installed.
        timeout_s: collective-operation timeout: a rank that dies makes the others fail after this long.
        max_minutes: wall-clock budget: stop after the step that exceeds it, with a checkpoint (so that
            `--resume` continues); 0 means no budget. Useful under job time limits and for the CPU demo.
    """

    max_steps: int = 1000
    micro_batch_size: int = 8
    grad_accum: int = 1
    precision: str = "fp32"
    compile: bool = False
    activation_checkpointing: bool = False
    strategy: str = "auto"
    device: str = "auto"
    seed: int = 1234
    log_every: int = 1
    eval_every: int = 0
    save_every: int = 0
    keep_last: int = 2
    progress: bool = True
    tensorboard: bool = True
    timeout_s: float = 300.0
    max_minutes: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_steps", "micro_batch_size", "grad_accum", "log_every", "keep_last"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"train.{name}={value!r} must be a positive integer")
        for name in ("eval_every", "save_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"train.{name}={value!r} must be an integer >= 0 (0: only at the end)")
        if self.seed < 0:
            raise ValueError(f"train.seed={self.seed!r} must be >= 0")
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision={self.precision!r}; expected one of {PRECISIONS}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"train.strategy={self.strategy!r}; expected one of {STRATEGIES}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"train.device={self.device!r}; expected auto, cpu, cuda or cuda:N")
        if self.max_minutes < 0:
            raise ValueError(f"train.max_minutes={self.max_minutes!r} must be >= 0 (0 means no budget)")
        if not self.timeout_s > 0:
            raise ValueError(f"train.timeout_s={self.timeout_s!r} must be positive")
