"""Corpus inputs as users name them (files, directories, glob patterns) expanded into a file list; shared by
tokenizer training and `openglm data prepare`."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from pathlib import Path


def corpus_files(corpus: Sequence[str | os.PathLike], pattern: str = "*") -> list[Path]:
    """Expand files, directories (every non-hidden file below matching `pattern`, sorted) and glob patterns.

    Args:
        corpus: paths, directories or glob patterns (`**` recurses).
        pattern: file-name pattern searched for inside directories.

    Returns:
        The files, in the order given (each directory and pattern sorted).
    """
    files: list[Path] = []
    for item in corpus:
        text = os.fspath(item)
        path = Path(text)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            found = sorted(
                p
                for p in path.rglob(pattern)
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
            )
            if not found:
                raise FileNotFoundError(f"corpus directory has no files matching {pattern!r}: {path}")
            files += found
        elif glob.has_magic(text):
            found = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
            if not found:
                raise FileNotFoundError(f"corpus pattern matched no files: {text}")
            files += found
        else:
            raise FileNotFoundError(f"corpus file not found: {text}: no such file or directory")
    if not files:
        raise ValueError("corpus: no input files given")
    return files
