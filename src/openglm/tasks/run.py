"""`openglm finetune` and `openglm eval` (issue 7, spec D.2-D.6): full fine-tuning of a GLM checkpoint on a
classification task (cloze or classifier head) with the shared training loop, keeping the best-dev model and
writing a metrics JSON; zero-shot LM, seq2seq and infilling task names are handed to their own modules.

Input is checked before any training: a missing model folder, an out_dir holding an earlier run, unlabelled
training or dev examples and rows longer than the model's positions are one-line errors up front, so that a
run never fails after hours of training and never overwrites what the user had.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from openglm import parallel
from openglm.atomic import write_text_atomic
from openglm.lora import ALL_TARGETS, LoRASettings
from openglm.ptuning import ENCODERS, GLMWithPrompts, PromptEncoder, prompt_settings
from openglm.tasks.classifier import (
    GLMForSequenceClassification,
    classifier_scores,
    encode_classifier_example,
    is_classifier_dir,
)
from openglm.tasks.cloze import (
    ClozeSample,
    ClozeTask,
    Example,
    cloze_loss,
    cloze_scores,
    collate,
    encode_example,
    filled_pattern_tokens,
    prompt_count,
)
from openglm.tasks.finetuning import BestDev, check_run_dir, fit_keeping_best, restore_progress, seeded
from openglm.tasks.metrics import compute_metrics
from openglm.tasks.superglue import SPLIT_FILES, TASKS, SuperGLUETask, get_task

logger = logging.getLogger(__name__)

MODES = ("cloze", "classifier")
RECIPES = ("large", "10b")
METRICS_FILE = "metrics.json"
BEST_DIR = "best"
# Task names served by the zero-shot LM / generation modules rather than by this one.
LM_EVAL_TASKS = ("lambada", "wikitext", "perplexity", "multichoice")
SEQ2SEQ_TASKS = ("xsum", "seq2seq", "cnn_dm", "gigaword")
INFILLING_TASKS = ("blank", "yahoo")


@dataclass(frozen=True)
class TaskData:
    """Where a task's data is and how its model inputs are built.

    Attributes:
        data_dir: folder with the split files (SuperGLUE: train.jsonl / val.jsonl / test.jsonl; YAML tasks:
            overrides the file's `data.dir`). For zero-shot LM tasks: the data file itself.
        train_file: explicit training file (overrides `data_dir`).
        dev_file: explicit development file.
        test_file: explicit test file (evaluated with the best model when labelled).
        pattern_id: cloze pattern; default the task's official one (GLM-10B used 0 for every task, spec D.3).
        max_seq_length: row length; default the task's official one.
        mode: `cloze` (pattern + verbalizer / answer scoring) or `classifier` (pooled head baseline, D.4).
        pool_token: classifier pooling: `cls`, `start` or `pad`.
        loss_func: `cross_entropy`, `hinge`, `generative` or `mix`; default the task's (WSC: mix).
        length_penalty: multi-token score normaliser exponent; default the task's (WSC: 1).
        max_train_examples: use only the first N training examples (quick runs).
        max_eval_examples: evaluate only the first N examples.
        prompt_tokens: P-tuning (spec D.5, cloze mode): this many continuous-prompt tokens before Part A
            (a YAML pattern may also place `{prompt: N}`); their embeddings come from a prompt encoder that
            trains with the model. Default for a P-tuned checkpoint: the count it was trained with.
        prompt_encoder: `lstm` (official default), `mlp` or `none` (the raw prompt embeddings).
        prompt_init: start each new prompt embedding as a random mix of a frequent word's embedding (one of
            the first 5000 ids) and a label word's (the answers' tokens for multi-token tasks), instead of
            random normal vectors.
    """

    data_dir: str | None = None
    train_file: str | None = None
    dev_file: str | None = None
    test_file: str | None = None
    pattern_id: int | None = None
    max_seq_length: int | None = None
    mode: str = "cloze"
    pool_token: str = "cls"
    loss_func: str | None = None
    length_penalty: float | None = None
    max_train_examples: int | None = None
    max_eval_examples: int | None = None
    prompt_tokens: int = 0
    prompt_encoder: str = "lstm"
    prompt_init: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"data.mode={self.mode!r}; expected one of {MODES}")
        if self.prompt_tokens < 0:
            raise ValueError(f"data.prompt_tokens={self.prompt_tokens!r} must be >= 0")
        if self.prompt_tokens and self.mode != "cloze":
            raise ValueError("data.prompt_tokens (P-tuning) applies to cloze mode only")
        if self.prompt_encoder not in ENCODERS:
            raise ValueError(f"data.prompt_encoder={self.prompt_encoder!r}; expected one of {ENCODERS}")
        for name in ("max_seq_length", "max_train_examples", "max_eval_examples"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"data.{name}={value!r} must be positive")


@dataclass(frozen=True)
class FinetuneSettings:
    """Fine-tuning run settings; None means the official value for the task and recipe (spec D.6).

    Attributes:
        recipe: `large` (GLM-Base/Large scripts: lr 1e-5, wd 0.1, Adam betas .9/.999) or `10b` (the GLM-10B
            DeepSpeed config: lr 5e-6, wd 0.01, betas .9/.95, batch 64, the XXLARGE epoch counts).
        epochs: passes over the training set.
        max_steps: optimizer steps; overrides `epochs`.
        batch_size: examples per optimizer step.
        eval_batch_size: examples per evaluation forward pass.
        lr: peak learning rate.
        weight_decay: AdamW weight decay.
        warmup: linear warmup as a fraction of the run (classification default 0.1).
        lr_decay_ratio: the linear decay ends at this fraction of the peak.
        beta2: Adam beta2.
        eps: Adam epsilon.
        clip_grad: gradient-norm clipping (0 disables).
        eval_every: steps between dev evaluations; default once per epoch.
        seed: seeds the model's dropout and the shuffling.
        device: `auto`, `cpu`, `cuda`, `cuda:N`.
        precision: `fp32`, `bf16` or `fp16` (CUDA).
        resume: continue from the newest checkpoint in the output directory.
        progress: show progress bars.
        block_lm_ratio: rho of the block-LM regularisation (spec D.10, cloze mode): a step is, with
            probability rho / (1 + rho), a blank-infilling batch of the training examples with the answer
            filled into the pattern. 0 turns it off (default).
        lora_rank: > 0 trains LoRA adapters of this rank on a frozen GLM instead of every weight (a
            classifier head still trains fully); the kept model has the adapters merged in. 0: full
            fine-tuning (default, as officially).
        lora_alpha: LoRA scale numerator (updates are scaled by alpha / rank).
        lora_dropout: dropout on the adapters' input.
        lora_targets: the linear layers that get adapters (default all four of every block).
        freeze_transformer: with P-tuning (`data.prompt_tokens` or `{prompt: N}` slots), train only the
            prompt encoder and keep every GLM weight as it is (prompt tuning).
        tune_prefix_layers: with `freeze_transformer`, still train the word embeddings and the first N
            transformer layers (0: the word embeddings only).
    """

    recipe: str = "large"
    epochs: int | None = None
    max_steps: int | None = None
    batch_size: int | None = None
    eval_batch_size: int = 16
    lr: float | None = None
    weight_decay: float | None = None
    warmup: float | None = None
    lr_decay_ratio: float = 0.1
    beta2: float | None = None
    eps: float = 1e-8
    clip_grad: float = 1.0
    eval_every: int | None = None
    seed: int = 1234
    device: str = "auto"
    precision: str = "fp32"
    resume: bool = False
    progress: bool = True
    block_lm_ratio: float = 0.0
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple[str, ...] = ALL_TARGETS
    freeze_transformer: bool = False
    tune_prefix_layers: int | None = None

    def __post_init__(self) -> None:
        if self.tune_prefix_layers is not None and (
            self.tune_prefix_layers < 0 or not self.freeze_transformer
        ):
            raise ValueError(
                f"train.tune_prefix_layers={self.tune_prefix_layers!r} needs train.freeze_transformer and a "
                "count >= 0"
            )
        if self.lora_rank < 0:
            raise ValueError(f"train.lora_rank={self.lora_rank!r} must be >= 0 (0 = full fine-tuning)")
        self.lora()  # validates the other LoRA settings
        if self.block_lm_ratio < 0:
            raise ValueError(f"train.block_lm_ratio={self.block_lm_ratio!r} must be >= 0")
        if self.recipe not in RECIPES:
            raise ValueError(f"train.recipe={self.recipe!r}; expected one of {RECIPES}")
        for name in ("epochs", "max_steps", "batch_size", "eval_batch_size", "eval_every"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"train.{name}={value!r} must be positive")

    def lora(self) -> LoRASettings | None:
        """The LoRA settings, or None for full fine-tuning."""
        if not self.lora_rank:
            return None
        return LoRASettings(self.lora_rank, self.lora_alpha, self.lora_dropout, tuple(self.lora_targets))


# Shared defaults of the entry points; the dataclasses are frozen, so sharing one instance is safe.
DEFAULT_DATA = TaskData()
DEFAULT_TRAIN = FinetuneSettings()


# ---------------------------------------------------------------------------------------------------------------
# Task and data resolution


def resolve_task(task: str) -> ClozeTask:
    """A built-in SuperGLUE task by name, or a YAML task file."""
    if task.endswith((".yaml", ".yml")):
        from openglm.tasks.custom import load_task

        return load_task(task)
    if task.lower() in TASKS:
        return get_task(task)
    known = sorted(TASKS) + list(LM_EVAL_TASKS + SEQ2SEQ_TASKS + INFILLING_TASKS)
    raise ValueError(f"unknown task {task!r}; expected one of {known} or a task .yaml file")


def split_file(task: ClozeTask, data: TaskData, split: str) -> Path:
    """The data file of `split` for this task and settings."""
    explicit = {"train": data.train_file, "dev": data.dev_file, "test": data.test_file}.get(split)
    if explicit:
        return Path(explicit)
    if hasattr(task, "split_path"):  # YAML tasks know their own files
        return task.split_path(split, data.data_dir)
    if data.data_dir is None:
        raise ValueError(
            f"task {task.name}: pass --data.data_dir DIR (the folder with {SPLIT_FILES[split]}) "
            f"or --data.{split}_file FILE"
        )
    return Path(data.data_dir) / SPLIT_FILES[split]


def has_split(task: ClozeTask, data: TaskData, split: str) -> bool:
    try:
        return split_file(task, data, split).is_file()
    except ValueError:
        return False


def load_examples(task: ClozeTask, data: TaskData, split: str, limit: int | None = None) -> list[Example]:
    examples = task.read(split_file(task, data, split), split)
    if not examples:
        raise ValueError(f"task {task.name}: split {split} ({split_file(task, data, split)}) has no examples")
    return examples[:limit] if limit else examples


def check_labels(task: ClozeTask, examples: Sequence[Example], split: str, required: bool) -> bool:
    """Whether the examples are labelled: all of them (True) or none (False, a test split to predict).

    Training and dev examples must all be labelled (`required`): an unlabelled one has no loss and cannot
    select a best model. A split with some labels and not others is refused too, as scoring only part of it
    would report a metric of a different set. Both errors name the first unlabelled example's file and line.
    Bad label values (not in the task's label list) are reported here as well, before any training.

    Args:
        task: the task.
        examples: the split's examples.
        split: `train`, `dev` or `test`.
        required: every example must be labelled.

    Returns:
        True when every example is labelled, False when none is.
    """
    unlabelled = [e for e in examples if task.label_index(e, split) < 0]
    if not unlabelled:
        return True
    if required or len(unlabelled) < len(examples):
        first = unlabelled[0]
        if not required:
            others = len(examples) - len(unlabelled)
            why = (
                f"{others} of the {len(examples)} {split} examples have one; label them all, or none to get "
                "predictions only"
            )
        elif split == "train":
            why = "training needs every example labelled"
        else:
            why = f"the {split} examples select the best model, so each needs one"
        raise ValueError(
            f"{first.where(task.name)}: the {split} example has no label (field {task.label_field!r}); {why}"
        )
    return False


def fit_positions(net: nn.Module, task: ClozeTask, data: TaskData) -> TaskData:
    """`data` with rows that fit the model's position table: a task's default length is capped at it (short
    examples lose nothing; long ones are shortened as usual), an explicit --data.max_seq_length beyond it is
    refused up front (it would index past the table mid-run)."""
    limit = net.config.max_sequence_length
    if data.max_seq_length is not None:
        if data.max_seq_length > limit:
            raise ValueError(
                f"--data.max_seq_length {data.max_seq_length} does not fit the model's max_sequence_length "
                f"{limit}; pass {limit} or less"
            )
        return data
    if task.max_seq_length <= limit:
        return data
    logger.info(
        "%s: rows of %d tokens (the model's positions) instead of %d", task.name, limit, task.max_seq_length
    )
    return dataclasses.replace(data, max_seq_length=limit)


def check_model_dir(model: str | os.PathLike) -> None:
    """A missing model folder is named as such (else the tokenizer, looked for in it first, is blamed)."""
    if not Path(model).exists():
        raise FileNotFoundError(f"model directory not found: {model}")
    if not Path(model).is_dir():
        raise NotADirectoryError(f"--model {model}: a file; name the model's directory")


def multi_task_samples(entries: Sequence[str], tokenizer: Any, max_length: int) -> list[np.ndarray]:
    """Multi-task pretraining examples (the official --multi-task-data, spec C.9): every labelled training
    example of the given cloze tasks, rendered by the task's pattern with its answer in the blank, as a
    `[CLS] ... eos` token array of at most `max_length` tokens (long inputs shortened as in fine-tuning).

    Args:
        entries: `TASK` or `TASK=DATA_DIR`: a built-in task name or a task .yaml file, and the folder of its
            split files (built-in tasks need it; a .yaml task defaults to its own `data.dir`).
        tokenizer: the pretraining tokenizer.
        max_length: the pretraining sample length.

    Returns:
        The examples of all tasks, in task order.
    """
    pool: list[np.ndarray] = []
    for entry in entries:
        name, _, folder = (part.strip() for part in entry.partition("="))
        if not folder and not name.endswith((".yaml", ".yml")):
            raise ValueError(
                f"multi-task entry {entry!r}: name the folder of its split files, {name}=DATA_DIR"
            )
        task = resolve_task(name)
        examples = load_examples(task, TaskData(data_dir=folder or None), "train")
        labelled = [e for e in examples if task.label_index(e, "train") >= 0]
        if not labelled:
            raise ValueError(f"multi-task entry {entry!r}: the train split has no labelled examples")
        pool.extend(filled_pattern_tokens(task, e, tokenizer, None, max_length) for e in labelled)
        logger.info("multi-task data: %d examples of %s", len(labelled), task.name)
    return pool


def encode_all(
    task: ClozeTask, examples: Sequence[Example], tokenizer: Any, data: TaskData, split: str
) -> list[ClozeSample]:
    max_len = data.max_seq_length or task.max_seq_length
    if data.mode == "classifier":
        return [encode_classifier_example(task, e, tokenizer, max_len, split) for e in examples]
    samples = [
        encode_example(task, e, tokenizer, data.pattern_id, max_len, split, data.prompt_tokens)
        for e in examples
    ]
    n_trunc = sum(s.truncated for s in samples)
    if n_trunc:
        logger.info(
            "%s %s: %d of %d inputs truncated to %d tokens", task.name, split, n_trunc, len(samples), max_len
        )
    return samples


def official_defaults(task: ClozeTask, settings: FinetuneSettings) -> dict[str, float]:
    """epochs, batch_size, lr, weight_decay, beta2 for this task: explicit settings, else spec D.6."""
    ten_b = settings.recipe == "10b"
    if isinstance(task, SuperGLUETask):
        d = task.defaults
        base = {
            "epochs": d.epochs_10b if ten_b else d.epochs,
            "batch_size": 64 if ten_b else d.batch_size,
        }
    else:
        custom = getattr(task, "defaults", {}) or {}
        base = {"epochs": custom.get("epochs", 3), "batch_size": custom.get("batch_size", 16)}
        for key in ("lr", "weight_decay", "warmup"):
            if key in custom:
                base[key] = custom[key]
    base.setdefault("lr", 5e-6 if ten_b else 1e-5)
    base.setdefault("weight_decay", 0.01 if ten_b else 0.1)
    base["beta2"] = 0.95 if ten_b else 0.999
    for key in ("epochs", "batch_size", "lr", "weight_decay", "beta2"):
        value = getattr(settings, key)
        if value is not None:
            base[key] = value
    return base


# ---------------------------------------------------------------------------------------------------------------
# Batches, scoring, evaluation


class EpochBatches:
    """Re-iterable training batches: each pass is one epoch in a new order drawn from (seed, epoch).

    `state_dict`/`load_state_dict` let the training loop resume at the exact batch.
    """

    def __init__(self, samples: Sequence[ClozeSample], batch_size: int, seed: int) -> None:
        if not samples:
            raise ValueError("no training examples")
        self.samples = list(samples)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        return math.ceil(len(self.samples) / self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.samples))
        while self.position < len(self):
            chunk = order[self.position * self.batch_size : (self.position + 1) * self.batch_size]
            self.position += 1
            yield collate([self.samples[i] for i in chunk])
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


class MixedBatches:
    """Block-LM regularisation (spec D.10): each step is, with probability ratio / (1 + ratio), a pretraining-
    style blank-infilling batch of filled patterns; otherwise the next cloze batch. Draws come from
    (seed, step), so a resumed run sees the same sequence."""

    def __init__(
        self,
        cloze: EpochBatches,
        filled: Sequence[np.ndarray],
        tokenizer: Any,
        ratio: float,
        seed: int,
    ) -> None:
        from openglm.blank_infilling import BlankInfilling, ObjectiveConfig, SpecialTokens

        if not filled:
            raise ValueError("block-LM regularisation needs labelled training examples")
        self.cloze = cloze
        self.filled = list(filled)
        self.objective = BlankInfilling(ObjectiveConfig(), SpecialTokens.from_tokenizer(tokenizer))
        self.pad_id = tokenizer.eos_id
        self.prob = ratio / (1.0 + ratio)
        self.seed = seed
        self.step = 0
        self._cloze_iter: Iterator[dict[str, Tensor]] | None = None

    def _next_cloze(self) -> dict[str, Tensor]:
        if self._cloze_iter is None:
            self._cloze_iter = iter(self.cloze)
        try:
            return next(self._cloze_iter)
        except StopIteration:
            self._cloze_iter = iter(self.cloze)
            return next(self._cloze_iter)

    def _block_batch(self, rng: np.random.Generator) -> dict[str, Any] | None:
        from openglm.blank_infilling import pad_rows

        pick = rng.choice(len(self.filled), size=min(self.cloze.batch_size, len(self.filled)), replace=False)
        block = self.objective([self.filled[i] for i in pick], rng)
        if not block.rows:  # every sample too short for its spans
            return None
        arrays = pad_rows(block.rows, pad_id=self.pad_id)
        return {**{k: torch.from_numpy(v) for k, v in arrays.items()}, "mode": block.mode}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            rng = np.random.default_rng([self.seed, 7, self.step])
            self.step += 1
            batch = self._block_batch(rng) if rng.random() < self.prob else None
            yield batch if batch is not None else self._next_cloze()

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "cloze": self.cloze.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.cloze.load_state_dict(state["cloze"])
        self._cloze_iter = None


def batch_scores(model: nn.Module, batch: dict[str, Tensor], mode: str, length_penalty: float) -> Tensor:
    """Label/choice scores [B, K] of a batch for either mode."""
    if mode == "classifier":
        return classifier_scores(model, batch)
    return cloze_scores(model, batch, length_penalty)


@torch.no_grad()
def predict_scores(
    model: nn.Module,
    samples: Sequence[ClozeSample],
    mode: str,
    length_penalty: float = 0.0,
    batch_size: int = 16,
    progress: bool = False,
) -> list[np.ndarray]:
    """Scores of every example (one array of label or choice scores each), in input order. Under torchrun
    each rank scores its share of the examples (`parallel.shard_map`): call it on every rank."""
    from tqdm.auto import tqdm

    def score(share: Sequence[ClozeSample]) -> list[np.ndarray]:
        out: list[np.ndarray] = []
        starts = range(0, len(share), batch_size)
        bar = not progress or not parallel.is_main()
        for start in tqdm(starts, desc="eval", disable=bar, leave=False, dynamic_ncols=True):
            chunk = share[start : start + batch_size]
            scores = batch_scores(model, collate(chunk), mode, length_penalty).float().cpu().numpy()
            out.extend(
                scores[i, : s.num_choices if s.targets is not None else scores.shape[1]]
                for i, s in enumerate(chunk)
            )
        return out

    was_training = model.training
    model.eval()
    try:
        return parallel.shard_map(score, samples)
    finally:
        model.train(was_training)


def score_examples(
    task: ClozeTask, examples: Sequence[Example], scores: Sequence[np.ndarray], split: str
) -> dict[str, float]:
    """The task's metrics for predicted scores (empty when the split is unlabelled)."""
    labels = [task.label_index(e, split) for e in examples]
    if any(label < 0 for label in labels):
        return {}
    predictions = [task.predict(e, s) for e, s in zip(examples, scores, strict=True)]
    return compute_metrics(task.metrics, predictions, labels, examples)


# ---------------------------------------------------------------------------------------------------------------
# Model and tokenizer loading, saving


def load_tokenizer(model_dir: str | os.PathLike, tokenizer: str | os.PathLike | None) -> Any:
    from openglm.tokenizer import GLMTokenizer

    try:
        return GLMTokenizer.from_spec(tokenizer or model_dir)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err} -- pass --tokenizer DIR or KIND:VOCAB_PATH") from None


def load_model(
    model_dir: str | os.PathLike, task: ClozeTask, data: TaskData, device: torch.device
) -> nn.Module:
    """The backbone for cloze mode (with its prompt encoder when P-tuned); backbone + head for classifier
    mode (a saved head is reused)."""
    from openglm.model import GLMModel

    if prompt_settings(model_dir) is not None:
        if data.mode != "cloze":
            raise ValueError(
                f"{model_dir} holds a P-tuned model; it answers cloze questions (data.mode=cloze)"
            )
        return GLMWithPrompts.from_pretrained(model_dir, device=device)
    if is_classifier_dir(model_dir):
        if data.mode != "classifier":
            raise ValueError(f"{model_dir} holds a classifier-head model; pass --data.mode classifier")
        return GLMForSequenceClassification.from_pretrained(model_dir, device=device)
    backbone = GLMModel.from_pretrained(model_dir, device=device)
    if data.mode == "cloze":
        return backbone
    num_classes = 1 if task.multi_token else len(task.label_list)
    return GLMForSequenceClassification(backbone, num_classes, data.pool_token).to(device)


def prompt_data(model_dir: str | os.PathLike, data: TaskData) -> TaskData:
    """`data` with the prefix prompt count a P-tuned checkpoint was trained with, unless set explicitly."""
    meta = prompt_settings(model_dir)
    if meta is None or data.prompt_tokens:
        return data
    return dataclasses.replace(data, prompt_tokens=meta["prefix_tokens"], prompt_encoder=meta["encoder"])


def attach_prompts(
    net: nn.Module, samples: Sequence[ClozeSample], data: TaskData, train: FinetuneSettings | None = None
) -> nn.Module:
    """The model that reads the samples' prompt tokens: a P-tuned model is checked against them; for
    training (`train` given) a plain GLM gets a new prompt encoder when they have any, and
    `train.freeze_transformer` freezes the GLM."""
    n = prompt_count(samples)
    if isinstance(net, GLMWithPrompts):
        if n != net.encoder.num_tokens:
            raise ValueError(
                f"the model was P-tuned with {net.encoder.num_tokens} prompt tokens, but the inputs place "
                f"{n or 0} (data.prompt_tokens={data.prompt_tokens}, plus the pattern's prompt slots)"
            )
    elif n:
        if train is None:
            raise ValueError(
                f"the inputs place {n} prompt tokens (data.prompt_tokens), but the model is not P-tuned"
            )
        if train.lora_rank:
            raise ValueError(
                "P-tuning (prompt tokens) and LoRA (train.lora_rank) are separate methods; pick one"
            )
        device = next(net.parameters()).device
        with seeded(train.seed):
            encoder = PromptEncoder(n, net.config.hidden_size, data.prompt_encoder)
        if data.prompt_init:
            generator = torch.Generator().manual_seed(train.seed)
            encoder.init_from_words(net.word_embeddings.weight, _answer_ids(samples), generator)
        net = GLMWithPrompts(net, encoder.to(device), data.prompt_tokens)
    if train is not None and train.freeze_transformer:
        if not isinstance(net, GLMWithPrompts):
            raise ValueError(
                "train.freeze_transformer trains only prompt tokens: set data.prompt_tokens (or {prompt: N} "
                "pieces in a YAML pattern)"
            )
        net.model.requires_grad_(False)
        if train.tune_prefix_layers is not None:
            layers = net.model.transformer.layers
            if train.tune_prefix_layers > len(layers):
                raise ValueError(
                    f"train.tune_prefix_layers={train.tune_prefix_layers} but the model has {len(layers)} layers"
                )
            net.model.word_embeddings.requires_grad_(True)
            for layer in layers[: train.tune_prefix_layers]:
                layer.requires_grad_(True)
    return net


def _answer_ids(samples: Sequence[ClozeSample]) -> list[int]:
    """The label-word ids of single-token samples, or the answer tokens of multi-token ones (sorted)."""
    ids: set[int] = set()
    for s in samples:
        if s.label_ids is not None:
            ids.update(int(i) for i in s.label_ids)
        elif s.targets is not None:
            for targets, mask in zip(s.targets, s.loss_mask, strict=True):
                ids.update(int(i) for i in targets[np.flatnonzero(mask)[:-1]])  # without the closing eop
    return sorted(ids)


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write JSON atomically (temporary file + rename)."""
    write_text_atomic(path, json.dumps(data, indent=1, default=str) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# Public entry points


def finetune(
    *,
    task: str,
    model: str,
    out_dir: str,
    tokenizer: str | None = None,
    data: TaskData = DEFAULT_DATA,
    train: FinetuneSettings = DEFAULT_TRAIN,
) -> dict[str, Any]:
    """Fine-tune a GLM on a classification, seq2seq or text-infilling task and keep the best-dev model.

    Classification: cloze mode turns every example into a blank-infilling question (spec D.2); classifier mode
    trains the pooled head baseline (D.4). Seq2seq (`xsum`, `cnn_dm`, `gigaword`, `seq2seq`) and text infilling
    (`blank`, `yahoo`) are fine-tuned by their own modules (data: `--data.data_dir` or
    `--data.train_file`/`--data.dev_file`); the settings given explicitly are passed on, the rest keep those
    modules' official defaults. The output directory receives `best/` (model + tokenizer of the best dev
    evaluation), `metrics.json` (dev/test metrics, settings), the loop's `metrics.jsonl` and its resumable
    checkpoints; an out_dir that already holds a run is only continued with `--train.resume true`.

    Args:
        task: a SuperGLUE task (`rte`, `cb`, `boolq`, `wic`, `multirc`, `copa`, `wsc`, `record`), a task
            `.yaml` file, a seq2seq task (`xsum`, `cnn_dm`, `gigaword`, `seq2seq`) or text infilling
            (`blank`, `yahoo`).
        model: checkpoint directory (`GLMModel.from_pretrained`), normally carrying its tokenizer.
        out_dir: output directory.
        tokenizer: tokenizer directory when `model` has none.
        data: data and input settings.
        train: run settings (defaults: the official hyper-parameters of the task).

    Returns:
        The contents of `metrics.json`.
    """
    if task.lower() in LM_EVAL_TASKS:
        raise ValueError(f"task {task!r} is a zero-shot evaluation; use `openglm eval --task {task}`")
    check_model_dir(model)
    check_run_dir(out_dir, train.resume)
    if task.lower() in SEQ2SEQ_TASKS + INFILLING_TASKS:
        return _dispatch_finetune(task.lower(), model, out_dir, tokenizer, data, train)
    from openglm.train.loop import count_loss_tokens, glm_loss
    from openglm.train.settings import OptimSettings, TrainSettings

    t = resolve_task(task)
    out = Path(out_dir)
    device = parallel.init_distributed(train.device).device  # under torchrun: this rank's GPU
    tok = load_tokenizer(model, tokenizer)
    data = prompt_data(model, data)
    with seeded(train.seed):  # a new classifier head
        net = load_model(model, t, data, device)
    _check_vocab(net, tok, model)
    hp = official_defaults(t, train)
    loss_func = data.loss_func or t.loss_func
    length_penalty = t.length_penalty if data.length_penalty is None else data.length_penalty
    if data.mode == "classifier":
        loss_func = "cross_entropy"

    train_examples = load_examples(t, data, "train", data.max_train_examples)
    dev_examples = load_examples(t, data, "dev", data.max_eval_examples)
    check_labels(t, train_examples, "train", required=True)
    check_labels(t, dev_examples, "dev", required=True)
    # The test split is read now, not after training, so that a broken file fails before the run.
    test_examples = (
        load_examples(t, data, "test", data.max_eval_examples) if has_split(t, data, "test") else None
    )
    test_labelled = test_examples is not None and check_labels(t, test_examples, "test", required=False)
    if test_examples is not None and not test_labelled:
        logger.info("%s test: no labels; it is not scored", t.name)
    data = fit_positions(net, t, data)
    train_samples = encode_all(t, train_examples, tok, data, "train")
    dev_samples = encode_all(t, dev_examples, tok, data, "dev")
    net = attach_prompts(net, train_samples, data, train)
    batches: EpochBatches | MixedBatches = EpochBatches(train_samples, int(hp["batch_size"]), train.seed)
    steps_per_epoch = len(batches)
    if train.block_lm_ratio > 0:
        if data.mode != "cloze":
            raise ValueError("train.block_lm_ratio applies to cloze fine-tuning only (data.mode=cloze)")
        max_len = data.max_seq_length or t.max_seq_length
        filled = [filled_pattern_tokens(t, e, tok, data.pattern_id, max_len, "train") for e in train_examples]
        batches = MixedBatches(batches, filled, tok, train.block_lm_ratio, train.seed)
    max_steps = train.max_steps or int(hp["epochs"]) * steps_per_epoch
    eval_every = min(train.eval_every or steps_per_epoch, max_steps)
    logger.info(
        "finetune %s (%s): %d train / %d dev examples, %d steps (%d per epoch), batch %d, lr %.2e",
        t.name, data.mode, len(train_samples), len(dev_samples), max_steps, steps_per_epoch, hp["batch_size"], hp["lr"],
    )  # fmt: skip

    counter = {"micro_batches": 0}
    best = BestDev(out / BEST_DIR)
    key_metric = t.metrics[0]
    if train.resume:
        counter["micro_batches"] = restore_progress(out, key_metric, best, "dev_")

    def loss_fn(m: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        counter["micro_batches"] += 1
        # As the official step loss: a cloze step averages over its examples (each micro-batch weighs 1), a
        # block-LM step (D.10) over its target tokens, counted over every micro-batch and rank (`step_weight`),
        # so that data-parallel steps equal one process.
        if "labels" not in batch:
            return glm_loss(m, batch)
        scores = batch_scores(m, batch, data.mode, length_penalty)
        return cloze_loss(scores, batch["labels"], loss_func), torch.ones(())

    def step_weight(batch: dict[str, Tensor]) -> float:
        return count_loss_tokens(batch) if "labels" not in batch else 1.0

    def dev_metrics(m: nn.Module) -> dict[str, float]:
        scores = predict_scores(
            m, dev_samples, data.mode, length_penalty, train.eval_batch_size, train.progress
        )
        return score_examples(t, dev_examples, scores, "dev")

    settings = TrainSettings(
        max_steps=max_steps,
        micro_batch_size=int(hp["batch_size"]),
        precision=train.precision,
        strategy="auto",  # DDP under torchrun (each rank trains on its share of a batch), else one process
        device=str(device),
        seed=train.seed,
        log_every=max(1, min(10, max_steps // 10)),
        eval_every=eval_every,
        keep_last=1,
        progress=train.progress,
        tensorboard=False,
    )
    optim = OptimSettings(
        lr=float(hp["lr"]),
        weight_decay=float(hp["weight_decay"]),
        beta1=0.9,
        beta2=float(hp["beta2"]),
        eps=train.eps,
        schedule="linear",
        warmup=float(train.warmup if train.warmup is not None else hp.get("warmup", 0.1)),
        lr_decay_ratio=train.lr_decay_ratio,
        clip_grad=train.clip_grad,
    )
    started = time.time()
    result, best = fit_keeping_best(
        net,
        tok,
        batches,
        settings,
        optim,
        run_dir=out,
        evaluate=dev_metrics,
        key_metric=key_metric,
        loss_fn=loss_fn,
        count_fn=step_weight,
        resume=train.resume,
        best=best,
        step_fn=lambda: counter["micro_batches"],
        metric_prefix="dev_",
        lora=train.lora(),
    )
    report: dict[str, Any] = {
        "task": t.name,
        "mode": data.mode,
        "pattern_id": None if data.mode == "classifier" else t.check_pattern(data.pattern_id),
        "model": str(model),
        "steps": result.step,
        "train_examples": len(train_samples),
        "best_step": best.step,
        "dev": best.metrics,
        "final_loss": result.losses[-1][1] if result.losses else None,
        "seconds": round(time.time() - started, 1),
        "hyperparameters": {
            **hp,
            "max_steps": max_steps,
            "loss_func": loss_func,
            "length_penalty": length_penalty,
        },
        "data": asdict(data),
        "train": asdict(train),
    }
    # Every rank scores its share of the test split with the kept model (rank 0 saved it to the run
    # directory, which all ranks share as they share checkpoints); rank 0 writes the report.
    if parallel.broadcast_object(test_labelled and (out / BEST_DIR).is_dir()) and test_examples is not None:
        best_model = load_model(out / BEST_DIR, t, data, device)
        scores = predict_scores(
            best_model,
            encode_all(t, test_examples, tok, data, "test"),
            data.mode,
            length_penalty,
            train.eval_batch_size,
            train.progress,
        )
        report["test"] = score_examples(t, test_examples, scores, "test") or None
    if parallel.is_main():
        write_json(out / METRICS_FILE, report)
        logger.info("best dev %s: %s; wrote %s", key_metric, best.metrics, out / METRICS_FILE)
    return report


def evaluate(
    *,
    task: str,
    model: str,
    tokenizer: str | None = None,
    data: TaskData = DEFAULT_DATA,
    split: str = "dev",
    batch_size: int = 16,
    device: str = "auto",
    output: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a (fine-tuned) checkpoint on a task split.

    Classification tasks are scored as in fine-tuning (a directory saved in classifier mode is detected); a
    split without labels (a test file) gives predictions only (`--output`), and one with some labels missing
    is refused. Zero-shot LM task names (`lambada`, `wikitext`, `perplexity`, `multichoice`; the data file is
    `--data.data_dir`), seq2seq (`xsum`, `cnn_dm`, `gigaword`: summarization layout; `seq2seq`: "source
    [gMASK]") and text infilling (`blank`, `yahoo`) are handed to their modules.

    Args:
        task: a SuperGLUE task (`rte`, `cb`, `boolq`, `wic`, `multirc`, `copa`, `wsc`, `record`), a task
            `.yaml` file, zero-shot LM (`lambada`, `wikitext`, `perplexity`, `multichoice`), seq2seq
            (`xsum`, `cnn_dm`, `gigaword`, `seq2seq`) or text infilling (`blank`, `yahoo`).
        model: checkpoint directory.
        tokenizer: tokenizer directory when `model` has none.
        data: data and input settings.
        split: `dev`, `test` or `train`.
        batch_size: examples per forward pass.
        device: `auto`, `cpu`, `cuda`, ...
        output: also write the metrics (and per-example predictions) to this JSON file.
        progress: show a progress bar.

    Returns:
        {"task", "split", "examples", metric: value, ...}.
    """
    if split not in SPLIT_FILES:
        raise ValueError(f"--split {split!r}: expected one of {list(SPLIT_FILES)}")
    if batch_size <= 0:
        raise ValueError(f"--batch_size {batch_size}: must be a positive number of examples per forward pass")
    check_model_dir(model)
    if output:
        check_output_file(output)
    # Under torchrun each rank scores its share of the examples on its own device; rank 0 writes `output`.
    device = str(parallel.init_distributed(device).device)
    name = task.lower()
    if name in LM_EVAL_TASKS + SEQ2SEQ_TASKS + INFILLING_TASKS:
        result = _dispatch_eval(name, model, tokenizer, data, split, batch_size, device, progress)
    else:
        t = resolve_task(task)
        if is_classifier_dir(model) and data.mode != "classifier":
            data = TaskData(**{**asdict(data), "mode": "classifier"})
        tok = load_tokenizer(model, tokenizer)
        data = prompt_data(model, data)
        net = load_model(model, t, data, torch.device(device))
        _check_vocab(net, tok, model)
        length_penalty = t.length_penalty if data.length_penalty is None else data.length_penalty
        examples = load_examples(t, data, split, data.max_eval_examples)
        data = fit_positions(net, t, data)
        labelled = check_labels(t, examples, split, required=False)
        if not labelled:
            logger.info(
                "%s %s: no labels, so no metrics; %s",
                t.name,
                split,
                "writing predictions only" if output else "pass --output FILE to save the predictions",
            )
        samples = encode_all(t, examples, tok, data, split)
        if data.mode == "cloze":
            net = attach_prompts(net, samples, data)
        scores = predict_scores(net, samples, data.mode, length_penalty, batch_size, progress)
        result = {"task": t.name, "split": split, "mode": data.mode, "examples": len(examples)}
        if labelled:
            result.update(score_examples(t, examples, scores, split))
        if output and parallel.is_main():
            preds = [
                {"guid": e.guid, "prediction": t.predict(e, s), "scores": [round(float(x), 6) for x in s]}
                for e, s in zip(examples, scores, strict=True)
            ]
            write_json(Path(output), {**result, "predictions": preds})
            return result
    if output and parallel.is_main():
        write_json(Path(output), result)
    return result


def check_output_file(output: str | os.PathLike) -> None:
    """Refuse an --output that names a directory (or lies under a file) before the evaluation runs rather
    than after it; missing folders are created when the file is written."""
    path = Path(output)
    if path.is_dir():
        raise ValueError(f"--output {output}: is a directory; name a file, e.g. {path / 'metrics.json'}")
    blocking = next((p for p in path.parents if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        raise NotADirectoryError(f"--output {output}: {blocking} is a file, not a folder")


def _check_vocab(net: nn.Module, tok: Any, model_dir: str | os.PathLike) -> None:
    config = getattr(net, "config", None)
    if config is not None and tok.num_tokens > config.vocab_size:
        raise ValueError(
            f"tokenizer has {tok.num_tokens} tokens but the model at {model_dir} only {config.vocab_size} rows"
        )


# ---------------------------------------------------------------------------------------------------------------
# Hand-off to the zero-shot LM, seq2seq and infilling modules


def _lm_data_path(data: TaskData, task: str, split: str = "dev") -> str:
    explicit = {"train": data.train_file, "dev": data.dev_file, "test": data.test_file}.get(split)
    path = explicit or data.data_dir
    if not path:
        raise ValueError(
            f"task {task}: pass the data with --data.data_dir (file or folder) or --data.{split}_file"
        )
    return path


def _layout(task: str) -> str:
    # Summarization tasks put [sMASK]/[MASK] before the article; plain `seq2seq` is "source [gMASK]" (D.7).
    return "customization" if task == "seq2seq" else "summarization"


def _dispatch_eval(
    task: str,
    model: str,
    tokenizer: str | None,
    data: TaskData,
    split: str,
    batch_size: int,
    device: str,
    progress: bool,
) -> dict[str, Any]:
    path = _lm_data_path(data, task, split)
    if task in LM_EVAL_TASKS:
        from openglm.tasks.lm_eval import run_lm_eval

        return run_lm_eval(
            task,
            model,
            path,
            tokenizer_dir=tokenizer,
            seq_length=data.max_seq_length,
            batch_size=batch_size,
            limit=data.max_eval_examples,
            device=device,
            progress=progress,
        )
    extra = {"src_seq_length": data.max_seq_length} if data.max_seq_length else {}
    if task in SEQ2SEQ_TASKS:
        from openglm.tasks.seq2seq import run_seq2seq_eval

        out = run_seq2seq_eval(
            model,
            path,
            tokenizer_dir=tokenizer,
            split=split,
            layout=_layout(task),
            batch_size=batch_size,
            limit=data.max_eval_examples,
            device=device,
            **extra,
        )
    else:
        from openglm.tasks.infilling import run_infilling_eval

        out = run_infilling_eval(
            model,
            path,
            tokenizer_dir=tokenizer,
            batch_size=batch_size,
            limit=data.max_eval_examples,
            device=device,
            split=split,
            **extra,
        )
    return {"task": task, "split": split, **out}


def _dispatch_finetune(
    task: str, model: str, out_dir: str, tokenizer: str | None, data: TaskData, train: FinetuneSettings
) -> dict[str, Any]:
    if task in LM_EVAL_TASKS:
        raise ValueError(f"task {task!r} is a zero-shot evaluation; use `openglm eval --task {task}`")
    # Only what the user set is passed on, so that each module keeps its own official defaults (spec D.7/D.8).
    chosen = {
        "epochs": train.epochs,
        "max_steps": train.max_steps,
        "batch_size": train.batch_size,
        "lr": train.lr,
        "weight_decay": train.weight_decay,
        "warmup": train.warmup,
        "eval_every": train.eval_every,
        "src_seq_length": data.max_seq_length,
    }
    kwargs: dict[str, Any] = {k: v for k, v in chosen.items() if v is not None}
    kwargs.update(precision=train.precision, device=train.device, seed=train.seed, progress=train.progress)
    kwargs.update(lora=train.lora(), resume=train.resume)
    train_data = _lm_data_path(data, task, "train")
    dev_data = data.dev_file or (data.data_dir if data.data_dir and Path(data.data_dir).is_dir() else None)
    if task in SEQ2SEQ_TASKS:
        from openglm.tasks.seq2seq import finetune_seq2seq

        if data.max_eval_examples:
            kwargs["dev_limit"] = data.max_eval_examples
        return finetune_seq2seq(
            model, train_data, out_dir, dev_data, tokenizer, layout=_layout(task), **kwargs
        )
    from openglm.tasks.infilling import finetune_infilling

    if data.max_eval_examples:
        kwargs["dev_limit"] = data.max_eval_examples
    if data.max_train_examples:
        kwargs["train_limit"] = data.max_train_examples
    return finetune_infilling(model, train_data, out_dir, dev_data, tokenizer, **kwargs)
