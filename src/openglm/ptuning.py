"""P-tuning (spec D.5): continuous prompt tokens for cloze fine-tuning.

A cloze pattern gets placeholder tokens (`data.prompt_tokens` before Part A, or `{prompt: N}` slots in a YAML
pattern); their word embeddings are overwritten by trainable vectors. The vectors come from a small
`PromptEncoder`: an embedding table [n, h] read through a 2-layer bidirectional LSTM and a ReLU MLP (`lstm`,
the official default), through the MLP alone (`mlp`), or used raw (`none`). With the transformer frozen
(`train.freeze_transformer`) only the encoder trains: prompt tuning. A saved model is the backbone's normal
directory plus `prompt.json` and `prompt.safetensors`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import Tensor, nn

from openglm.atomic import write_bytes_atomic, write_text_atomic
from openglm.model import GLMModel, GLMOutput

ENCODERS = ("lstm", "mlp", "none")
PROMPT_CONFIG = "prompt.json"
PROMPT_WEIGHTS = "prompt.safetensors"


class PromptEncoder(nn.Module):
    """The prompt vectors [n, h]: a table of n embeddings, re-encoded so that they are learned jointly.

    Args:
        num_tokens: n, the placeholders per row.
        hidden_size: h, the model width.
        kind: `lstm` (embeddings -> 2-layer bidirectional LSTM with hidden size h -> Linear(2h, h) -> ReLU ->
            Linear(h, h)), `mlp` (embeddings -> Linear(h, h) -> ReLU -> Linear(h, h)) or `none` (the raw
            embeddings).
    """

    def __init__(self, num_tokens: int, hidden_size: int, kind: str = "lstm") -> None:
        super().__init__()
        if kind not in ENCODERS:
            raise ValueError(f"prompt encoder {kind!r}; expected one of {ENCODERS}")
        if num_tokens < 1:
            raise ValueError(f"a prompt encoder needs >= 1 token, got {num_tokens}")
        self.num_tokens, self.kind = num_tokens, kind
        self.embeddings = nn.Embedding(num_tokens, hidden_size)
        h = hidden_size
        self.lstm = (
            nn.LSTM(h, h, num_layers=2, bidirectional=True, batch_first=True) if kind == "lstm" else None
        )
        width = 2 * h if kind == "lstm" else h
        self.mlp = nn.Sequential(nn.Linear(width, h), nn.ReLU(), nn.Linear(h, h)) if kind != "none" else None

    @torch.no_grad()
    def init_from_words(
        self, word_embeddings: Tensor, label_ids: Sequence[int], generator: torch.Generator
    ) -> None:
        """Start each prompt embedding as a random mix w * e(word) + (1 - w) * e(label word), with w ~ U(0, 1),
        a random word among the first 5000 ids and a random one of `label_ids` (the official --prompt-init).

        Args:
            word_embeddings: the model's word embedding table [V, h].
            label_ids: the task's label-word (or answer) token ids, at least one.
            generator: the random source (seeded by the caller).
        """
        if not label_ids:
            raise ValueError("prompt initialisation from words needs at least one label-word id")
        n = self.num_tokens
        table = word_embeddings.detach().float().cpu()
        words = torch.randint(0, min(5000, table.shape[0]), (n,), generator=generator)
        labels = torch.as_tensor(list(label_ids))[torch.randint(0, len(label_ids), (n,), generator=generator)]
        w = torch.rand(n, 1, generator=generator)
        mixed = w * table[words] + (1 - w) * table[labels]  # [n, h]
        self.embeddings.weight.copy_(mixed.to(self.embeddings.weight))

    def forward(self) -> Tensor:
        """The n prompt vectors, [n, h]."""
        x = self.embeddings.weight
        if self.lstm is not None:
            x = self.lstm(x[None])[0][0]  # [1, n, h] -> [1, n, 2h] -> [n, 2h]
        return self.mlp(x) if self.mlp is not None else x


class GLMWithPrompts(nn.Module):
    """A GLM whose placeholder tokens (`prompt_pos`) read the prompt encoder's vectors, in order.

    Args:
        model: the backbone.
        encoder: the prompt encoder; its `num_tokens` is the placeholder count of every row.
        prefix_tokens: how many of the placeholders the inputs put before Part A (recorded with the model so
            that evaluation builds the same inputs).
    """

    def __init__(self, model: GLMModel, encoder: PromptEncoder, prefix_tokens: int = 0) -> None:
        super().__init__()
        if encoder.embeddings.embedding_dim != model.config.hidden_size:
            raise ValueError(
                f"prompt encoder width {encoder.embeddings.embedding_dim} != model width {model.config.hidden_size}"
            )
        self.model, self.encoder, self.prefix_tokens = model, encoder, prefix_tokens
        self.config = model.config

    @property
    def word_embeddings(self) -> nn.Embedding:
        return self.model.word_embeddings

    def forward(
        self,
        input_ids: Tensor,
        position_ids: Tensor,
        attention_mask: Any = None,
        prompt_pos: Tensor | None = None,
        **kwargs: Any,
    ) -> GLMOutput:
        """`GLMModel.forward`, with the word embeddings at `prompt_pos` [B, n] (indices into each row's T
        tokens, in prompt order) replaced by the n prompt vectors. Without `prompt_pos`: the plain model."""
        if prompt_pos is None and not (self.training and torch.is_grad_enabled()):
            return self.model(input_ids, position_ids, attention_mask=attention_mask, **kwargs)
        B = input_ids.shape[0]
        words = self.model.word_embeddings(input_ids)
        prompts = self.encoder().to(words.dtype)  # [n, C]
        if prompt_pos is None:
            # A training batch without prompts (block-LM regularisation) must still reach every prompt
            # parameter: DDP expects a gradient for each one at every step. Zero times the prompts adds none.
            words = words + 0.0 * prompts.sum()
        else:
            if prompt_pos.shape != (B, self.encoder.num_tokens):
                raise ValueError(
                    f"prompt_pos must be [B, n] = [{B}, {self.encoder.num_tokens}] (the encoder's prompt "
                    f"tokens); got {tuple(prompt_pos.shape)}"
                )
            rows = torch.arange(B, device=input_ids.device)[:, None].expand_as(prompt_pos)
            words = words.index_put((rows, prompt_pos), prompts.expand(B, -1, -1))
        return self.model(
            input_ids, position_ids, attention_mask=attention_mask, input_embeds=words, **kwargs
        )

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """The backbone as a normal model directory plus `prompt.json` and `prompt.safetensors`."""
        directory = Path(directory)
        self.model.save_pretrained(directory)
        weights = {k: v.detach().cpu().contiguous() for k, v in self.encoder.state_dict().items()}
        write_bytes_atomic(directory / PROMPT_WEIGHTS, save(weights))
        meta = {
            "num_tokens": self.encoder.num_tokens,
            "encoder": self.encoder.kind,
            "prefix_tokens": self.prefix_tokens,
        }
        write_text_atomic(directory / PROMPT_CONFIG, json.dumps(meta, indent=1) + "\n")

    @classmethod
    def from_pretrained(
        cls, directory: str | os.PathLike, device: str | torch.device = "cpu"
    ) -> GLMWithPrompts:
        """Load a directory written by `save_pretrained`."""
        meta = prompt_settings(directory)
        if meta is None:
            raise FileNotFoundError(f"{directory}: no {PROMPT_CONFIG}; not a P-tuning checkpoint")
        backbone = GLMModel.from_pretrained(directory, device=device)
        encoder = PromptEncoder(meta["num_tokens"], backbone.config.hidden_size, meta["encoder"])
        encoder.load_state_dict(load_file(str(Path(directory) / PROMPT_WEIGHTS), device=str(device)))
        return cls(backbone, encoder.to(device), meta["prefix_tokens"])


def prompt_settings(directory: str | os.PathLike) -> dict[str, Any] | None:
    """`prompt.json` of a P-tuning checkpoint directory (None for any other directory)."""
    path = Path(directory) / PROMPT_CONFIG
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        ok = isinstance(meta.get("num_tokens"), int) and meta.get("encoder") in ENCODERS
        ok = ok and isinstance(meta.get("prefix_tokens"), int)
    except (json.JSONDecodeError, AttributeError):
        ok = False
    if not ok:
        raise ValueError(
            f"{path}: expected {{num_tokens: int, encoder: one of {ENCODERS}, prefix_tokens: int}}"
        )
    return meta
