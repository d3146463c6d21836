"""Fine-tuning and evaluation tasks (spec D): cloze classification, seq2seq, text infilling, zero-shot LM."""

from openglm.tasks.cloze import (
    MASK,
    ClozeTask,
    Example,
    Fragment,
    cloze_loss,
    cloze_scores,
    collate,
    encode_example,
)
from openglm.tasks.custom import load_task
from openglm.tasks.run import FinetuneSettings, TaskData, evaluate, finetune, multi_task_samples
from openglm.tasks.superglue import TASKS as SUPERGLUE_TASKS
from openglm.tasks.superglue import get_task

__all__ = [
    "MASK",
    "SUPERGLUE_TASKS",
    "ClozeTask",
    "Example",
    "FinetuneSettings",
    "Fragment",
    "TaskData",
    "cloze_loss",
    "cloze_scores",
    "collate",
    "encode_example",
    "evaluate",
    "finetune",
    "get_task",
    "load_task",
    "multi_task_samples",
]
