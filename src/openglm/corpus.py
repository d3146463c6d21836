"""Raw corpora as users give them, shared by tokenizer training and `openglm data prepare`: inputs (files,
directories, glob patterns) expanded into a file list, and the files streamed as documents (plain text
paragraphs or lines, JSON lines, gzip), with bad input counted or refused."""

from __future__ import annotations

import collections
import glob
import gzip
import io
import json
import logging
import os
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

log = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")

# The official corpus readers map typographic quotes and dashes to ASCII before tokenizing.
_PUNCTUATION = str.maketrans({"‘": "'", "’": "'", "“": '"', "”": '"', "–": "-", "—": "-"})


def ascii_punctuation(text: str) -> str:
    """Curly quotes and en/em dashes -> ASCII, as the official corpus readers do before tokenizing."""
    return text.translate(_PUNCTUATION)


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


@dataclass
class InputReport:
    """What the reader saw: counts per kind of problem, and a few examples with file:line."""

    files: int = 0
    documents: int = 0
    skipped: collections.Counter = field(default_factory=collections.Counter)
    examples: list[str] = field(default_factory=list)
    first: dict[str, str] = field(default_factory=dict)  # kind -> where it was first seen

    def skip(self, kind: str, where: str, strict: bool) -> None:
        if strict:
            raise ValueError(f"{where}: {kind}")
        self.skipped[kind] += 1
        self.first.setdefault(kind, where)
        if len(self.examples) < 10:
            self.examples.append(f"{where}: {kind}")
        log.debug("skipped %s: %s", where, kind)

    def summary(self) -> str:
        """What was skipped, each kind with a count and where it was first seen (or "no text found")."""
        parts = [
            f"{kind}: {count}" + (f" (first at {self.first[kind]})" if kind in self.first else "")
            for kind, count in self.skipped.items()
        ]
        return ", ".join(parts) or "no text found"

    def log_skipped(self) -> None:
        """One warning per kind of skipped input: its count and where it was first seen."""
        for kind, count in self.skipped.items():
            first = f" (first at {self.first[kind]})" if kind in self.first else ""
            log.warning("skipped %d x %s%s", count, kind, first)


def open_binary(path: Path) -> io.BufferedIOBase:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")  # noqa: SIM115


def _read_lines(handle: io.BufferedIOBase, path: Path) -> Iterator[bytes]:
    """The raw lines of `handle`; a damaged .gz becomes one ValueError naming the file (gzip raises
    BadGzipFile, EOFError or zlib.error, whose messages say nothing of which input it was)."""
    number = 0
    try:
        for raw in handle:
            number += 1
            yield raw
    except (gzip.BadGzipFile, EOFError, zlib.error) as err:
        if isinstance(err, EOFError):
            problem = f"truncated gzip file (its data ends after line {number})"
        else:
            problem = f"corrupt gzip file {f'after line {number}' if number else 'at its start'} ({err})"
        raise ValueError(f"{path}: {problem}; recompress or remove it") from None


def is_jsonl(path: Path) -> bool:
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return name.endswith(JSONL_SUFFIXES)


def iter_documents(
    files: Sequence[Path],
    report: InputReport,
    text_format: Literal["paragraphs", "lines"] = "paragraphs",
    jsonl_field: str = "text",
    strict: bool = False,
    prompt_field: str | None = None,
) -> Iterator[str] | Iterator[tuple[str, str]]:
    """Stream documents as strings, line by line (never a whole file in memory).

    Plain text: documents are separated by blank lines ("paragraphs") or are single lines ("lines").
    JSON lines (.jsonl/.json/.ndjson, optionally .gz): the string field `jsonl_field` of each object.
    With `prompt_field`, every document is a `(prompt, text)` pair instead: the prompt is that string field
    of a JSON object (required there), and "" for plain-text documents. Bad input is counted in `report`
    (or raises ValueError naming file:line when `strict`).
    """

    def plain(text: str) -> str | tuple[str, str]:
        return text if prompt_field is None else ("", text)

    for path in files:
        report.files += 1
        jsonl = is_jsonl(path)
        emitted = 0
        bad_doc = False
        lines: list[str] = []
        with open_binary(path) as handle:
            for number, raw in enumerate(_read_lines(handle, path), 1):
                where = f"{path}:{number}"
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    report.skip("invalid UTF-8", where, strict)
                    if jsonl or text_format == "lines":
                        continue
                    bad_doc = True
                    continue
                if jsonl:
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        report.skip("invalid JSON line", where, strict)
                        continue
                    value = record.get(jsonl_field) if isinstance(record, dict) else None
                    if not isinstance(value, str):
                        report.skip(f"missing or non-string field {jsonl_field!r}", where, strict)
                        continue
                    if prompt_field is None:
                        if value.strip():
                            emitted += 1
                            yield value
                        continue
                    prompt = record.get(prompt_field)
                    if not isinstance(prompt, str):
                        report.skip(f"missing or non-string field {prompt_field!r}", where, strict)
                        continue
                    if value.strip():
                        emitted += 1
                        yield prompt, value
                    continue
                if text_format == "lines":
                    if line.strip():
                        emitted += 1
                        yield plain(line.rstrip("\r\n"))
                    continue
                if line.strip():
                    lines.append(line)
                    continue
                if lines and not bad_doc:
                    emitted += 1
                    yield plain("".join(lines).strip())
                lines, bad_doc = [], False
        if lines and not bad_doc:
            emitted += 1
            yield plain("".join(lines).strip())
        report.documents += emitted
        if emitted == 0:
            report.skip("no documents in this file (empty?)", str(path), strict)
