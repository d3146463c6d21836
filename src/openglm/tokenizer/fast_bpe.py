"""Byte-level BPE encoding through `tiktoken`: the same ids as the `tokenizers` BPE for the GPT-2, RoBERTa and
trained GLM tokenizers, about 2-3x faster on one core (benchmarks/tokenizer_speed.py).

Both implement GPT-2's scheme: split the text with GPT-2's regex, map bytes to printable characters, merge
pairs by merge order. `tiktoken` merges by the rank of the merged token instead of the pair, which is the same
order when each merged token comes from exactly one merge (true of GPT-2/RoBERTa and of `tokenizers`-trained
BPE), so ranks are built as: the 256 single bytes, then each merge's result in merge order. Ids are mapped from
ranks to the vocabulary (identity for GPT-2). Every fast encoder is checked against the library on a sample
text when it is built and is not used if they disagree.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

log = logging.getLogger(__name__)

# GPT-2's pre-tokenisation regex, as the `tokenizers` ByteLevel pre-tokenizer applies it.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

# Checked at build time: ASCII, punctuation runs, digits, whitespace runs, accents, CJK, emoji, contractions.
_SELF_CHECK = (
    "Hello world! It's 2024 -- isn't it?  Tabs\tand\n\nnewlines   end  \n",
    "Café naïve Zürich São Paulo, résumé; ¿Qué? ¡Sí!",
    "清华大学位于北京。今天天气怎么样？ 東京 서울 Москва",
    "Emoji 😀🎉👍🏽 ∑∞ © ® ™ ... ---- ____ $$ 1,234.56e-7",
    "they'll we've I'm you'd it's 'quoted' \"double\" (parens) [brackets] {braces}",
)


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (the vocabulary's alphabet)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


class TiktokenBPE:
    """Encodes text fragments to vocabulary ids with a `tiktoken` core built from a vocab and its merges."""

    def __init__(self, encoding: object, rank_to_id: list[int] | None) -> None:
        self.encoding = encoding
        self.rank_to_id = rank_to_id

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        out = []
        encode = self.encoding.encode_ordinary  # type: ignore[attr-defined]
        table = self.rank_to_id
        for text in texts:
            if not text.isascii():
                # tiktoken would silently replace lone surrogates; the library path raises, and so do we.
                text.encode("utf-8")
            ranks = encode(text)
            out.append(ranks if table is None else [table[r] for r in ranks])
        return out


def build(vocab: dict[str, int], merges: Sequence[tuple[str, str]], reference: object) -> TiktokenBPE | None:
    """A fast encoder equivalent to `reference` (an object with `encode_batch(texts) -> ids`), or None when
    `tiktoken` is not installed, the vocabulary is not byte-level, or the self-check disagrees.

    Args:
        vocab: token string (byte-level alphabet) -> id.
        merges: the merges in priority order, as pairs of token strings.
        reference: the library encoder the result must agree with.
    """
    try:
        import tiktoken
    except ImportError:
        return None
    alphabet = byte_to_unicode()
    to_byte = {c: b for b, c in alphabet.items()}
    ranks: dict[bytes, int] = {}
    try:
        # Single bytes in vocabulary order (their ranks never decide a merge), so GPT-2's ranks are its ids.
        for b in sorted(range(256), key=lambda b: vocab[alphabet[b]]):
            ranks[bytes([b])] = len(ranks)
        for left, right in merges:
            merged = bytes(to_byte[c] for c in left + right)
            if merged in ranks:  # a token reachable by two merges: rank order would differ from pair order
                return None
            ranks[merged] = len(ranks)
        rank_to_id = [0] * len(ranks)
        for token, rank in ranks.items():
            rank_to_id[rank] = vocab["".join(alphabet[b] for b in token)]
    except KeyError:  # a character outside the byte alphabet, or a merge result missing from the vocab
        return None
    encoding = tiktoken.Encoding(
        name="openglm-bpe", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={}
    )
    fast = TiktokenBPE(encoding, None if rank_to_id == list(range(len(ranks))) else rank_to_id)
    if fast.encode_batch(list(_SELF_CHECK)) != reference.encode_batch(list(_SELF_CHECK)):  # type: ignore[attr-defined]
        log.warning(
            "tiktoken disagrees with the tokenizers library on the self-check text; using the library"
        )
        return None
    return fast
