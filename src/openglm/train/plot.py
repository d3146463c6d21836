"""`openglm plot RUN`: the loss and learning-rate curves of a run (its metrics.jsonl) as a PNG."""

from __future__ import annotations

import json
import os
from pathlib import Path

from openglm.train.loop import METRICS_NAME


def read_metrics(run: str | os.PathLike) -> list[dict[str, float]]:
    """The metric lines of a run folder (or of a metrics.jsonl path)."""
    path = Path(run)
    if path.is_dir():
        path = path / METRICS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics file (is this a run folder of `openglm pretrain`?)")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
    return rows


def plot(run: str, out: str | None = None) -> str:
    """Draw training loss, validation losses per objective, and the learning rate against the step.

    Args:
        run: a run folder (holding metrics.jsonl).
        out: the PNG to write; default RUN/curves.png.

    Returns:
        The PNG path.
    """
    rows = read_metrics(run)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install 'openglm[plot]'") from None
    train = [r for r in rows if "loss" in r]
    if not train:
        raise ValueError(f"{run}: the metrics hold no training loss yet")
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", linewidth=1)
    val_keys = sorted({k for r in rows for k in r if k.startswith("val_loss")})
    for key in val_keys:
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax_loss.plot(*zip(*pts, strict=True), marker="o", label=key.replace("val_loss", "valid"), linewidth=1)
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    ax_lr.plot([r["step"] for r in train], [r["lr"] for r in train], color="tab:gray")
    ax_lr.set_ylabel("lr")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.suptitle(Path(run).name)
    fig.tight_layout()
    target = Path(out) if out else (Path(run) if Path(run).is_dir() else Path(run).parent) / "curves.png"
    tmp = target.with_name(target.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, target)
    return str(target)
