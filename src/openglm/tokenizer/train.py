"""Training a byte-level BPE tokenizer on a new corpus (issue 3): no unknown tokens for any Unicode text, the GLM
special tokens appended after the learned vocabulary, saved so that `GLMTokenizer.from_pretrained` loads it."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Literal

from openglm.corpus import InputReport, ascii_punctuation, corpus_files, iter_documents
from openglm.tokenizer.glm import _LSTRIP_TOKENS, GLM_SPECIAL_TOKENS, GLMTokenizer

log = logging.getLogger(__name__)

_CHUNK = 1 << 20  # bytes read per step
_BATCH = 1000  # lines handed to the trainer per step


def document_batches(
    documents: Iterable[str], standardize: bool = True, progress: bool = False
) -> Iterator[list[str]]:
    """Group documents into lists of up to 1000 for the trainer, with the punctuation mapping `data prepare`
    applies before encoding (so that the tokenizer learns the text it will be asked to encode)."""
    from tqdm import tqdm

    batch: list[str] = []
    for doc in tqdm(documents, unit="doc", desc="reading corpus", disable=not progress, mininterval=2.0):
        batch.append(ascii_punctuation(doc) if standardize else doc)
        if len(batch) == _BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def train_bpe(
    texts: Iterable[str | list[str]], vocab_size: int, min_frequency: int = 2, progress: bool = False
):
    """Train a byte-level BPE (GPT-2 pre-tokenisation) and append the GLM special tokens.

    Args:
        texts: texts, or batches (lists) of texts, streamed once.
        vocab_size: the total size including the special tokens.
        min_frequency: pairs seen fewer times are not merged.
        progress: show the library's progress bars.

    Returns:
        The `tokenizers.Tokenizer`.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers, trainers
    from tokenizers.models import BPE

    learned = vocab_size - len(GLM_SPECIAL_TOKENS)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if learned < len(alphabet):
        raise ValueError(
            f"vocab_size={vocab_size} is too small: it must be at least "
            f"{len(alphabet) + len(GLM_SPECIAL_TOKENS)} (256 byte tokens + {len(GLM_SPECIAL_TOKENS)} GLM tokens)"
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency={min_frequency} must be at least 1")
    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # Every byte is in the initial alphabet, so any Unicode text encodes without an unknown token.
    trainer = trainers.BpeTrainer(
        vocab_size=learned, min_frequency=min_frequency, initial_alphabet=alphabet, show_progress=progress
    )
    tok.train_from_iterator(texts, trainer)
    # Added after training, the special tokens take the ids after the learned vocabulary, in this order.
    tok.add_special_tokens(
        [
            AddedToken(t, lstrip=t in _LSTRIP_TOKENS, normalized=False, special=True)
            for t in GLM_SPECIAL_TOKENS
        ]
    )
    return tok


def train_tokenizer(
    corpus: list[str] | str | None = None,
    vocab_size: int | None = None,
    out: str | None = None,
    min_frequency: int = 2,
    text_format: Literal["paragraphs", "lines"] = "paragraphs",
    jsonl_field: str = "text",
    pattern: str = "*",
    standardize_punctuation: bool = True,
    strict: bool = False,
    progress: bool = True,
    overwrite: bool = False,
) -> str:
    """Train a byte-level BPE tokenizer with the GLM special tokens on a corpus and save it.

    The corpus is read exactly as `openglm data prepare` reads it (same files, documents, JSON field and
    punctuation mapping), streamed document by document. The result has no unknown tokens for any Unicode
    input; the GLM tokens [CLS] [SEP] [MASK] [sMASK] [gMASK] <|startofpiece|> <|endofpiece|> [UNK] [dBLOCK]
    <|endoftext|> (pad and eos) follow the learned vocabulary, and `GLMTokenizer.from_pretrained(out)` loads it.

    Args:
        corpus: files, directories (searched recursively for `pattern`) or glob patterns; one path or a list.
            Files ending in .jsonl/.json/.ndjson are JSON lines, others plain UTF-8 text; .gz is
            decompressed on the fly.
        vocab_size: total number of tokens including the 10 GLM tokens (the corpus may yield fewer).
        out: output directory (created; other files in it are kept; an existing tokenizer needs `overwrite`).
        min_frequency: pairs seen fewer times are not merged.
        text_format: plain text documents are separated by blank lines ("paragraphs") or are lines ("lines").
        jsonl_field: the string field holding a document in JSON lines files.
        pattern: file name pattern inside directories.
        standardize_punctuation: map curly quotes and dashes to ASCII (the `data prepare` default).
        strict: stop at the first bad input (invalid UTF-8, invalid JSON, missing field, empty file) instead
            of skipping and counting it, as `data prepare` does.
        progress: show progress bars.
        overwrite: replace a tokenizer already in `out` (shards and models made with it no longer match it).

    `corpus`, `vocab_size` and `out` are required; they have defaults only so that the command line takes them
    as flags (`--corpus PATH --vocab_size N --out DIR`; several inputs: `--corpus [A,B]` or `--corpus+ B`).

    Returns:
        The output directory.
    """
    for name, value in (("corpus", corpus), ("vocab_size", vocab_size), ("out", out)):
        if value is None or (isinstance(value, list) and not value):
            raise ValueError(f"tokenizer train: --{name} is required")
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"tokenizer train: --out {out} exists and is not a directory; name a directory")
    held = [n for n in ("tokenizer.json", "tokenizer_config.json") if (out_dir / n).exists()]
    if held and not overwrite:
        raise ValueError(
            f"tokenizer train: --out {out} already holds a tokenizer ({', '.join(held)}); pass --overwrite true "
            "to replace it, or choose another --out"
        )
    files = corpus_files([corpus] if isinstance(corpus, str | os.PathLike) else corpus, pattern)
    log.info("training a %d-token byte-level BPE on %d file(s)", vocab_size, len(files))
    report = InputReport()
    documents = iter_documents(files, report, text_format, jsonl_field, strict)
    tok = train_bpe(
        document_batches(documents, standardize_punctuation, progress), vocab_size, min_frequency, progress
    )
    report.log_skipped()
    if report.documents == 0:
        raise ValueError(
            f"tokenizer train: no documents were read from {len(files)} input file(s) ({report.summary()})"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    data = tok.to_str().encode("utf-8")
    glm = GLMTokenizer._from_tokenizer_json(data, out_dir / "tokenizer.json")
    glm.save_pretrained(out_dir)
    log.info("saved %d tokens (model vocab %d) to %s", glm.num_tokens, glm.vocab_size, out_dir)
    return str(out_dir)
