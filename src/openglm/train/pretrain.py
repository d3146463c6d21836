"""`openglm pretrain`: GLM pretraining from a YAML recipe plus dotted overrides (issue 5, spec C and C.10).

`torchrun --nproc_per_node N -m openglm pretrain ...` runs the same function on N ranks (DDP or FSDP2).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from openglm import parallel
from openglm.atomic import replace_directory, write_text_atomic
from openglm.blank_infilling import MODES, ObjectiveConfig
from openglm.config import GLMConfig, pad_vocab_size
from openglm.model import GLMModel
from openglm.train.checkpoint import latest_checkpoint, verify_checkpoint
from openglm.train.loop import METRICS_NAME, evaluate_loss, fit, seed_everything
from openglm.train.settings import OptimSettings, TrainSettings

log = logging.getLogger(__name__)


@dataclass
class DataSettings:
    """Where pretraining batches come from.

    Attributes:
        path: token shards written by `openglm data prepare` (a directory holding manifest.json).
        tokenizer: tokenizer directory; None means the one recorded in the shard manifest.
        synthetic: train on synthetic blank-infilling batches instead (smoke tests, throughput, planning).
        seq_length: sample length before corruption (512 in the official runs); at most the model's
            max_sequence_length.
        valid_fraction: share of documents held out for validation.
        valid_batches: validation batches per objective (token / sentence / document).
        seed: the data seed (sample stream, corruption, validation split).
        multi_task: downstream cloze tasks mixed into pretraining (the official --multi-task-data), each
            `TASK=DATA_DIR` (a built-in task and the folder of its split files) or a task .yaml file: their
            labelled training examples, rendered by the pattern with the answer filled in, go through the
            same objective.
        multi_task_ratio: the probability that a step trains on a batch of those examples instead of the
            corpus (the official --multi-task-ratio).
    """

    path: str | None = None
    tokenizer: str | None = None
    synthetic: bool = False
    seq_length: int = 512
    valid_fraction: float = 0.01
    valid_batches: int = 4
    seed: int = 0
    multi_task: list[str] = field(default_factory=list)
    multi_task_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.seq_length < 8:
            raise ValueError(f"data.seq_length={self.seq_length!r} must be >= 8")
        if not 0.0 <= self.multi_task_ratio <= 1.0:
            raise ValueError(f"data.multi_task_ratio={self.multi_task_ratio!r} must be in [0, 1]")
        if bool(self.multi_task) != (self.multi_task_ratio > 0):
            raise ValueError(
                "data.multi_task and data.multi_task_ratio go together: set both (tasks and a ratio > 0) or neither"
            )
        if self.multi_task and self.synthetic:
            raise ValueError("data.multi_task needs a tokenized corpus, not data.synthetic")
        if not 0.0 <= self.valid_fraction < 1.0:
            raise ValueError(f"data.valid_fraction={self.valid_fraction!r} must be in [0, 1)")
        if self.valid_batches < 0:
            raise ValueError(f"data.valid_batches={self.valid_batches!r} must be >= 0")
        if self.seed < 0:  # numpy's seed sequences take only non-negative entropy
            raise ValueError(f"data.seed={self.seed!r} must be >= 0")


def _build_config(model: str, overrides: dict[str, Any], vocab_size: int | None) -> GLMConfig:
    config = GLMConfig.resolve(model)
    if overrides:
        known = set(GLMConfig.__dataclass_fields__)
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"model_overrides: unknown GLMConfig field(s) {unknown}")
        config = config.replace(**overrides)
    if vocab_size is not None and "vocab_size" not in overrides and config.vocab_size != vocab_size:
        log.info("vocab_size %d -> %d (the tokenizer's, padded to 128)", config.vocab_size, vocab_size)
        config = config.replace(vocab_size=vocab_size)
    if vocab_size is not None and config.vocab_size < vocab_size:
        raise ValueError(
            f"model_overrides.vocab_size={config.vocab_size} is smaller than the tokenizer's {vocab_size}"
        )
    return config


def pretrain(
    model: str = "tiny",
    data: DataSettings = DataSettings(),  # noqa: B008 (never mutated; jsonargparse reads the defaults)
    objective: ObjectiveConfig = ObjectiveConfig(),  # noqa: B008
    train: TrainSettings = TrainSettings(),  # noqa: B008
    optim: OptimSettings = OptimSettings(),  # noqa: B008
    out_dir: str = "runs/pretrain",
    model_overrides: dict[str, Any] | None = None,
    init_from: str | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Pretrain GLM with autoregressive blank infilling.

    Args:
        model: architecture: a preset name (`tiny`, `small`, `glm-base`, `glm-large`, `glm-10b`, ...) or a
            config.json path. vocab_size follows the tokenizer unless `model_overrides` sets it.
        data: batch source settings.
        objective: the blank-infilling objective mix (spec C.2-C.6).
        train: run settings (steps, batch, precision, strategy, checkpoints, ...).
        optim: AdamW and learning-rate schedule settings (spec C.10).
        out_dir: run folder: metrics.jsonl, checkpoints/, and the final model in model/. A fresh run refuses
            a folder that already holds a run (checkpoints, metrics or a model); continue it with `resume`.
        model_overrides: GLMConfig fields to change, e.g. {num_layers: 4, hidden_size: 256}.
        init_from: start from these weights (an openglm checkpoint directory) instead of a fresh init.
        resume: continue exactly from the newest checkpoint in out_dir.

    Returns:
        Summary: final step, last training loss, validation losses, the model directory.
    """
    if data.path is None and not data.synthetic:
        raise ValueError(
            "data.path is required (token shards from `openglm data prepare`), or set data.synthetic"
        )
    check_out_dir(out_dir)
    if not resume:
        found = existing_run(out_dir)
        if found:
            raise ValueError(
                f"out_dir={out_dir} already holds a run ({', '.join(found)}); pass --resume true to continue "
                "it, or choose another --out_dir"
            )
    env = parallel.init_distributed(train.device, train.timeout_s)
    try:
        return _pretrain(
            model, data, objective, train, optim, Path(out_dir), model_overrides or {}, init_from, resume, env
        )
    finally:
        parallel.teardown()


def check_out_dir(out_dir: str | os.PathLike, flag: str = "out_dir") -> None:
    """Fail early, with one line, when `out_dir` (or a folder above it) exists but is not a directory."""
    path = Path(out_dir)
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                where = "" if p == path else f" ({p} is a file)"
                raise ValueError(f"{flag}={out_dir}: not a directory{where}; choose another --{flag}")
            return


def held_out_batches(
    corpus: Any,
    special: Any,
    data: DataSettings,
    objective: ObjectiveConfig,
    batch_size: int,
    modes: tuple[str, ...] = MODES,
) -> dict[str, list[dict[str, Any]]] | None:
    """The fixed validation batches per objective of a run with these settings (its held-out documents);
    None when the run holds out nothing.

    Args:
        corpus: the run's whole `ShardedCorpus`.
        special: the tokenizer's `SpecialTokens`.
        data: the run's data settings (valid_fraction, valid_batches, seq_length, seed).
        objective: the run's objective.
        batch_size: the run's micro-batch size.
        modes: the objectives to build batches for.
    """
    from openglm.data import split_documents, validation_batches

    if not (data.valid_fraction > 0 and data.valid_batches > 0):
        return None
    _, valid_ids = split_documents(len(corpus), data.valid_fraction, data.seed)
    return validation_batches(
        corpus.subset(valid_ids),
        special,
        objective,
        seq_length=data.seq_length,
        batch_size=batch_size,
        num_batches=data.valid_batches,
        seed=data.seed,
        modes=modes,
    )


def existing_run(out_dir: str | os.PathLike) -> list[str]:
    """What of a previous run `out_dir` holds: checkpoints, metrics or an exported model (empty: none).

    A folder left by a run that failed before its first metric (an empty metrics.jsonl, run.json) holds
    nothing worth keeping, so a fresh run may start there.
    """
    path = Path(out_dir)
    found = []
    checkpoints = path / "checkpoints"
    if checkpoints.is_dir() and any(checkpoints.iterdir()):
        found.append("checkpoints/")
    metrics = path / METRICS_NAME
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(METRICS_NAME)
    if (path / "model").exists():
        found.append("model/")
    return found


def _pretrain(
    model_name: str,
    data: DataSettings,
    objective: ObjectiveConfig,
    train: TrainSettings,
    optim: OptimSettings,
    out_dir: Path,
    overrides: dict[str, Any],
    init_from: str | None,
    resume: bool,
    env: parallel.DistEnv,
) -> dict[str, Any]:
    tokenizer = None
    if data.synthetic:
        config = _build_config(model_name, overrides, None)
    else:
        from openglm.data import ShardedCorpus

        corpus = ShardedCorpus(data.path)
        tok_dir = data.tokenizer or corpus.manifest.get("tokenizer")
        if not tok_dir:
            raise ValueError(f"{data.path}: the manifest names no tokenizer; set data.tokenizer")
        from openglm.tokenizer import GLMTokenizer

        tokenizer = GLMTokenizer.from_pretrained(tok_dir)
        corpus.check_tokenizer(tokenizer)  # shards of another tokenizer would train on the wrong ids
        config = _build_config(model_name, overrides, pad_vocab_size(tokenizer.num_tokens))
    if data.seq_length > config.max_sequence_length:
        raise ValueError(
            f"data.seq_length={data.seq_length} exceeds the model's max_sequence_length={config.max_sequence_length}"
        )
    if resume:
        latest = latest_checkpoint(out_dir)
        if latest is not None:
            # Before run.json is rewritten: a checkpoint that cannot be resumed must leave the run as it was.
            verify_checkpoint(latest, config)
    train_batches, valid = _batches(data, objective, train, config, tokenizer, env)

    seed_everything(train.seed)
    net = GLMModel.from_pretrained(init_from, config=config) if init_from else GLMModel(config)
    if env.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        settings = {
            "model": config.to_dict(),
            "data": asdict(data),
            "objective": asdict(objective),
            "train": asdict(train),
            "optim": asdict(optim),
            "world_size": env.world_size,
        }
        write_text_atomic(out_dir / "run.json", json.dumps(settings, indent=2) + "\n")
        log.info(
            "GLM %.2fM parameters, %d rank(s), global batch %d x %d tokens",
            config.num_parameters() / 1e6,
            env.world_size,
            train.micro_batch_size * train.grad_accum * env.world_size,
            data.seq_length,
        )

    def eval_fn(m: torch.nn.Module) -> dict[str, float]:
        return evaluate_loss(m, valid, device=env.device)

    result = fit(
        net,
        train_batches,
        train,
        optim,
        run_dir=out_dir,
        eval_fn=eval_fn if valid else None,
        resume=resume,
        env=env,
    )
    model_dir = out_dir / "model"
    if env.is_main and result.checkpoint is not None:
        _export(result.checkpoint, model_dir, tokenizer)
    summary: dict[str, Any] = {"step": result.step, "model_dir": str(model_dir)}
    if result.losses:
        summary["loss"] = result.losses[-1][1]
    summary.update(result.eval)
    return summary


def _batches(data, objective, train, config, tokenizer, env) -> tuple[Any, list[dict[str, Any]]]:
    if data.synthetic:
        from openglm.train.synthetic import SyntheticBatches

        def source(seed: int, mode: str = "token") -> SyntheticBatches:
            return SyntheticBatches(
                config.vocab_size,
                data.seq_length,
                train.micro_batch_size,
                seed,
                env.rank,
                env.world_size,
                mode,
            )

        held = source(data.seed + 1)
        valid = [held.batch(i) for i in range(data.valid_batches)]
        return source(data.seed), valid
    from openglm.blank_infilling import SpecialTokens
    from openglm.data import PretrainingBatches, ShardedCorpus, split_documents

    corpus = ShardedCorpus(data.path)
    special = SpecialTokens.from_tokenizer(tokenizer)
    train_corpus, valid = corpus, []
    per_mode = held_out_batches(corpus, special, data, objective, train.micro_batch_size)
    if per_mode is not None:
        train_corpus = corpus.subset(split_documents(len(corpus), data.valid_fraction, data.seed)[0])
        # Ranks split the fixed validation batches when they divide evenly (FSDP2 forwards are collective, so
        # all ranks must run the same number); otherwise every rank evaluates all of them, and the duplicated
        # sums, reduced over ranks, leave the mean unchanged.
        flat = [b for batches in per_mode.values() for b in batches]
        valid = flat[env.rank :: env.world_size] if len(flat) % env.world_size == 0 else flat
    batches = PretrainingBatches(
        train_corpus,
        special,
        objective,
        seq_length=data.seq_length,
        batch_size=train.micro_batch_size,
        seed=data.seed,
        rank=env.rank,
        world_size=env.world_size,
        pad_id=tokenizer.pad_id if tokenizer.pad_id is not None else 0,
        multi_task=_multi_task(data, tokenizer),
        multi_task_ratio=data.multi_task_ratio,
    )
    return batches, valid


def _multi_task(data: DataSettings, tokenizer: Any) -> list[Any]:
    if not data.multi_task:
        return []
    from openglm.tasks import multi_task_samples

    return multi_task_samples(data.multi_task, tokenizer, data.seq_length)


def _export(checkpoint: Path, model_dir: Path, tokenizer: Any) -> None:
    """Copy the final weights (and the tokenizer) into out_dir/model, a directory `openglm infill` loads.

    The new directory is complete before it replaces the old one, and a failed copy leaves no temporary behind.
    """
    import shutil

    def write(folder: Path) -> None:
        for name in ("config.json", "model.safetensors"):
            shutil.copy2(checkpoint / name, folder / name)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)

    replace_directory(model_dir, write)
