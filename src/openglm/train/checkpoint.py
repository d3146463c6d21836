"""Training checkpoints for exact resume: model (safetensors), optimizer, step, RNG states and data position.

Layout: `<run_dir>/checkpoints/step-00000100/{config.json, model.safetensors, optimizer.pt, trainer.pt}`.
A checkpoint is written into a temporary folder and renamed into place only once complete, so a crash
during a save never damages the previous one; the newest complete folder is the one to resume from.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from openglm import parallel

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step-(\d{8})$")
OPTIMIZER_NAME = "optimizer.pt"
TRAINER_NAME = "trainer.pt"


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), numpy and python RNG states, as tensors/lists so that weights_only loading works."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "key": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {"version": py_state[0], "internal": list(py_state[1]), "gauss_next": py_state[2]},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np_s = state["numpy"]
    np.random.set_state(
        (
            "MT19937",
            np_s["key"].numpy().astype(np.uint32),
            np_s["pos"],
            np_s["has_gauss"],
            np_s["cached_gaussian"],
        )
    )
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [
        p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name) and (p / TRAINER_NAME).is_file()
    ]
    return sorted(found, key=lambda p: p.name)


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(
    run_dir: str | os.PathLike,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    keep_last: int,
    is_main: bool = True,
) -> Path:
    """Write a complete checkpoint for `trainer_state["step"]` atomically; keep the newest `keep_last`.

    Collective under FSDP2 (the full state is gathered on every rank); only the main rank writes.

    Args:
        run_dir: the run folder.
        model: the (possibly wrapped) model.
        optimizer: its optimizer.
        trainer_state: step, data position, RNG states, scaler state and anything else the loop needs.
        keep_last: number of checkpoints to keep.
        is_main: whether this rank writes files.

    Returns:
        The checkpoint folder.
    """
    from openglm.convert import save_checkpoint as save_weights

    step = int(trainer_state["step"])
    model_state = parallel.full_model_state(model)
    optim_state = parallel.full_optimizer_state(model, optimizer)
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:08d}"
    if is_main:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        inner = parallel.unwrap(model)
        save_weights(_StateView(inner.config, model_state), tmp)
        torch.save(optim_state, tmp / OPTIMIZER_NAME)
        torch.save(trainer_state, tmp / TRAINER_NAME)
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again after a resume: replace it as a whole
            old = root / f".old-step-{step:08d}-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
        for stale in checkpoint_dirs(run_dir)[:-keep_last]:
            shutil.rmtree(stale, ignore_errors=True)
        for leftover in root.glob(".tmp-step-*"):
            if not leftover.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(leftover, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    parallel.barrier()
    return final


def load_checkpoint(
    directory: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> dict[str, Any]:
    """Restore model weights and optimizer state in place and return the trainer state (RNG not yet applied).

    Args:
        directory: a checkpoint folder written by `save_checkpoint`.
        model: the (possibly wrapped) model, already built with the same architecture.
        optimizer: its optimizer, or None to restore the weights only.

    Returns:
        The trainer state dict.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    for name in ("model.safetensors", TRAINER_NAME) + ((OPTIMIZER_NAME,) if optimizer is not None else ()):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name}: checkpoint file missing")
    state = load_file(str(directory / "model.safetensors"))
    parallel.load_full_model_state(model, state)
    if optimizer is not None:
        optim_state = torch.load(directory / OPTIMIZER_NAME, map_location="cpu", weights_only=True)
        parallel.load_full_optimizer_state(model, optimizer, optim_state)
    return torch.load(directory / TRAINER_NAME, map_location="cpu", weights_only=True)


class _StateView(nn.Module):
    """Lets `convert.save_checkpoint` write a gathered state dict (FSDP2 shards live on the real model)."""

    def __init__(self, config: Any, state: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.config = config
        self._state = state

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return self._state


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
