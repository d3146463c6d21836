"""Fine-tuning with the shared training loop while keeping the model of the best dev evaluation (spec D.2-D.8):
the selection rule shared by classification, seq2seq and text-infilling fine-tuning, and the generation run settings.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from openglm import parallel
from openglm.atomic import replace_directory, write_text_atomic
from openglm.lora import LoRASettings, add_lora, trainable_summary
from openglm.parallel import unwrap

if TYPE_CHECKING:
    from openglm.train.loop import Batch, FitResult, LossFn
    from openglm.train.settings import OptimSettings, TrainSettings

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw from torch's global RNG as if just seeded with `seed`, and leave it as it was afterwards: new
    parameters (a classifier head, LoRA adapters, a prompt encoder) then depend on the run's seed only, not
    on whatever ran before in the process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@dataclass
class BestDev:
    """The best dev evaluation so far and the directory holding its model.

    Attributes:
        directory: where the best model and its tokenizer are saved.
        value: its key metric (None before the first evaluation).
        step: the step it was made at, as counted by the caller (None when not counted).
        metrics: all its metrics (None before the first evaluation).
    """

    directory: Path
    value: float | None = None
    step: int | None = None
    metrics: dict[str, float] | None = None


# What a fine-tuning run leaves in its out_dir: the training loop's log and checkpoints, the kept model and the
# report. A new run would delete the log and mix its checkpoints and best model with the old run's.
RUN_FILES = ("metrics.jsonl", "checkpoints", "best", "metrics.json")


def check_run_dir(out_dir: str | os.PathLike, resume: bool) -> None:
    """Refuse an out_dir that is a file, or that holds an earlier run unless resuming it.

    Called before anything is loaded or written, so that a refused run leaves the folder as it was.

    Args:
        out_dir: the run directory.
        resume: whether the run continues the one in `out_dir` (`--train.resume true`).
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out_dir {out} is a file, not a folder; pick another --out_dir")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not resume:
        raise ValueError(
            f"out_dir {out} already holds a fine-tuning run ({', '.join(found)}); continue it with "
            "--train.resume true, or pick another --out_dir"
        )


def restore_progress(out: Path, key_metric: str, best: BestDev, metric_prefix: str = "") -> int:
    """On resume: the step of the newest checkpoint (0 without one), and the best dev evaluation so far from
    metrics.jsonl put into `best`, so that a resumed run keeps a better earlier `best/` instead of overwriting it.

    Args:
        out: the run directory.
        key_metric: the metric that selects the best model.
        best: filled in place.
        metric_prefix: the prefix of the dev metrics in metrics.jsonl (`dev_` for classification).

    Returns:
        The step the run resumes at.
    """
    from openglm.train.checkpoint import latest_checkpoint
    from openglm.train.loop import METRICS_NAME, metric_rows

    checkpoint = latest_checkpoint(out)
    if checkpoint is None:
        return 0
    done = int(checkpoint.name.split("-")[-1])
    history = out / METRICS_NAME
    if not (history.is_file() and best.directory.is_dir()):
        return done
    for line, _ in metric_rows(history):  # a torn last line of a killed run is dropped there
        row = json.loads(line)
        value = row.get(f"{metric_prefix}{key_metric}")
        if value is not None and row["step"] <= done and (best.value is None or value > best.value):
            best.value, best.step = value, row["step"]
            # Evaluations are rows of their own in metrics.jsonl, apart from the training-loss rows.
            best.metrics = {
                k.removeprefix(metric_prefix): v
                for k, v in row.items()
                if k != "step" and k.startswith(metric_prefix)
            }
    return done


def save_model_dir(model: nn.Module, tokenizer: Any, directory: Path) -> None:
    """Write model + tokenizer into `directory`, replacing it only once the new copy is complete.

    Args:
        model: a module with `save_pretrained(dir)`.
        tokenizer: a tokenizer with `save_pretrained(dir)`.
        directory: the target directory (an existing one is replaced).
    """

    def write(folder: Path) -> None:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)

    replace_directory(directory, write)


class RankShard:
    """This rank's rows of every global batch of `batches` (rows rank, rank + world, ...), for data-parallel
    fine-tuning: all ranks draw the same global batches (same seed) and each trains on its share. Batches with
    fewer rows than ranks (an epoch's last, partial batch) are skipped on every rank alike. Tensors whose first
    dimension is the batch are split; other entries pass unchanged. Exact-resume state is the wrapped source's.
    """

    def __init__(self, batches: Iterable[Batch], rank: int, world_size: int) -> None:
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.batches:
            rows = _batch_rows(batch)
            if rows < self.world_size:
                continue
            yield {
                k: v[self.rank :: self.world_size]
                if isinstance(v, Tensor) and v.dim() and v.size(0) == rows
                else v
                for k, v in batch.items()
            }

    def state_dict(self) -> dict[str, Any]:
        return self.batches.state_dict()  # type: ignore[attr-defined]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batches.load_state_dict(state)  # type: ignore[attr-defined]


def _batch_rows(batch: Batch) -> int:
    """The batch size of a batch dict: the first dimension of its token ids."""
    for key in ("input_ids", "tokens", "text"):
        value = batch.get(key)
        if isinstance(value, Tensor):
            return value.size(0)
    first = next((v for v in batch.values() if isinstance(v, Tensor) and v.dim()), None)
    if first is None:
        raise ValueError(f"cannot tell the batch size of a batch with keys {sorted(batch)}")
    return first.size(0)


def fit_keeping_best(
    model: nn.Module,
    tokenizer: Any,
    batches: Iterable[Batch],
    settings: TrainSettings,
    optim: OptimSettings,
    *,
    run_dir: str | os.PathLike,
    evaluate: Callable[[nn.Module], dict[str, float]] | None,
    key_metric: str,
    loss_fn: LossFn | None = None,
    count_fn: Callable[[Batch], float] | None = None,
    resume: bool = False,
    best: BestDev | None = None,
    step_fn: Callable[[], int] | None = None,
    metric_prefix: str = "",
    lora: LoRASettings | None = None,
) -> tuple[FitResult, BestDev]:
    """Train with `fit`, saving model + tokenizer to the best directory whenever dev `key_metric` improves.

    The first evaluation is always kept; later ones only when strictly better. Without `evaluate` (no dev
    data) the final model is saved there instead.

    Args:
        model: the unwrapped model (`fit` wraps it per `settings`).
        tokenizer: saved next to every kept model.
        batches: training batches for `fit`.
        settings: run settings.
        optim: optimizer settings.
        run_dir: the run directory (checkpoints, metrics.jsonl); the best model goes to `run_dir/best`
            unless `best` names another directory.
        evaluate: `(unwrapped model) -> dev metrics` (must contain `key_metric`); None: no dev evaluation.
        key_metric: the metric that selects the best model (higher is better).
        loss_fn: `fit`'s loss function (default: its own).
        count_fn: `fit`'s weight counter (default: its own).
        resume: continue from the newest checkpoint in `run_dir`.
        best: the best evaluation so far (e.g. restored on resume); default: none yet.
        step_fn: `() -> step` recorded with a new best (default: no step recorded).
        metric_prefix: prefix of the metric names returned to `fit` (what metrics.jsonl records).
        lora: train LoRA adapters on the frozen GLM (added to `model` in place) instead of every weight;
            the kept models have the adapters merged in. None: full fine-tuning.

    Under torchrun, every rank trains on its share of each global batch (`RankShard`, DDP through `fit`);
    every rank evaluates the same synchronised model and rank 0 alone writes the kept models.

    Returns:
        `fit`'s result and the best dev evaluation.
    """
    from openglm.train.loop import fit

    env = parallel.init_distributed(settings.device, settings.timeout_s)
    if env.distributed:
        batches = RankShard(batches, env.rank, env.world_size)
    if lora is not None:
        with seeded(settings.seed):
            adapted = add_lora(model, lora)
        logger.info("LoRA rank %d on %d layers: %s", lora.rank, adapted, trainable_summary(model))

    out = Path(run_dir)
    best = best if best is not None else BestDev(out / "best")

    def eval_fn(net: nn.Module) -> dict[str, float]:
        inner = unwrap(net)
        metrics = evaluate(inner)  # type: ignore[misc]  # only called when `evaluate` is given
        value = metrics[key_metric]
        if best.value is None or value > best.value:
            best.value, best.metrics = value, dict(metrics)
            best.step = step_fn() if step_fn is not None else None
            if env.is_main:
                save_model_dir(inner, tokenizer, best.directory)
                logger.info("new best dev %s = %.4f (step %s)", key_metric, value, best.step)
            parallel.barrier()  # the kept model is complete before any rank goes on
        return {f"{metric_prefix}{k}": v for k, v in metrics.items()}

    extra: dict[str, Any] = {}
    if loss_fn is not None:
        extra["loss_fn"] = loss_fn
    if count_fn is not None:
        extra["count_fn"] = count_fn
    result = fit(
        model,
        batches,
        settings,
        optim,
        run_dir=out,
        eval_fn=eval_fn if evaluate is not None else None,
        resume=resume,
        env=env,
        **extra,
    )
    if evaluate is None and env.is_main:
        save_model_dir(unwrap(model), tokenizer, best.directory)
    parallel.barrier()
    return result, best


def finetune_generation(
    model: nn.Module,
    tokenizer: Any,
    batches: Sized,
    out_dir: Path,
    evaluate: Callable[[nn.Module], dict[str, float]] | None,
    key_metric: str,
    *,
    label_smoothing: float,
    epochs: float,
    max_steps: int | None,
    batch_size: int,
    grad_accum: int,
    lr: float,
    weight_decay: float,
    warmup: float,
    eval_every: int,
    precision: str,
    device: str,
    seed: int,
    progress: bool,
    lora: LoRASettings | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Fine-tune for generation (seq2seq, text infilling) with the label-smoothed loss and the official linear
    schedule, keep the best dev model in `out_dir/best` and write the summary to `out_dir/metrics.json`.

    Args:
        model: the pretrained model.
        tokenizer: saved with every kept model.
        batches: training batches (their `len` is one epoch).
        out_dir: run directory.
        evaluate: `(unwrapped model) -> dev metrics`; None: no dev data (the final model is kept).
        key_metric: the dev metric that selects the best model.
        label_smoothing: epsilon of the smoothed loss.
        epochs: training epochs (used when `max_steps` is None).
        max_steps: optimizer steps (overrides `epochs`).
        batch_size: rows per micro-batch.
        grad_accum: micro-batches per optimizer step.
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        warmup: warmup fraction.
        eval_every: evaluate every this many steps (0: only at the end).
        precision: `fp32`, `bf16` or `fp16`.
        device: `auto`, `cpu`, `cuda`, ...
        seed: seed of initialisation, dropout and data order.
        progress: show progress bars.
        lora: train LoRA adapters instead of every weight (None: full fine-tuning).
        resume: continue from the newest checkpoint in `out_dir`, keeping its best model unless beaten.

    Returns:
        `{"step", "train_loss", "dev": best dev metrics ({} without dev data), "best": model directory}`.
    """
    from openglm.tasks.seq2seq import smoothed_loss_fn
    from openglm.train.settings import OptimSettings, TrainSettings

    settings = TrainSettings(
        max_steps=max_steps or max(1, math.ceil(len(batches) * epochs / grad_accum)),
        micro_batch_size=batch_size,
        grad_accum=grad_accum,
        precision=precision,
        device=device,
        seed=seed,
        eval_every=eval_every,
        progress=progress,
    )
    optim = OptimSettings(lr=lr, weight_decay=weight_decay, schedule="linear", warmup=warmup)
    best = BestDev(out_dir / "best")
    # `fit` tells the evaluation no step, so the micro-batches are counted to date a new best model.
    micro_batches = [restore_progress(out_dir, key_metric, best) * grad_accum if resume else 0]
    smoothed = smoothed_loss_fn(label_smoothing)

    def loss_fn(net: nn.Module, batch: Batch) -> tuple[Tensor, Tensor]:
        micro_batches[0] += 1
        return smoothed(net, batch)

    result, best = fit_keeping_best(
        model,
        tokenizer,
        batches,  # type: ignore[arg-type]  # the batch sources are iterable as well as sized
        settings,
        optim,
        run_dir=out_dir,
        evaluate=evaluate,
        key_metric=key_metric,
        loss_fn=loss_fn,
        resume=resume,
        best=best,
        step_fn=lambda: micro_batches[0] // grad_accum,
        lora=lora,
    )
    summary = {
        "step": result.step,
        "train_loss": result.losses[-1][1] if result.losses else None,
        "dev": best.metrics or {},
        "best": str(best.directory),
    }
    if parallel.is_main():
        write_text_atomic(out_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")
    return summary
