"""A learnable synthetic blank-infilling batch source, for tests, benchmarks and planning runs.

Each row is a short arithmetic sequence with one span blanked out (spec C.3-C.4 layout: Part A with [MASK],
then <sop> + span in Part B, targets unshifted, 2-D positions). Batches are a pure function of
(seed, batch index), so the source is trivially resumable and shardable by rank.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

MASK_ID, SOP_ID, EOP_ID, PAD_ID = 1, 2, 3, 0
FIRST_WORD = 8


class SyntheticBatches:
    """Infinite iterable of GLM batch dicts; rank r of `world_size` gets rows [r*B, (r+1)*B) of each global batch.

    Args:
        vocab_size: ids are drawn below this (>= 16).
        seq_len: T, the padded row length (>= 8).
        batch_size: rows per rank per micro-batch (B).
        seed: data seed.
        rank: this rank.
        world_size: number of ranks sharing each global batch.
        mode: the objective name put in `batch["mode"]`.
    """

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        mode: str = "token",
    ) -> None:
        if vocab_size < 16 or seq_len < 8 or batch_size <= 0:
            raise ValueError(
                f"SyntheticBatches: vocab_size={vocab_size} (>= 16), seq_len={seq_len} (>= 8), "
                f"batch_size={batch_size} (> 0)"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"SyntheticBatches: rank={rank} not in [0, world_size={world_size})")
        self.vocab_size, self.seq_len, self.batch_size = vocab_size, seq_len, batch_size
        self.seed, self.rank, self.world_size, self.mode = seed, rank, world_size, mode
        self.index = 0

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])

    def __iter__(self) -> Iterator[dict[str, Any]]:
        while True:
            batch = self.batch(self.index)
            self.index += 1
            yield batch

    def batch(self, index: int) -> dict[str, Any]:
        """The rows of global batch `index` that belong to this rank."""
        rng = np.random.default_rng([self.seed, index])
        rows = [self._row(rng) for _ in range(self.batch_size * self.world_size)]
        rows = rows[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        return {
            "input_ids": torch.tensor(np.stack([r[0] for r in rows]), dtype=torch.long),
            "position_ids": torch.tensor(np.stack([r[1] for r in rows]), dtype=torch.long),
            "sep": torch.tensor([r[2] for r in rows], dtype=torch.long),
            "targets": torch.tensor(np.stack([r[3] for r in rows]), dtype=torch.long),
            "loss_mask": torch.tensor(np.stack([r[4] for r in rows]), dtype=torch.float32),
            "mode": self.mode,
        }

    def _row(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int, np.ndarray, np.ndarray]:
        T, V = self.seq_len, self.vocab_size
        span = int(rng.integers(1, max(2, T // 4)))
        n = int(rng.integers(span + 2, T - 1))  # text length: Part A (n - span + 1) + Part B (span + 1) <= T
        start, stride = int(rng.integers(FIRST_WORD, V)), int(rng.integers(1, 4))
        text = FIRST_WORD + (start + stride * np.arange(n)) % (V - FIRST_WORD)
        s = int(rng.integers(0, n - span + 1))
        part_a = np.concatenate([text[:s], [MASK_ID], text[s + span :]])
        part_b = np.concatenate([[SOP_ID], text[s : s + span]])
        sep = len(part_a)
        ids = np.full(T, PAD_ID, dtype=np.int64)
        ids[:sep], ids[sep : sep + span + 1] = part_a, part_b
        pos = np.zeros((2, T), dtype=np.int64)
        pos[0, :sep] = np.arange(sep)
        pos[0, sep : sep + span + 1] = s
        pos[1, sep : sep + span + 1] = np.arange(1, span + 2)
        targets = np.zeros(T, dtype=np.int64)
        targets[sep : sep + span + 1] = np.concatenate([text[s : s + span], [EOP_ID]])
        mask = np.zeros(T, dtype=np.float32)
        mask[sep : sep + span + 1] = 1.0
        return ids, pos, sep, targets, mask
