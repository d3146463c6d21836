"""Shared test helpers: where the reference fixtures and the shared data live (skip when absent), and the tiny
stand-ins the task tests share (character tokenizer, BERT tokenizer, tiny checkpoint, a few training steps)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from torch import nn

# Tests run tiny models, where thread start-up and contention cost more than the arithmetic: one thread is
# several times faster on a 2-core machine, and much faster when the cores are shared.
torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]


def reference_dir() -> Path:
    """The fixture root: $OPENGLM_REFERENCE_DIR or ../shared/fixtures/reference."""
    env = os.environ.get("OPENGLM_REFERENCE_DIR")
    return Path(env) if env else ROOT.parent / "shared" / "fixtures" / "reference"


def shared_data_dir() -> Path:
    return ROOT.parent / "shared" / "data"


def require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"reference data not available: {path} (set OPENGLM_REFERENCE_DIR or add ../shared)")
    return path


@pytest.fixture
def reference() -> Path:
    return require(reference_dir())


@pytest.fixture
def shared_data() -> Path:
    return require(shared_data_dir())


def char_tokenizer(**ids: Any) -> SimpleNamespace:
    """A stand-in tokenizer: one id per character (spaces dropped), "[MASK]" -> `mask_id`.

    Special ids: pad = eos = 0, cls 1, mask 2, sop 3, eop 4, no [gMASK]/[sMASK]; `ids` overrides them.
    """

    def encode(text: str) -> list[int]:
        out = []
        for i, part in enumerate(text.split("[MASK]")):
            if i:
                out.append(2)
            out += [ord(c) % 200 + 40 for c in part.replace(" ", "")]
        return out

    specials = dict(pad_id=0, eos_id=0, cls_id=1, mask_id=2, sop_id=3, eop_id=4, gmask_id=None, smask_id=None)
    return SimpleNamespace(**{**specials, **ids}, encode=encode)


def bert_tokenizer() -> Any:
    """The official BERT (uncased) tokenizer from ../shared; skips when its vocab file is absent."""
    from openglm.tokenizer import GLMTokenizer

    path = shared_data_dir() / "tokenizers" / "bert-large-uncased-vocab.txt"
    if not path.is_file():
        pytest.skip(f"tokenizer files not available: {path}")
    return GLMTokenizer.from_files("bert", path)


def tiny_checkpoint(directory: Path, tokenizer: Any, seed: int = 0) -> Path:
    """Save a seeded random tiny GLM sized for `tokenizer`, with the tokenizer, to `directory`."""
    from openglm.config import GLMConfig
    from openglm.model import GLMModel

    torch.manual_seed(seed)
    GLMModel(GLMConfig.from_name("tiny", vocab_size=tokenizer.vocab_size)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def train_steps(model: nn.Module, batches: Iterable[Any], steps: int, loss_fn: Any) -> None:
    """`steps` optimizer steps on CPU at a constant lr of 1e-2: enough for a tiny model to learn one example."""
    from openglm.train.loop import fit
    from openglm.train.settings import OptimSettings, TrainSettings

    settings = TrainSettings(max_steps=steps, device="cpu", progress=False, eval_every=0, log_every=100)
    fit(model, batches, settings, OptimSettings(lr=1e-2, warmup=0.0, schedule="constant"), loss_fn=loss_fn)
