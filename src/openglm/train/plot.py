"""`openglm plot RUN`: the loss and learning-rate curves of a run (its metrics.jsonl) as a PNG."""

from __future__ import annotations

import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from openglm.atomic import write_bytes_atomic
from openglm.train.loop import METRICS_NAME

log = logging.getLogger(__name__)


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def read_metrics(run: str | os.PathLike) -> list[dict[str, float]]:
    """The metric rows of a run folder (or of a metrics.jsonl path).

    Rows that are not a JSON object with a numeric step (a line torn by a crash, a hand edit) are skipped
    with one warning that counts them, as are fields that are not numbers: a plot of the rest is more use
    than no plot.

    Raises:
        FileNotFoundError: no metrics file.
        ValueError: the file is not UTF-8 text.
    """
    path = Path(run)
    if path.is_dir():
        path = path / METRICS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics file (is this a run folder of `openglm pretrain`?)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ValueError(f"{path}: not a metrics file (not UTF-8 text)") from None
    rows, skipped = [], []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not _number(row.get("step")):
            skipped.append(number)
            continue
        rows.append({k: float(v) for k, v in row.items() if isinstance(k, str) and _number(v)})
    if skipped:
        log.warning(
            "%s: skipped %d malformed line(s) (line %s%s)",
            path,
            len(skipped),
            ", ".join(map(str, skipped[:5])),
            ", ..." if len(skipped) > 5 else "",
        )
    return rows


def plot(run: str, out: str | None = None) -> str:
    """Draw training loss, validation losses per objective, and the learning rate against the step.

    Args:
        run: a run folder (holding metrics.jsonl).
        out: the image to write: a file (its suffix picks the format: .png, .pdf, .svg, ...) or an existing
            directory (curves.png goes there); default RUN/curves.png.

    Returns:
        The image path.
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
    run_dir = Path(run) if Path(run).is_dir() else Path(run).parent
    target = Path(out) if out else run_dir / "curves.png"
    if target.is_dir():
        target = target / "curves.png"
        if target.is_dir():
            raise ValueError(f"out={out}: {target} is a directory; give a file path")
    fmt = target.suffix.lower().lstrip(".")
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(8, 6), sharex=True, height_ratios=(3, 1))
    try:
        if fmt not in fig.canvas.get_supported_filetypes():
            raise ValueError(
                f"out={target}: unknown image type {target.suffix or '(no suffix)'!r}; use .png, .pdf or .svg"
            )
        if not target.parent.is_dir():
            raise FileNotFoundError(f"out={target}: the folder {target.parent} does not exist")
        ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", linewidth=1)
        val_keys = sorted({k for r in rows for k in r if k.startswith("val_loss")})
        for key in val_keys:
            pts = [(r["step"], r[key]) for r in rows if key in r]
            ax_loss.plot(
                *zip(*pts, strict=True), marker="o", label=key.replace("val_loss", "valid"), linewidth=1
            )
        ax_loss.set_ylabel("loss (nats/token)")
        ax_loss.legend()
        ax_loss.grid(alpha=0.3)
        lr = [(r["step"], r["lr"]) for r in train if "lr" in r and math.isfinite(r["lr"])]
        if lr:
            ax_lr.plot(*zip(*lr, strict=True), color="tab:gray")
        ax_lr.set_ylabel("lr")
        ax_lr.set_xlabel("step")
        ax_lr.grid(alpha=0.3)
        fig.suptitle(Path(run).name)
        fig.tight_layout()
        image = io.BytesIO()
        fig.savefig(image, dpi=110, format=fmt)
        write_bytes_atomic(target, image.getvalue())  # the image appears whole or not at all
    finally:
        plt.close(fig)
    return str(target)
