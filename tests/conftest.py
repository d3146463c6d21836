"""Shared test helpers: where the reference fixtures and the shared data live (skip when absent)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

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
