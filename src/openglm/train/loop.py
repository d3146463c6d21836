"""The one training loop of openglm, shared by pretraining and fine-tuning (spec C.8, C.10, A.11).

`fit` takes any iterable of batch dicts and a loss function; the default loss is GLM's token-mean fp32
cross-entropy over the padded vocabulary under the loss mask. It handles gradient accumulation, mixed
precision, clipping, the official LR schedule, validation, metrics, exact checkpoint/resume and Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from openglm import parallel
from openglm.atomic import write_text_atomic
from openglm.train.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from openglm.train.optim import build_optimizer, lr_at, set_lr
from openglm.train.settings import OptimSettings, TrainSettings

log = logging.getLogger(__name__)

Batch = Mapping[str, Any]
LossFn = Callable[[nn.Module, Batch], tuple[Tensor, Tensor]]
EvalFn = Callable[[nn.Module], dict[str, float]]
METRICS_NAME = "metrics.jsonl"


def glm_loss(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
    """Sum of fp32 cross-entropy over the padded vocabulary at loss-masked positions, and the mask total.

    The vocabulary projection runs only where the loss is (`logits_mask`), and logit i predicts
    `targets[i]` (no shift, spec I.2). The loop divides by the mask total of the whole global batch.

    Args:
        model: a (possibly wrapped) `GLMModel`.
        batch: dict with input_ids [B,T], position_ids [B,2,T], sep [B], targets [B,T], loss_mask [B,T].

    Returns:
        (loss sum, weight sum) as 0-dim fp32 tensors.
    """
    weights = batch["loss_mask"]
    where = weights > 0
    out = model(batch["input_ids"], batch["position_ids"], attention_mask=batch["sep"], logits_mask=where)
    ce = F.cross_entropy(out.logits.float(), batch["targets"][where], reduction="none")  # (N,)
    w = weights[where].float()
    return (ce * w).sum(), w.sum()


def count_loss_tokens(batch: Batch) -> float:
    """The normaliser of `glm_loss`: the loss-mask total of a batch (known before the forward pass)."""
    return float(batch["loss_mask"].float().sum())


@dataclass
class FitResult:
    """What `fit` returns.

    Attributes:
        step: optimizer steps completed (including those before a resume).
        losses: training loss of each step run in this call, as (step, loss).
        eval: the last validation metrics.
        checkpoint: the last checkpoint written, if any.
    """

    step: int
    losses: list[tuple[int, float]] = field(default_factory=list)
    eval: dict[str, float] = field(default_factory=dict)
    checkpoint: Path | None = None


def seed_everything(seed: int) -> None:
    """Seed torch, numpy's global RNG and python's `random`."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def autocast_context(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast for the forward pass; weights and the optimizer stay fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    if (
        device.type == "cpu"
        and precision == "bf16"
        and torch.backends.cpu.get_cpu_capability() in ("DEFAULT", "AVX2")
    ):
        # Without AVX512-BF16/AMX, bf16 matmuls are emulated, about 100x slower than fp32 (measured on AVX2).
        log.warning(
            "bf16 on a CPU without native bf16 (%s) is far slower than fp32; consider --train.precision fp32",
            torch.backends.cpu.get_cpu_capability(),
        )
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: Batch, device: torch.device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if isinstance(v, Tensor) else v) for k, v in batch.items()}


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    batches: Iterable[Batch],
    loss_fn: LossFn = glm_loss,
    device: torch.device | None = None,
    group_key: str | None = "mode",
) -> dict[str, float]:
    """Held-out loss, overall and per objective (`batch[group_key]`, e.g. token / sentence / document).

    Every rank passes its own shard of the validation batches; sums are reduced over ranks.

    Args:
        model: the (possibly wrapped) model, in eval mode.
        batches: validation batches.
        loss_fn: as for `fit`.
        device: where to move batches (default: the model's device).
        group_key: batch key naming the objective; None reports only the overall loss.

    Returns:
        {"val_loss": ..., "val_loss/<mode>": ...}.
    """
    device = device or next(parallel.unwrap(model).parameters()).device
    sums: dict[str, list[float]] = {}
    for batch in batches:
        total, weight = loss_fn(model, to_device(batch, device))
        keys = ["val_loss"]
        if group_key is not None and group_key in batch:
            keys.append(f"val_loss/{batch[group_key]}")
        for key in keys:
            acc = sums.setdefault(key, [0.0, 0.0])
            acc[0] += float(total)
            acc[1] += float(weight)
    # Ranks may see different objectives; reduce over a fixed key list so that the collectives line up.
    names = sorted({key for keys in _gather_objects(sorted(sums)) for key in keys})
    vec = torch.tensor([v for k in names for v in sums.get(k, [0.0, 0.0])], dtype=torch.float64)
    vec = parallel.all_reduce_sum(vec.to(device)).cpu()
    out = {}
    for i, key in enumerate(names):
        total, weight = float(vec[2 * i]), float(vec[2 * i + 1])
        if weight > 0:
            out[key] = total / weight
    return out


class _Interrupt:
    """Turns the first Ctrl-C into a flag checked after each step; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _Interrupt:
        if _main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, signal.default_int_handler)
        log.warning(
            "interrupt: finishing this step, saving a checkpoint, then stopping (Ctrl-C again to abort)"
        )

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


class _Metrics:
    """metrics.jsonl (+ TensorBoard when installed) on the main rank."""

    def __init__(
        self, run_dir: Path | None, enabled: bool, tensorboard: bool, resume_step: int | None
    ) -> None:
        self.file = None
        self.tb = None
        if run_dir is None or not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / METRICS_NAME
        if resume_step is not None and path.exists():
            # Drop lines past the checkpoint: those steps are about to be run again.
            kept = [ln for ln, step in metric_rows(path) if step <= resume_step]
            write_text_atomic(path, "".join(ln + "\n" for ln in kept))
        elif resume_step is None and path.exists():
            path.unlink()
        self.file = path.open("a")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(run_dir / "tensorboard"))
            except ImportError:
                log.warning("tensorboard is not installed; metrics go to %s only", path)

    def write(self, step: int, values: dict[str, float]) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"step": step, **values}) + "\n")
            self.file.flush()
        if self.tb is not None:
            for key, value in values.items():
                self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def metric_rows(path: Path) -> list[tuple[str, int]]:
    """The lines of a metrics file with their steps. A torn last line (the process was killed while writing
    it) is dropped; any other line that is not a metric row is an error naming the file and line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a metrics file (not UTF-8 text); move it away to resume") from None
    out = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = row["step"]
            if isinstance(step, bool) or not isinstance(step, int):
                raise TypeError
        except (ValueError, KeyError, TypeError, IndexError):
            if number == len(lines):
                log.warning("%s:%d: dropped a torn last line", path, number)
                continue
            raise ValueError(
                f"{path}:{number}: not a metrics row (a JSON object with an integer step); fix or remove "
                "that line to resume"
            ) from None
        out.append((line, step))
    return out


def _next_micro_batches(
    source: Iterable[Batch], it: Iterator[Batch], n: int, consumed: int
) -> tuple[list, Iterator]:
    out = []
    while len(out) < n:
        try:
            out.append(next(it))
        except StopIteration:
            if iter(source) is source:  # a one-shot iterator cannot start another epoch
                raise ValueError(
                    f"the batch source ended after {consumed + len(out)} micro-batches"
                ) from None
            it = iter(source)
            try:
                out.append(next(it))
            except StopIteration:
                raise ValueError("the batch source yields no batches") from None
    return out, it


def fit(
    model: nn.Module,
    train_batches: Iterable[Batch],
    settings: TrainSettings,
    optim: OptimSettings | None = None,
    *,
    run_dir: str | os.PathLike | None = None,
    loss_fn: LossFn = glm_loss,
    count_fn: Callable[[Batch], float] = count_loss_tokens,
    eval_fn: EvalFn | None = None,
    resume: bool = False,
    env: parallel.DistEnv | None = None,
) -> FitResult:
    """Train `model` for `settings.max_steps` optimizer steps.

    Each step draws `settings.grad_accum` micro-batches from `train_batches` (this rank's shard). The loss of
    a step is sum(loss sums) / sum(`count_fn`) over all its micro-batches and ranks, so the result does not
    depend on how the global batch is split; with one micro-batch on one rank it is exactly spec C.8.

    Exact resume: with `resume=True` the newest checkpoint in `run_dir` restores weights, optimizer, step,
    RNG states and the data position. The data position is restored with `train_batches.load_state_dict`
    when the source has one, else by skipping the micro-batches already consumed (the source must then be
    deterministic). A re-iterable source (not a one-shot iterator) is restarted when it ends (epochs).

    Args:
        model: an unwrapped `GLMModel` (or any module `loss_fn` understands); wrapped here per `settings`.
        train_batches: iterable of batch dicts (tensors are moved to the device here).
        settings: run settings.
        optim: optimizer settings (default `OptimSettings()`).
        run_dir: where metrics and checkpoints go; None keeps nothing on disk.
        loss_fn: `(model, batch) -> (loss sum, weight sum)`; default `glm_loss`.
        count_fn: `batch -> weight sum` known before the forward pass (must match `loss_fn`'s weight sum).
        eval_fn: `(model) -> metrics`, called in eval mode without grad every `settings.eval_every` steps and
            at the end, on every rank (e.g. a partial of `evaluate_loss`).
        resume: continue from the newest checkpoint in `run_dir` (a fresh start when there is none).
        env: the distributed environment (default: `parallel.init_distributed(settings.device, ...)`).

    Returns:
        A `FitResult`. Ctrl-C saves a checkpoint (when `run_dir` is set) and re-raises KeyboardInterrupt.
    """
    optim = optim or OptimSettings()
    env = env or parallel.init_distributed(settings.device, settings.timeout_s)
    if settings.precision == "fp16" and env.device.type != "cuda":
        raise ValueError("train.precision='fp16' needs a CUDA device; use bf16 on CPU")
    run_path = Path(run_dir) if run_dir is not None else None
    model = parallel.wrap_model(
        model, env, settings.strategy, settings.activation_checkpointing, settings.compile
    )
    model.train()
    optimizer = build_optimizer(model, optim)
    scaler = torch.amp.GradScaler("cuda") if settings.precision == "fp16" else None
    params = [p for p in model.parameters() if p.requires_grad]

    step, consumed = 0, 0
    checkpoint = latest_checkpoint(run_path) if (resume and run_path is not None) else None
    seed_everything(settings.seed + env.rank)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer)
        step, consumed = int(state["step"]), int(state["consumed"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        rng = (
            state["rng_per_rank"][env.rank]
            if env.rank < len(state["rng_per_rank"])
            else state["rng_per_rank"][0]
        )
        set_rng_state(rng)
        if "data" in state and hasattr(train_batches, "load_state_dict"):
            train_batches.load_state_dict(state["data"][env.rank])
        log.info("resumed from %s at step %d", checkpoint, step)
    elif resume:
        log.info("no checkpoint in %s; starting from scratch", run_path)

    it = iter(train_batches)
    if checkpoint is not None and not hasattr(train_batches, "load_state_dict"):
        _, it = _next_micro_batches(train_batches, it, consumed, 0) if consumed else (None, it)

    metrics = _Metrics(run_path, env.is_main, settings.tensorboard, step if checkpoint is not None else None)
    result = FitResult(step=step, checkpoint=checkpoint)
    from tqdm.auto import tqdm

    bar = tqdm(
        total=settings.max_steps,
        initial=step,
        disable=not (settings.progress and env.is_main),
        dynamic_ncols=True,
        desc="train",
    )
    autocast = autocast_context(settings.precision, env.device)

    def save() -> None:
        if run_path is None:
            return
        trainer_state = {
            "step": step,
            "consumed": consumed,
            "rng_per_rank": _gather_objects(rng_state()),
            "scaler": scaler.state_dict() if scaler is not None else {},
        }
        if hasattr(train_batches, "state_dict"):
            trainer_state["data"] = _gather_objects(train_batches.state_dict())
        result.checkpoint = save_checkpoint(
            run_path, model, optimizer, trainer_state, settings.keep_last, env.is_main
        )

    def run_eval() -> None:
        if eval_fn is None:
            return
        model.eval()
        with torch.no_grad(), autocast:
            values = eval_fn(model)
        model.train()
        result.eval = dict(values)
        metrics.write(step, values)
        if env.is_main:
            log.info("step %d: %s", step, " ".join(f"{k}={v:.4f}" for k, v in values.items()))

    started = time.perf_counter()
    try:
        with _Interrupt() as interrupt:
            while step < settings.max_steps:
                t0 = time.perf_counter()
                lr = lr_at(step, optim, settings.max_steps)
                set_lr(optimizer, lr)
                micro, it = _next_micro_batches(train_batches, it, settings.grad_accum, consumed)
                local = torch.tensor(
                    [sum(count_fn(b) for b in micro)], dtype=torch.float64, device=env.device
                )
                total_weight = float(parallel.all_reduce_sum(local))
                if total_weight <= 0:
                    raise ValueError(
                        f"step {step}: the global batch has no tokens to learn from (every loss mask is empty); "
                        "is the corpus too small, or its documents too short, for the sequence length?"
                    )
                # DDP and FSDP2 average gradients over ranks, hence the world size in the scale.
                scale = env.world_size / total_weight
                loss_sum = torch.zeros((), dtype=torch.float64, device=env.device)
                tokens = 0
                for i, batch in enumerate(micro):
                    batch = to_device(batch, env.device)
                    tokens += int(batch["input_ids"].numel()) if "input_ids" in batch else 0
                    with parallel.gradient_sync(model, i == len(micro) - 1):
                        with autocast:
                            total, _ = loss_fn(model, batch)
                        scaled = total.float() * scale
                        (scaler.scale(scaled) if scaler is not None else scaled).backward()
                    loss_sum += total.detach().double()
                if scaler is not None:
                    scaler.unscale_(optimizer)
                grad_norm = (
                    torch.nn.utils.clip_grad_norm_(params, optim.clip_grad)
                    if optim.clip_grad > 0
                    else torch.nn.utils.clip_grad_norm_(params, float("inf"))
                )
                if scaler is not None:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                consumed += len(micro)
                loss = float(parallel.all_reduce_sum(loss_sum)) / total_weight
                if not math.isfinite(loss) and scaler is None:
                    raise FloatingPointError(
                        f"step {step}: the loss is {loss}; lower optim.lr or check the data"
                    )
                result.losses.append((step, loss))
                elapsed = time.perf_counter() - t0
                tok_s = tokens * env.world_size / max(elapsed, 1e-9)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tok_s:,.0f}", refresh=False)
                if step % settings.log_every == 0 or step == settings.max_steps:
                    metrics.write(
                        step,
                        {"loss": loss, "lr": lr, "grad_norm": float(grad_norm), "tokens_per_s": tok_s},
                    )
                if settings.eval_every and step % settings.eval_every == 0 and step < settings.max_steps:
                    run_eval()
                out_of_time = (
                    bool(settings.max_minutes) and time.perf_counter() - started > 60 * settings.max_minutes
                )
                stop, out_of_time = _any_rank((interrupt.requested, out_of_time), env)
                last = step == settings.max_steps or out_of_time
                if stop or last or (settings.save_every and step % settings.save_every == 0):
                    save()
                if stop:
                    raise KeyboardInterrupt
                if out_of_time and step < settings.max_steps:
                    log.warning(
                        "train.max_minutes=%g reached at step %d; stopping", settings.max_minutes, step
                    )
                    break
            if eval_fn is not None:
                run_eval()
    finally:
        bar.close()
        metrics.close()
    result.step = step
    return result


def _gather_objects(obj: Any) -> list[Any]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    box: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(box, obj)
    return box


def _any_rank(flags: tuple[bool, ...], env: parallel.DistEnv) -> tuple[bool, ...]:
    """Each flag is true on every rank when it is true on any (all ranks must stop at the same step)."""
    if not env.distributed:
        return flags
    summed = parallel.all_reduce_sum(torch.tensor([float(f) for f in flags], device=env.device))
    return tuple(bool(x > 0) for x in summed.tolist())
