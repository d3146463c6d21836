"""Training a byte-level BPE tokenizer on a new corpus (issue 3): no unknown tokens for any Unicode text, the GLM
special tokens appended after the learned vocabulary, saved so that `GLMTokenizer.from_pretrained` loads it."""

from __future__ import annotations

import codecs
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from openglm.corpus import corpus_files
from openglm.tokenizer.glm import _LSTRIP_TOKENS, GLM_SPECIAL_TOKENS, GLMTokenizer

log = logging.getLogger(__name__)

_CHUNK = 1 << 20  # bytes read per step
_BATCH = 1000  # lines handed to the trainer per step


def iter_lines(files: Sequence[Path], progress: bool = False) -> Iterator[list[str]]:
    """Stream the files as batches of lines (newlines kept), reading 1 MiB at a time.

    Args:
        files: UTF-8 text files.
        progress: show a progress bar over the bytes read.

    Yields:
        Lists of up to 1000 lines.

    Raises:
        ValueError: a file is not valid UTF-8; the message names the file and the byte offset.
    """
    from tqdm import tqdm

    total = sum(f.stat().st_size for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="reading corpus", disable=not progress) as bar:
        for path in files:
            decoder = codecs.getincrementaldecoder("utf-8")("strict")
            offset = 0  # bytes of this file handed to the decoder so far
            carry = ""
            with open(path, "rb") as f:
                while True:
                    chunk = f.read(_CHUNK)
                    pending = len(decoder.getstate()[0])  # undecoded bytes kept from the previous chunk
                    try:
                        text = decoder.decode(chunk, final=not chunk)
                    except UnicodeDecodeError as err:
                        at = offset - pending + err.start
                        raise ValueError(
                            f"{path}: not valid UTF-8 at byte offset {at}; convert the file to UTF-8"
                        ) from None
                    offset += len(chunk)
                    bar.update(len(chunk))
                    lines = (carry + text).splitlines(keepends=True)
                    carry = lines.pop() if lines and chunk and not lines[-1].endswith(("\n", "\r")) else ""
                    for i in range(0, len(lines), _BATCH):
                        yield lines[i : i + _BATCH]
                    if not chunk:
                        break


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
    progress: bool = True,
) -> str:
    """Train a byte-level BPE tokenizer with the GLM special tokens on text files and save it.

    The files are streamed (never loaded whole). The result has no unknown tokens for any Unicode input; the
    GLM tokens [CLS] [SEP] [MASK] [sMASK] [gMASK] <|startofpiece|> <|endofpiece|> [UNK] [dBLOCK]
    <|endoftext|> (pad and eos) follow the learned vocabulary, and `GLMTokenizer.from_pretrained(out)` loads it.

    Args:
        corpus: UTF-8 text files, directories (every non-hidden file below) or glob patterns; one path or a
            list.
        vocab_size: total number of tokens including the 10 GLM tokens (the corpus may yield fewer).
        out: output directory (created; other files in it are kept).
        min_frequency: pairs seen fewer times are not merged.
        progress: show progress bars.

    `corpus`, `vocab_size` and `out` are required; they have defaults only so that the command line takes them
    as flags (`--corpus PATH --vocab_size N --out DIR`; several inputs: `--corpus [A,B]` or `--corpus+ B`).

    Returns:
        The output directory.
    """
    for name, value in (("corpus", corpus), ("vocab_size", vocab_size), ("out", out)):
        if value is None or (isinstance(value, list) and not value):
            raise ValueError(f"tokenizer train: --{name} is required")
    files = corpus_files([corpus] if isinstance(corpus, str | os.PathLike) else corpus)
    log.info("training a %d-token byte-level BPE on %d file(s)", vocab_size, len(files))
    tok = train_bpe(iter_lines(files, progress), vocab_size, min_frequency, progress)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = tok.to_str().encode("utf-8")
    glm = GLMTokenizer._from_tokenizer_json(data, out_dir / "tokenizer.json")
    glm.save_pretrained(out_dir)
    log.info("saved %d tokens (model vocab %d) to %s", glm.num_tokens, glm.vocab_size, out_dir)
    return str(out_dir)
