"""Classifier-head baseline (spec D.4, F.2): [CLS] A [SEP] B [eos] -> pooled hidden state -> tanh(Linear) ->
dropout -> Linear to the classes (one score per choice for multiple-choice tasks), instead of a cloze question.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn

from openglm.atomic import write_bytes_atomic, write_text_atomic
from openglm.model import GLMModel
from openglm.tasks.cloze import (
    PADDED_CHOICE_SCORE,
    ClozeSample,
    ClozeTask,
    Example,
    Tokenizer,
    build_input,
    truncate,
)

POOL_TOKENS = ("cls", "start", "pad")
HEAD_CONFIG = "classifier.json"
HEAD_WEIGHTS = "classifier.safetensors"


class GLMForSequenceClassification(nn.Module):
    """GLM backbone plus the official pooled classification head.

    The parameter names match the official checkpoints (`model.*`, `pool_layer.*`, `multichoice_head.*`).

    Args:
        model: the GLM backbone.
        num_classes: output scores per row (1 for multiple-choice tasks, scored per choice).
        pool_token: `cls` (index 0, default), `start` (index sep) or `pad` (index sep - 1, the eos token).
        dropout: dropout between the pooler and the output layer (default: the backbone's output dropout).
    """

    def __init__(
        self, model: GLMModel, num_classes: int, pool_token: str = "cls", dropout: float | None = None
    ) -> None:
        super().__init__()
        if pool_token not in POOL_TOKENS:
            raise ValueError(f"pool_token={pool_token!r}; expected one of {POOL_TOKENS}")
        if num_classes < 1:
            raise ValueError(f"num_classes={num_classes} must be >= 1")
        h = model.config.hidden_size
        self.model = model
        self.config = model.config
        self.num_classes = num_classes
        self.pool_token = pool_token
        self.pool_layer = nn.Linear(h, h)
        self.dropout = nn.Dropout(model.config.output_dropout_prob if dropout is None else dropout)
        self.multichoice_head = nn.Linear(h, num_classes)
        std = model.config.initializer_range
        for lin in (self.pool_layer, self.multichoice_head):
            nn.init.normal_(lin.weight, std=std)
            nn.init.zeros_(lin.bias)

    def forward(self, input_ids: Tensor, position_ids: Tensor, sep: Tensor) -> Tensor:
        """Class scores [B, num_classes] for input_ids [B, T], position_ids [B, 2, T], sep [B]."""
        B, T = input_ids.shape
        # No position needs vocabulary logits: an all-False mask skips the output projection.
        none = torch.zeros(B, T, dtype=torch.bool, device=input_ids.device)
        hidden = self.model(
            input_ids, position_ids, attention_mask=sep, logits_mask=none, return_hidden=True
        ).hidden_states
        if self.pool_token == "cls":
            index = torch.zeros_like(sep)
        elif self.pool_token == "start":
            index = sep
        else:
            index = sep - 1
        pooled = hidden[torch.arange(B, device=hidden.device), index]  # [B, C]
        return self.multichoice_head(self.dropout(torch.tanh(self.pool_layer(pooled))))

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """The backbone as a normal model directory plus `classifier.json` and `classifier.safetensors`."""
        directory = Path(directory)
        self.model.save_pretrained(directory)
        head = {
            k: v.detach().cpu().contiguous()
            for k, v in self.state_dict().items()
            if not k.startswith("model.")
        }
        write_bytes_atomic(directory / HEAD_WEIGHTS, save(head))
        meta = {"num_classes": self.num_classes, "pool_token": self.pool_token, "dropout": self.dropout.p}
        write_text_atomic(directory / HEAD_CONFIG, json.dumps(meta, indent=1) + "\n")

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, device: str | torch.device = "cpu"
    ) -> GLMForSequenceClassification:
        """Load a directory written by `save_pretrained`."""
        directory = Path(directory)
        meta_path = directory / HEAD_CONFIG
        if not meta_path.is_file():
            raise FileNotFoundError(f"{directory}: no {HEAD_CONFIG}; not a classifier-head checkpoint")
        meta = json.loads(meta_path.read_text())
        model = cls(
            GLMModel.from_pretrained(directory, device=device),
            meta["num_classes"],
            meta["pool_token"],
            meta["dropout"],
        )
        model.load_state_dict(load_file(str(directory / HEAD_WEIGHTS), device=str(device)), strict=False)
        return model


def is_classifier_dir(directory: str | os.PathLike) -> bool:
    return (Path(directory) / HEAD_CONFIG).is_file()


def encode_classifier_example(
    task: ClozeTask, example: Example, tokenizer: Tokenizer, max_seq_length: int, split: str = "dev"
) -> ClozeSample:
    """Inputs of the classifier head: [CLS] A [SEP] B [eos] per row (spec D.4); several rows = choices.

    Texts too long for `max_seq_length` lose tokens from the end of the longer text first.
    """
    rows = []
    truncated = False
    for text_a, text_b in task.classifier_texts(example):
        a = [(list(tokenizer.encode(text_a)), True)]
        b = [(list(tokenizer.encode(text_b)), True)] if text_b else []
        # `truncate` reserves 3 extra tokens ([CLS], eos, sop); here they are [CLS], [SEP], eos, and one more
        # slot must stay free after eos (the official builder's cut, and the `start` pooling index).
        truncated |= truncate(a, b, 0, max_seq_length - (1 if b else 0))
        rows.append(
            build_input(
                a[0][0],
                b[0][0] if b else None,
                None,
                max_seq_length,
                tokenizer,
                add_sep=True,
                add_piece=False,
            )
        )
    label = task.label_index(example, split)
    if len(rows) == 1 and not task.multi_token:
        r = rows[0]
        return ClozeSample(
            r.input_ids, r.position_ids, r.sep, r.loss_mask, label, example.guid, truncated=truncated
        )
    return ClozeSample.from_rows(rows, label, example.guid, truncated)


def classifier_scores(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Class scores [B, K], or per-choice scores [B, C] (padded choices -10000) for multiple-choice batches."""
    device = next(model.parameters()).device
    input_ids = batch["input_ids"].to(device)
    if input_ids.dim() == 2:
        return model(input_ids, batch["position_ids"].to(device), batch["sep"].to(device))
    B, C, T = input_ids.shape
    real = batch["choice_mask"].to(device).bool()
    per_row = model(
        input_ids[real], batch["position_ids"].to(device)[real], batch["sep"].to(device)[real]
    )  # [N, 1]
    scores = torch.full((B, C), PADDED_CHOICE_SCORE, device=device, dtype=per_row.dtype)
    return scores.masked_scatter(real, per_row[:, 0])
