"""Training: one loop for pretraining and fine-tuning (`fit`), AdamW + the official schedule, checkpoints."""

from openglm.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from openglm.train.loop import FitResult, count_loss_tokens, evaluate_loss, fit, glm_loss, seed_everything
from openglm.train.optim import build_optimizer, lr_at, param_groups
from openglm.train.settings import OptimSettings, TrainSettings

__all__ = [
    "FitResult",
    "OptimSettings",
    "TrainSettings",
    "build_optimizer",
    "count_loss_tokens",
    "evaluate_loss",
    "fit",
    "glm_loss",
    "latest_checkpoint",
    "load_checkpoint",
    "lr_at",
    "param_groups",
    "save_checkpoint",
    "seed_everything",
]
