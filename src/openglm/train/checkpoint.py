"""Training checkpoints for exact resume: model (safetensors), optimizer, step, RNG states and data position.

Layout: `<run_dir>/checkpoints/step-00000100/{config.json, model.safetensors, optimizer.pt, trainer.pt}`.
A checkpoint is written into a temporary folder and renamed into place only once complete, so a crash
during a save never damages the previous one; the newest complete folder is the one to resume from.
"""

from __future__ import annotations

import json
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
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
OPTIMIZER_NAME = "optimizer.pt"
TRAINER_NAME = "trainer.pt"
# GLMConfig fields a run may change on resume: they do not change what the saved weights mean.
_RUNTIME_FIELDS = frozenset(
    {
        "embedding_dropout_prob",
        "attention_dropout_prob",
        "output_dropout_prob",
        "initializer_range",
        "tokenizer",
    }
)


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
        # The folder just written always stays, even when older runs left checkpoints with higher steps in
        # run_dir: it is the state the caller goes on from (and exports).
        others = [d for d in checkpoint_dirs(run_dir) if d.name != final.name]
        for stale in others[: max(len(others) - (keep_last - 1), 0)]:
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

    Raises:
        FileNotFoundError: a checkpoint file is missing.
        ValueError: a file is damaged, or the weights do not fit `model` (naming the file and what differs).
    """
    directory = Path(directory)
    _require_files(directory, optimizer is not None)
    # The small trainer state first: a damaged checkpoint fails before the model is touched.
    trainer_state = _read_trainer_state(directory / TRAINER_NAME)
    state = _read_weights(directory / WEIGHTS_NAME)
    try:
        parallel.load_full_model_state(model, state)
    except (RuntimeError, KeyError, ValueError) as err:
        raise ValueError(_mismatch_message(directory, parallel.unwrap(model), err)) from None
    if optimizer is not None:
        optim_state = _read_torch(directory / OPTIMIZER_NAME)
        try:
            parallel.load_full_optimizer_state(model, optimizer, optim_state)
        except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as err:
            raise ValueError(
                f"{directory / OPTIMIZER_NAME}: the optimizer state does not fit this run's model and "
                f"optimizer ({_first_line(err)})"
            ) from None
    return trainer_state


def verify_checkpoint(
    directory: str | os.PathLike, config: Any | None = None, optimizer: bool = True
) -> None:
    """Check, without loading the weights, that a checkpoint can be resumed: every file present and readable,
    and (given `config`, a `GLMConfig`) its config.json describing the same architecture.

    Cheap enough to run before a resumed run writes anything, so that a bad checkpoint fails the command
    before it touches the run folder.

    Raises:
        FileNotFoundError: a checkpoint file is missing.
        ValueError: a file is damaged, or the architecture differs from `config`.
    """
    from safetensors import safe_open

    directory = Path(directory)
    _require_files(directory, optimizer)
    if config is not None:
        diff = _config_diff(directory, config)
        if diff:
            raise ValueError(_config_message(directory, diff))
    _read_trainer_state(directory / TRAINER_NAME)
    path = directory / WEIGHTS_NAME
    try:
        with safe_open(str(path), framework="pt") as f:  # parses and size-checks the header only
            f.keys()
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(_damaged(path, err)) from None
    if optimizer:
        _read_torch(directory / OPTIMIZER_NAME, mmap=True)


def _require_files(directory: Path, optimizer: bool) -> None:
    for name in (WEIGHTS_NAME, TRAINER_NAME) + ((OPTIMIZER_NAME,) if optimizer else ()):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name}: checkpoint file missing")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= 160 else line[:157] + "..."


def _damaged(path: Path, err: BaseException) -> str:
    try:
        reason = "the file is empty" if path.stat().st_size == 0 else _first_line(err)
    except OSError:
        reason = _first_line(err)
    return (
        f"{path}: damaged checkpoint file ({reason}); remove {path.parent.name}/ from "
        f"{path.parent.parent} to resume from an earlier checkpoint"
    )


def _read_torch(path: Path, mmap: bool = False) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception:  # EOFError, UnpicklingError, RuntimeError (zip), ...: torch's texts do not say which
        raise ValueError(_damaged(path, ValueError("truncated, or not written by torch.save"))) from None


def _read_trainer_state(path: Path) -> dict[str, Any]:
    state = _read_torch(path)
    if not isinstance(state, dict) or not all(key in state for key in ("step", "consumed", "rng_per_rank")):
        raise ValueError(
            _damaged(path, ValueError("not a trainer state: step, consumed or rng_per_rank missing"))
        )
    return state


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(_damaged(path, err)) from None


def _config_diff(directory: Path, config: Any) -> list[str]:
    """Architecture fields whose value in the checkpoint's config.json differs from `config`."""
    try:
        saved = json.loads((directory / CONFIG_NAME).read_text())
    except (OSError, ValueError):
        return []  # nothing to compare with; loading the weights still checks every shape
    if not isinstance(saved, dict) or not hasattr(config, "to_dict"):
        return []
    current = config.to_dict()
    keys = sorted((set(saved) | set(current)) - _RUNTIME_FIELDS - {"model_type"})
    return [f"{k} {saved.get(k)!r} vs {current.get(k)!r}" for k in keys if saved.get(k) != current.get(k)]


def _config_message(directory: Path, diff: list[str]) -> str:
    return (
        f"{directory}: the checkpoint's architecture differs from this run's config ({'; '.join(diff)}, "
        "checkpoint vs run); resume with the model settings the run was started with"
    )


def _mismatch_message(directory: Path, model: nn.Module, err: BaseException) -> str:
    diff = _config_diff(directory, getattr(model, "config", None))
    if diff:
        return _config_message(directory, diff)
    # load_state_dict lists every mismatch on its own line; the first names a tensor and both shapes.
    details = [ln.strip() for ln in str(err).splitlines()[1:] if ln.strip()] or [_first_line(err)]
    return (
        f"{directory / WEIGHTS_NAME}: the checkpoint's weights do not fit this run's model ({details[0]}); "
        "resume with the model settings the run was started with"
    )


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
