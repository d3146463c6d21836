"""GLM's autoregressive blank-infilling objective (spec C.2-C.8): span sampling for the token, sentence and
document objectives, the Part A / Part B layout with 2-D positions, and the per-batch objective mix.
Pure numpy; every random draw comes from the `numpy.random.Generator` the caller passes in."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np

#: Characters that make a token a sentence end (spec C.1; the official newline test never fires).
SENTENCE_END_CHARS = (".", "?", "!", ";", ":", "。", "？", "！", "；", "…")

MODES = ("token", "sentence", "document")


class SpanError(ValueError):
    """A span handed to the layout is invalid (for example it contains the end-of-document token)."""


@dataclass
class ObjectiveConfig:
    """Every knob of the blank-infilling objective. Defaults are GLM-Base/Large (`ds_block_large.sh`).

    The mode probabilities are per batch (official) unless `per_sample_mode` is set; the document
    probability is what remains, 1 - bert_prob - gap_sentence_prob.
    """

    bert_prob: float = 1.0  # token-level blank infilling ("bert" mode)
    gap_sentence_prob: float = 0.0  # sentence-level ([sMASK] under task_mask)
    bert_ratio: float = 0.15  # masked share of a sample in token mode; the length counts [CLS]/eos
    gap_sentence_ratio: float = 0.15  # masked share in sentence mode (whole sentences, so it overshoots)
    average_block_length: float = 3.0  # Poisson lambda of the span lengths
    max_block_length: int = 40  # exclusive: span lengths are 1..max_block_length-1
    # Official --gpt-infill-prob. Despite its name it selects the *suffix* (prefix-LM) variant of
    # document mode for single-document samples; multi-document samples always take the suffix variant.
    gpt_suffix_prob: float = 0.5
    gpt_min_ratio: float = 0.5  # document mode: G_max >= gpt_min_ratio * (shortest sample length)
    block_mask_prob: float = 0.0  # token mode: each Part B span input token becomes [dBLOCK] with this prob
    # Official --context-mask-ratio (C.9): Part A text tokens within `context_mask_range` tokens of a span
    # (before its start or after its end) each become [dBLOCK] with this probability, in every block layout,
    # so the model cannot lean on a blank's immediate neighbours alone. [CLS], eos and masks are kept.
    context_mask_ratio: float = 0.0
    context_mask_range: int = 3
    short_seq_prob: float = 0.0  # per batch: split every sample into short sentence-aligned pieces
    single_span_prob: float = 0.0  # per batch: token mode with exactly one span per sample
    task_mask: bool = False  # sentence mode uses [sMASK] and document mode [gMASK] (else [MASK])
    shuffle_blocks: bool = True  # ablation off: Part B spans in text order
    block_position_encoding: bool = True  # ablation off: every Part B block id is 1
    masked_lm: bool = False  # ablation: BERT-style, each span token replaced in place, no Part B
    per_sample_mode: bool = False  # draw the objective per sample instead of per batch
    # Official --random-position (C.9): shift all positions of a block-layout row by a random offset so
    # that every row of the position table gets trained; positions stay below `max_position`.
    random_position: bool = False
    max_position: int = 512
    short_seq_min_length: int = 32  # smallest piece length of the short-sequence split

    def __post_init__(self) -> None:
        probs = {
            "bert_prob": self.bert_prob,
            "gap_sentence_prob": self.gap_sentence_prob,
            "bert_ratio": self.bert_ratio,
            "gap_sentence_ratio": self.gap_sentence_ratio,
            "gpt_suffix_prob": self.gpt_suffix_prob,
            "gpt_min_ratio": self.gpt_min_ratio,
            "block_mask_prob": self.block_mask_prob,
            "context_mask_ratio": self.context_mask_ratio,
            "short_seq_prob": self.short_seq_prob,
            "single_span_prob": self.single_span_prob,
        }
        for name, value in probs.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"ObjectiveConfig.{name} must be in [0, 1], got {value}")
        if self.bert_prob + self.gap_sentence_prob > 1.0 + 1e-9:
            raise ValueError(
                f"ObjectiveConfig: bert_prob + gap_sentence_prob must be <= 1, got "
                f"{self.bert_prob} + {self.gap_sentence_prob}"
            )
        if self.context_mask_range < 1:
            raise ValueError(
                f"ObjectiveConfig.context_mask_range must be >= 1, got {self.context_mask_range}"
            )
        if self.max_block_length < 2:
            raise ValueError(f"ObjectiveConfig.max_block_length must be >= 2, got {self.max_block_length}")
        if self.average_block_length <= 0:
            raise ValueError(
                f"ObjectiveConfig.average_block_length must be > 0, got {self.average_block_length}"
            )

    @property
    def gpt_prob(self) -> float:
        return max(0.0, 1.0 - self.bert_prob - self.gap_sentence_prob)

    @classmethod
    def from_name(cls, name: str, **overrides: object) -> ObjectiveConfig:
        """An official pretraining mix by name (see `OBJECTIVE_PRESETS`), with optional field overrides."""
        if name not in OBJECTIVE_PRESETS:
            raise ValueError(f"unknown objective preset {name!r}; choose from {sorted(OBJECTIVE_PRESETS)}")
        return cls(**{**OBJECTIVE_PRESETS[name], **overrides})

    def only(self, mode: str) -> ObjectiveConfig:
        """A copy that always draws `mode` ("token", "sentence" or "document"); used for validation sets."""
        if mode not in MODES:
            raise ValueError(f"unknown objective mode {mode!r}; choose from {MODES}")
        from dataclasses import replace

        bert, gap = {"token": (1.0, 0.0), "sentence": (0.0, 1.0), "document": (0.0, 0.0)}[mode]
        return replace(self, bert_prob=bert, gap_sentence_prob=gap, short_seq_prob=0.0, single_span_prob=0.0)


#: Official pretraining mixes (config/ds_block_*.sh). Values not listed are the ObjectiveConfig defaults.
OBJECTIVE_PRESETS: dict[str, dict[str, object]] = {
    "glm-base": {},
    "glm-large": {},
    "glm-10b": {
        "bert_prob": 0.5,
        "gap_sentence_prob": 0.3,
        "gpt_min_ratio": 0.25,
        "block_mask_prob": 0.1,
        "short_seq_prob": 0.02,
        "task_mask": True,
    },
    "document": {"bert_prob": 0.0, "gap_sentence_prob": 0.0},
    "sentence": {"bert_prob": 0.0, "gap_sentence_prob": 1.0},
}


@dataclass
class SpecialTokens:
    """The ids the objective writes, plus a lookup table of sentence-end ids (spec C.1)."""

    cls: int
    eos: int
    mask: int
    sop: int
    eop: int
    smask: int | None = None
    gmask: int | None = None
    dblock: int | None = None
    sentence_end: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # bool [vocab]

    @classmethod
    def from_tokenizer(cls, tokenizer: object) -> SpecialTokens:
        """Read the ids and the sentence-end table from a `GLMTokenizer` (or anything with the same API)."""
        num = int(getattr(tokenizer, "num_tokens", None) or tokenizer.vocab_size)
        strings = tokenizer.convert_ids_to_tokens(list(range(num)))
        return cls(
            cls=tokenizer.cls_id,
            eos=tokenizer.eos_id,
            mask=tokenizer.mask_id,
            sop=tokenizer.sop_id,
            eop=tokenizer.eop_id,
            smask=getattr(tokenizer, "smask_id", None),
            gmask=getattr(tokenizer, "gmask_id", None),
            dblock=getattr(tokenizer, "dblock_id", None),
            sentence_end=sentence_end_table(strings),
        )

    def is_sentence_end(self, tokens: np.ndarray) -> np.ndarray:
        """Boolean array: which of `tokens` are sentence ends (ids outside the table are not)."""
        tokens = np.asarray(tokens)
        table = self.sentence_end
        inside = (tokens >= 0) & (tokens < len(table))
        out = np.zeros(tokens.shape, dtype=bool)
        out[inside] = table[tokens[inside]]
        return out


def sentence_end_table(token_strings: Sequence[str | None]) -> np.ndarray:
    """Boolean [len(token_strings)]: True where the token string contains a sentence-end character."""
    return np.array(
        [s is not None and any(ch in s for ch in SENTENCE_END_CHARS) for s in token_strings], dtype=bool
    )


@dataclass
class Row:
    """One laid-out sample. Logit i predicts targets[i] (no shift); Part A is tokens[:sep]."""

    tokens: np.ndarray  # int64 [T]
    targets: np.ndarray  # int64 [T]
    loss_mask: np.ndarray  # int64 [T], 0 on Part A
    position_ids: np.ndarray  # int64 [2, T]: positions, block positions
    sep: int
    spans: list[tuple[int, int]] = field(default_factory=list)  # Part-B order, indices into the input

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


# --------------------------------------------------------------------------------------------------------
# The deterministic core (spec C.4, C.6): layouts from given spans.


def collapsed_positions(length: int, spans: Iterable[tuple[int, int]]) -> np.ndarray:
    """Positions of the input tokens after every span collapses onto the position of its first token."""
    step = np.ones(length, dtype=np.int64)
    for start, end in spans:
        step[start + 1 : end] = 0
    return np.cumsum(step) - 1


def layout_blocks(
    tokens: Sequence[int] | np.ndarray,
    spans: Sequence[tuple[int, int]],
    mask_id: int,
    special: SpecialTokens,
    *,
    block_position_encoding: bool = True,
    dblock: np.ndarray | None = None,
) -> Row:
    """Part A / Part B layout of `tokens` with the given spans (spec C.4).

    Args:
        tokens: the sample, e.g. `[CLS] doc eos [CLS] doc eos ...`.
        spans: half-open `(start, end)` index ranges, **in Part-B order** (shuffle them before calling).
            Spans must not overlap; they may touch.
        mask_id: the id that replaces each span in Part A ([MASK], [sMASK] or [gMASK]).
        special: sop/eop/eos ids (and dblock when `dblock` is given).
        block_position_encoding: False gives block id 1 to every Part B token (ablation).
        dblock: optional bool array over the concatenated span tokens in Part-B order; True entries are
            replaced by [dBLOCK] in the Part B *inputs* (targets keep the real token).

    Returns:
        The Row: tokens = Part A ‖ Part B, targets, loss mask (1 on all of Part B), positions [2, T], sep.

    Raises:
        SpanError: a span is empty, out of range, overlaps another, or contains the eos token.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    n = tokens.shape[0]
    spans = [(int(s), int(e)) for s, e in spans]
    for start, end in spans:
        if not 0 <= start < end <= n:
            raise SpanError(f"span ({start}, {end}) is empty or outside the sample of length {n}")
    in_text_order = sorted(spans)
    for (_, end_a), (start_b, _) in pairwise(in_text_order):
        if start_b < end_a:
            raise SpanError(f"spans overlap: {in_text_order}")
    for start, end in spans:
        if np.any(tokens[start:end] == special.eos):
            raise SpanError(
                f"span ({start}, {end}) contains the end-of-document token {special.eos}; spans must lie "
                "inside one document"
            )
    positions = collapsed_positions(n, spans)

    # Part A: the text with each span replaced by one mask token; positions are the collapsed ones.
    keep = np.ones(n, dtype=bool)
    for start, end in spans:
        keep[start + 1 : end] = False
    part_a = tokens[keep].copy()
    pos_a = positions[keep]
    is_span_start = np.zeros(n, dtype=bool)
    for start, _ in spans:
        is_span_start[start] = True
    part_a[is_span_start[keep]] = mask_id
    sep = part_a.shape[0]

    # Part B: per span, [sop] + span as inputs and span + [eop] as targets, all at the mask's position.
    total = sum(e - s for s, e in spans)
    if dblock is not None and len(dblock) != total:
        raise SpanError(f"dblock mask has {len(dblock)} entries, the spans hold {total} tokens")
    b_in, b_tgt, b_pos, b_blk = [], [], [], []
    offset = 0
    for start, end in spans:
        length = end - start
        span_tokens = tokens[start:end]
        inputs = span_tokens.copy()
        if dblock is not None:
            inputs[np.asarray(dblock[offset : offset + length], dtype=bool)] = special.dblock
        offset += length
        b_in.append(np.concatenate(([special.sop], inputs)))
        b_tgt.append(np.concatenate((span_tokens, [special.eop])))
        b_pos.append(np.full(length + 1, positions[start], dtype=np.int64))
        if block_position_encoding:
            b_blk.append(np.arange(1, length + 2, dtype=np.int64))
        else:
            b_blk.append(np.ones(length + 1, dtype=np.int64))
    empty = np.zeros(0, dtype=np.int64)
    part_b = np.concatenate(b_in).astype(np.int64) if spans else empty
    out_tokens = np.concatenate((part_a, part_b))
    targets = np.concatenate((part_a, np.concatenate(b_tgt).astype(np.int64) if spans else empty))
    loss_mask = np.concatenate((np.zeros(sep, dtype=np.int64), np.ones(part_b.shape[0], dtype=np.int64)))
    pos = np.concatenate((pos_a, np.concatenate(b_pos) if spans else empty))
    blk = np.concatenate((np.zeros(sep, dtype=np.int64), np.concatenate(b_blk) if spans else empty))
    return Row(out_tokens, targets, loss_mask, np.stack((pos, blk)), sep, spans)  # positions: [2, T]


def layout_prefix_lm(
    tokens: Sequence[int] | np.ndarray,
    loss_mask: Sequence[int] | np.ndarray,
    generation_length: int,
    mask_id: int,
    special: SpecialTokens,
    *,
    block_position_encoding: bool = True,
) -> Row:
    """The suffix (prefix-LM) variant of document mode (spec C.6): the last G tokens become Part B.

    Returns a row of length len(tokens)+1 with no eop: tokens = source ‖ [gMASK] ‖ [sop] ‖ target[:-1],
    targets = source ‖ [gMASK] ‖ target, loss = the document loss mask on the target.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    loss_mask = np.asarray(loss_mask, dtype=np.int64)
    n = tokens.shape[0]
    if not 1 <= generation_length <= n - 1:
        raise SpanError(f"generation length {generation_length} must be in 1..{n - 1} for a sample of {n}")
    division = n - generation_length
    source, target = tokens[:division], tokens[division:]
    out_tokens = np.concatenate((source, [mask_id, special.sop], target[:-1]))
    targets = np.concatenate((source, [mask_id], target))
    out_loss = np.concatenate((np.zeros(division + 1, dtype=np.int64), loss_mask[division:]))
    pos = np.concatenate((np.arange(division + 1), np.full(generation_length, division))).astype(np.int64)
    if block_position_encoding:
        blk = np.concatenate((np.zeros(division + 1), np.arange(1, generation_length + 1)))
    else:
        # The official no-block-position branch builds this one element too long (I.12); ours fits.
        blk = np.concatenate((np.zeros(division + 1), np.ones(generation_length)))
    return Row(
        out_tokens, targets, out_loss, np.stack((pos, blk.astype(np.int64))), division + 1, [(division, n)]
    )


def layout_masked_lm(
    tokens: Sequence[int] | np.ndarray,
    loss_mask: Sequence[int] | np.ndarray,
    spans: Sequence[tuple[int, int]],
    mask_id: int,
) -> Row:
    """The masked-LM ablation: span tokens replaced by [MASK] in place, fully bidirectional (sep = T),
    targets are the original tokens, loss on the masked positions (times the document loss mask)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    n = tokens.shape[0]
    inputs = tokens.copy()
    masked = np.zeros(n, dtype=np.int64)
    for start, end in spans:
        inputs[start:end] = mask_id
        masked[start:end] = 1
    pos = np.stack((np.arange(n, dtype=np.int64), np.zeros(n, dtype=np.int64)))
    return Row(inputs, tokens.copy(), masked * np.asarray(loss_mask, dtype=np.int64), pos, n, list(spans))


# --------------------------------------------------------------------------------------------------------
# Span sampling (spec C.3, C.5).


def span_length_distribution(average: float = 3.0, max_length: int = 40) -> np.ndarray:
    """Probabilities of span lengths 1..max_length-1: Poisson(average) truncated and renormalised."""
    k = np.arange(1, max_length)
    log_pmf = k * math.log(average) - average - np.array([math.lgamma(x + 1) for x in k])
    pmf = np.exp(log_pmf)
    return pmf / pmf.sum()


def draw_span_lengths(rng: np.random.Generator, target: int, probs: np.ndarray) -> list[int]:
    """Span lengths drawn one at a time until their total reaches `target` (at least one span)."""
    lengths: list[int] = []
    total = 0
    mean = float(np.dot(np.arange(1, len(probs) + 1), probs))
    while True:
        # Draw in chunks for speed; the cut below keeps the one-at-a-time semantics.
        chunk = rng.choice(len(probs), size=max(4, int(1.5 * (target - total) / mean) + 2), p=probs) + 1
        cum = total + np.cumsum(chunk)
        hit = np.flatnonzero(cum >= target)
        if hit.size:
            lengths.extend(int(x) for x in chunk[: hit[0] + 1])
            return lengths
        lengths.extend(int(x) for x in chunk)
        total = int(cum[-1])


def documents(tokens: np.ndarray, special: SpecialTokens) -> list[tuple[int, int]]:
    """The usable `(offset, length)` range of every document of a packed sample (spec C.3).

    A document's range starts after its [CLS] and excludes its eos; a trailing document without eos
    also loses its last token (the official rule).
    """
    n = tokens.shape[0]
    bounds = [-1] + np.flatnonzero(tokens == special.eos).tolist()
    docs = []
    last = n
    for index in reversed(bounds):
        start = index
        if start + 1 < n and tokens[start + 1] == special.cls:
            start += 1
        length = last - start - 1
        if last == n and length > 0:
            length -= 1
        docs.append((start + 1, length))
        last = index
    return docs


def place_spans(
    rng: np.random.Generator, length: int, span_lengths: Sequence[int], offset: int = 0
) -> list[tuple[int, int]]:
    """Place spans uniformly inside a range of `length` tokens with >= 1 unmasked token between them.

    Stars and bars: k gap positions drawn i.i.d. from 0..length-S-k+1 and sorted. Spans keep the order
    of `span_lengths` from left to right.
    """
    k = len(span_lengths)
    room = length - sum(span_lengths) - k + 1
    if room < 0:
        raise SpanError(f"{k} spans of total {sum(span_lengths)} do not fit in {length} tokens")
    places = np.sort(rng.integers(0, room + 1, size=k))
    spans = []
    for place, span_length in zip(places.tolist(), span_lengths, strict=True):
        start = offset + place
        spans.append((start, start + span_length))
        offset += span_length + 1
    return spans


def sample_token_spans(
    rng: np.random.Generator,
    tokens: np.ndarray,
    span_lengths: Sequence[int],
    special: SpecialTokens,
    ratio: float,
) -> list[tuple[int, int]] | None:
    """Put the spans inside documents with per-document quotas (spec C.3); None when they do not all fit.

    Documents are visited shortest first. Each but the longest takes the longest prefix of the remaining
    (shuffled) lengths whose sum is <= floor(ratio * its length); the longest takes what fits with gaps.
    """
    lengths = [int(x) for x in rng.permutation(np.asarray(span_lengths, dtype=np.int64))]
    docs = sorted(documents(tokens, special), key=lambda d: d[1])
    spans: list[tuple[int, int]] = []
    used = 0
    for i, (offset, doc_len) in enumerate(docs):
        count, total = 0, 0
        if i == len(docs) - 1:
            # The longest document: one unmasked token between consecutive spans must also fit.
            while used + count < len(lengths) and lengths[used + count] + total + count <= doc_len:
                total += lengths[used + count]
                count += 1
        else:
            quota = int(doc_len * ratio)
            while used + count < len(lengths) and lengths[used + count] + total <= quota:
                total += lengths[used + count]
                count += 1
        if count:
            spans += place_spans(rng, doc_len, lengths[used : used + count], offset)
            used += count
    if used < len(lengths):
        return None
    return spans


def sentence_spans(tokens: np.ndarray, special: SpecialTokens) -> list[tuple[int, int]]:
    """Every sentence of a sample: maximal runs ending in a sentence-end token (spec C.5).

    A run starts after [CLS] (at index 0) or after the previous sentence end; an eos resets the start
    without emitting the unterminated run, so the next sentence may start on the following [CLS].
    """
    ends = special.is_sentence_end(tokens)
    spans = []
    last = 1 if tokens.shape[0] and tokens[0] == special.cls else 0
    for i in np.flatnonzero(ends | (tokens == special.eos)).tolist():
        if ends[i]:
            if last < i + 1:
                spans.append((last, i + 1))
        last = i + 1
    return spans


def split_short(
    rng: np.random.Generator,
    tokens: np.ndarray,
    loss_mask: np.ndarray,
    length: int,
    count: int,
    special: SpecialTokens,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The short-sequence rule (spec C.2.1): `count` random sentence-aligned pieces of `length` tokens,
    each with [CLS] re-prepended."""
    body, body_mask = tokens[1:], loss_mask[1:]
    boundary = special.is_sentence_end(body) | (body == special.eos)
    pieces = []
    for _ in range(count):
        if length >= body.shape[0]:
            start, end = 0, body.shape[0]
        else:
            start = int(rng.integers(0, body.shape[0] - length))
            # Move the start back to just after a sentence end (never onto an eos).
            while start > 0 and (body[start] == special.eos or not boundary[start - 1]):
                start -= 1
            end = start + length
            while end > start and not boundary[end - 1]:
                end -= 1
            if end - start < length // 2:
                end = start + length
        pieces.append(
            (
                np.concatenate(([special.cls], body[start:end])).astype(np.int64),
                np.concatenate(([0], body_mask[start:end])).astype(np.int64),
            )
        )
    return pieces


# --------------------------------------------------------------------------------------------------------
# The per-batch objective (spec C.2).


@dataclass
class BlockBatch:
    """The rows built from one batch of samples, before padding."""

    rows: list[Row]
    mode: str  # "token", "sentence", "document", or "mixed" with per_sample_mode
    modes: list[str]  # per row
    dropped: int = 0  # samples whose spans did not fit (spec C.3)
    split: bool = False  # the short-sequence rule fired
    generation_lengths: list[int] = field(default_factory=list)  # document rows: G per row
    variants: list[str] = field(default_factory=list)  # document rows: "suffix" or "infill"


class BlankInfilling:
    """Turns packed samples into GLM training rows (spec C.2-C.7).

    Args:
        config: the objective's probabilities and switches.
        special: token ids and the sentence-end table.
    """

    def __init__(self, config: ObjectiveConfig, special: SpecialTokens) -> None:
        self.config = config
        self.special = special
        self.span_probs = span_length_distribution(config.average_block_length, config.max_block_length)
        if config.task_mask and (special.smask is None or special.gmask is None):
            raise ValueError("ObjectiveConfig.task_mask needs a tokenizer with [sMASK] and [gMASK]")
        for knob in ("block_mask_prob", "context_mask_ratio"):
            if getattr(config, knob) > 0 and special.dblock is None:
                raise ValueError(f"ObjectiveConfig.{knob} > 0 needs a tokenizer with [dBLOCK]")
        self.sentence_mask = special.smask if config.task_mask else special.mask
        self.generation_mask = special.gmask if config.task_mask else special.mask

    def __call__(
        self,
        samples: Sequence[np.ndarray],
        rng: np.random.Generator,
        loss_masks: Sequence[np.ndarray] | None = None,
    ) -> BlockBatch:
        """Build the rows of one batch.

        Args:
            samples: token arrays, each `[CLS] doc eos [CLS] ...` as made by the sample assembly.
            rng: the batch's generator (the only source of randomness).
            loss_masks: per-sample document loss masks (default: 0 on [CLS], 1 elsewhere).

        Returns:
            A BlockBatch; dropped samples are counted, not returned.
        """
        cfg = self.config
        samples = [np.asarray(s, dtype=np.int64) for s in samples]
        if loss_masks is None:
            masks = [(s != self.special.cls).astype(np.int64) for s in samples]
        else:
            masks = [np.asarray(m, dtype=np.int64) for m in loss_masks]
        for i, s in enumerate(samples):
            if s.shape[0] < 3 or s[0] != self.special.cls:
                raise ValueError(
                    f"sample {i} must start with [CLS] ({self.special.cls}) and hold >= 3 tokens"
                )
        split = False
        if cfg.short_seq_prob > 0 and rng.random() < cfg.short_seq_prob:
            split = True
            seq = max(s.shape[0] for s in samples)
            lo = min(cfg.short_seq_min_length, seq - 2)
            length = int(rng.integers(lo, seq - 1)) if seq - 1 > lo else lo
            count = max(1, (seq - 1) // length)
            pieces = [
                p
                for s, m in zip(samples, masks, strict=True)
                for p in split_short(rng, s, m, length, count, self.special)
            ]
            samples = [p[0] for p in pieces]
            masks = [p[1] for p in pieces]
        single_span = cfg.single_span_prob > 0 and rng.random() < cfg.single_span_prob
        if single_span:
            modes = ["token"] * len(samples)
        elif cfg.per_sample_mode:
            modes = [self._draw_mode(rng) for _ in samples]
        else:
            modes = [self._draw_mode(rng)] * len(samples)
        batch = BlockBatch([], modes[0] if len(set(modes)) <= 1 else "mixed", [], split=split)

        doc_index = [i for i, m in enumerate(modes) if m == "document"]
        g_max_per_sample: dict[int, int] = {}
        if doc_index:
            if cfg.per_sample_mode:
                for i in doc_index:
                    g_max_per_sample[i] = self._draw_g_max(rng, [samples[i].shape[0]])
            else:
                g_max = self._draw_g_max(rng, [samples[i].shape[0] for i in doc_index])
                g_max_per_sample = dict.fromkeys(doc_index, g_max)

        for i, (tokens, mask, mode) in enumerate(zip(samples, masks, modes, strict=True)):
            if mode == "token":
                row = self._token_row(rng, tokens, mask, single_span)
            elif mode == "sentence":
                row = self._sentence_row(rng, tokens, mask)
            else:
                row = self._document_row(rng, tokens, mask, g_max_per_sample[i], batch)
            if row is None:
                batch.dropped += 1
                continue
            batch.rows.append(row)
            batch.modes.append(mode)
        return batch

    def _draw_mode(self, rng: np.random.Generator) -> str:
        r = rng.random()
        if r < self.config.bert_prob:
            return "token"
        if r < self.config.bert_prob + self.config.gap_sentence_prob:
            return "sentence"
        return "document"

    def _draw_g_max(self, rng: np.random.Generator, lengths: list[int]) -> int:
        low = int(self.config.gpt_min_ratio * min(lengths))
        high = max(lengths) - 2
        low = min(max(low, 1), high)
        return int(rng.integers(low, high + 1))

    def _shuffle(self, rng: np.random.Generator, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        if self.config.shuffle_blocks:
            return [spans[j] for j in rng.permutation(len(spans))]
        return sorted(spans)

    def _blocks(
        self,
        rng: np.random.Generator,
        tokens: np.ndarray,
        spans: list[tuple[int, int]],
        mask_id: int,
        token_mode: bool,
    ) -> Row:
        ordered = self._shuffle(rng, spans)
        if self.config.context_mask_ratio > 0:
            tokens = self._mask_context(rng, tokens, spans)
        dblock = None
        if token_mode and self.config.block_mask_prob > 0:
            total = sum(e - s for s, e in ordered)
            dblock = rng.random(total) < self.config.block_mask_prob
        row = layout_blocks(
            tokens,
            ordered,
            mask_id,
            self.special,
            block_position_encoding=self.config.block_position_encoding,
            dblock=dblock,
        )
        if self.config.random_position:
            last = int(row.position_ids[0].max(initial=0))
            if last < self.config.max_position - 1:
                row.position_ids[0] += int(rng.integers(0, self.config.max_position - last))
        return row

    def _mask_context(
        self, rng: np.random.Generator, tokens: np.ndarray, spans: list[tuple[int, int]]
    ) -> np.ndarray:
        """A copy of `tokens` with some neighbours of the spans replaced by [dBLOCK] (context_mask_ratio)."""
        n, reach = tokens.shape[0], self.config.context_mask_range
        near = np.zeros(n, dtype=bool)
        in_span = np.zeros(n, dtype=bool)
        for start, end in spans:
            near[max(0, start - reach) : min(n, end + reach)] = True
            in_span[start:end] = True
        near &= ~in_span & (tokens != self.special.cls) & (tokens != self.special.eos)
        chosen = near & (rng.random(n) < self.config.context_mask_ratio)
        out = tokens.copy()
        out[chosen] = self.special.dblock
        return out

    def _token_row(
        self, rng: np.random.Generator, tokens: np.ndarray, mask: np.ndarray, single_span: bool
    ) -> Row | None:
        if single_span:
            lengths = [int(rng.choice(len(self.span_probs), p=self.span_probs)) + 1]
        else:
            lengths = draw_span_lengths(rng, int(self.config.bert_ratio * tokens.shape[0]), self.span_probs)
        spans = sample_token_spans(rng, tokens, lengths, self.special, self.config.bert_ratio)
        if spans is None:
            return None
        if self.config.masked_lm:
            return layout_masked_lm(tokens, mask, spans, self.special.mask)
        return self._blocks(rng, tokens, spans, self.special.mask, token_mode=True)

    def _sentence_row(self, rng: np.random.Generator, tokens: np.ndarray, mask: np.ndarray) -> Row:
        sentences = sentence_spans(tokens, self.special)
        target = int(self.config.gap_sentence_ratio * tokens.shape[0])
        chosen, total = [], 0
        for j in rng.permutation(len(sentences)).tolist():
            chosen.append(sentences[j])
            total += sentences[j][1] - sentences[j][0]
            if total >= target:
                break
        if self.config.masked_lm:
            return layout_masked_lm(tokens, mask, chosen, self.sentence_mask)
        return self._blocks(rng, tokens, chosen, self.sentence_mask, token_mode=False)

    def _document_row(
        self, rng: np.random.Generator, tokens: np.ndarray, mask: np.ndarray, g_max: int, batch: BlockBatch
    ) -> Row | None:
        n = tokens.shape[0]
        g = min(g_max, n - 2)
        eos_at = np.flatnonzero(tokens == self.special.eos)
        multi_doc = eos_at.size > 0 and eos_at[0] != n - 1
        if multi_doc or rng.random() < self.config.gpt_suffix_prob:
            row = layout_prefix_lm(
                tokens,
                mask,
                g,
                self.generation_mask,
                self.special,
                block_position_encoding=self.config.block_position_encoding,
            )
            variant = "suffix"
        else:
            spans = sample_token_spans(rng, tokens, [g], self.special, self.config.bert_ratio)
            if spans is None:
                return None
            if self.config.masked_lm:
                row = layout_masked_lm(tokens, mask, spans, self.generation_mask)
            else:
                row = self._blocks(rng, tokens, spans, self.generation_mask, token_mode=False)
            variant = "infill"
        batch.generation_lengths.append(g)
        batch.variants.append(variant)
        return row


def pad_rows(rows: Sequence[Row], length: int | None = None, pad_id: int = 0) -> dict[str, np.ndarray]:
    """Right-pad rows to the longest (or `length`) as in spec C.7.

    Returns numpy arrays: input_ids [B,T], position_ids [B,2,T], sep [B], targets [B,T], loss_mask [B,T].
    Padding is `pad_id` in tokens and targets (0 officially) and 0 in positions and the loss mask.
    """
    width = max((len(r) for r in rows), default=0) if length is None else length
    b = len(rows)
    input_ids = np.full((b, width), pad_id, dtype=np.int64)
    targets = np.full((b, width), pad_id, dtype=np.int64)
    loss_mask = np.zeros((b, width), dtype=np.float32)
    position_ids = np.zeros((b, 2, width), dtype=np.int64)  # [B, 2, T]
    sep = np.zeros(b, dtype=np.int64)
    for i, row in enumerate(rows):
        t = len(row)
        if t > width:
            raise ValueError(f"row {i} has {t} tokens, more than the padded length {width}")
        input_ids[i, :t] = row.tokens
        targets[i, :t] = row.targets
        loss_mask[i, :t] = row.loss_mask
        position_ids[i, :, :t] = row.position_ids
        sep[i] = row.sep
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "sep": sep,
        "targets": targets,
        "loss_mask": loss_mask,
    }
