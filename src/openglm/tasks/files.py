"""Task files (spec D): reading jsonl data rows and text, with bad lines, bad bytes and missing or mistyped fields
reported by file and line."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


class Rows(list):
    """The rows of a jsonl file (a plain list of dicts) that also knows the line each row came from: blank lines
    are skipped, so row positions and line numbers can differ, and messages should name the line."""

    def __init__(self, rows: Sequence[dict[str, Any]] = (), lines: Sequence[int] = ()) -> None:
        super().__init__(rows)
        self.lines = list(lines)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):  # `rows[:limit]` keeps the line numbers
            return Rows(super().__getitem__(index), self.lines[index])
        return super().__getitem__(index)


def line_of(rows: Sequence[Any], i: int) -> int:
    """The file line of `rows[i]` (0-based `i`): from `Rows`, else the position + 1."""
    lines = getattr(rows, "lines", None)
    return lines[i] if lines and i < len(lines) else i + 1


def not_utf8(path: str | os.PathLike) -> ValueError:
    """The error for a file that is not UTF-8 text, naming the file, the line and the first bad byte.

    Decoding errors met while streaming a file only know their offset in a buffer, so the file is decoded
    again here to find where the bad byte really is.
    """
    data = Path(path).read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return ValueError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}); "
            "task data must be UTF-8"
        )
    return ValueError(f"{path}: not UTF-8 text; task data must be UTF-8")


def read_text(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file; a missing file or bad bytes give one-line errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise not_utf8(path) from None


def read_jsonl(path: str | os.PathLike) -> Rows:
    """The rows of a jsonl file, blank lines skipped.

    Args:
        path: the file.

    Returns:
        One dict per non-blank line (a `Rows` list, which also holds each row's line number).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a line is not valid JSON or not a JSON object, or the file is not UTF-8 (the message names
            file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    rows, lines = [], []
    try:
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
                lines.append(n)
    except UnicodeDecodeError:
        raise not_utf8(path) from None
    return Rows(rows, lines)


def row_field(row: dict[str, Any], name: str, path: str | os.PathLike, n: int) -> Any:
    """`row[name]`, or a ValueError naming the file, the line and the fields the row has.

    Args:
        row: a parsed row (or a nested object of it).
        name: the field.
        path: the file, for the message.
        n: the row's line in the file, for the message.

    Returns:
        The field's value.
    """
    if not isinstance(row, dict):
        raise ValueError(f"{path}:{n}: expected an object holding {name!r}, got {show_value(row)}")
    if name not in row:
        raise ValueError(f"{path}:{n}: the row has no field {name!r} (fields: {sorted(row)})")
    return row[name]


def row_text(row: dict[str, Any], name: str, path: str | os.PathLike, n: int, empty: bool = True) -> str:
    """`row[name]` when it is a string (non-empty unless `empty`), else a ValueError naming file, line and field:
    a number or null where text belongs is a broken row, and turning it into "5" or "None" would hide that."""
    value = row_field(row, name, path, n)
    if not isinstance(value, str):
        raise ValueError(f"{path}:{n}: field {name!r} must be a string, got {show_value(value)}")
    if not empty and not value.strip():
        raise ValueError(f"{path}:{n}: field {name!r} is empty")
    return value


def show_value(value: Any, limit: int = 40) -> str:
    """A data value as a message shows it: JSON's null for None, else its repr, cut to `limit` characters."""
    text = "null" if value is None else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
