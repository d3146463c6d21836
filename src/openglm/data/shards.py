"""Corpus -> token shards (`openglm data prepare`) and the readers over them (spec C.1 input side).

A shard directory holds `manifest.json`, and per shard a flat token file (`shard-NNNNN.bin`, uint16 when
the vocabulary fits, else uint32) with a document index (`shard-NNNNN.idx.npy`, int64 offsets [docs+1])."""

from __future__ import annotations

import collections
import io
import json
import logging
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from openglm.atomic import write_bytes_atomic
from openglm.corpus import InputReport, ascii_punctuation, corpus_files, iter_documents

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"


# --------------------------------------------------------------------------------------------------------
# Readers


class InMemoryCorpus:
    """Tokenized documents held in memory (tests, small corpora, fixture samples)."""

    def __init__(self, documents: Sequence[Sequence[int] | np.ndarray]) -> None:
        self.documents = [np.asarray(d, dtype=np.int64) for d in documents]
        self.doc_lengths = np.array([d.shape[0] for d in self.documents], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.documents[index]

    def subset(self, doc_ids: Sequence[int] | np.ndarray) -> CorpusSubset:
        return CorpusSubset(self, doc_ids)


class ShardedCorpus:
    """Read-only view of a shard directory; cheap to pickle into DataLoader workers and many ranks
    (the token files are memory-mapped lazily in each process)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        if not manifest_path.is_file():
            raise FileNotFoundError(f"{manifest_path}: no shard manifest (run `openglm data prepare` first)")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{manifest_path}: format_version {self.manifest.get('format_version')} is not {FORMAT_VERSION}"
            )
        self.dtype = np.dtype(self.manifest["dtype"])
        self._offsets = [np.load(self.path / s["index"]) for s in self.manifest["shards"]]
        self.doc_lengths = (
            np.concatenate([np.diff(o) for o in self._offsets]).astype(np.int64)
            if self._offsets
            else np.zeros(0, dtype=np.int64)
        )
        self._first_doc = np.cumsum([0] + [len(o) - 1 for o in self._offsets])
        self._maps: list[np.memmap | None] = [None] * len(self._offsets)

    @property
    def num_tokens(self) -> int:
        return int(self.doc_lengths.sum())

    def __len__(self) -> int:
        return int(self.doc_lengths.shape[0])

    def _tokens(self, shard: int) -> np.ndarray:
        mapped = self._maps[shard]
        if mapped is None:
            info = self.manifest["shards"][shard]
            if info["num_tokens"] == 0:
                mapped = np.zeros(0, dtype=self.dtype)
            else:
                mapped = np.memmap(self.path / info["tokens"], dtype=self.dtype, mode="r")
            self._maps[shard] = mapped
        return mapped

    def __getitem__(self, index: int) -> np.ndarray:
        """Document `index` as int64 tokens (no [CLS]/eos)."""
        if not 0 <= index < len(self):
            raise IndexError(f"document {index} out of range (corpus has {len(self)})")
        shard = int(np.searchsorted(self._first_doc, index, side="right")) - 1
        local = index - int(self._first_doc[shard])
        offsets = self._offsets[shard]
        return np.asarray(self._tokens(shard)[offsets[local] : offsets[local + 1]], dtype=np.int64)

    def subset(self, doc_ids: Sequence[int] | np.ndarray) -> CorpusSubset:
        return CorpusSubset(self, doc_ids)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = [None] * len(self._offsets)  # re-map in the receiving process
        return state


class CorpusSubset:
    """Some documents of a corpus (e.g. a held-out split from `split_documents`)."""

    def __init__(self, corpus: Any, doc_ids: Sequence[int] | np.ndarray) -> None:
        self.corpus = corpus
        self.doc_ids = np.asarray(doc_ids, dtype=np.int64)
        self.doc_lengths = np.asarray(corpus.doc_lengths, dtype=np.int64)[self.doc_ids]

    def __len__(self) -> int:
        return int(self.doc_ids.shape[0])

    def __getitem__(self, index: int) -> np.ndarray:
        return self.corpus[int(self.doc_ids[index])]


# --------------------------------------------------------------------------------------------------------
# Writing shards


class ShardWriter:
    """Appends tokenized documents to size-capped shards; `close()` writes the manifest last."""

    def __init__(self, out: Path, dtype: np.dtype, shard_tokens: int, meta: dict[str, Any]) -> None:
        self.out = out
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.meta = meta
        self.shards: list[dict[str, Any]] = []
        self._handle = None
        self._offsets: list[int] = [0]
        self._tmp: Path | None = None
        self.num_docs = 0
        self.num_tokens = 0

    def _open(self) -> None:
        name = f"shard-{len(self.shards):05d}"
        self._tmp = self.out / f".{name}.bin.tmp"
        self._handle = open(self._tmp, "wb")  # noqa: SIM115
        self._offsets = [0]

    def add(self, tokens: np.ndarray) -> None:
        if self._handle is None:
            self._open()
        self._handle.write(np.asarray(tokens).astype(self.dtype, copy=False).tobytes())
        self._offsets.append(self._offsets[-1] + int(tokens.shape[0]))
        self.num_docs += 1
        self.num_tokens += int(tokens.shape[0])
        if self._offsets[-1] >= self.shard_tokens:
            self._finish_shard()

    def _finish_shard(self) -> None:
        if self._handle is None:
            return
        self._handle.close()
        self._handle = None
        name = f"shard-{len(self.shards):05d}"
        index = io.BytesIO()
        np.save(index, np.asarray(self._offsets, dtype=np.int64))
        write_bytes_atomic(self.out / f"{name}.idx.npy", index.getvalue())
        os.replace(self._tmp, self.out / f"{name}.bin")
        self.shards.append(
            {
                "tokens": f"{name}.bin",
                "index": f"{name}.idx.npy",
                "num_docs": len(self._offsets) - 1,
                "num_tokens": self._offsets[-1],
            }
        )

    def close(self) -> dict[str, Any]:
        self._finish_shard()
        manifest = {
            "format_version": FORMAT_VERSION,
            "dtype": self.dtype.name,
            "num_docs": self.num_docs,
            "num_tokens": self.num_tokens,
            "shards": self.shards,
            **self.meta,
        }
        write_bytes_atomic(self.out / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
        return manifest

    def abort(self) -> None:
        """Remove what this writer wrote (no manifest is written, so nothing half-done is readable)."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        if self._tmp is not None and self._tmp.exists():
            self._tmp.unlink()
        for shard in self.shards:
            for key in ("tokens", "index"):
                (self.out / shard[key]).unlink(missing_ok=True)
        self.shards = []


_WORKER_TOKENIZER: Any = None


def _load_tokenizer(path: str) -> Any:
    from openglm.tokenizer import GLMTokenizer

    return GLMTokenizer.from_pretrained(path)


def _init_worker(path: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = _load_tokenizer(path)


def _encode_chunk(texts: list[str], standardize: bool) -> list[np.ndarray]:
    if standardize:
        texts = [ascii_punctuation(t) for t in texts]
    return [np.asarray(ids, dtype=np.int64) for ids in _WORKER_TOKENIZER.encode_batch(texts)]


def _chunks(docs: Iterator[str], max_docs: int, max_chars: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    chars = 0
    for doc in docs:
        chunk.append(doc)
        chars += len(doc)
        if len(chunk) >= max_docs or chars >= max_chars:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def prepare_corpus(
    input: list[str] | str | None = None,
    tokenizer: str | None = None,
    out: str | None = None,
    text_format: Literal["paragraphs", "lines"] = "paragraphs",
    jsonl_field: str = "text",
    pattern: str = "*",
    workers: int | None = None,
    shard_tokens: int = 1 << 28,
    standardize_punctuation: bool = True,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize a text corpus into memory-mapped token shards for pretraining.

    Args:
        input: files, directories (searched recursively for `pattern`) or globs; several as
            `--input '[a.txt,b.jsonl]'`. Files ending in
            .jsonl/.json/.ndjson are JSON lines; others are plain text; .gz is decompressed on the fly.
        tokenizer: a tokenizer directory (written by `openglm tokenizer` / `GLMTokenizer.save_pretrained`).
        out: the output directory (created; refused if it already holds shards unless `overwrite`).
        text_format: plain text documents are separated by blank lines ("paragraphs") or are lines ("lines").
        jsonl_field: the string field holding a document in JSON lines files.
        pattern: file name pattern inside directories.
        workers: tokenizer processes (default: the CPU count, at most 8; 0 = tokenize in this process).
        shard_tokens: tokens per shard before a new one is started.
        standardize_punctuation: map curly quotes and dashes to ASCII (as the official corpus readers do).
        strict: stop at the first bad input (invalid UTF-8, invalid JSON, missing field, empty file)
            instead of skipping and counting it.
        overwrite: replace an existing shard directory.
        progress: show a progress bar.

    `input`, `tokenizer` and `out` are required; they have defaults only so that the command line takes them
    as flags (`--input ... --tokenizer ... --out ...`).

    Returns:
        A summary: out, num_docs, num_tokens, dtype, shards, skipped (counts per kind of bad input). The
        full manifest is OUT/manifest.json (`ShardedCorpus(out).manifest`).
    """
    from tqdm import tqdm

    for name, value in (("input", input), ("tokenizer", tokenizer), ("out", out)):
        if value is None or (isinstance(value, list) and not value):
            raise ValueError(f"data prepare: --{name} is required")
    out_dir = Path(out)
    if (out_dir / MANIFEST).exists() and not overwrite:
        raise ValueError(f"{out_dir}: already holds a shard manifest (pass --overwrite to replace it)")
    if not Path(tokenizer).exists():
        raise FileNotFoundError(f"{tokenizer}: no such tokenizer directory")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
    files = corpus_files([input] if isinstance(input, str) else input, pattern)
    tok = _load_tokenizer(str(tokenizer))
    vocab = int(getattr(tok, "vocab_size", 0) or 0)
    dtype = np.dtype(np.uint16) if 0 < vocab <= 1 << 16 else np.dtype(np.uint32)
    out_dir.mkdir(parents=True, exist_ok=True)
    if overwrite:
        for old in list(out_dir.glob("shard-*")) + [out_dir / MANIFEST]:
            if old.exists():
                old.unlink()
    meta = {
        "tokenizer": str(Path(tokenizer).resolve()),
        "vocab_size": vocab,
        "eos_id": tok.eos_id,
        "cls_id": tok.cls_id,
        "inputs": [str(p) for p in files],
        "text_format": text_format,
        "jsonl_field": jsonl_field,
        "standardize_punctuation": standardize_punctuation,
    }
    report = InputReport()
    writer = ShardWriter(out_dir, dtype, shard_tokens, meta)
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    docs = iter_documents(files, report, text_format, jsonl_field, strict)
    chunks = _chunks(docs, max_docs=256, max_chars=1 << 20)
    bar = tqdm(total=None, unit="doc", desc="tokenizing", disable=not progress, mininterval=2.0)
    empty_docs = 0
    try:
        if workers == 0:
            global _WORKER_TOKENIZER
            _WORKER_TOKENIZER = tok
            results: Iterator[list[np.ndarray]] = (_encode_chunk(c, standardize_punctuation) for c in chunks)
            for encoded in results:
                empty_docs += _write_chunk(writer, encoded, vocab, bar)
        else:
            ctx = multiprocessing.get_context("spawn" if os.name == "nt" else "fork")
            with ctx.Pool(workers, initializer=_init_worker, initargs=(str(tokenizer),)) as pool:
                # A bounded window of chunks in flight keeps memory flat however large the corpus.
                pending: collections.deque = collections.deque()
                for chunk in chunks:
                    pending.append(pool.apply_async(_encode_chunk, (chunk, standardize_punctuation)))
                    if len(pending) >= 2 * workers:
                        empty_docs += _write_chunk(writer, pending.popleft().get(), vocab, bar)
                while pending:
                    empty_docs += _write_chunk(writer, pending.popleft().get(), vocab, bar)
    except BaseException:
        writer.abort()
        bar.close()
        raise
    bar.close()
    if empty_docs:
        report.skipped["document with no tokens"] += empty_docs
    writer.meta["skipped"] = dict(report.skipped)
    writer.meta["skipped_examples"] = report.examples
    writer.meta["files"] = report.files
    if writer.num_docs == 0:
        writer.abort()
        detail = ", ".join(f"{k}: {v}" for k, v in report.skipped.items()) or "no text found"
        raise ValueError(f"no documents were read from {len(files)} input file(s) ({detail})")
    manifest = writer.close()
    for kind, count in report.skipped.items():
        log.warning(
            "skipped %d x %s (e.g. %s)", count, kind, next((e for e in report.examples if kind in e), "-")
        )
    log.info(
        "wrote %d documents, %d tokens (%s) in %d shard(s) to %s",
        manifest["num_docs"],
        manifest["num_tokens"],
        manifest["dtype"],
        len(manifest["shards"]),
        out_dir,
    )
    return {
        "out": str(out_dir),
        "num_docs": manifest["num_docs"],
        "num_tokens": manifest["num_tokens"],
        "dtype": manifest["dtype"],
        "shards": len(manifest["shards"]),
        "skipped": manifest["skipped"],
    }


def _write_chunk(writer: ShardWriter, encoded: list[np.ndarray], vocab: int, bar: Any) -> int:
    empty = 0
    for ids in encoded:
        if ids.shape[0] == 0:
            empty += 1
            continue
        if vocab and (ids.min() < 0 or ids.max() >= max(vocab, 1)):
            raise ValueError(f"tokenizer produced id {int(ids.max())} outside its vocabulary of {vocab}")
        writer.add(ids)
    bar.update(len(encoded))
    return empty
