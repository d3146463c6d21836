"""Task files (spec D): reading jsonl data rows, with bad lines and missing fields reported by file and line."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a jsonl file, blank lines skipped.

    Args:
        path: the file.

    Returns:
        One dict per non-blank line.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line is not valid JSON or not a JSON object (the message names file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{n}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def row_field(row: dict[str, Any], name: str, path: str | os.PathLike, n: int) -> Any:
    """`row[name]`, or a ValueError naming the file, the row number and the fields the row has.

    Args:
        row: a parsed row (or a nested object of it).
        name: the field.
        path: the file, for the message.
        n: the row number, for the message.

    Returns:
        The field's value.
    """
    if name not in row:
        raise ValueError(f"{path}: row {n} has no field {name!r} (fields: {sorted(row)})")
    return row[name]


# The names a split's file goes by in a data folder (the official seq2seq and Yahoo folders say `val`).
SPLIT_NAMES = {"train": ("train",), "dev": ("dev", "val", "valid", "validation"), "test": ("test",)}


def find_split_file(folder: str | os.PathLike, split: str, suffixes: tuple[str, ...]) -> Path | None:
    """The file of `split` in `folder`: the first `{name}{suffix}` that exists, for the split's names
    (`SPLIT_NAMES`) and the given suffixes in order; None when there is none."""
    folder = Path(folder)
    for name in SPLIT_NAMES.get(split, (split,)):
        for suffix in suffixes:
            if (folder / f"{name}{suffix}").is_file():
                return folder / f"{name}{suffix}"
    return None


def split_file_names(split: str, suffixes: tuple[str, ...]) -> str:
    """The file names `find_split_file` tries, for error messages."""
    return ", ".join(f"{name}{suffix}" for name in SPLIT_NAMES.get(split, (split,)) for suffix in suffixes)
