"""Corpus -> token shards (`openglm data prepare`) and the readers over them (spec C.1 input side).

A shard directory holds `manifest.json`, and per shard a flat token file (`shard-NNNNN.bin`, uint16 when
the vocabulary fits, else uint32) with a document index (`shard-NNNNN.idx.npy`, int64 offsets [docs+1]).
Corpora prepared with a prompt field also have `shard-NNNNN.prompt.npy` (int32 [docs]): how many leading
tokens of each document are prompt: their loss mask is 0 (spec C.1), which the prefix-LM rows of the
document objective honour (C.6) and token/sentence rows ignore, as officially."""

from __future__ import annotations

import collections
import contextlib
import io
import json
import logging
import multiprocessing
import os
import re
import secrets
import shutil
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

    def __init__(
        self,
        documents: Sequence[Sequence[int] | np.ndarray],
        prompt_lengths: Sequence[int] | np.ndarray | None = None,
    ) -> None:
        self.documents = [np.asarray(d, dtype=np.int64) for d in documents]
        self.doc_lengths = np.array([d.shape[0] for d in self.documents], dtype=np.int64)
        self.prompt_lengths = _prompt_lengths(prompt_lengths, self.doc_lengths)

    def __len__(self) -> int:
        return len(self.documents)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.documents[index]

    def subset(self, doc_ids: Sequence[int] | np.ndarray) -> CorpusSubset:
        return CorpusSubset(self, doc_ids)


class ShardedCorpus:
    """Read-only view of a shard directory; cheap to pickle into DataLoader workers and many ranks
    (the token files are memory-mapped lazily in each process).

    Opening checks the manifest against what `openglm data prepare` writes and against the files it names
    (types, dtype, every token file's size, every index), so damaged shards fail here with one line naming
    the file, instead of training on garbage or failing deep inside the model."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        manifest_path = self.path / MANIFEST
        self.manifest = _read_manifest(manifest_path)
        self.dtype = np.dtype(self.manifest["dtype"])
        shards = self.manifest["shards"]
        self._offsets = [
            _load_index(self.path, manifest_path, i, s, self.dtype) for i, s in enumerate(shards)
        ]
        self.doc_lengths = np.concatenate([np.diff(o) for o in self._offsets]).astype(np.int64)
        self._first_doc = np.cumsum([0] + [len(o) - 1 for o in self._offsets])
        self._maps: list[np.memmap | None] = [None] * len(self._offsets)
        prompts = [
            _load_array(
                self.path / s["prompt"],
                f"{manifest_path}: shards[{i}].prompt",
                s["num_docs"],
                "prompt lengths",
            )
            if "prompt" in s
            else np.zeros(s["num_docs"], dtype=np.int32)
            for i, s in enumerate(shards)
        ]
        self.prompt_lengths = _prompt_lengths(np.concatenate(prompts), self.doc_lengths, manifest_path)

    def check_tokenizer(self, tokenizer: Any) -> None:
        """Raise ValueError (one line) unless `tokenizer` matches the one these shards were prepared with, as
        far as the manifest records it: vocab_size, eos_id and cls_id. Token ids from another vocabulary
        would train silently on the wrong embeddings (or index past the embedding table)."""
        recorded = self.manifest.get("tokenizer") or "unknown"
        for key in ("vocab_size", "eos_id", "cls_id"):
            want = self.manifest.get(key)
            have = getattr(tokenizer, key, None)
            if want is None or have is None or (key == "vocab_size" and want == 0):
                continue  # not recorded (or not known for this tokenizer): nothing to compare
            if int(have) != want:
                raise ValueError(
                    f"{self.path / MANIFEST}: the shards were prepared with a tokenizer of {key} {want} "
                    f"({recorded}), but this tokenizer has {key} {int(have)}; use the tokenizer the shards "
                    "were made with or prepare them again"
                )

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
        self.prompt_lengths = document_prompt_lengths(corpus)[self.doc_ids]

    def __len__(self) -> int:
        return int(self.doc_ids.shape[0])

    def __getitem__(self, index: int) -> np.ndarray:
        return self.corpus[int(self.doc_ids[index])]


def document_prompt_lengths(corpus: Any) -> np.ndarray:
    """int64 [num_docs]: the prompt tokens at the start of each document (zeros for corpora without)."""
    lengths = getattr(corpus, "prompt_lengths", None)
    if lengths is None:
        return np.zeros(len(corpus.doc_lengths), dtype=np.int64)
    return np.asarray(lengths, dtype=np.int64)


def _prompt_lengths(lengths: Any, doc_lengths: np.ndarray, where: object = "prompt_lengths") -> np.ndarray:
    if lengths is None:
        return np.zeros(doc_lengths.shape[0], dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.shape != doc_lengths.shape:
        raise ValueError(f"{where}: {lengths.shape[0]} prompt lengths for {doc_lengths.shape[0]} documents")
    bad = np.flatnonzero((lengths < 0) | (lengths > doc_lengths))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{where}: document {i} has prompt length {int(lengths[i])} but {int(doc_lengths[i])} tokens"
        )
    return lengths


# The dtypes `prepare_corpus` writes: uint16 when the vocabulary fits, else uint32.
SHARD_DTYPES = ("uint16", "uint32")


def _read_manifest(manifest_path: Path) -> dict[str, Any]:
    """The parsed manifest, checked field by field (one-line errors naming the file and field)."""
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: no shard manifest (run `openglm data prepare` first)")
    try:
        manifest = json.loads(manifest_path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(
            f"{manifest_path}: not a valid shard manifest ({err}); run `openglm data prepare` again"
        ) from None
    where = str(manifest_path)
    if not isinstance(manifest, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(manifest).__name__}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{where}: format_version {manifest.get('format_version')} is not {FORMAT_VERSION}")
    dtype = manifest.get("dtype")
    if dtype not in SHARD_DTYPES:
        raise ValueError(f"{where}: dtype {dtype!r} is not one of {', '.join(SHARD_DTYPES)}")
    for key in ("num_docs", "num_tokens"):
        _count(manifest, key, f"{where}: ")
    vocab = manifest.get("vocab_size")
    if vocab is not None:
        _count(manifest, "vocab_size", f"{where}: ")
        if vocab > np.iinfo(dtype).max + 1:
            raise ValueError(f"{where}: vocab_size {vocab} does not fit dtype {dtype}")
    for key in ("eos_id", "cls_id"):
        if manifest.get(key) is not None:
            _count(manifest, key, f"{where}: ")
            if vocab and manifest[key] >= vocab:
                raise ValueError(f"{where}: {key} {manifest[key]} is outside vocab_size {vocab}")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards:
        raise ValueError(f"{where}: shards must be a non-empty list of shard entries, got {shards!r:.60}")
    for i, shard in enumerate(shards):
        at = f"{where}: shards[{i}]"
        if not isinstance(shard, dict):
            raise ValueError(f"{at} must be an object, got {shard!r:.60}")
        for key in ("tokens", "index") + (("prompt",) if "prompt" in shard else ()):
            name = shard.get(key)
            # Only plain names: a manifest must not make the reader open files outside its folder.
            if not isinstance(name, str) or not name or Path(name).name != name or name in (".", ".."):
                raise ValueError(
                    f"{at}.{key} must be a file name inside {manifest_path.parent}, got {name!r}"
                )
        _count(shard, "num_docs", f"{at}.")
        _count(shard, "num_tokens", f"{at}.")
    for key in ("num_docs", "num_tokens"):
        total = sum(shard[key] for shard in shards)
        if manifest[key] != total:
            raise ValueError(f"{where}: {key} is {manifest[key]} but its shards hold {total}")
    return manifest


def _count(record: dict[str, Any], key: str, prefix: str) -> None:
    value = record.get(key)
    # bool is an int in Python, but `true` is never a count.
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{prefix}{key} must be a whole number >= 0, got {value!r}")


def _load_array(path: Path, field: str, count: int, expect: str) -> np.ndarray:
    """`count` integers from the .npy file named by manifest `field`, or a one-line error naming the file.
    Pickles are refused: a manifest folder is data, and loading one must not run code."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file (named by {field})")
    try:
        array = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError):
        # numpy's own messages (pickle advice, byte counts) do not help here: the file is simply damaged.
        raise ValueError(
            f"{path}: not a readable .npy array (named by {field}); it is damaged or truncated, "
            "run `openglm data prepare` again"
        ) from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "iu" or array.shape != (count,):
        found = (
            f"{array.dtype} of shape {array.shape}" if isinstance(array, np.ndarray) else type(array).__name__
        )
        raise ValueError(f"{path}: expected {count} integers ({expect}, named by {field}), found {found}")
    return array


def _load_index(
    folder: Path, manifest_path: Path, i: int, shard: dict[str, Any], dtype: np.dtype
) -> np.ndarray:
    """Shard `i`'s document offsets, checked against its manifest entry and its token file's size."""
    at = f"{manifest_path}: shards[{i}]"
    docs, tokens = shard["num_docs"], shard["num_tokens"]
    token_file = folder / shard["tokens"]
    if tokens > 0 or token_file.exists():
        if not token_file.is_file():
            raise FileNotFoundError(f"{token_file}: no such file (named by {at}.tokens)")
        size = token_file.stat().st_size
        if size != tokens * dtype.itemsize:
            raise ValueError(
                f"{token_file}: {size} bytes, but {at} records {tokens} {dtype.name} tokens "
                f"({tokens * dtype.itemsize} bytes); the file is truncated or the manifest is wrong"
            )
    offsets = _load_array(folder / shard["index"], f"{at}.index", docs + 1, "num_docs + 1 document offsets")
    offsets = offsets.astype(np.int64)
    if offsets[0] != 0 or offsets[-1] != tokens or np.any(np.diff(offsets) < 0):
        raise ValueError(
            f"{folder / shard['index']}: offsets must rise from 0 to num_tokens {tokens} ({at}), "
            f"found {int(offsets[0])} .. {int(offsets[-1])}"
        )
    return offsets


# --------------------------------------------------------------------------------------------------------
# Writing shards


class ShardWriter:
    """Appends tokenized documents to size-capped shards; `close()` writes the manifest last."""

    def __init__(
        self, out: Path, dtype: np.dtype, shard_tokens: int, meta: dict[str, Any], prompts: bool = False
    ) -> None:
        self.out = out
        self.prompts = prompts  # write per-document prompt lengths
        self.dtype = np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.meta = meta
        self.shards: list[dict[str, Any]] = []
        self._handle = None
        self._offsets: list[int] = [0]
        self._prompt_lengths: list[int] = []
        self._tmp: Path | None = None
        self.num_docs = 0
        self.num_tokens = 0

    def _open(self) -> None:
        name = f"shard-{len(self.shards):05d}"
        self._tmp = self.out / f".{name}.bin.tmp"
        self._handle = open(self._tmp, "wb")  # noqa: SIM115
        self._offsets = [0]
        self._prompt_lengths = []

    def add(self, tokens: np.ndarray, prompt_length: int = 0) -> None:
        if self._handle is None:
            self._open()
        self._handle.write(np.asarray(tokens).astype(self.dtype, copy=False).tobytes())
        self._offsets.append(self._offsets[-1] + int(tokens.shape[0]))
        self._prompt_lengths.append(prompt_length)
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
        entry = {"tokens": f"{name}.bin", "index": f"{name}.idx.npy"}
        if self.prompts:
            prompts = io.BytesIO()
            np.save(prompts, np.asarray(self._prompt_lengths, dtype=np.int32))
            write_bytes_atomic(self.out / f"{name}.prompt.npy", prompts.getvalue())
            entry["prompt"] = f"{name}.prompt.npy"
        os.replace(self._tmp, self.out / f"{name}.bin")
        self.shards.append({**entry, "num_docs": len(self._offsets) - 1, "num_tokens": self._offsets[-1]})

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


_WORKER_TOKENIZER: Any = None


def _load_tokenizer(path: str) -> Any:
    from openglm.tokenizer import GLMTokenizer

    return GLMTokenizer.from_pretrained(path)


def _init_worker(path: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = _load_tokenizer(path)


Document = str | tuple[str, str]  # a text, or (prompt, text) with --prompt-field


def _encode_chunk(docs: list[Document], standardize: bool) -> list[tuple[np.ndarray, int]]:
    """Token ids and prompt length per document; a prompt is tokenized on its own, then the text."""
    prompts = [d[0] if isinstance(d, tuple) else "" for d in docs]
    texts = [d[1] if isinstance(d, tuple) else d for d in docs]
    if standardize:
        prompts = [ascii_punctuation(t) for t in prompts]
        texts = [ascii_punctuation(t) for t in texts]
    encoded = _WORKER_TOKENIZER.encode_batch(texts)
    if not any(prompts):
        return [(np.asarray(ids, dtype=np.int64), 0) for ids in encoded]
    prompt_ids = _WORKER_TOKENIZER.encode_batch(prompts)
    return [
        (np.asarray(list(p) + list(t), dtype=np.int64), len(p))
        for p, t in zip(prompt_ids, encoded, strict=True)
    ]


def _chunks(docs: Iterator[Document], max_docs: int, max_chars: int) -> Iterator[list[Document]]:
    chunk: list[Document] = []
    chars = 0
    for doc in docs:
        chunk.append(doc)
        chars += sum(map(len, doc)) if isinstance(doc, tuple) else len(doc)
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
    prompt_field: str | None = None,
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
        prompt_field: JSON lines only: a string field that precedes the text as a prompt (e.g. a question
            before its answer). The two are tokenized separately and joined; the prompt's tokens get loss
            mask 0, which the document objective's prefix-LM rows honour (spec C.1, C.6). Plain-text
            documents in the same run have no prompt.
        pattern: file name pattern inside directories.
        workers: tokenizer processes (default: the CPU count, at most 8; 0 = tokenize in this process).
        shard_tokens: tokens per shard before a new one is started.
        standardize_punctuation: map curly quotes and dashes to ASCII (as the official corpus readers do).
        strict: stop at the first bad input (invalid UTF-8, invalid JSON, missing field, empty file)
            instead of skipping and counting it.
        overwrite: replace the shards OUT already holds (its other files are kept). The new shards are
            built in a hidden folder inside OUT and moved in only when complete, so a failed run leaves the
            old ones.
        progress: show a progress bar.

    `input`, `tokenizer` and `out` are required; they have defaults only so that the command line takes them
    as flags (`--input ... --tokenizer ... --out ...`).

    Returns:
        A summary: out, num_docs, num_tokens, dtype, shards, skipped (counts per kind of bad input). The
        full manifest is OUT/manifest.json (`ShardedCorpus(out).manifest`).
    """
    for name, value in (("input", input), ("tokenizer", tokenizer), ("out", out)):
        if value is None or (isinstance(value, list) and not value):
            raise ValueError(f"data prepare: --{name} is required")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: --out exists and is not a directory")
    if (out_dir / MANIFEST).exists() and not overwrite:
        raise ValueError(f"{out_dir}: already holds a shard manifest (pass --overwrite true to replace it)")
    if not Path(tokenizer).exists():
        raise FileNotFoundError(f"{tokenizer}: no such tokenizer directory")
    if shard_tokens < 1:
        raise ValueError(f"data prepare: --shard_tokens must be >= 1, got {shard_tokens}")
    if workers is not None and workers < 0:
        raise ValueError(
            f"data prepare: --workers must be >= 0 (0 = tokenize in this process), got {workers}"
        )
    if text_format not in ("paragraphs", "lines"):
        raise ValueError(f"data prepare: --text_format must be paragraphs or lines, got {text_format!r}")
    files = corpus_files([input] if isinstance(input, str) else input, pattern)
    tok = _load_tokenizer(str(tokenizer))
    vocab = int(getattr(tok, "vocab_size", 0) or 0)
    dtype = np.dtype(np.uint16) if 0 < vocab <= 1 << 16 else np.dtype(np.uint32)
    meta = {
        "tokenizer": str(Path(tokenizer).resolve()),
        "vocab_size": vocab,
        "eos_id": tok.eos_id,
        "cls_id": tok.cls_id,
        "inputs": [str(p) for p in files],
        "text_format": text_format,
        "jsonl_field": jsonl_field,
        "prompt_field": prompt_field,
        "standardize_punctuation": standardize_punctuation,
    }
    if workers is None:
        workers = min(8, os.cpu_count() or 1)
    # Shards are built in a hidden folder inside OUT and moved into place only once complete, so a failure
    # (bad input, Ctrl-C, a full disk) leaves the shards OUT had, and no new folder. Inside OUT, not beside
    # it: every move stays on OUT's filesystem (OUT may be a mount point) and needs no rights on its parent.
    target = out_dir.resolve()
    created = ([] if target.exists() else [target]) + _missing_parents(target)  # deepest first
    target.mkdir(parents=True, exist_ok=True)
    staging = target / f".build-{os.getpid()}-{secrets.token_hex(4)}.tmp"
    staging.mkdir()
    try:
        report = InputReport()
        writer = ShardWriter(staging, dtype, shard_tokens, meta, prompts=prompt_field is not None)
        _tokenize(
            files,
            report,
            writer,
            tok,
            str(tokenizer),
            vocab,
            workers,
            progress,
            text_format,
            jsonl_field,
            strict,
            prompt_field,
            standardize_punctuation,
        )
        writer.meta["skipped"] = dict(report.skipped)
        writer.meta["skipped_examples"] = report.examples
        writer.meta["files"] = report.files
        if writer.num_docs == 0:
            raise ValueError(f"no documents were read from {len(files)} input file(s) ({report.summary()})")
        manifest = writer.close()
        _install(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for folder in created:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    report.log_skipped()
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


def _tokenize(
    files: list[Path],
    report: InputReport,
    writer: ShardWriter,
    tok: Any,
    tokenizer: str,
    vocab: int,
    workers: int,
    progress: bool,
    text_format: Literal["paragraphs", "lines"],
    jsonl_field: str,
    strict: bool,
    prompt_field: str | None,
    standardize_punctuation: bool,
) -> None:
    """Stream the documents of `files` through the tokenizer (in `workers` processes) into `writer`."""
    from tqdm import tqdm

    docs = iter_documents(files, report, text_format, jsonl_field, strict, prompt_field)
    chunks = _chunks(docs, max_docs=256, max_chars=1 << 20)
    empty_docs = 0
    with tqdm(total=None, unit="doc", desc="tokenizing", disable=not progress, mininterval=2.0) as bar:
        if workers == 0:
            global _WORKER_TOKENIZER
            _WORKER_TOKENIZER = tok
            for chunk in chunks:
                empty_docs += _write_chunk(writer, _encode_chunk(chunk, standardize_punctuation), vocab, bar)
        else:
            ctx = multiprocessing.get_context("spawn" if os.name == "nt" else "fork")
            with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
                # A bounded window of chunks in flight keeps memory flat however large the corpus.
                pending: collections.deque = collections.deque()
                for chunk in chunks:
                    pending.append(pool.apply_async(_encode_chunk, (chunk, standardize_punctuation)))
                    if len(pending) >= 2 * workers:
                        empty_docs += _write_chunk(writer, pending.popleft().get(), vocab, bar)
                while pending:
                    empty_docs += _write_chunk(writer, pending.popleft().get(), vocab, bar)
    if empty_docs:
        report.skipped["document with no tokens"] += empty_docs


def _missing_parents(folder: Path) -> list[Path]:
    """The ancestors of `folder` that do not exist yet, deepest first (to remove again after a failure)."""
    missing = []
    for parent in folder.parents:
        if parent.exists():
            break
        missing.append(parent)
    return missing


def _is_shard_file(name: str) -> bool:
    return name == MANIFEST or re.fullmatch(r"shard-\d+\.(bin|idx\.npy|prompt\.npy)", name) is not None


def _install(staging: Path, out_dir: Path) -> None:
    """Move complete shards from `staging` to `out_dir`, replacing the shards it held.

    `staging` is a hidden folder inside `out_dir` (which may hold the user's other files, even the corpus
    itself). The old shard files move aside first, manifest first, so no reader ever sees a manifest over a
    mix of old and new shards; the new files go in manifest last; the old ones are deleted only then. A crash
    in between leaves every old and new file on disk, in OUT or in the hidden folders inside it."""
    backup = staging.with_suffix(".old")
    backup.mkdir()
    old = sorted((p for p in out_dir.iterdir() if _is_shard_file(p.name)), key=lambda p: p.name != MANIFEST)
    new = sorted(staging.iterdir(), key=lambda p: p.name == MANIFEST)
    moved_in: list[Path] = []
    try:
        for path in old:
            os.replace(path, backup / path.name)
        for path in new:
            os.replace(path, out_dir / path.name)
            moved_in.append(out_dir / path.name)
    except BaseException:
        for path in moved_in:
            path.unlink(missing_ok=True)
        for path in sorted(backup.iterdir(), key=lambda p: p.name == MANIFEST):
            os.replace(path, out_dir / path.name)
        backup.rmdir()
        raise
    staging.rmdir()
    shutil.rmtree(backup)


def _write_chunk(writer: ShardWriter, encoded: list[tuple[np.ndarray, int]], vocab: int, bar: Any) -> int:
    empty = 0
    for ids, prompt_length in encoded:
        if ids.shape[0] == prompt_length:  # no text tokens: nothing to learn from
            empty += 1
            continue
        if vocab and (ids.min() < 0 or ids.max() >= max(vocab, 1)):
            raise ValueError(f"tokenizer produced id {int(ids.max())} outside its vocabulary of {vocab}")
        writer.add(ids, prompt_length)
    bar.update(len(encoded))
    return empty
